"""FREE's synchronized parallel decoding, batched (Bae et al., EMNLP 2023).

Per row: every token runs the shallow steps ``0..L_S-1``. A confident token (margin > threshold) is
emitted from the shallow exit and its layer-``L_S`` hidden state is pushed on the row's stack: its
deep steps are *deferred*. The next non-confident token runs the deep steps ``L_S..L-1`` once over
[stacked states + itself] in one causal pass, which fills the exact deep KV of every deferred token
and gives its own deep prediction. Across the batch, the deep pass runs only for the rows that need
it, as one ragged packed chunk (each row a different number of tokens and its own deep cache length).

The same pass yields, for every deferred token, (its shallow confidence, shallow argmax == deep
argmax): the calibration pairs of the adaptive threshold (``threshold.AdaptiveThreshold``), refitted
at the start of each generation and whenever a sequence finishes (a new sample starts).

A row that finishes with a non-empty stack leaves without running its deferred deep steps: no later
token of that generation reads them.
"""
from __future__ import annotations

import torch

from ..engine.policy import Decision, DepthPolicy, SubStep, run_steps
from ..engine.trace import IDLE
from ..models.cache import Chunk
from .decoding import exit_confidence, exit_logits
from .threshold import AdaptiveThreshold


class FreeDecoding(DepthPolicy):
    """``threshold``: a fixed margin threshold, or an ``AdaptiveThreshold`` fitted online."""

    def __init__(self, shallow_layer: int, threshold: float | AdaptiveThreshold = 0.9, heads=None,
                 measure: str = "margin", calibrate: bool = False):
        """``calibrate``: collect the calibration pairs (``self.pairs``) with a fixed threshold too; it costs
        one more LM-head call per deferred token (the adaptive threshold always collects them)."""
        self.shallow_layer, self.heads, self.measure = shallow_layer, heads, measure
        self.calibrate = calibrate or isinstance(threshold, AdaptiveThreshold)
        self.adaptive = threshold if isinstance(threshold, AdaptiveThreshold) else None
        self.fixed = None if self.adaptive else float(threshold)
        self.name = "free_adaptive" if self.adaptive else "free"

    @property
    def threshold(self) -> float:
        return self.adaptive.threshold if self.adaptive else self.fixed

    def begin(self, model, batch_size: int) -> None:
        if not 0 < self.shallow_layer < model.num_steps:
            raise ValueError(f"shallow_layer must be in 1..{model.num_steps - 1}, got {self.shallow_layer}")
        self.model = model
        self.stacks: list[list[tuple[torch.Tensor, float, int]]] = [[] for _ in range(batch_size)]
        self.pairs: list[tuple[float, bool]] = []  # every calibration pair seen (for plots)
        if self.adaptive:
            self.adaptive.refit()

    def keep_rows(self, rows: list[int]) -> None:
        self.stacks = [self.stacks[r] for r in rows]
        if self.adaptive:
            self.adaptive.refit()  # a sequence finished: the next sample starts with a refitted threshold

    def decode(self, x, lengths, cache, t, record=False) -> Decision:
        model, ls, L, n = self.model, self.shallow_layer, self.model.num_steps, len(x)
        chunk = Chunk.decode(lengths)
        h, _ = run_steps(model, x, range(ls), cache, chunk)
        conf, shallow = exit_confidence(model, self.heads, h, ls, self.measure)
        confident = (conf > self.threshold).tolist()
        sure = [r for r in range(n) if confident[r]]
        deep_rows = [r for r in range(n) if not confident[r]]
        logits = torch.empty(n, model.config.vocab_size, device=x.device, dtype=h.dtype)
        if sure:
            logits[sure] = shallow[sure] if shallow is not None else exit_logits(model, self.heads, h[sure], ls)
        substeps = [SubStep("shallow", ["shallow"] * n, n)]
        if deep_rows:
            deep_logits, tokens = self._deep_pass(deep_rows, h, lengths, cache)
            logits[deep_rows] = deep_logits.to(logits.dtype)
            substeps.append(SubStep("deep", ["deep" if r in set(deep_rows) else IDLE for r in range(n)], tokens))
        shallow_top1 = logits.argmax(-1).tolist()
        for r in sure:
            self.stacks[r].append((h[r], float(conf[r]), shallow_top1[r]))
        steps = [list(range(ls)) if c else list(range(L)) for c in confident]
        return Decision(logits, steps, confident, substeps)

    def _deep_pass(self, rows: list[int], h: torch.Tensor, lengths: torch.Tensor, cache):
        """Deep steps over [deferred tokens + current token] of each row in ``rows``, one ragged chunk."""
        model, ls = self.model, self.shallow_layer
        counts = torch.zeros_like(lengths)
        states = []
        for r in rows:
            states += [s for s, _, _ in self.stacks[r]] + [h[r]]
            counts[r] = len(self.stacks[r]) + 1
        starts = lengths + 1 - counts  # the oldest deferred token's slot (rows without a pass: unused)
        chunk = Chunk.build(torch.where(counts > 0, starts, lengths), counts)
        hd, _ = run_steps(model, torch.stack(states), range(ls, model.num_steps), cache, chunk)
        last = counts[rows].cumsum(0) - 1
        deep_logits = model.head(hd[last])
        deferred = [i for i in range(len(states)) if i not in set(last.tolist())]
        if deferred and self.calibrate:
            deep_top1 = model.head(hd[deferred]).argmax(-1).tolist()
            flat = [item for r in rows for item in self.stacks[r]]
            pairs = [(c, tok == d) for (_, c, tok), d in zip(flat, deep_top1)]
            self.pairs += pairs
            if self.adaptive:
                self.adaptive.observe([c for c, _ in pairs], [ok for _, ok in pairs])
        for r in rows:
            self.stacks[r] = []
        return deep_logits, len(states)

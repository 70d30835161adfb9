"""FREE's synchronized parallel decoding, batched (Bae et al., EMNLP 2023).

Per row: every token runs the shallow steps ``0..L_S-1``. A confident token (confidence > threshold)
is emitted from the shallow exit and its layer-``L_S`` hidden state is pushed on the row's stack: its
deep steps are *deferred*. The next unsure token runs the deep steps ``L_S..L-1`` once over [stacked
states + itself] in one causal pass, which fills the exact deep KV of every deferred token (the
cache's per-step lengths put them at their own slots) and gives its own deep prediction. Across the
batch the deep pass runs only for the rows that need it, as one ragged packed chunk.

The same pass yields, for every deferred token, (its shallow confidence, shallow argmax == deep
argmax): the calibration pairs of the adaptive threshold (``threshold.AdaptiveThreshold``), refitted
at the start of each run and whenever a sequence finishes (a new sample starts). The pairs come only
from deferred tokens, i.e. from a sample truncated at the threshold: the fit sees no token the
current threshold sent deep.

A row that finishes with a non-empty stack leaves without running its deferred deep steps: no later
token of that sequence reads them.
"""
from __future__ import annotations

import torch

from ...early_exit.confidence import exits
from ...early_exit.threshold import AdaptiveThreshold
from ..tokens import Tokens
from .base import DepthPolicy, Exit
from .exits import ExitBlocks, check_exit, exit_confidence, exit_logits


class FreeDecoding(DepthPolicy):
    """``threshold``: a fixed confidence threshold, or an ``AdaptiveThreshold`` fitted online."""

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

    def bind(self, model, rows, capacity):
        check_exit("shallow_layer", self.shallow_layer, model)
        self.model, ls, d = model, self.shallow_layer, model.config.hidden_size
        self.segments, self.finish = [range(ls), range(ls, model.num_steps)], range(model.num_steps, model.num_steps)
        self.labels = ["shallow", "deep"]
        self.blocks = ExitBlocks(model, self.heads, [ls])
        device = model.device
        # The stacks, as tensors: row r holds its deferred tokens' state, confidence, shallow argmax, position.
        self.stack_h = torch.zeros(rows, capacity, d, device=device, dtype=model.dtype)
        self.stack_conf = torch.zeros(rows, capacity, device=device)
        self.stack_top1 = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.stack_pos = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.stack_n = torch.zeros(rows, dtype=torch.long, device=device)
        self.pairs: list[tuple[float, bool]] = []  # every calibration pair seen (for plots)
        if self.adaptive:
            self.adaptive.refit()
        return self

    def extra_pages(self):
        return len(self.blocks)

    def admit(self, rows):
        self.stack_n[rows] = 0

    def release(self, rows):
        self.stack_n[rows] = 0
        if self.adaptive:
            self.adaptive.refit()  # a sequence finished: the next sample starts with a refitted threshold

    def decide(self, tokens, h, ctx):
        self.blocks.run(tokens, h, ~ctx.final, self.shallow_layer, ctx)  # prompt tokens fill its KV too
        decoding = ~tokens.prefill & ~ctx.final
        if not bool(decoding.any()):
            return None
        rows = decoding.nonzero().squeeze(1)
        adapted = self.blocks.adapted(tokens, rows, self.shallow_layer)
        conf, shallow = exit_confidence(self.model, self.heads, h[rows], self.shallow_layer, self.measure, ctx,
                                        adapted=adapted)
        sure = exits(conf, self.threshold)
        leave = torch.zeros_like(decoding)
        leave[rows] = sure
        logits = None
        if shallow is not None:
            logits = shallow.new_zeros(len(tokens), shallow.shape[-1])
            logits[rows] = shallow
        elif bool(sure.any()):
            logits = h.new_zeros(len(tokens), self.model.config.vocab_size)
            logits[rows[sure]] = exit_logits(self.model, self.heads, h[rows[sure]], self.shallow_layer,
                                             None if adapted is None else adapted[sure])
        # Confident tokens are deferred: push (state, confidence, shallow argmax, position) on their row's stack.
        pushed = rows[sure]
        if len(pushed):
            r, n = tokens.row[pushed], self.stack_n[tokens.row[pushed]]
            self.stack_h[r, n] = h[pushed]
            self.stack_conf[r, n] = conf[sure].float()
            self.stack_top1[r, n] = logits[pushed].argmax(-1)
            self.stack_pos[r, n] = tokens.pos[pushed]
            self.stack_n[r] += 1
        # Unsure tokens go deep, and take their row's deferred tokens with them.
        extra = self._pop(tokens.row[rows[~sure]])
        return Exit(leave=leave, logits=logits, propagate=torch.zeros_like(leave), deferred=leave.clone(), extra=extra)

    def _pop(self, rows: torch.Tensor) -> Tokens | None:
        counts = self.stack_n[rows]
        if len(rows) == 0 or int(counts.sum()) == 0:
            return None
        row_of = torch.repeat_interleave(rows, counts)
        slot = torch.arange(len(row_of), device=rows.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        flag = torch.zeros(len(row_of), dtype=torch.bool, device=rows.device)
        out = Tokens(row=row_of, pos=self.stack_pos[row_of, slot], seg=torch.ones_like(row_of),
                     h=self.stack_h[row_of, slot], emit=flag, head=torch.full_like(flag, self.calibrate),
                     prefill=flag, deferred=flag.clone(),
                     extra={"free_conf": self.stack_conf[row_of, slot], "free_top1": self.stack_top1[row_of, slot]})
        self.stack_n[rows] = 0
        return out

    def head_input(self, tokens, h):
        return self.blocks.head_input(tokens, h, [(0, self.shallow_layer)])

    def observe(self, tokens, logits, ctx):
        if not self.calibrate or "free_conf" not in tokens.extra:
            return
        caught_up = ~tokens.emit & ~tokens.prefill
        if not bool(caught_up.any()):
            return
        deep_top1 = logits[caught_up].argmax(-1)
        conf = tokens.extra["free_conf"][caught_up].tolist()
        right = (deep_top1 == tokens.extra["free_top1"][caught_up]).tolist()
        self.pairs += list(zip(conf, right))
        if self.adaptive:
            self.adaptive.observe(conf, right)

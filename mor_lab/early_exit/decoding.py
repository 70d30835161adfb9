"""Batched early-exit decoding with a correct KV cache: static exit and CALM (batch or per row).

A token that exits after ``e`` depth steps still needs keys/values at steps ``e..L-1`` for the tokens
after it. CALM's fix, state propagation, is used throughout: the exited hidden state is copied
upward and each skipped layer computes only its K/V from it (norm + two projections, ~6% of a layer).

CALM semantics: in the paper's batched setting the batch leaves an exit point only when *every* row
is confident (``per_row=False``), so one hard token holds the whole batch. ``per_row=True`` lets each
row leave on its own: the remaining rows continue as a smaller packed batch.

``propagate_state=False`` leaves the skipped steps' cache slots empty (zeros): the "missing KV"
problem made visible, for teaching; later tokens then attend to holes.
"""
from __future__ import annotations

import torch

from ..engine.policy import Decision, DepthPolicy, SubStep, propagate, run_steps, subset_chunk
from ..engine.trace import IDLE
from ..models.cache import Chunk
from .confidence import MEASURES, calm_threshold, confidence


def exit_logits(model, heads, h: torch.Tensor, exit_layer: int) -> torch.Tensor:
    """Logits at an exit point: the shared final norm + LM head, through a trained adapter if given."""
    return model.head(h) if heads is None else heads.logits(model, h, exit_layer)


def _classifier(heads, exit_layer: int):
    return None if heads is None else heads.meta[str(exit_layer)]


def exit_confidence(model, heads, h: torch.Tensor, exit_layer: int, measure: str, prev_hidden=None):
    """(confidence, exit logits or None). The logits are computed only when the measure reads them
    (softmax, margin): with a hidden-state measure (meta, state) tokens that continue never pay for the
    LM head at the exit, which on a small model costs as much as several layers."""
    if measure in ("softmax", "margin"):
        logits = exit_logits(model, heads, h, exit_layer)
        return confidence(measure, logits=logits), logits
    return confidence(measure, hidden=h, prev_hidden=prev_hidden, classifier=_classifier(heads, exit_layer)), None


class StaticExit(DepthPolicy):
    """Every token exits after ``exit_layer`` steps; the deeper KV comes from state propagation."""

    name = "static"

    def __init__(self, exit_layer: int, heads=None, propagate_state: bool = True):
        self.exit_layer, self.heads, self.propagate_state = exit_layer, heads, propagate_state

    def begin(self, model, batch_size: int) -> None:
        if not 0 < self.exit_layer <= model.num_steps:
            raise ValueError(f"exit_layer must be in 1..{model.num_steps}, got {self.exit_layer}")
        self.model = model

    def decode(self, x, lengths, cache, t, record=False) -> Decision:
        model, e = self.model, self.exit_layer
        chunk = Chunk.decode(lengths)
        rope = model.rope(chunk.positions)
        h, _ = run_steps(model, x, range(e), cache, chunk, rope)
        if self.propagate_state:
            propagate(model, h, range(e, model.num_steps), cache, chunk, rope)
        n = len(x)
        return Decision(exit_logits(model, self.heads, h, e), [list(range(e))] * n, None,
                        [SubStep(f"exit {e}", [f"exit {e}"] * n, n)])


class CalmExit(DepthPolicy):
    """CALM: test confidence at each exit point; exit when it reaches the (decaying) threshold.

    ``exit_layers``: numbers of steps after which a token may exit (e.g. ``[4, 8, 12, ...]``).
    ``decay_max_len``: with a value, the threshold decays over the output as in CALM (``calm_threshold``).
    """

    def __init__(self, threshold: float, exit_layers, measure: str = "softmax", per_row: bool = False,
                 heads=None, decay_max_len: int | None = None, propagate_state: bool = True):
        if measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {measure!r}; allowed: {', '.join(MEASURES)}")
        self.threshold, self.measure, self.per_row = threshold, measure, per_row
        self.exit_layers, self.heads, self.decay_max_len = sorted(set(exit_layers)), heads, decay_max_len
        self.propagate_state = propagate_state
        self.name = "calm_per_row" if per_row else "calm"

    def begin(self, model, batch_size: int) -> None:
        if not self.exit_layers or self.exit_layers[0] < 1 or self.exit_layers[-1] >= model.num_steps:
            raise ValueError(f"exit_layers must lie in 1..{model.num_steps - 1}, got {self.exit_layers}")
        self.model = model

    def decode(self, x, lengths, cache, t, record=False) -> Decision:
        model, L, n = self.model, self.model.num_steps, len(x)
        tau = self.threshold if self.decay_max_len is None else calm_threshold(self.threshold, t, self.decay_max_len)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        logits = torch.empty(n, model.config.vocab_size, device=x.device, dtype=x.dtype)
        exit_at = [L] * n
        h, prev, done, substeps = x, x, 0, []
        for e in self.exit_layers + [L]:
            chunk = subset_chunk(lengths, active)
            rope = model.rope(chunk.positions)
            h, _ = run_steps(model, h, range(done, e), cache, chunk, rope)
            rows = active.nonzero().squeeze(1)
            substeps.append(SubStep(f"layers {done}-{e - 1}", ["run" if a else IDLE for a in active.tolist()],
                                    len(rows)))
            done = e
            if e == L:
                logits[rows] = model.head(h)
                break
            conf, lg = exit_confidence(model, self.heads, h, e, self.measure, prev)
            ok = conf >= tau
            if not self.per_row:
                ok = ok.all().expand_as(ok)
            if ok.any():
                leaving = rows[ok]
                logits[leaving] = lg[ok] if lg is not None else exit_logits(model, self.heads, h[ok], e)
                for r in leaving.tolist():
                    exit_at[r] = e
                gone = torch.zeros_like(active)
                gone[leaving] = True
                if self.propagate_state:
                    out = subset_chunk(lengths, gone)
                    propagate(model, h[ok], range(e, L), cache, out, model.rope(out.positions))
                active &= ~gone
                h = h[~ok]
                if not active.any():
                    break
            prev = h
        return Decision(logits, [list(range(e)) for e in exit_at], None, substeps)

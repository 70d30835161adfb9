"""Early exit on a vanilla plan: a static exit, and CALM's confidence-based exits (batch or per row).

A token that exits after ``e`` depth steps still needs keys/values at steps ``e..L-1`` for the tokens
after it. CALM's fix, state propagation, is the default: the exited hidden state is copied upward and
each skipped layer computes only its K/V from it (norm + two projections, ~6% of a layer), batched per
layer over every token that left in the same pass.

CALM semantics: in the paper's batched setting the batch leaves an exit point only when *every* token
there is confident (``per_row=False``), so one hard token holds the whole batch; ``per_row=True`` lets
each row leave on its own. ``propagate_state=False`` leaves the skipped steps' cache slots empty: the
"missing KV" problem made visible, for teaching; later tokens then attend to holes.

Prompt tokens always run every layer, so every layer's KV exists for the prompt.
"""
from __future__ import annotations

import torch

from ...early_exit.confidence import calm_threshold, canonical_measure, confidence, exits
from ..tokens import Tokens
from .base import Context, DepthPolicy, Exit

LOGIT_MEASURES = ("softmax_max", "softmax_diff")  # the measures that read the exit's logits (an LM-head call)


def exit_logits(model, heads, h: torch.Tensor, exit_layer: int) -> torch.Tensor:
    """Logits at an exit point: the shared final norm + LM head, through a trained adapter if given."""
    return model.head(h if heads is None else heads.adapt(h, exit_layer))


def exit_confidence(model, heads, h, exit_layer: int, measure: str, ctx: Context, prev_hidden=None):
    """(confidence, exit logits or None), the test logged as a pass. The logits are computed only when the
    measure reads them (softmax, margin): with a hidden-state measure (meta, state) tokens that continue
    never pay for the LM head at the exit, which on a small model costs as much as several layers."""
    if canonical_measure(measure) in LOGIT_MEASURES:
        logits = exit_logits(model, heads, h, exit_layer)
        ctx.log("test", len(h))
        return confidence(measure, logits=logits), logits
    classifier = None if heads is None else heads.meta[str(exit_layer)]
    if measure == "meta" and classifier is None:
        raise ValueError("the 'meta' measure needs trained exit heads (heads=...) with a meta classifier")
    ctx.log("classifier", len(h))
    return confidence(measure, hidden=h, prev_hidden=prev_hidden, classifier=classifier), None


def check_exit(name: str, exit_layer: int, model) -> None:
    if not isinstance(exit_layer, int) or not 0 < exit_layer < model.num_steps:
        raise ValueError(f"{name} must be in 1..{model.num_steps - 1} (depth steps before the exit), got {exit_layer!r}")


class StaticExit(DepthPolicy):
    """Every generated token exits after ``exit_layer`` steps; the deeper KV comes from state propagation."""

    name = "static"

    def __init__(self, exit_layer: int, heads=None, propagate_state: bool = True):
        self.exit_layer, self.heads, self.propagate = exit_layer, heads, propagate_state

    def bind(self, model, rows, capacity):
        if self.exit_layer == model.num_steps:  # exiting after the last layer is the full model
            return DepthPolicy.bind(self, model, rows, capacity)
        check_exit("exit_layer", self.exit_layer, model)
        self.model, e = model, self.exit_layer
        self.segments, self.finish = [range(e), range(e, model.num_steps)], range(model.num_steps, model.num_steps)
        self.labels = [f"exit {e}", "prefill"]
        return self

    def decide(self, tokens, h, ctx):
        return Exit(leave=~tokens.prefill)

    def head_input(self, tokens, h):
        if self.heads is None or len(self.segments) == 1:
            return h
        out = h.clone()
        early = tokens.seg == 0
        if bool(early.any()):
            out[early] = self.heads.adapt(h[early], self.exit_layer)
        return out


class CalmExit(DepthPolicy):
    """CALM: test confidence at each exit point; exit when it exceeds the (decaying) threshold.

    ``exit_layers``: numbers of steps after which a token may exit (e.g. ``[4, 8, 12, ...]``).
    ``decay_max_len``: with a value, the threshold decays over the output as in CALM (``calm_threshold``,
    at the 1-based index of the generated token, as the reference passes it). The rule is the
    reference's strict ``confidence > threshold`` (``exits``; ``inclusive=True``: t5x's ``>=``), and no
    token exits before ``min_layer`` steps (FREE's ``exit_min_layer``).
    """

    def __init__(self, threshold: float, exit_layers, measure: str = "softmax", per_row: bool = False,
                 heads=None, decay_max_len: int | None = None, propagate_state: bool = True,
                 inclusive: bool = False, min_layer: int | None = None, decay_form: str = "free"):
        canonical_measure(measure)  # a clear error for an unknown name
        self.inclusive, self.min_layer, self.decay_form = inclusive, min_layer, decay_form
        self.threshold, self.measure, self.per_row = threshold, measure, per_row
        self.exit_layers, self.heads, self.decay_max_len = sorted(set(exit_layers)), heads, decay_max_len
        self.propagate = propagate_state
        self.name = "calm_per_row" if per_row else "calm"

    def bind(self, model, rows, capacity):
        if not self.exit_layers or self.exit_layers[0] < 1 or self.exit_layers[-1] >= model.num_steps:
            raise ValueError(f"exit_layers must lie in 1..{model.num_steps - 1}, got {self.exit_layers}")
        self.model = model
        bounds = [0] + self.exit_layers + [model.num_steps]
        self.segments = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        self.finish = range(model.num_steps, model.num_steps)
        self.labels = [f"layers {s.start}-{s.stop - 1}" for s in self.segments]
        return self

    def tau(self, tokens: Tokens, ctx: Context) -> torch.Tensor | float:
        if self.decay_max_len is None:
            return self.threshold
        return torch.tensor([calm_threshold(self.threshold, k + 1, self.decay_max_len, form=self.decay_form)
                             for k in ctx.index.tolist()],
                            device=tokens.h.device)

    def decide(self, tokens, h, ctx):
        decoding = ~tokens.prefill & ~ctx.final
        if not bool(decoding.any()):
            return None
        leave = torch.zeros_like(decoding)
        full = None
        tau = self.tau(tokens, ctx)
        prev = tokens.extra.get("prev_exit_h")
        for seg in torch.unique(tokens.seg[decoding]).tolist():  # one exit point per pass on a vanilla plan
            rows = (decoding & (tokens.seg == seg)).nonzero().squeeze(1)
            e = self.segments[seg].stop
            conf, logits = exit_confidence(self.model, self.heads, h[rows], e, self.measure, ctx,
                                           None if prev is None else prev[rows])
            ok = exits(conf, tau[rows] if isinstance(tau, torch.Tensor) else tau, inclusive=self.inclusive,
                       layer=e, min_layer=self.min_layer)
            if not self.per_row:
                ok = ok.all().expand_as(ok)
            leave[rows] = ok
            if logits is not None:
                full = logits.new_zeros(len(tokens), logits.shape[-1]) if full is None else full
                full[rows] = logits
        if self.measure == "state":
            tokens.extra["prev_exit_h"] = h.clone()
        return Exit(leave=leave, logits=full)

    def combine(self, tokens, h_in, h_out, ctx):
        if self.measure == "state" and "prev_exit_h" not in tokens.extra:
            tokens.extra["prev_exit_h"] = h_in.clone()  # the first exit compares with the token's embedding
        return h_out

    def head_input(self, tokens, h):
        if self.heads is None:
            return h
        out = h.clone()
        for seg, segment in enumerate(self.segments[:-1]):
            here = tokens.seg == seg
            if bool(here.any()):
                out[here] = self.heads.adapt(h[here], segment.stop)
        return out


EARLY_EXIT_METHODS = ("full", "static", "calm", "calm_per_row", "free", "free_adaptive")


def early_exit_policy(method: str, shallow_layer: int, threshold: float, heads=None, measure: str = "margin"):
    """One exit after ``shallow_layer`` steps, by name: ``full``, ``static``, ``calm`` (batch semantics),
    ``calm_per_row``, ``free`` (fixed threshold) or ``free_adaptive`` (the Beta-mixture threshold)."""
    from ...early_exit.threshold import AdaptiveThreshold
    from .free import FreeDecoding
    if method == "full":
        return DepthPolicy()
    if method == "static":
        return StaticExit(shallow_layer, heads)
    if method in ("calm", "calm_per_row"):
        return CalmExit(threshold, [shallow_layer], measure=measure, per_row=method == "calm_per_row", heads=heads)
    if method == "free":
        return FreeDecoding(shallow_layer, threshold, heads, measure=measure)
    if method == "free_adaptive":
        return FreeDecoding(shallow_layer, AdaptiveThreshold(), heads, measure=measure)
    raise ValueError(f"unknown early-exit method {method!r}; allowed: {', '.join(EARLY_EXIT_METHODS)}")

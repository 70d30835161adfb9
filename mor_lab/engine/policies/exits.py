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

Exit blocks (``ExitConfig(adapter="block")``): the exit after ``e`` steps reads a decoder layer of its
own, which attends over the earlier tokens' exit states, so it keeps a KV page of its own (page
``model.num_steps + i`` for the i-th exit with a block, from ``extra_pages``). Every token that reaches
the exit, prompt and deep-going tokens included, runs the block there once, in order (``ExitBlocks.run``),
which writes its KV; a token that left at an earlier exit fills a later exit's page by state
propagation from its exited state, as the skipped layers do (the block's K/V depend only on its input).
"""
from __future__ import annotations

import torch

from ...early_exit.confidence import calm_threshold, canonical_measure, confidence, exits
from ..tokens import Tokens
from .base import Context, DepthPolicy, Exit

LOGIT_MEASURES = ("softmax_max", "softmax_diff")  # the measures that read the exit's logits (an LM-head call)


def exit_logits(model, heads, h: torch.Tensor, exit_layer: int, adapted: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at an exit point: the shared final norm + LM head, through a trained adapter if given
    (``adapted``: the exit block's output, already computed by ``ExitBlocks.run``)."""
    if adapted is not None:
        return model.head(adapted)
    return model.head(h if heads is None else heads.adapt(h, exit_layer))


def exit_confidence(model, heads, h, exit_layer: int, measure: str, ctx: Context, prev_hidden=None,
                    adapted: torch.Tensor | None = None):
    """(confidence, exit logits or None), the test logged as a pass. The logits are computed only when the
    measure reads them (softmax, margin): with a hidden-state measure (meta, state) tokens that continue
    never pay for the LM head at the exit, which on a small model costs as much as several layers."""
    if canonical_measure(measure) in LOGIT_MEASURES:
        logits = exit_logits(model, heads, h, exit_layer, adapted)
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


class ExitBlocks:
    """The exit blocks of a policy's exits (none unless ``heads`` has ``adapter="block"``) and their KV pages.

    The block's output of each token that reached an exit travels in ``tokens.extra["exit_h"]``: the
    exit test and the head call read it instead of an adapter applied to the hidden state."""

    def __init__(self, model, heads, exit_layers: list[int]):
        attends = heads is not None and getattr(heads, "attends", False)
        if attends:
            heads.check(model)
            missing = [e for e in exit_layers if e not in heads.exit_layers]
            if missing:
                raise ValueError(f"the exit heads have no block after {missing} steps; exits: {heads.exit_layers}")
        self.heads = heads
        self.page = {e: model.num_steps + i for i, e in enumerate(exit_layers)} if attends else {}

    def __len__(self) -> int:
        return len(self.page)

    def run(self, tokens: Tokens, h: torch.Tensor, at: torch.Tensor, exit_layer: int, ctx: Context) -> None:
        """Tokens ``at`` (bool) reached the exit after ``exit_layer`` steps: run its block on them (all of
        them, so its KV page has every token) and keep the output in ``extra["exit_h"]``."""
        if exit_layer not in self.page or not bool(at.any()):
            return
        rows = at.nonzero().squeeze(1)
        out = ctx.side_layer(self.heads.block(exit_layer), self.page[exit_layer], tokens.select(rows), h[rows])
        if "exit_h" not in tokens.extra:
            tokens.extra["exit_h"] = torch.zeros_like(h)
        tokens.extra["exit_h"][rows] = out

    def adapted(self, tokens: Tokens, rows: torch.Tensor, exit_layer: int) -> torch.Tensor | None:
        """The block outputs of ``rows`` (None when this exit has no block)."""
        return tokens.extra["exit_h"][rows] if exit_layer in self.page else None

    def propagate(self, tokens: Tokens, exit_layer: int, ctx: Context) -> None:
        """State propagation into the pages of the blocks after ``exit_layer`` steps for tokens that left
        there: their exited state is each later block's input (the block's output is not used)."""
        for e, page in self.page.items():
            if e > exit_layer:
                ctx.side_layer(self.heads.block(e), page, tokens, tokens.h)

    def head_input(self, tokens: Tokens, h: torch.Tensor, exits: list[tuple[int, int]]) -> torch.Tensor:
        """``h``, with each token that left at exit ``(seg, exit_layer)`` replaced by its adapter's output."""
        heads = self.heads
        if heads is None:
            return h
        out = None
        for seg, e in exits:
            here = tokens.seg == seg
            if bool(here.any()):
                out = h.clone() if out is None else out
                out[here] = tokens.extra["exit_h"][here] if e in self.page else heads.adapt(h[here], e)
        return h if out is None else out


class StaticExit(DepthPolicy):
    """Every generated token exits after ``exit_layer`` steps; the deeper KV comes from state propagation."""

    name = "static"

    def __init__(self, exit_layer: int, heads=None, propagate_state: bool = True):
        self.exit_layer, self.heads, self.propagate = exit_layer, heads, propagate_state

    def bind(self, model, rows, capacity):
        if self.exit_layer == model.num_steps:  # exiting after the last layer is the full model
            self.blocks = ExitBlocks(model, None, [])
            return DepthPolicy.bind(self, model, rows, capacity)
        check_exit("exit_layer", self.exit_layer, model)
        self.model, e = model, self.exit_layer
        self.segments, self.finish = [range(e), range(e, model.num_steps)], range(model.num_steps, model.num_steps)
        self.labels = [f"exit {e}", "prefill"]
        self.blocks = ExitBlocks(model, self.heads, [e])
        return self

    def extra_pages(self):
        return len(self.blocks)

    def decide(self, tokens, h, ctx):
        self.blocks.run(tokens, h, tokens.seg == 0, self.exit_layer, ctx)
        return Exit(leave=~tokens.prefill)

    def head_input(self, tokens, h):
        if len(self.segments) == 1:
            return h
        return self.blocks.head_input(tokens, h, [(0, self.exit_layer)])


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
        self.blocks = ExitBlocks(model, self.heads, self.exit_layers)
        return self

    def extra_pages(self):
        return len(self.blocks)

    def tau(self, tokens: Tokens, ctx: Context) -> torch.Tensor | float:
        if self.decay_max_len is None:
            return self.threshold
        return torch.tensor([calm_threshold(self.threshold, k + 1, self.decay_max_len, form=self.decay_form)
                             for k in ctx.index.tolist()],
                            device=tokens.h.device)

    def decide(self, tokens, h, ctx):
        for seg in torch.unique(tokens.seg[~ctx.final]).tolist() if len(self.blocks) else ():
            self.blocks.run(tokens, h, (tokens.seg == seg) & ~ctx.final, self.segments[seg].stop, ctx)  # all of them
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
                                           None if prev is None else prev[rows], self.blocks.adapted(tokens, rows, e))
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

    def left(self, tokens, ctx):
        if self.propagate and len(self.blocks):
            for seg in torch.unique(tokens.seg).tolist():
                if seg < len(self.segments) - 1:
                    self.blocks.propagate(tokens.select(tokens.seg == seg), self.segments[seg].stop, ctx)

    def head_input(self, tokens, h):
        return self.blocks.head_input(tokens, h, [(seg, s.stop) for seg, s in enumerate(self.segments[:-1])])


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

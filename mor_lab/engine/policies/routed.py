"""Mixture-of-Recursions at decode time: the routers decide, token by token, how many loops to run.

Expert-choice: before each loop the loop's router scores the token; training picks the top
``capacity_r`` of the sequence, which looks at the future, so decoding uses the causal rule the
auxiliary loss trains (``router.decide``: logit > threshold). The loop's output is gated,
``h + g * Block(h)``. Token-choice: one router, applied after the prelude, picks each token's depth up
front; after its last loop the token's state is ``x + g * h``. Prompt tokens are routed the same way,
so a packed prefill decides every token exactly as token-by-token decoding would.

KV caching: **recursion-wise** (default): a token that skips loop r writes nothing there and no state
propagation fills it in, so attention at loop r is among the tokens that reached it (the cache's
per-step lengths compact each loop's page). **Recursive KV sharing**: the deeper loops' steps read
loop 0's page (``cache_storage``) and write nothing.

Given the same decisions (``forced``: loops per (request, position)), decoding gives the same logits
as the training pass (tested), so what a router learned is what runs.
"""
from __future__ import annotations

import torch

from ..plan import LoopStructure
from .base import DepthPolicy, Exit


class RoutedDepth(DepthPolicy):
    """The routed depth of a ``MoRModel`` (expert- or token-choice; vanilla and recursive run every step).

    ``forced``: ``[requests, positions]`` recursions per token, instead of the routers' decisions
    (tests, analysis). ``record``: keep every token's recursions in ``self.decisions``
    (request, position, loops), prompt tokens included."""

    def __init__(self, forced: torch.Tensor | None = None, record: bool = False):
        self.forced, self.record = forced, record
        self.name = "mor"

    def bind(self, model, rows, capacity):
        kind = getattr(model, "kind", None)
        if kind is None:
            raise ValueError("RoutedDepth needs a MoRModel (mor_lab.mor.MoRModel); for a recursive Decoder use "
                             "LoopExit with an exit rule")
        self.model, self.kind = model, kind
        self.decisions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        st = LoopStructure.of(model) if kind != "vanilla" else None
        if st is None:
            DepthPolicy.bind(self, model, rows, capacity)
            self.structure, self.first_loop = None, 0
            return self
        self.structure = st
        self.segments = ([range(st.prelude)] if st.prelude else []) + [st.loop_steps(r) for r in range(st.loops)]
        self.first_loop = 1 if st.prelude else 0
        self.finish = st.coda_steps()
        self.labels = (["prelude"] if st.prelude else []) + [f"loop {r}" for r in range(st.loops)]
        self.propagate = False
        self.router = getattr(model, "router", None)
        self.scheme = model.mor.kv_scheme
        if kind == "expert" and not st.prelude and self.router.config.capacity[0] < 1:
            raise ValueError("expert-choice routing of loop 0 (capacity[0] < 1) needs a prelude layer to score "
                             "tokens before their first loop: use a MIDDLE_CYCLE model")
        return self

    def cache_storage(self):
        if self.structure is None or self.scheme != "share":
            return None
        st = self.structure
        storage = list(range(self.model.num_steps))
        for r in range(1, st.loops):
            for j, s in enumerate(st.loop_steps(r)):
                storage[s] = st.loop_steps(0)[j]
        return storage

    def _loop(self, tokens) -> torch.Tensor:
        """The loop index of each token's current segment (-1: the prelude)."""
        return tokens.seg - self.first_loop

    def _forced(self, tokens, ctx, loop: torch.Tensor) -> torch.Tensor:
        """Forced decisions: does each token take loop ``loop`` (per token)?"""
        return self.forced.to(tokens.pos.device)[ctx.request, tokens.pos] > loop

    def decide(self, tokens, h, ctx):
        if self.structure is None:
            return None
        loop = self._loop(tokens)  # the segment just run (-1: the prelude); the question is about loop + 1
        nxt = loop + 1
        if self.kind == "token":  # the depth was picked when the token entered loop 0 (combine)
            asked = (loop >= 0) & ~ctx.final
            return Exit(leave=asked & (tokens.extra["mor_depth"] <= nxt)) if bool(asked.any()) else None
        asked = ~ctx.final
        if not bool(asked.any()):
            return None
        rows = asked.nonzero().squeeze(1)
        if self.forced is not None:
            go = self._forced(tokens.select(rows), ctx.subset(rows), nxt[rows])
        elif self.kind == "expert":
            ctx.log("router", len(rows))
            go, gate = self.router.decide_and_gate(nxt[rows], h[rows])  # the gate of the loop it enters
            self._keep_gate(tokens, rows, gate)
        else:
            go = torch.ones(len(rows), dtype=torch.bool, device=h.device)
        leave = torch.zeros(len(tokens), dtype=torch.bool, device=h.device)
        leave[rows] = ~go
        return Exit(leave=leave)

    def _keep_gate(self, tokens, rows, gate) -> None:
        if "mor_gate" not in tokens.extra:
            tokens.extra["mor_gate"] = gate.new_zeros(len(tokens))
            tokens.extra["mor_has_gate"] = torch.zeros(len(tokens), dtype=torch.bool, device=gate.device)
        tokens.extra["mor_gate"][rows] = gate
        tokens.extra["mor_has_gate"][rows] = True

    def _forced_depth(self, tokens, ctx, rows):
        return self.forced.to(tokens.pos.device)[ctx.request[rows], tokens.pos[rows]] - 1

    def combine(self, tokens, h_in, h_out, ctx):
        if self.structure is None:
            return h_out
        loop = self._loop(tokens)
        if self.kind == "expert":
            inside = loop >= 0
            if not bool(inside.any()):
                return h_out
            has = tokens.extra.get("mor_has_gate")
            missing = inside if has is None else inside & ~has
            if bool(missing.any()):  # loop 0 of a plan without a prelude, or forced decisions: score now
                rows = missing.nonzero().squeeze(1)
                ctx.log("router", len(rows))
                self._keep_gate(tokens, rows, self.router.decide_and_gate(loop[rows], h_in[rows])[1])
            gate = tokens.extra["mor_gate"].to(h_out.dtype)
            tokens.extra["mor_has_gate"] = tokens.extra["mor_has_gate"] & ~inside  # used: the next loop scores anew
            return torch.where(inside[:, None], h_in + gate[:, None] * h_out, h_out)
        if self.kind == "token":
            entering = loop == 0
            if bool(entering.any()):  # the router picks each token's depth from the input of loop 0
                rows = entering.nonzero().squeeze(1)
                ctx.log("router", len(rows))
                forced = None if self.forced is None else self._forced_depth(tokens, ctx, rows)
                _, _, depth, gate = self.router.route(h_in[rows], forced)
                for key, value in (("mor_depth", depth + 1), ("mor_gate", gate), ("mor_x", h_in[rows])):
                    if key not in tokens.extra:
                        tokens.extra[key] = value.new_zeros((len(tokens), *value.shape[1:]))
                    tokens.extra[key][rows] = value
            if "mor_depth" not in tokens.extra:  # the prelude: nobody has entered a loop yet
                return h_out
            last = (tokens.extra["mor_depth"] == loop + 1) & (loop >= 0)
            x, g = tokens.extra["mor_x"], tokens.extra["mor_gate"].to(h_out.dtype)
            return torch.where(last[:, None], x + g[:, None] * h_out, h_out)
        return h_out

    def left(self, tokens, ctx):
        if self.record:
            loops = (self._loop(tokens) + 1).clamp(min=0)
            self.decisions.append((ctx.request, tokens.pos, loops))

    def loops_per_token(self, requests: int, length: int) -> torch.Tensor:
        """``[requests, length]`` recursions of every recorded token (``record=True``)."""
        out = torch.zeros(requests, length, dtype=torch.long)
        for request, pos, loops in self.decisions:
            keep = pos < length
            out[request[keep].cpu(), pos[keep].cpu()] = loops[keep].cpu()
        return out

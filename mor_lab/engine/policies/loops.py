"""A recursive model with an exit rule: prelude -> N_r loops of a shared block -> coda.

A token may stop after any loop. The loops it skips get their KV by state propagation (the exited
hidden state is copied up and each skipped step computes only its K/V, as in CALM), so every later
token finds a complete cache at every step. In continuous mode the scheduler runs the shared block
once per engine step over every token, whatever loop each is in (continuous depth-wise batching);
in static mode a decode step waits for its slowest row. Same rule, same decisions: same tokens.

The loop structure is read off the model's plan (``LoopStructure.of``); prompts run every loop.
"""
from __future__ import annotations

import torch

from ..plan import LoopStructure
from .base import DepthPolicy, Exit


def uniform_hash(seed: int, request: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per (seed, request, token index), the same on every device and in every
    batch: integer mixing (three Lehmer rounds), exact in int64."""
    modulus = 2_147_483_647
    h = (seed * 73_856_093 + request.long() * 19_349_663 + index.long() * 83_492_791) % modulus
    for _ in range(3):
        h = (h * 48_271 + 12_345) % modulus
    return h.double() / modulus


class FixedLoops:
    """Exit after a predetermined number of loops per (request, token), drawn from ``probs``.

    The draw depends only on (seed, request, token index), never on scheduling, so a scheduler's
    efficiency can be measured independently of model quality and outputs compared exactly.
    """

    def __init__(self, probs: list[float], seed: int = 0):
        if abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
            raise ValueError(f"probs must be a distribution over loops 1..N_r, got {probs}")
        self.probs, self.seed = list(probs), seed
        self.cumulative = torch.tensor(probs, dtype=torch.float64).cumsum(0)

    def loops_for(self, request: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        u = uniform_hash(self.seed, request, index)
        cumulative = self.cumulative.to(u.device)
        return (torch.searchsorted(cumulative, u, right=True) + 1).clamp(max=len(self.probs))

    def __call__(self, model, h, ctx, loops_done: torch.Tensor) -> torch.Tensor:
        return loops_done >= self.loops_for(ctx.request, ctx.index)

    @property
    def mean_loops(self) -> float:
        return sum((i + 1) * p for i, p in enumerate(self.probs))


class ConfidenceLoops:
    """Exit when the logit lens after a loop is confident (margin of the final norm + LM head): one head
    call per test, on every token that finished a loop."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, model, h, ctx, loops_done) -> torch.Tensor:
        ctx.log("test", len(h))
        top2 = model.head(h).float().softmax(-1).topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) > self.threshold


class NeverExit:
    """Every token runs every loop (the recursive model at full depth)."""

    def __call__(self, model, h, ctx, loops_done) -> torch.Tensor:
        return torch.zeros(len(h), dtype=torch.bool, device=h.device)


class LoopExit(DepthPolicy):
    """Recursive loops with an exit rule ``rule(model, h, ctx, loops_done) -> leave`` after each loop."""

    def __init__(self, rule=None):
        self.rule = rule or NeverExit()
        self.name = "recursive" if isinstance(self.rule, NeverExit) else "recursive_exit"

    def bind(self, model, rows, capacity):
        st = LoopStructure.of(model)
        if st is None:
            raise ValueError("this policy needs a recursive model (a plan with a shared block looped at least "
                             f"twice, e.g. MIDDLE_CYCLE); the model's plan {model.plan} has none: convert it with "
                             "mor_lab.recursive.convert")
        self.model, self.structure = model, st
        self.segments = ([range(st.prelude)] if st.prelude else []) + [st.loop_steps(r) for r in range(st.loops)]
        self.first_loop = 1 if st.prelude else 0
        self.finish = st.coda_steps()
        self.labels = (["prelude"] if st.prelude else []) + [f"loop {r}" for r in range(st.loops)]
        return self

    def decide(self, tokens, h, ctx):
        loops_done = tokens.seg - self.first_loop + 1  # after the prelude (0): every token takes the first loop
        asked = ~tokens.prefill & ~ctx.final & (loops_done >= 1)
        if not bool(asked.any()):
            return None
        rows = asked.nonzero().squeeze(1)
        leave = torch.zeros_like(asked)
        leave[rows] = self.rule(self.model, h[rows], ctx.subset(rows), loops_done[rows])
        return Exit(leave=leave)

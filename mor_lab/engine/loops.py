"""Recursive depth plans for decoding: prelude -> N_r loops of a shared block -> coda, and exit rules.

A token may stop after any loop. The loops it skips get their KV by state propagation (the exited
hidden state is copied up and each skipped step computes only its K/V, as in CALM), so every later
token finds a complete cache at every step; the choice is explicit in ``propagate`` calls below.

``LoopedExit`` is the *static batching* baseline: a decode step ends when its slowest row has exited
(exited rows idle). The continuous depth-wise batching engine (``cdb.py``) uses the same structure
and exit rules, so with the same exit decisions both produce the same tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .policy import Decision, DepthPolicy, SubStep, propagate, run_steps, subset_chunk
from .trace import IDLE


@dataclass(frozen=True)
class LoopStructure:
    prelude: int  # depth steps before the loops (MIDDLE_* strategies: the unique first layer)
    block: int  # K: depth steps per loop
    loops: int  # N_r
    coda: int  # depth steps after the loops (the unique last layer)

    @property
    def num_steps(self) -> int:
        return self.prelude + self.block * self.loops + self.coda

    def loop_steps(self, loop: int) -> range:
        start = self.prelude + loop * self.block
        return range(start, start + self.block)

    def skipped_steps(self, loops_done: int) -> range:
        return range(self.prelude + loops_done * self.block, self.prelude + self.loops * self.block)

    def coda_steps(self) -> range:
        return range(self.num_steps - self.coda, self.num_steps)

    def steps_for(self, loops_done: int) -> list[int]:
        """The depth steps a token exiting after ``loops_done`` loops runs."""
        return list(range(self.prelude + loops_done * self.block)) + list(self.coda_steps())

    def check(self, model) -> None:
        if model.num_steps != self.num_steps:
            raise ValueError(f"loop structure has {self.num_steps} steps (prelude {self.prelude} + {self.loops} x "
                             f"{self.block} + coda {self.coda}), the model's plan has {model.num_steps}")
        for j in range(self.block):
            layers = {model.plan[s] for s in (self.loop_steps(r)[j] for r in range(self.loops))}
            if len(layers) != 1:
                raise ValueError(f"step {j} of the loop uses different physical layers {sorted(layers)} across "
                                 "loops: continuous depth-wise batching needs a CYCLE-style shared block")

    def shared_layer(self, model, j: int) -> int:
        return model.plan[self.loop_steps(0)[j]]

    @classmethod
    def middle_cycle(cls, num_layers: int, loops: int) -> "LoopStructure":
        """MIDDLE_CYCLE over ``num_layers``: first and last unique, ``(L-2)//N_r`` shared layers looped."""
        return cls(1, (num_layers - 2) // loops, loops, 1)

    def plan(self) -> list[int]:
        """The CYCLE plan over physical layers [prelude..., block..., coda...] for these steps."""
        block = [self.prelude + j for j in range(self.block)] * self.loops
        coda = [self.prelude + self.block + j for j in range(self.coda)]
        return list(range(self.prelude)) + block + coda


class FixedLoops:
    """Exit after a predetermined number of loops per (sequence, token), drawn from ``probs``.

    The draw depends only on (seed, sequence, token index), never on scheduling, so a scheduler's
    efficiency can be measured independently of model quality and outputs compared exactly.
    """

    def __init__(self, probs: list[float], seed: int = 0):
        if abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
            raise ValueError(f"probs must be a distribution over loops 1..N_r, got {probs}")
        self.probs, self.seed = list(probs), seed

    def loops_for(self, seq: int, token: int) -> int:
        rng = random.Random(self.seed * 1_000_003 + seq * 7_919 + token)
        return rng.choices(range(1, len(self.probs) + 1), weights=self.probs)[0]

    def __call__(self, model, h, seqs: list[int], tokens: list[int], loops_done: list[int]) -> list[bool]:
        return [done >= self.loops_for(s, t) for s, t, done in zip(seqs, tokens, loops_done)]

    @property
    def mean_loops(self) -> float:
        return sum((i + 1) * p for i, p in enumerate(self.probs))


class ConfidenceLoops:
    """Exit when the logit lens after a loop is confident (margin of the final norm + LM head)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, model, h, seqs, tokens, loops_done) -> list[bool]:
        top2 = model.head(h).float().softmax(-1).topk(2, dim=-1).values
        return ((top2[:, 0] - top2[:, 1]) > self.threshold).tolist()


def finish_tokens(model, structure: LoopStructure, h, rows: torch.Tensor, loops_done: list[int], lengths, cache):
    """Tokens of ``rows`` leave the loops: state propagation into skipped loops, then coda and head."""
    n = len(lengths)
    for done in sorted(set(loops_done)):
        group = torch.zeros(n, dtype=torch.bool, device=lengths.device)
        group[rows[[i for i, d in enumerate(loops_done) if d == done]]] = True
        if done < structure.loops:
            chunk = subset_chunk(lengths, group)
            select = torch.tensor([i for i, d in enumerate(loops_done) if d == done], device=h.device)
            propagate(model, h[select], structure.skipped_steps(done), cache, chunk)
    mask = torch.zeros(n, dtype=torch.bool, device=lengths.device)
    mask[rows] = True
    h, _ = run_steps(model, h, structure.coda_steps(), cache, subset_chunk(lengths, mask))
    return model.head(h)


class LoopedExit(DepthPolicy):
    """Recursive model + early exit with static batching: the decode step waits for its slowest row."""

    name = "recursive_static_exit"

    def __init__(self, structure: LoopStructure, rule, first_request: int = 0):
        self.structure, self.rule, self.first_request = structure, rule, first_request

    def begin(self, model, batch_size: int) -> None:
        """``first_request``: the request id of row 0 (exit rules may key on request ids)."""
        self.structure.check(model)
        self.model, self.seqs = model, list(range(self.first_request, self.first_request + batch_size))

    def keep_rows(self, rows: list[int]) -> None:
        self.seqs = [self.seqs[r] for r in rows]

    def decode(self, x, lengths, cache, t, record=False) -> Decision:
        model, st, n = self.model, self.structure, len(x)
        everyone = torch.ones(n, dtype=torch.bool, device=x.device)
        h, _ = run_steps(model, x, range(st.prelude), cache, subset_chunk(lengths, everyone))
        active, logits = everyone.clone(), torch.empty(n, model.config.vocab_size, device=x.device, dtype=x.dtype)
        loops_of, substeps = [st.loops] * n, []
        for loop in range(st.loops):
            h, _ = run_steps(model, h, st.loop_steps(loop), cache, subset_chunk(lengths, active))
            rows = active.nonzero().squeeze(1)
            substeps.append(SubStep(f"loop {loop}", [f"loop {loop}" if a else IDLE for a in active.tolist()],
                                    len(rows)))
            leave = self.rule(model, h, [self.seqs[r] for r in rows.tolist()], [t + 1] * len(rows),
                              [loop + 1] * len(rows)) if loop + 1 < st.loops else [True] * len(rows)
            leave_t = torch.tensor(leave, dtype=torch.bool, device=x.device)
            if leave_t.any():
                out = rows[leave_t]
                logits[out] = finish_tokens(model, st, h[leave_t], out, [loop + 1] * len(out), lengths, cache)
                for r in out.tolist():
                    loops_of[r] = loop + 1
                active[out] = False
                h = h[~leave_t]
            if not active.any():
                break
        return Decision(logits, [st.steps_for(k) for k in loops_of], None, substeps)


def static_generate(model, structure: LoopStructure, prompt_ids: list[list[int]], max_new_tokens: int, slots: int,
                    rule=None, eos_token_ids=()):
    """Static batching, the baseline of continuous depth-wise batching: requests in groups of ``slots``;
    a group starts when the previous one has finished, and every decode step waits for its slowest row
    (``rule=None``: full depth, no exits). Same signature and return as ``cdb_generate``: (ids, Trace)."""
    from .generate import generate_ids
    from .trace import Trace

    ids, trace = [], Trace(num_steps=model.num_steps)
    for first in range(0, len(prompt_ids), slots):
        policy = None if rule is None else LoopedExit(structure, rule, first_request=first)
        out, part = generate_ids(model, prompt_ids[first:first + slots], max_new_tokens,
                                 eos_token_ids=list(eos_token_ids), policy=policy)
        ids += out
        trace.tokens += part.tokens
        trace.engine_steps += part.engine_steps
    return ids, trace

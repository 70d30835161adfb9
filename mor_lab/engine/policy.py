"""Depth policies: how many depth steps each row of a decode step runs, and what happens to the rest.

The engine owns the batch (prompts, sampling, stopping, the trace); a policy owns one decode step's
depth: the full model, a static or confidence-based early exit, FREE's synchronized parallel
decoding, later recursion loops and routers. A policy receives the embedded new token of every
live row and returns the logits to sample from, plus what each row did (for the trace).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.cache import Chunk, KVCache


@dataclass
class SubStep:
    """One pass of the batch through some depth steps, as the utilization timeline shows it."""

    kind: str  # "decode", "shallow", "deep", "exit 8", ...
    activity: list[str]  # per live row; "idle" when the row did nothing in this pass
    tokens: int  # tokens processed (a deep pass may process several per row)


@dataclass
class Decision:
    logits: torch.Tensor  # [B, vocab]: what to sample the next token from, per live row
    steps: list[list[int]]  # per live row: the depth steps behind its prediction
    deferred: list[bool] | None = None  # per live row: its deeper steps will run later (FREE)
    substeps: list[SubStep] = field(default_factory=list)
    lens: tuple[torch.Tensor, torch.Tensor] | None = None  # logit lens (top1, confidence) [steps, B]


def logit_lens(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token and its probability if the model stopped here (final norm + LM head)."""
    probs = model.head(h).float().softmax(-1)
    conf, top1 = probs.max(-1)
    return top1, conf


def run_steps(model, h: torch.Tensor, steps, cache: KVCache, chunk: Chunk, rope=None, record: bool = False,
              pick=None):
    """Run ``steps`` on the packed tokens ``h``; optionally the logit lens of ``pick(h)`` after each.

    The lens runs the LM head once over all recorded steps (one large matmul instead of one per step).
    """
    rope = model.rope(chunk.positions) if rope is None else rope
    states = []
    for step in steps:
        h = model.run_step(step, h, rope, cache, chunk)
        if record:
            states.append(h if pick is None else pick(h))
    return h, (logit_lens(model, torch.stack(states)) if states else None)


def propagate(model, h: torch.Tensor, steps, cache: KVCache, chunk: Chunk, rope=None) -> None:
    """State propagation: fill the KV of ``steps`` for tokens that exited with hidden state ``h``."""
    rope = model.rope(chunk.positions) if rope is None else rope
    groups: dict[tuple, list[int]] = {}  # tied loops of one layer share their K/V: computed once
    for step in steps:
        tied = model.delta(step) is None
        groups.setdefault((model.plan[step], None if tied else step), []).append(step)
    for group in groups.values():
        model.propagate_state(group, h, rope, cache, chunk)


def subset_chunk(lengths: torch.Tensor, rows: torch.Tensor) -> Chunk:
    """A decode chunk (one token per row at slot ``lengths[b]``) for the rows where ``rows`` is True."""
    return Chunk.build(lengths, rows.long())


class DepthPolicy:
    """Base policy: the full model, every depth step for every token."""

    name = "full"

    def begin(self, model, batch_size: int) -> None:
        """Called once per generation, after the prompts were prefilled at full depth."""
        self.model = model

    def keep_rows(self, rows: list[int]) -> None:
        """Finished rows left the batch: keep the per-row state of ``rows`` only."""

    def decode(self, x: torch.Tensor, lengths: torch.Tensor, cache: KVCache, t: int,
               record: bool = False) -> Decision:
        model = self.model
        chunk = Chunk.decode(lengths)
        h, lens = run_steps(model, x, range(model.num_steps), cache, chunk, record=record)
        steps = list(range(model.num_steps))
        return Decision(model.head(h), [steps] * len(x), None,
                        [SubStep("decode", ["decode"] * len(x), len(x))], lens)


FullDepth = DepthPolicy

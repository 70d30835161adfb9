"""What a depth policy is: segments of depth steps, and a decision between them.

The scheduler owns the batch (requests, slots, the KV cache, head calls, sampling, stopping, the
trace); a policy owns depth. It splits the plan's steps into **segments** with a decision point
after each (``segments``), names the steps every token runs just before its head call (``finish``:
a recursive model's coda), and answers, for a batch of tokens at a decision point, who leaves
(``decide``). Everything else is an optional hook: a transform after a segment (MoR's gated update),
the input of the head (exit adapters), the logits it saw (FREE's calibration), per-row state at
admission and release. A policy keeps its per-row state in tensors of ``rows`` entries and its
per-token state in ``Tokens.extra``: nothing hidden on the model or the cache.

Prompt tokens travel through the same segments (``tokens.prefill``); a policy that prefills at full
depth simply never lets them leave.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import Tokens


@dataclass
class Exit:
    """A policy's answer at a decision point, for the ``N`` tokens it was asked about."""
    leave: torch.Tensor  # [N] bool: these tokens leave the layers now
    logits: torch.Tensor | None = None  # [N, vocab]: the exit test's logits, used as the leaving tokens' output
    propagate: torch.Tensor | None = None  # [N] bool: fill skipped steps' KV by state propagation
    deferred: torch.Tensor | None = None  # [N] bool: leaving tokens whose deep steps run later (FREE)
    extra: Tokens | None = None  # tokens to run beside the continuing ones in their next segment (FREE)


@dataclass
class Context:
    """What a policy may read about the tokens it decides for, and where it logs the passes it makes."""
    request: torch.Tensor  # [N] request id of each token's sequence
    index: torch.Tensor  # [N] which generated token (0 = the first) each emitting token computes
    trace: object  # the run's Trace: ``ctx.log(kind, rows, tokens)`` appends to its pass log
    final: torch.Tensor | None = None  # [N] bool: at the last segment (they leave whatever the policy says)

    side: object = None  # the engine's ``side_layer`` for these tokens (see below)

    def subset(self, index: torch.Tensor) -> "Context":
        return Context(self.request[index], self.index[index], self.trace,
                       None if self.final is None else self.final[index], self.side)

    def side_layer(self, layer, step: int, tokens: Tokens, h: torch.Tensor) -> torch.Tensor:
        """Run a decoder layer that is not part of the model's plan (an exit block) on ``tokens`` with KV
        page ``step`` (from ``extra_pages``): every token that reaches it must pass here once, in order."""
        return self.side(layer, step, tokens, h)

    def log(self, kind: str, rows: int, tokens: int | None = None) -> None:
        from ..trace import Pass
        self.trace.passes.append(Pass(kind, rows, rows if tokens is None else tokens))


class DepthPolicy:
    """The full model: one segment of every depth step, nobody leaves early."""

    name = "full"
    propagate = True  # tokens leaving early fill their skipped steps by state propagation (CALM)

    def bind(self, model, rows: int, capacity: int) -> "DepthPolicy":
        """Check the policy fits ``model`` and allocate per-row state for ``rows`` cache rows of
        ``capacity`` slots. Called once per run, before anything else."""
        self.model = model
        self.segments = [range(model.num_steps)]
        self.finish = range(model.num_steps, model.num_steps)
        self.labels = ["decode"]
        return self

    def cache_storage(self) -> list[int] | None:
        """Step -> the step whose KV page it uses (recursive KV sharing); None: every step its own."""
        return None

    def extra_pages(self) -> int:
        """KV pages the policy's own layers need beyond the model's steps (an exit block's attention):
        page ``model.num_steps + i``, run through ``ctx.side_layer``."""
        return 0

    def admit(self, rows: torch.Tensor) -> None:
        """New sequences start in these cache rows."""

    def release(self, rows: torch.Tensor) -> None:
        """The sequences of these rows finished."""

    def combine(self, tokens: Tokens, h_in: torch.Tensor, h_out: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The hidden state after a segment from its input and the layers' output (MoR's gate)."""
        return h_out

    def decide(self, tokens: Tokens, h: torch.Tensor, ctx: Context) -> Exit | None:
        """After a segment that is not the last: which tokens leave (None: nobody)."""
        return None

    def left(self, tokens: Tokens, ctx: Context) -> None:
        """These tokens left after segment ``tokens.seg`` (every token passes here once)."""

    def head_input(self, tokens: Tokens, h: torch.Tensor) -> torch.Tensor:
        """What the final norm + LM head read for these tokens (a trained exit adapter, say)."""
        return h

    def observe(self, tokens: Tokens, logits: torch.Tensor, ctx: Context) -> None:
        """The logits the head call computed for ``tokens`` (FREE calibrates on its deferred ones)."""

    def label(self, seg: int) -> str:
        return self.labels[seg]

    def steps_for(self, seg: int) -> list[int]:
        """The depth steps of a token that left after segment ``seg`` (then ran ``finish``)."""
        return [s for segment in self.segments[:seg + 1] for s in segment] + list(self.finish)


FullDepth = DepthPolicy


def check_threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)

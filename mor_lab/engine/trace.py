"""What the engine did, token by token and step by step: the data every visualization reads.

Per generated token: the depth steps it ran and, when recorded, the logit-lens top-1 token and its
probability after each of those steps. Per engine step (one pass of some rows through a group of
layers): what each batch slot was doing ("prefill", "decode", "shallow", "deep", "loop 2", ...; "wait"
while its token waits for a head call, "idle" when it holds no sequence), and for which sequence. Per
pass over weights (``passes``): what the cost model prices, so every run can be predicted and compared
with its ideal (``mor_lab.engine.cost``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

IDLE = "idle"
WAIT = "wait"  # the slot's token left the layers and waits for its head call: no useful work
NOT_BUSY = (IDLE, WAIT)


class Pass(NamedTuple):
    """One read of some weights by the engine: the unit the cost model prices.

    ``kind``: "layer" (one decoder layer over packed tokens), "head" (final norm + LM head + sampling),
    "test" (an exit test: the LM head at an exit, or a classifier), "propagate" (K/V projections of
    exited tokens for the steps they skipped, all layers in one call), "router" (MoR router scores).
    ``keys``: summed attention length of the tokens (layer passes), or the layers a propagation call
    projected; ``prefill``: how many of the tokens are prompt tokens; ``gathered``: the cache slots the
    pass copied out of the KV cache (its rows, or their steps, were not one page's rows 0..n-1: the
    reference attention path gathers them; the paged kernels read in place, 0)."""
    kind: str
    rows: int
    tokens: int
    keys: int = 0
    prefill: int = 0
    gathered: int = 0


@dataclass
class TokenTrace:
    token_id: int
    steps: list[int]  # depth steps this token ran, in order
    top1: list[int] | None = None  # logit-lens top-1 after each step in ``steps``
    confidence: list[float] | None = None  # its softmax probability
    deferred: bool = False  # deep steps ran later, in a parallel pass (FREE)
    predicted: int | None = None  # teacher forcing: the policy's own top choice ...
    logprob: float | None = None  # ... and the log-probability it gave the forced token

    @property
    def exit_step(self) -> int:
        return self.steps[-1] if self.steps else -1

    @property
    def num_steps(self) -> int:
        return len(self.steps)


@dataclass
class EngineStep:
    kind: str  # "prefill" or "decode" (later plans add their own)
    sequences: list[int | None]  # per batch slot: the sequence it served, or None
    activity: list[str]  # per batch slot: what it did (IDLE when nothing useful)
    tokens: int = 0  # tokens processed in this step (prefill counts the whole prompt)


@dataclass
class Trace:
    num_steps: int
    tokens: list[list[TokenTrace]] = field(default_factory=list)  # per sequence, per generated token
    passes: list[Pass] = field(default_factory=list)  # every read of weights, for the cost model
    slots: int = 0  # block slots: the most rows one pass may run (the batch size B)
    seconds: float = 0.0  # wall time of the run
    labelled: list[EngineStep] = field(default_factory=list, repr=False)
    pending: list = field(default_factory=list, repr=False)  # raw records, labelled on first read
    labeler: object = field(default=None, repr=False, compare=False)

    @property
    def engine_steps(self) -> list[EngineStep]:
        """What every batch slot did at every pass. The engine keeps raw tensors while it runs (no per-row
        Python in its hot path); they become labelled steps here, when something reads them."""
        if self.pending:
            self.labelled += [self.labeler(record) for record in self.pending]
            self.pending = []
        return self.labelled

    def utilization(self, kinds: tuple[str, ...] | None = None) -> float:
        """Fraction of batch-slot x engine-step cells that did useful work."""
        busy = total = 0
        for step in self.engine_steps:
            if kinds and step.kind not in kinds:
                continue
            total += len(step.activity)
            busy += sum(a not in NOT_BUSY for a in step.activity)
        return busy / total if total else 0.0

    def pass_counts(self) -> dict[str, int]:
        """How many passes of each kind the run made (the per-step cost breakdown)."""
        counts: dict[str, int] = {}
        for p in self.passes:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def mean_steps_per_token(self) -> float:
        counts = [t.num_steps for seq in self.tokens for t in seq]
        return sum(counts) / len(counts) if counts else 0.0

    def activity_matrix(self) -> tuple[list[list[str]], list[list[int | None]]]:
        """``[engine step][slot]`` activity labels and sequence ids (for the utilization timeline)."""
        return [s.activity for s in self.engine_steps], [s.sequences for s in self.engine_steps]

"""Which original layers share weights, and where the shared weights start from (Relaxed Recursive Transformers).

A recursive model has depth steps = (prelude) + N_r loops of K shared layers + (coda). A
:class:`SharingPlan` is that layout as plain data: for every depth step, the physical layer it runs,
its loop (recursion) index, and the original layer whose place it takes. Strategies, for shared
layer ``i`` of base depth ``K``:

- ``cycle``: original layers ``[i + r*K for r in range(N_r)]`` tie to shared layer ``i`` (the block
  of K layers is repeated); ``K = L // N_r``.
- ``sequence``: original layers ``range(i*N_r, (i+1)*N_r)`` tie to shared layer ``i`` (each layer is
  repeated in place); ``K = L // N_r``.
- ``middle_cycle`` / ``middle_sequence``: the same over layers ``1 .. L-2``; the first and last layers
  stay unique (a prelude and a coda); ``K = (L-2) // N_r``.

Layer counts that do not divide: like the reference code (the MoR repository's
``sharing_strategy/llama.py``), the model is first *subsampled* to ``K*N_r`` layers, the ones at
``round(linspace(0, L-1, K*N_r))`` (``round(linspace(1, L-2, K*N_r))`` between the kept first and
last layers for the middle variants; Python's ``round``: halves go to the even integer). The
strategies then apply to the subsampled stack; the layers left out are listed in
``SharingPlan.dropped_layers`` and nothing stands in for them. When the count divides, the
subsample is every layer.

Initializations of each shared layer (:func:`init_sources`), as positions ``p`` in that (subsampled)
stack of ``n = num_steps`` layers; middle variants draw only from ``1 .. n-2``:

- ``stepwise``: ``round(linspace(0, n-1, K))`` (middle: ``round(linspace(1, n-2, K))``).
- ``average``: the mean of the layers tied to it.
- ``lower``: the first K (middle: ``1 .. K``); ``upper``: the last K (middle: ``n-K-1 .. n-2``).
- ``random``: K distinct positions drawn with a seeded ``torch.Generator``, sorted (the reference
  uses NumPy's global generator, so the draws differ from it, not the rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.config import DictConfig

CYCLE, SEQUENCE, MIDDLE_CYCLE, MIDDLE_SEQUENCE = "cycle", "sequence", "middle_cycle", "middle_sequence"
STRATEGIES = (CYCLE, SEQUENCE, MIDDLE_CYCLE, MIDDLE_SEQUENCE)
STEPWISE, AVERAGE, LOWER, UPPER, RANDOM = "stepwise", "average", "lower", "upper", "random"
INITIALIZATIONS = (STEPWISE, AVERAGE, LOWER, UPPER, RANDOM)


def check_strategy(strategy: str) -> str:
    """The canonical (lower-case) strategy name, or a ValueError listing the allowed ones."""
    name = strategy.lower() if isinstance(strategy, str) else strategy
    if name not in STRATEGIES:
        raise ValueError(f"unknown sharing strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    return name


def check_init(init: str) -> str:
    """The canonical (lower-case) initialization name, or a ValueError listing the allowed ones."""
    name = init.lower() if isinstance(init, str) else init
    if name not in INITIALIZATIONS:
        raise ValueError(f"unknown initialization {init!r}; allowed: {', '.join(INITIALIZATIONS)}")
    return name


def is_middle(strategy: str) -> bool:
    return check_strategy(strategy).startswith("middle_")


def base_depth(num_layers: int, num_recursions: int, strategy: str) -> int:
    """K: how many shared layers one loop has (``L // N_r``, or ``(L-2) // N_r`` for middle variants)."""
    loopable = num_layers - 2 if is_middle(strategy) else num_layers
    return loopable // num_recursions


@dataclass
class RecursiveConfig(DictConfig):
    """How to turn an L-layer model into a recursive one: strategy, loops, initialization, norms."""
    strategy: str = MIDDLE_CYCLE
    num_recursions: int = 2  # N_r, loops of the shared block
    init: str = STEPWISE  # where the shared weights start from
    tie_norms: bool = False  # True: one norm weight per shared layer; False: each step keeps its layer's own
    seed: int = 0  # the draw of init="random"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.strategy, str) or self.strategy.lower() not in STRATEGIES:
            raise ValueError(f"RecursiveConfig.strategy = {self.strategy!r} is not supported; "
                             f"allowed: {', '.join(STRATEGIES)}")
        if not isinstance(self.init, str) or self.init.lower() not in INITIALIZATIONS:
            raise ValueError(f"RecursiveConfig.init = {self.init!r} is not supported; "
                             f"allowed: {', '.join(INITIALIZATIONS)}")
        self.strategy, self.init = self.strategy.lower(), self.init.lower()
        n = self.num_recursions
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"RecursiveConfig.num_recursions must be a positive integer, got {n!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"RecursiveConfig.seed must be an integer, got {self.seed!r}")



@dataclass(frozen=True)
class DepthStep:
    """One depth step of a recursive model."""
    step: int  # s, the position in the depth plan
    layer: int  # the physical layer of the recursive Decoder it runs
    loop: int | None  # r, the recursion it belongs to; None for the unique prelude/coda of middle variants
    original: int  # the original layer whose place it takes (and whose weights it recovers at full LoRA rank)


@dataclass(frozen=True)
class SharingPlan:
    """The layout of a recursive model as data; build one with :meth:`SharingPlan.build`."""
    strategy: str
    num_layers: int  # L, layers of the original model
    num_recursions: int  # N_r
    base_depth: int  # K, shared layers per loop
    steps: tuple[DepthStep, ...]

    @classmethod
    def build(cls, num_layers: int, num_recursions: int, strategy: str = MIDDLE_CYCLE) -> "SharingPlan":
        strategy = check_strategy(strategy)
        if not isinstance(num_recursions, int) or num_recursions < 1:
            raise ValueError(f"num_recursions must be a positive integer, got {num_recursions!r}")
        middle = is_middle(strategy)
        if middle and num_layers < 3:
            raise ValueError(f"{strategy} keeps the first and last layers unique: it needs num_layers >= 3, "
                             f"got {num_layers}")
        K = base_depth(num_layers, num_recursions, strategy)
        if K < 1:
            loopable = num_layers - 2 if middle else num_layers
            raise ValueError(f"num_recursions={num_recursions} is more than the {loopable} layers {strategy} "
                             f"can loop over (num_layers={num_layers})")
        kept = subsampled_layers(num_layers, num_recursions, strategy)
        offset = 1 if middle else 0  # the prelude is step 0 and physical layer 0
        steps = [DepthStep(0, 0, None, 0)] if middle else []
        for p in range(K * num_recursions):  # p: position among the looped steps
            if strategy in (CYCLE, MIDDLE_CYCLE):
                shared, loop = p % K, p // K
            else:
                shared, loop = p // num_recursions, p % num_recursions
            steps.append(DepthStep(offset + p, offset + shared, loop, kept[offset + p]))
        if middle:
            steps.append(DepthStep(len(steps), K + 1, None, num_layers - 1))
        return cls(strategy, num_layers, num_recursions, K, tuple(steps))

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_physical_layers(self) -> int:
        """K shared layers (+ prelude and coda for middle variants): ``config.num_layers`` of the recursive model."""
        return self.base_depth + (2 if is_middle(self.strategy) else 0)

    @property
    def plan(self) -> list[int]:
        """``Decoder.plan``: the physical layer of every depth step."""
        return [s.layer for s in self.steps]

    @property
    def shared_layers(self) -> tuple[int, ...]:
        """The physical layers that loop (all but the prelude and coda)."""
        return tuple(sorted({s.layer for s in self.steps if s.loop is not None}))

    @property
    def unique_layers(self) -> tuple[int, ...]:
        """The physical layers run once (the prelude and coda of middle variants)."""
        return tuple(s.layer for s in self.steps if s.loop is None)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """The original layer of every depth step (the subsampled stack, in step order)."""
        return tuple(s.original for s in self.steps)

    @property
    def dropped_layers(self) -> tuple[int, ...]:
        """Original layers that no step stands in for (only when L does not divide)."""
        return tuple(sorted(set(range(self.num_layers)) - set(self.kept_layers)))

    def groups(self) -> dict[int, tuple[int, ...]]:
        """Physical layer -> the original layers tied to it, in loop order."""
        groups: dict[int, list[int]] = {}
        for s in self.steps:
            groups.setdefault(s.layer, []).append(s.original)
        return {layer: tuple(originals) for layer, originals in sorted(groups.items())}

    def loop_steps(self, loop: int) -> list[int]:
        """The depth steps of recursion ``loop``."""
        return [s.step for s in self.steps if s.loop == loop]

    def matrix(self) -> torch.Tensor:
        """``[num_steps, num_physical_layers]`` with 1 where step s runs physical layer j (a heatmap-ready view)."""
        m = torch.zeros(self.num_steps, self.num_physical_layers, dtype=torch.int64)
        m[torch.arange(self.num_steps), torch.tensor(self.plan)] = 1
        return m

    def __str__(self) -> str:
        middle = " + prelude + coda" if is_middle(self.strategy) else ""
        lines = [f"SharingPlan {self.strategy}: {self.num_layers} layers -> {self.num_physical_layers} physical "
                 f"({self.base_depth} shared x {self.num_recursions} loops{middle}), {self.num_steps} steps",
                 " step  layer  loop  original"]
        for s in self.steps:
            lines.append(f"{s.step:5d}  {s.layer:5d}  {'-' if s.loop is None else s.loop:>4}  {s.original:8d}")
        if self.dropped_layers:
            lines.append(f"dropped (L does not divide): {list(self.dropped_layers)}")
        return "\n".join(lines)


def _round_linspace(start: float, stop: float, num: int) -> list[int]:
    """``[round(x) for x in np.linspace(start, stop, num)]``, as the reference code computes it."""
    return [int(round(x)) for x in np.linspace(start, stop, num)]


def subsampled_layers(num_layers: int, num_recursions: int, strategy: str) -> list[int]:
    """The original layers a recursive model keeps, in order: all of them when L divides, else the
    reference's ``round(linspace(...))`` subsample (see the module docstring)."""
    K = base_depth(num_layers, num_recursions, strategy)
    n = K * num_recursions
    if is_middle(strategy):
        if n == num_layers - 2:
            return list(range(num_layers))
        return [0] + _round_linspace(1, num_layers - 2, n) + [num_layers - 1]
    return list(range(num_layers)) if n == num_layers else _round_linspace(0, num_layers - 1, n)


def init_sources(sharing: SharingPlan, init: str, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """For every physical layer, the original layers whose mean initializes it (one layer except for ``average``).

    The prelude and coda of middle variants are their own original layers.
    """
    init = check_init(init)
    groups = sharing.groups()
    if init == AVERAGE:
        return tuple(groups[layer] for layer in range(sharing.num_physical_layers))
    kept, K, n = sharing.kept_layers, sharing.base_depth, sharing.num_steps
    middle = is_middle(sharing.strategy)
    lo, hi = (1, n - 2) if middle else (0, n - 1)  # positions the shared layers may start from
    if init == STEPWISE:
        positions = _round_linspace(lo, hi, K)
    elif init == LOWER:
        positions = list(range(lo, lo + K))
    elif init == UPPER:
        positions = list(range(hi - K + 1, hi + 1))
    else:  # RANDOM
        generator = torch.Generator().manual_seed(seed)
        positions = sorted(lo + int(i) for i in torch.randperm(hi - lo + 1, generator=generator)[:K])
    sources = [(kept[p],) for p in positions]
    if middle:
        sources = [groups[0]] + sources + [groups[K + 1]]
    return tuple(sources)

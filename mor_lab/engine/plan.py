"""The loop structure of a recursive plan, read off the model's own ``Decoder.plan``.

A recursive model's plan is prelude -> ``N_r`` loops of a shared block of ``K`` layers -> coda (the
MIDDLE_CYCLE layout keeps the first and last layers unique; CYCLE has no prelude or coda). The plan
(``plan[s]``: the physical layer depth step ``s`` runs) is the one representation: this module only
*derives* the structure from it, so nothing has to be passed beside the model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopStructure:
    prelude: int  # depth steps before the loops
    block: int  # K: depth steps per loop
    loops: int  # N_r
    coda: int  # depth steps after the loops

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

    @classmethod
    def of(cls, model) -> "LoopStructure | None":
        """The structure of ``model.plan``, or None when it has no block looped at least twice.

        Among the ways to read the plan as prelude + block x N_r + coda, the one whose loops cover the
        most steps wins; prelude and coda may not reuse a layer (a SEQUENCE plan, which repeats each
        layer in place, has no shared block to batch across loops)."""
        return loop_structure(list(model.plan))

    def check(self, model) -> None:
        """Raise unless this is the structure of ``model``'s plan."""
        found = LoopStructure.of(model)
        if found != self:
            raise ValueError(f"the model's plan has loop structure {found}, not {self}: the structure is read off "
                             "the model's plan (LoopStructure.of(model)); pass no structure")


def loop_structure(plan: list[int]) -> LoopStructure | None:
    best = None
    n = len(plan)
    for block in range(1, n // 2 + 1):
        for prelude in range(0, n - 2 * block + 1):
            unit = plan[prelude:prelude + block]
            if len(set(unit)) != block:
                continue
            loops = 1
            while plan[prelude + loops * block:prelude + (loops + 1) * block] == unit:
                loops += 1
            if loops < 2:
                continue
            outside = plan[:prelude] + plan[prelude + loops * block:]
            if set(outside) & set(unit) or len(set(outside)) != len(outside):
                continue
            candidate = LoopStructure(prelude, block, loops, n - prelude - loops * block)
            if best is None or loops * block > best.loops * best.block:
                best = candidate
    return best

"""The packed tokens the scheduler moves through a model: one tensor per field, never a Python list per row.

A decode token is its row's current token (``emit``: its logits are sampled); a prompt token of a new
request, or a token FREE deferred, rides along in the same structure with ``emit`` off. ``seg`` is the
next segment a running token runs, or the segment it left after once it waits for its head call.
Policies keep per-token state (an MoR gate, a token-choice depth) in ``extra``, which follows every
selection and concatenation, so nothing about a token is kept beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Tokens:
    row: torch.Tensor  # [N] cache row
    pos: torch.Tensor  # [N] position in the sequence (rotary position)
    seg: torch.Tensor  # [N] next segment to run (running), or the one it left after (waiting)
    h: torch.Tensor  # [N, d]
    emit: torch.Tensor  # [N] bool: the row's current token, sampled after its head call
    head: torch.Tensor  # [N] bool: needs logits at its head call (emit, or FREE's calibration)
    prefill: torch.Tensor  # [N] bool: a prompt token
    deferred: torch.Tensor  # [N] bool: left without its deep steps (FREE)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    FIELDS = ("row", "pos", "seg", "h", "emit", "head", "prefill", "deferred")

    def __len__(self) -> int:
        return len(self.row)

    @classmethod
    def empty(cls, hidden_size: int, device, dtype) -> "Tokens":
        long, flag = torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.bool, device=device)
        return cls(long, long, long, torch.zeros(0, hidden_size, device=device, dtype=dtype), flag, flag, flag, flag)

    @classmethod
    def new(cls, row: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, emit: torch.Tensor,
            prefill: bool) -> "Tokens":
        flag = torch.full_like(emit, prefill)
        return cls(row, pos, torch.zeros_like(row), h, emit, emit.clone(), flag, torch.zeros_like(emit))

    def select(self, index: torch.Tensor) -> "Tokens":
        """The tokens at ``index`` (a bool mask or indices), every field and every extra alike."""
        return Tokens(*(getattr(self, f)[index] for f in self.FIELDS),
                      extra={k: v[index] for k, v in self.extra.items()})

    def ordered(self) -> "Tokens":
        """Row-major order (by row, then position): what a Chunk packs."""
        if len(self) < 2:
            return self
        order = torch.argsort(self.row * (int(self.pos.max()) + 1) + self.pos)
        return self.select(order)

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        parts = [p for p in parts if len(p)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        keys = set().union(*(p.extra for p in parts))
        extra = {}
        for k in keys:
            like = next(p.extra[k] for p in parts if k in p.extra)
            extra[k] = torch.cat([p.extra[k] if k in p.extra else
                                  like.new_zeros((len(p), *like.shape[1:])) for p in parts])
        return Tokens(*(torch.cat([getattr(p, f) for p in parts]) for f in Tokens.FIELDS), extra=extra)

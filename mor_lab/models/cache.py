"""A preallocated KV cache keyed by depth step, and the addressing of the tokens written into it.

The cache is plain storage: ``k[step]`` and ``v[step]`` of shape ``[batch, kv_heads, capacity, head_dim]``.
Where each new token goes, and which cached slots each query may see, is described by a ``Chunk``,
built once per engine step and shared by every depth step that processes the same tokens. Keeping the
addressing out of the cache lets later plans give each depth step its own lengths (early exit,
recursion-wise caching) or point several steps at one cache slot (recursive KV sharing) without
changing the attention code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """New tokens of a ragged batch, packed: ``N`` tokens, token ``i`` belongs to batch row ``rows[i]``.

    Hidden states travel packed (``[N, d]``), so projections and MLPs spend no work on padding;
    attention unpacks queries to ``[B, width, ...]``. Token ``i`` is the ``cols[i]``-th new token of its
    row, has rotary position ``positions[i]``, is written to cache slot ``slots[i]``, and sees the
    cache slots ``<= slots[i]`` of its row (causal, ragged).
    """

    rows: torch.Tensor  # [N]
    cols: torch.Tensor  # [N]
    slots: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    batch_size: int
    width: int  # max new tokens in a row
    kv_len: int  # slots [0, kv_len) cover every row's visible keys
    attn_mask: torch.Tensor  # [B, 1, width, kv_len] bool
    dense: bool  # rows/cols enumerate the full [B, width] grid in order: unpacking is a reshape

    @property
    def num_tokens(self) -> int:
        return len(self.rows)

    @classmethod
    def build(cls, starts: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor | None = None) -> "Chunk":
        """Row ``b`` gets ``counts[b]`` new tokens in slots ``starts[b] .. starts[b] + counts[b] - 1``.

        ``positions`` (packed, ``[N]``) defaults to the slots: a sequence's n-th token at position n.
        """
        starts, counts = starts.long(), counts.long()
        device = starts.device
        batch, width = len(starts), int(counts.max())
        offsets = torch.arange(width, device=device)
        valid = offsets[None, :] < counts[:, None]
        dense = bool(valid.all())
        rows, cols = valid.nonzero(as_tuple=True)
        slots = starts[rows] + cols
        kv_len = max(1, int((starts + counts).max()))
        query_slots = starts[:, None] + offsets[None, :]  # padding queries see junk, never used
        attn_mask = (torch.arange(kv_len, device=device)[None, None, :] <= query_slots[:, :, None])[:, None]
        return cls(rows=rows, cols=cols, slots=slots, positions=slots if positions is None else positions,
                   batch_size=batch, width=width, kv_len=kv_len, attn_mask=attn_mask, dense=dense)

    @classmethod
    def prefill(cls, lengths: torch.Tensor) -> "Chunk":
        """Whole prompts of the given lengths into an empty cache."""
        return cls.build(torch.zeros_like(lengths), lengths)

    @classmethod
    def decode(cls, lengths: torch.Tensor) -> "Chunk":
        """One new token per row, written after the row's ``lengths`` cached tokens."""
        return cls.build(lengths, torch.ones_like(lengths))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[B, width, ...]`` (zeros where a row has fewer tokens)."""
        if self.dense:
            return x.view(self.batch_size, self.width, *x.shape[1:])
        out = x.new_zeros(self.batch_size, self.width, *x.shape[1:])
        out[self.rows, self.cols] = x
        return out

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, width, ...]`` -> ``[N, ...]``."""
        if self.dense:
            return x.reshape(self.num_tokens, *x.shape[2:])
        return x[self.rows, self.cols]


class KVCache:
    """``num_steps`` caches (one per depth step) of ``batch_size`` rows and ``capacity`` slots."""

    def __init__(self, num_steps: int, batch_size: int, capacity: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device=None):
        shape = (num_steps, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> "KVCache":
        c = model.config
        p = next(model.parameters())
        return cls(model.num_steps, batch_size, capacity, c.num_kv_heads, c.head_dim, p.dtype, p.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def write(self, step: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: Chunk) -> None:
        """Store the chunk's packed keys/values (``[N, kv_heads, head_dim]``) in step ``step``'s cache.

        ``step`` may be a ``[B]`` tensor: each batch row at its own depth step (continuous depth-wise
        batching runs rows at different recursion loops through one shared layer)."""
        if chunk.kv_len > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots is too small for {chunk.kv_len} tokens; "
                             "allocate it with a larger capacity")
        if isinstance(step, torch.Tensor):
            steps = step[chunk.rows]
            self.k[steps, chunk.rows, :, chunk.slots] = k
            self.v[steps, chunk.rows, :, chunk.slots] = v
            return
        self.k[step][chunk.rows, :, chunk.slots] = k
        self.v[step][chunk.rows, :, chunk.slots] = v

    def read(self, step: int | torch.Tensor, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values the chunk's queries may see: ``[B, kv_heads, kv_len, head_dim]`` (views for
        one step; a gathered copy when ``step`` gives each row its own step)."""
        if isinstance(step, torch.Tensor):
            rows = torch.arange(len(step), device=step.device)
            return self.k[:, :, :, :chunk.kv_len][step, rows], self.v[:, :, :, :chunk.kv_len][step, rows]
        return self.k[step][:, :, :chunk.kv_len], self.v[step][:, :, :chunk.kv_len]

    def reset_rows(self, rows: list[int]) -> None:
        """Free these rows for new sequences (their old keys become unreachable; zeroed for clarity)."""
        self.k[:, rows] = 0
        self.v[:, rows] = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the batch to ``rows`` (finished sequences leave, the rest keep their cache)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

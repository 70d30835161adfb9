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
    """``T`` new tokens per batch row, right-padded: row ``b`` has ``counts[b]`` real tokens.

    positions: ``[B, T]`` rotary positions. slots: ``[B, T]`` cache slot of each token.
    Query ``t`` of row ``b`` sees cache slots ``< starts[b] + t + 1`` (causal, ragged).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor
    kv_len: int  # slots [0, kv_len) cover every row's visible keys
    attn_mask: torch.Tensor  # [B, 1, T, kv_len] bool
    write_rows: torch.Tensor  # flat indices of the real tokens: rows ...
    write_cols: torch.Tensor  # ... and their column in the chunk

    @classmethod
    def build(cls, starts: torch.Tensor, counts: torch.Tensor, width: int | None = None,
              positions: torch.Tensor | None = None) -> "Chunk":
        """Tokens of row b occupy slots ``starts[b] .. starts[b] + counts[b] - 1``.

        ``positions`` defaults to the slots (a sequence's n-th token at position n).
        """
        starts = starts.long()
        counts = counts.long()
        device = starts.device
        width = int(counts.max()) if width is None else width
        offsets = torch.arange(width, device=device)
        slots = starts[:, None] + offsets[None, :]
        valid = offsets[None, :] < counts[:, None]
        kv_len = max(1, int((starts + counts).max()))
        keys = torch.arange(kv_len, device=device)
        attn_mask = (keys[None, None, :] <= slots[:, :, None])[:, None]
        if bool(valid.all()):
            rows = torch.arange(len(starts), device=device).repeat_interleave(width)
            cols = offsets.repeat(len(starts))
        else:
            rows, cols = valid.nonzero(as_tuple=True)
        return cls(positions=slots if positions is None else positions, slots=slots, counts=counts,
                   kv_len=kv_len, attn_mask=attn_mask, write_rows=rows, write_cols=cols)

    @classmethod
    def prefill(cls, lengths: list[int], device=None) -> "Chunk":
        counts = torch.tensor(lengths, device=device)
        return cls.build(torch.zeros_like(counts), counts)

    @classmethod
    def decode(cls, lengths: torch.Tensor) -> "Chunk":
        """One new token per row, written after the row's ``lengths`` cached tokens."""
        return cls.build(lengths, torch.ones_like(lengths), width=1)


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

    def write_and_read(self, step: int, k: torch.Tensor, v: torch.Tensor, chunk: Chunk):
        """Store the chunk's real tokens (``k, v``: ``[B, H, T, D]``) and return the visible keys/values."""
        if chunk.kv_len > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots is too small for {chunk.kv_len} tokens; "
                             "allocate it with a larger capacity")
        rows, cols = chunk.write_rows, chunk.write_cols
        slots = chunk.slots[rows, cols]
        self.k[step][rows, :, slots] = k[rows, :, cols]
        self.v[step][rows, :, slots] = v[rows, :, cols]
        return self.k[step][:, :, :chunk.kv_len], self.v[step][:, :, :chunk.kv_len]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the batch to ``rows`` (finished sequences leave, the rest keep their cache)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

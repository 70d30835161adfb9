"""A preallocated KV cache keyed by depth step, and the addressing of the tokens written into it.

The cache is plain storage plus one length per (step, row): ``k[page]`` and ``v[page]`` of shape
``[rows, kv_heads, capacity, head_dim]``, ``lengths[page, row]`` = tokens of that row written there.
A token at step ``s`` of row ``b`` goes to slot ``lengths[s, b]`` and attends to the slots before it.
Keeping one length per step is what lets every depth plan share this one cache:

- full depth and early exit with state propagation: every token writes every step, the lengths agree;
- FREE: a deferred token's deep steps lag behind and are caught up later, in order, by the deep pass;
- Mixture-of-Recursions with **recursion-wise** caching: only tokens that reach loop r write its steps,
  so loop r's cache is compacted by construction and a token attends to the earlier tokens that
  reached the same loop (its rotary position stays its position in the sequence);
- **recursive KV sharing** (``storage``): the steps of loops 1.. are mapped onto loop 0's pages; they
  read loop 0's keys/values and never write, so the loops hold ``1/N_r`` of the KV memory.

Where each new token goes, and which slots each query sees, is a :class:`Chunk`, built once per pass
and shared by every step of that pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """New tokens of some cache rows, packed row-major: ``N`` tokens, token ``i`` in cache row ``rows[i]``.

    Hidden states travel packed (``[N, d]``), so projections and MLPs spend no work on padding or on
    rows that sit this pass out. Attention unpacks queries to ``[n, width, ...]`` over the ``n`` rows
    that have tokens (``batch_rows``). Token ``i`` is the ``cols[i]``-th new token of its row, has rotary
    position ``positions[i]``, is written to slot ``slots[i]`` and sees its row's slots ``<= slots[i]``.
    """

    rows: torch.Tensor  # [N] cache row of each token (ascending: row-major packing)
    cols: torch.Tensor  # [N]
    slots: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    batch_rows: torch.Tensor  # [n] the cache rows that have tokens, ascending
    local: torch.Tensor  # [N] index of each token's row in batch_rows
    first: torch.Tensor  # [n] index of each batch row's first token
    width: int  # max new tokens in a row
    kv_len: int  # slots [0, kv_len) cover every row's visible keys
    attn_mask: torch.Tensor  # [n, 1, width, kv_len] bool
    dense: bool  # every batch row has `width` tokens: unpacking is a reshape
    all_rows: bool  # batch_rows are all the cache's rows 0..n-1: cache reads are views, not gathers
    track_lengths: bool = True  # writes advance the cache's lengths (the engine advances once per pass instead)

    @property
    def num_tokens(self) -> int:
        return len(self.rows)

    @property
    def batch_size(self) -> int:
        return len(self.batch_rows)

    @classmethod
    def build(cls, starts: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor | None = None,
              rows: torch.Tensor | None = None, total_rows: int | None = None) -> "Chunk":
        """Cache row ``rows[j]`` (default ``j``) gets ``counts[j]`` new tokens in slots ``starts[j] ..``.

        Rows with no new tokens are left out. ``positions`` (packed, ``[N]``) defaults to the slots;
        ``total_rows``: the cache's row count (default ``len(starts)``), to know when reads can be views.
        """
        starts, counts = starts.long(), counts.long()
        rows = torch.arange(len(starts), device=starts.device) if rows is None else rows.long()
        total_rows = len(starts) if total_rows is None else total_rows
        token_rows = torch.repeat_interleave(rows, counts)
        cols = torch.arange(len(token_rows), device=starts.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        slots = torch.repeat_interleave(starts, counts) + cols
        return cls.from_tokens(token_rows, slots, slots if positions is None else positions, total_rows, cols)

    @classmethod
    def from_tokens(cls, rows: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, total_rows: int,
                    cols: torch.Tensor | None = None) -> "Chunk":
        """Packed tokens given one by one: cache row (ascending), slot, rotary position.

        Each token sees its row's slots ``<=`` its own. The slots of a row need not be contiguous:
        recursive KV sharing reads loop 0's page at the positions of the tokens a router sent deeper."""
        device = rows.device
        batch_rows, counts = torch.unique_consecutive(rows, return_counts=True)
        n = len(batch_rows)
        first = counts.cumsum(0) - counts
        local = torch.repeat_interleave(torch.arange(n, device=device), counts)
        if cols is None:
            cols = torch.arange(len(rows), device=device) - first[local]
        width = int(counts.max()) if n else 0
        dense = bool((counts == width).all()) if n else True
        kv_len = max(1, int(slots.max()) + 1) if n else 1
        query_slots = torch.zeros((n, width), dtype=torch.long, device=device)
        query_slots[local, cols] = slots  # padding queries see slot 0 (finite), and are never used
        attn_mask = (torch.arange(kv_len, device=device)[None, None, :] <= query_slots[:, :, None])[:, None]
        all_rows = n == total_rows and (n == 0 or int(batch_rows[-1]) == n - 1)
        return cls(rows=rows, cols=cols, slots=slots, positions=positions, batch_rows=batch_rows, local=local,
                   first=first, width=width, kv_len=kv_len, attn_mask=attn_mask, dense=dense, all_rows=all_rows)

    @classmethod
    def prefill(cls, lengths: torch.Tensor) -> "Chunk":
        """Whole prompts of the given lengths into an empty cache."""
        return cls.build(torch.zeros_like(lengths), lengths)

    @classmethod
    def decode(cls, lengths: torch.Tensor) -> "Chunk":
        """One new token per row, written after the row's ``lengths`` cached tokens."""
        return cls.build(lengths, torch.ones_like(lengths))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[n, width, ...]`` (zeros where a row has fewer tokens)."""
        if self.dense:
            return x.view(self.batch_size, self.width, *x.shape[1:])
        out = x.new_zeros(self.batch_size, self.width, *x.shape[1:])
        out[self.local, self.cols] = x
        return out

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, width, ...]`` -> ``[N, ...]``."""
        if self.dense:
            return x.reshape(self.num_tokens, *x.shape[2:])
        return x[self.local, self.cols]


class KVCache:
    """Keys/values of ``num_steps`` depth steps for ``batch_size`` rows of ``capacity`` slots.

    ``storage[s]``: the step whose page step ``s`` uses (default: its own). A step mapped onto another
    one reads that page and never writes: recursive KV sharing. ``lengths[page, row]``: tokens written.
    """

    def __init__(self, num_steps: int, batch_size: int, capacity: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device=None, storage: list[int] | None = None):
        storage = list(range(num_steps)) if storage is None else list(storage)
        if len(storage) != num_steps or any(storage[s] != s and storage[storage[s]] != storage[s]
                                            for s in range(num_steps)):
            raise ValueError(f"storage must map each of the {num_steps} steps to a step that owns its page, "
                             f"got {storage}")
        owners = sorted(set(storage))
        index = {s: i for i, s in enumerate(owners)}
        self.storage = storage
        self.page_of = torch.tensor([index[storage[s]] for s in range(num_steps)], device=device)
        self.owner = torch.tensor([storage[s] == s for s in range(num_steps)], device=device)
        self._page = [index[storage[s]] for s in range(num_steps)]  # host copies for int steps
        self._owns = [storage[s] == s for s in range(num_steps)]
        shape = (len(owners), batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(len(owners), batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, storage: list[int] | None = None,
                  extra_steps: int = 0) -> "KVCache":
        """A cache for ``model``'s depth steps, plus ``extra_steps`` pages after them (a policy's own layers,
        e.g. an exit block: step ``model.num_steps + i``)."""
        c = model.config
        p = next(model.parameters())
        steps = model.num_steps + extra_steps
        if storage is not None and extra_steps:
            storage = list(storage) + list(range(model.num_steps, steps))
        return cls(steps, batch_size, capacity, c.num_kv_heads, c.head_dim, p.dtype, p.device, storage)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_steps(self) -> int:
        return len(self.storage)

    def length(self, step: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens already cached at ``step`` for ``rows`` (all rows by default)."""
        lengths = self.lengths[self._page[step]]
        return lengths if rows is None else lengths[rows]

    def slots(self, step: int | torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        """Where new tokens go at ``step`` (an int, or one step per token): the ``cols[i]``-th new token of
        row ``rows[i]`` goes after the row's cached tokens. A step that reads another step's page writes
        nothing; its tokens sit at their positions there (the owner page holds every token: loop 0)."""
        if isinstance(step, int):
            start = self.lengths[self._page[step], rows] + cols
            return start if self._owns[step] else positions
        start = self.lengths[self.page_of[step], rows] + cols
        return torch.where(self.owner[step], start, positions)

    def put(self, step: int | torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, track: bool = True) -> None:
        """Store packed keys/values (``[N, kv_heads, head_dim]``) of tokens at (row, slot), at ``step``
        (an int, or one step per token); steps that do not own their page are skipped."""
        if len(slots) and int(slots.max()) >= self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots is too small for slot {int(slots.max())}; "
                             "allocate it with a larger capacity")
        if isinstance(step, int):
            if not self._owns[step]:
                return
            page = self._page[step]
            self.k[page][rows, :, slots] = k
            self.v[page][rows, :, slots] = v
            if track:
                self.lengths[page].scatter_reduce_(0, rows, slots + 1, "amax")
            return
        own = self.owner[step]
        if not bool(own.all()):
            step, rows, slots, k, v = step[own], rows[own], slots[own], k[own], v[own]
        pages = self.page_of[step]
        self.k[pages, rows, :, slots] = k
        self.v[pages, rows, :, slots] = v
        if track:
            self.lengths.view(-1).scatter_reduce_(0, pages * self.batch_size + rows, slots + 1, "amax")

    def write(self, step: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: Chunk) -> None:
        """Store the chunk's packed keys/values at ``step`` (an int, or one step per token)."""
        self.put(step, chunk.rows, chunk.slots, k, v, chunk.track_lengths)

    def advance(self, first_step: int | torch.Tensor, steps: int, chunk: Chunk) -> None:
        """After a pass of ``steps`` consecutive depth steps from ``first_step`` (an int, or one per token)
        over the chunk's tokens with ``track_lengths`` off: every written page's length, in one update."""
        offsets = torch.arange(steps, device=chunk.rows.device)
        step = (first_step + offsets[:, None]).expand(steps, chunk.num_tokens).reshape(-1)
        rows, slots = chunk.rows.repeat(steps), chunk.slots.repeat(steps)
        own = self.owner[step]
        pages = self.page_of[step[own]]
        self.lengths.view(-1).scatter_reduce_(0, pages * self.batch_size + rows[own], slots[own] + 1, "amax")

    def read(self, step: int | torch.Tensor, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values the chunk's queries may see: ``[n, kv_heads, kv_len, head_dim]``, views when
        the chunk covers every row at one step, a gathered copy otherwise."""
        kv = chunk.kv_len
        if isinstance(step, int):
            page = self._page[step]
            if chunk.all_rows:
                return self.k[page][:, :, :kv], self.v[page][:, :, :kv]
            return self.k[page][chunk.batch_rows, :, :kv], self.v[page][chunk.batch_rows, :, :kv]
        pages = self.page_of[step[chunk.first]]
        return self.k[pages, chunk.batch_rows, :, :kv], self.v[pages, chunk.batch_rows, :, :kv]

    def pages(self, step: int | torch.Tensor) -> int | torch.Tensor:
        """The page index of ``step`` (int, or per token): the paged attention kernels address pages."""
        return self._page[step] if isinstance(step, int) else self.page_of[step]

    def reset_rows(self, rows) -> None:
        """Free these rows for new sequences: their old keys become unreachable."""
        self.lengths[:, rows] = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

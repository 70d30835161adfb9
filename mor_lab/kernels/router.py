"""Gather and gated scatter-add for expert-choice routing (Mixture-of-Recursions).

At each recursion the router keeps a subset of tokens: ``h_sel = h[index]`` goes through the shared
block, and ``h[index] += g * block(h_sel)`` adds the result back, scaled by the router's gate; the other
tokens pass unchanged. Fusing the scale into the scatter saves the ``g * out`` intermediate and does the
update in place.

``index`` may repeat (a token chosen twice gets both updates, like ``index_add_``). Top-k selections never
repeat, but a race on a repeated row would corrupt the hidden state silently, and checking for repeats
would cost a host sync. Atomic adds would make the result depend on the order the GPU happens to run
them in (and the interpreter has no 16-bit float atomics), so the kernel sorts the index instead (one
small device sort, no host sync): the first of each run of equal rows adds the whole run, in index
order, which is exactly what a sequential ``index_add_`` computes, on every run.
A fused top-k over capacity is not here: ``torch.topk`` over a few thousand scores is already one kernel.
"""
from __future__ import annotations

import torch

from ._triton import jit, next_power_of_2, tl

BLOCK = 1024


def router_gather_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` (``[N, d]`` -> ``[k, d]``)."""
    return x[index]


def gated_scatter_add_reference(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                                gate: torch.Tensor) -> torch.Tensor:
    """In place ``h[index] += gate[:, None] * out`` (repeated rows accumulate); returns ``h``.
    ``h``: ``[N, d]``; ``index``: ``[k]`` in ``[0, N)``; ``out``: ``[k, d]``; ``gate``: ``[k]``."""
    return h.index_add_(0, index, (gate[:, None] * out).to(h.dtype))


@jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: row * d passes 2^31 on big batches
    src = tl.load(idx_ptr + row).to(tl.int64)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    tl.store(out_ptr + row * d + cols, tl.load(x_ptr + src * d + cols, mask=mask), mask=mask)


@jit
def _gated_scatter_add_kernel(h_ptr, sorted_ptr, order_ptr, out_ptr, gate_ptr, k, d, BLOCK: tl.constexpr):
    """One program per (sorted position, column block); only the first of each run of equal rows works."""
    i, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    dst = tl.load(sorted_ptr + i).to(tl.int64)
    before = tl.load(sorted_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    if before != dst:
        cols = part * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        h = tl.load(h_ptr + dst * d + cols, mask=mask, other=0.0)
        j = i
        row = dst
        while row == dst:  # the run i, i+1, ... of positions that name this row, in index order
            src = tl.load(order_ptr + j).to(tl.int64)
            g = tl.load(gate_ptr + src).to(tl.float32)
            update = (g * tl.load(out_ptr + src * d + cols, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
            h = (h.to(tl.float32) + update.to(tl.float32)).to(h.dtype)  # each add rounded, as index_add_ does
            j += 1
            row = tl.load(sorted_ptr + j, mask=j < k, other=-1).to(tl.int64)
        tl.store(h_ptr + dst * d + cols, h, mask=mask)


def _grid(rows: int, d: int):
    block = min(BLOCK, next_power_of_2(d))
    return (rows, (d + block - 1) // block), block


def router_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton gather; same signature as :func:`router_gather_reference`."""
    x = x.contiguous()
    d = x.shape[-1]
    out = torch.empty((len(index), *x.shape[1:]), dtype=x.dtype, device=x.device)
    if len(index) and d:
        grid, block = _grid(len(index), d)
        _gather_kernel[grid](x, index.contiguous(), out, d, BLOCK=block)
    return out


def gated_scatter_add(h: torch.Tensor, index: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Triton in-place gated scatter-add; same signature as :func:`gated_scatter_add_reference`."""
    if not h.is_contiguous():
        raise ValueError("gated_scatter_add updates h in place: h must be contiguous")
    d = h.shape[-1]
    if len(index) and d:
        grid, block = _grid(len(index), d)
        rows, order = torch.sort(index, stable=True)  # on the device: no host sync
        _gated_scatter_add_kernel[grid](h, rows.contiguous(), order.contiguous(), out.contiguous(), gate.contiguous(),
                                        len(index), d, BLOCK=block)
    return h

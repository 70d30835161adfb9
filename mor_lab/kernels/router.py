"""Gather and gated scatter-add for expert-choice routing (Mixture-of-Recursions).

At each recursion the router keeps a subset of tokens: ``h_sel = h[index]`` goes through the shared
block, and ``h[index] += g * block(h_sel)`` adds the result back, scaled by the router's gate; the other
tokens pass unchanged. Fusing the scale into the scatter saves the ``g * out`` intermediate and does the
update in place, one program per selected row. ``index`` must not repeat (top-k selections never do).
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
    """In place ``h[index] += gate[:, None] * out``; returns ``h``. ``out``: ``[k, d]``, ``gate``: ``[k]``."""
    h[index] = h[index] + (gate[:, None] * out).to(h.dtype)
    return h


@jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, d, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    src = tl.load(idx_ptr + row).to(tl.int64)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    tl.store(out_ptr + row * d + cols, tl.load(x_ptr + src * d + cols, mask=mask), mask=mask)


@jit
def _gated_scatter_add_kernel(h_ptr, idx_ptr, out_ptr, gate_ptr, d, BLOCK: tl.constexpr):
    row, part = tl.program_id(0), tl.program_id(1)
    dst = tl.load(idx_ptr + row).to(tl.int64)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(gate_ptr + row)
    update = (g * tl.load(out_ptr + row * d + cols, mask=mask, other=0.0)).to(h_ptr.dtype.element_ty)
    h = tl.load(h_ptr + dst * d + cols, mask=mask, other=0.0)
    tl.store(h_ptr + dst * d + cols, h + update, mask=mask)


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
        _gated_scatter_add_kernel[grid](h, index.contiguous(), out.contiguous(), gate.contiguous(), d, BLOCK=block)
    return h

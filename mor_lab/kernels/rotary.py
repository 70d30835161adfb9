"""Rotary position embedding applied to queries or keys in one pass (HF "rotate_half" layout).

``x * cos + rotate_half(x) * sin`` in eager PyTorch allocates the rotated copy, two products and a sum;
here one program per token rotates every head of that token, reading its cos/sin row once.
"""
from __future__ import annotations

import torch

from ._triton import jit, next_power_of_2, tl


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[..., heads, head_dim]``; ``cos``/``sin``: ``[..., 1, head_dim]`` (broadcast over heads)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # int64: tokens x heads x head_dim passes 2^31 on long prefills
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (j < half)
    dim = 2 * half
    base = token * heads * dim + h * dim
    x1 = tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + j, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + token * dim + j, mask=j < half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + token * dim + half + j, mask=j < half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + token * dim + j, mask=j < half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + token * dim + half + j, mask=j < half, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + j, (x1 * c1 - x2 * s1).to(out_ty), mask=mask)
    tl.store(out_ptr + base + half + j, (x2 * c2 + x1 * s2).to(out_ty), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton rotary; same signature as :func:`apply_rotary_reference`."""
    *lead, heads, dim = x.shape
    xs = x.reshape(-1, heads, dim).contiguous()
    c = cos.expand(*lead, 1, dim).reshape(-1, dim).contiguous()
    s = sin.expand(*lead, 1, dim).reshape(-1, dim).contiguous()
    out = torch.empty(xs.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if xs.shape[0]:
        _rotary_kernel[(xs.shape[0],)](xs, c, s, out, heads, dim // 2, BLOCK_H=next_power_of_2(heads),
                                       BLOCK_D=next_power_of_2(dim // 2), num_warps=1)
    return out.view(*lead, heads, dim)

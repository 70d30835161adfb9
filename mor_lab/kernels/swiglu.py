"""Fused SwiGLU activation: ``silu(gate) * up`` in one pass.

In eager PyTorch this is two kernels and an intermediate of the MLP's widest shape (``[N, 4d]``-ish)
written and read back; fused, gate and up are read once and the product written once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, tl

BLOCK = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (any shape, same for both)."""
    return F.silu(gate) * up


@jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: MLP activations pass 2^31
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)  # silu in fp32, rounded like torch's F.silu
    tl.store(out_ptr + offs, (act * u.to(tl.float32)).to(u.dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up``; same signature as :func:`silu_mul_reference`."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        _silu_mul_kernel[((n + BLOCK - 1) // BLOCK,)](g, u, out, n, BLOCK=BLOCK, num_warps=4)
    return out

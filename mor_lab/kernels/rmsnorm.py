"""Fused RMSNorm, optionally with the residual add that precedes it in every decoder layer.

Unfused, ``h = h + attn_out; y = norm(h)`` reads and writes the hidden state four times and launches
four or five kernels (add, square-mean, rsqrt-multiply, cast, weight); fused, one program per row reads
``x`` (and the residual) once and writes ``y`` (and the new residual) once. Decode batches are a few
dozen rows, so launch count and memory traffic are the whole cost.

Numerics follow ``Decoder``'s RMSNorm exactly: normalise in fp32, cast to the input dtype, then multiply
by the weight. ``weight`` may be ``[d]`` or one row per token ``[N, d]`` (tokens at different depth
steps with per-step norm weights in one batch).
"""
from __future__ import annotations

import torch

from ._triton import jit, next_power_of_2, num_warps, tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalize(x)``: ``x`` is ``[..., d]``, ``weight`` ``[d]`` or ``[..., d]``."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = residual + x``; returns ``(rms_norm(h), h)``."""
    h = residual + x
    return rms_norm_reference(h, weight, eps), h


@jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, d, w_row_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * d passes 2^31 on a long batch of wide rows
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # rounded to the input dtype, like torch (16-bit arithmetic done in fp32, as torch does)
        res = tl.load(res_ptr + row * d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * d + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / d + eps)
    w = tl.load(w_ptr + row * w_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * (xf * inv_rms).to(x.dtype).to(tl.float32)  # normalised, rounded to the input dtype, then weighted
    tl.store(y_ptr + row * d + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    per_row = weight.dim() > 1
    w = weight.reshape(-1, d).contiguous() if per_row else weight.contiguous()
    if per_row and w.shape[0] != rows:
        raise ValueError(f"per-row weight has {w.shape[0]} rows for {rows} tokens")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    h = torch.empty_like(x2) if residual is not None else x2
    res = residual.reshape(-1, d).contiguous() if residual is not None else x2
    if rows:
        block = next_power_of_2(d)
        _rms_norm_kernel[(rows,)](x2, res, w, y, h, d, d if per_row else 0, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps(block))
    return y.view(x.shape), h.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm: one program per row; same signature as :func:`rms_norm_reference`."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton residual add + RMSNorm in one pass; same signature as :func:`add_rms_norm_reference`."""
    return _launch(x, residual, weight, eps)

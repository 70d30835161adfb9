"""Multi-LoRA linear: ``y = x W^T + b + scale_i * (x A_i^T) B_i^T``, adapter ``i = adapter_ids[row]`` per row.

In a relaxed recursive transformer every loop of the shared block has its own LoRA (the relaxation).
Continuous depth-wise batching puts tokens of *different* loops in one batch, so one projection must
apply a different adapter to each row. Looping over adapters launches ``2 x loops`` small matmuls and
reads ``x`` once per adapter; here the shared ``W`` is read once for the whole batch and each row
gathers its own low-rank factors (the gathered / "BGMV" scheme of multi-adapter serving, Punica/S-LoRA):

1. shrink: ``t[row] = scale_i * x[row] @ A_i^T`` (``[N, r]``, fp32), one program per row;
2. expand, fused into the dense matmul: each ``[BLOCK_M, BLOCK_N]`` tile of ``x W^T`` adds
   ``sum_r t[:, r] * B_{i(row)}[:, r]`` before it is stored.

``adapter_ids[row] = -1`` means no adapter (that row is a plain linear). Adapters of different ranks
are stacked by zero-padding to the largest rank, which changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import dot, interpreted_bf16, jit, launch_options, next_power_of_2, tl

# Tiles and launch settings of the fused matmul, read at each call: `bench kernels` sweeps them on a GPU.
# block_m None: 16, 32 or 64 rows by the batch size.
MATMUL_LAUNCH = {"block_m": None, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": None}


def multi_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor,
                                scales: torch.Tensor) -> torch.Tensor:
    """``x``: ``[N, in]``; ``weight``: ``[out, in]``; ``lora_a``: ``[n, r, in]``; ``lora_b``: ``[n, out, r]``;
    ``adapter_ids``: ``[N]`` (``-1``: none); ``scales``: ``[n]``. Returns ``[N, out]``."""
    y = F.linear(x, weight, bias)
    for a in adapter_ids.unique().tolist():
        if a < 0:
            continue
        rows = adapter_ids == a
        y[rows] = y[rows] + (x[rows] @ lora_a[a].T) @ lora_b[a].T * scales[a].to(y.dtype)
    return y


@jit
def _shrink_kernel(x_ptr, a_ptr, ids_ptr, scale_ptr, t_ptr, k_dim, rank,
                   stride_an, stride_ar, stride_ak, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * k_dim passes 2^31 on big batches
    adapter = tl.load(ids_ptr + row).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if adapter >= 0:
        for k0 in range(0, k_dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * k_dim + k, mask=k < k_dim, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + adapter * stride_an + r[:, None] * stride_ar + k[None, :] * stride_ak,
                        mask=(r[:, None] < rank) & (k[None, :] < k_dim), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        acc = acc * tl.load(scale_ptr + adapter).to(tl.float32)
    tl.store(t_ptr + row * rank + r, acc, mask=r < rank)


@jit
def _matmul_expand_kernel(x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, ids_ptr, y_ptr, m_dim, n_dim, k_dim, rank,
                          stride_bn, stride_bo, stride_br, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                          UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows x width passes 2^31 on big batches
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):  # the shared dense weight: read once for every row of the tile
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * k_dim + k[None, :], mask=(m[:, None] < m_dim) & (k[None, :] < k_dim),
                    other=0.0)
        w = tl.load(w_ptr + n[None, :] * k_dim + k[:, None], mask=(n[None, :] < n_dim) & (k[:, None] < k_dim),
                    other=0.0)
        acc += dot(x, w, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < n_dim, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:  # each row adds its own adapter's expand: t[row] @ B_i^T
        adapter = tl.load(ids_ptr + m, mask=m < m_dim, other=-1).to(tl.int64)
        row_ok = (m < m_dim) & (adapter >= 0)
        for r in range(0, rank):
            t = tl.load(t_ptr + m * rank + r, mask=row_ok, other=0.0)
            b = tl.load(b_ptr + adapter[:, None] * stride_bn + n[None, :] * stride_bo + r * stride_br,
                        mask=row_ok[:, None] & (n[None, :] < n_dim), other=0.0).to(tl.float32)
            acc += t[:, None] * b
    tl.store(y_ptr + m[:, None] * n_dim + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < m_dim) & (n[None, :] < n_dim))


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, adapter_ids: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Triton multi-LoRA linear; same signature as :func:`multi_lora_linear_reference` (any ``lora_b`` strides:
    pass ``B`` stored as ``[n, r, out]`` and transposed for coalesced loads)."""
    n_adapters, rank, k_dim = lora_a.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_dim).contiguous()
    m_dim, n_dim = x2.shape[0], weight.shape[0]
    w = weight.contiguous()
    a = lora_a.contiguous()
    ids = adapter_ids.reshape(-1).to(torch.int32).contiguous()
    y = torch.empty(m_dim, n_dim, dtype=x.dtype, device=x.device)
    if m_dim == 0:
        return y.view(*lead, n_dim)
    has_lora = rank > 0 and n_adapters > 0  # rows with id -1 get t = 0 (no host sync to skip them)
    t = torch.zeros(m_dim, max(rank, 1), dtype=torch.float32, device=x.device)
    if has_lora:
        _shrink_kernel[(m_dim,)](x2, a, ids, scales.float().contiguous(), t, k_dim, rank, *a.stride(),
                                 BLOCK_R=next_power_of_2(rank), BLOCK_K=min(128, max(16, next_power_of_2(k_dim))))
    block_m = MATMUL_LAUNCH["block_m"] or (16 if m_dim <= 16 else 32 if m_dim <= 64 else 64)
    block_n, block_k = MATMUL_LAUNCH["block_n"], MATMUL_LAUNCH["block_k"]
    grid = (triton_cdiv(m_dim, block_m), triton_cdiv(n_dim, block_n))
    _matmul_expand_kernel[grid](x2, w, bias if bias is not None else w, t, lora_b, ids, y, m_dim, n_dim, k_dim,
                                rank, *lora_b.stride(), HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                                UPCAST=interpreted_bf16(x2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                **launch_options(MATMUL_LAUNCH))
    return y.view(*lead, n_dim)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

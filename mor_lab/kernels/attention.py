"""Ragged attention over a paged KV cache: the operation continuous depth-wise batching spends its time in.

In a CDB batch every slot holds a different sequence, at a different depth step (loop), with its own
cache length. Padded attention (``scaled_dot_product_attention`` over ``[B, heads, max_len]`` with a
mask) reads and multiplies every slot up to the *longest* length; the ragged kernel stops each slot at
its own length, so it moves exactly the bytes of the live keys and values.

The cache is paged: ``k_cache``/``v_cache`` are ``[pages, kv_heads, page_size, head_dim]`` (any strides,
contiguous head_dim), and ``block_tables[t, j]`` names the page that holds positions
``j*page_size .. (j+1)*page_size - 1`` of query ``t``'s sequence. Sequences and loops can then grow and
be freed page by page. mor_lab's ``KVCache`` (``[steps, batch, kv_heads, capacity, head_dim]``) is the
special case of one page of ``capacity`` positions per (step, slot): its view ``[steps*batch, ...]`` with
``block_tables[t] = [step * batch + slot]``.

- ``paged_decode_attention``: one query token per slot (``q``: ``[T, heads, head_dim]``) that sees the
  first ``seq_lens[t]`` positions. One program per (slot, kv head, split) loads each key/value tile once
  for all the query heads that share it (grouped-query attention) and keeps an online softmax in fp32.
  With ``num_splits > 1`` each slot's length is cut into that many parts whose partial results are
  merged by a second small kernel (flash-decoding): enough programs to fill the GPU at small batches.
- ``paged_chunk_attention``: several causal query tokens per sequence, packed (``q``: ``[N, heads,
  head_dim]``, sequence ``s`` owning rows ``query_starts[s]:query_starts[s+1]``, its *last* queries:
  query ``j`` of ``q_len`` sees positions ``< seq_lens[s] - q_len + j + 1``). Prefill, FREE's parallel deep
  pass, several tokens per slot. One program per (sequence, query tile, head), tiles multiplied with
  ``tl.dot``.

A sequence with no visible positions gets a zero output (padded SDPA would give NaN). Outputs are
contiguous ``[tokens, heads, head_dim]`` whatever the strides of ``q``.

No wrapper reads a device value on the host, so a decode step can be captured in a CUDA graph: the
chunk kernel's grid needs the longest query count, which the caller knows (``max_query_len``; without it
the wrapper takes the upper bound ``q.shape[0]`` and the surplus programs exit at once).
"""
from __future__ import annotations

import functools
import math

import torch

from ._triton import dot, interpreted_bf16, jit, launch_options, next_power_of_2, tl

# Launch settings of the decode kernel, read at each call: `bench kernels` sweeps them on a GPU (the
# interpreter ignores warps and stages). block_n None: the largest tile whose [G, N, D] product fits.
# num_splits None: from the batch and the SM count.
DECODE_LAUNCH = {"num_splits": None, "block_n": None, "num_warps": 4, "num_stages": None}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence: ``[kv_heads, length, head_dim]``."""
    pages = table[: _cdiv(length, cache.shape[2])].long()
    return cache[pages].transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """q ``[heads, n, D]``, k/v ``[kv_heads, L, D]`` -> ``[heads, n, D]`` in fp32 (softmax over visible keys)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    scores = q.float() @ k.transpose(1, 2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None, num_splits=None):
    """``q``: ``[T, heads, D]``; caches ``[pages, kv_heads, page_size, D]``; ``block_tables``: ``[T, max_pages]``;
    ``seq_lens``: ``[T]``. Returns ``[T, heads, D]``. (``num_splits`` only tunes the kernel.)"""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    for t, length in enumerate(seq_lens.tolist()):
        if length > 0:
            k, v = _gather_kv(k_cache, block_tables[t], length), _gather_kv(v_cache, block_tables[t], length)
            out[t] = _attend(q[t][:, None], k, v, None, scale)[:, 0].to(q.dtype)
    return out


def paged_chunk_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_starts, scale=None,
                                    max_query_len=None):
    """``q``: packed ``[N, heads, D]``; ``query_starts``: ``[S + 1]``; ``block_tables``: ``[S, max_pages]``;
    ``seq_lens``: ``[S]`` (keys visible to the sequence's last query); ``max_query_len``: an upper bound on
    any sequence's query count (the kernel's grid; checked here). Returns ``[N, heads, D]``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    starts = query_starts.tolist()
    longest = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    if max_query_len is not None and longest > max_query_len:
        raise ValueError(f"max_query_len={max_query_len} but a sequence has {longest} queries: pass the chunk's "
                         "width (the most queries any sequence has), or None for the upper bound q.shape[0]")
    for s, length in enumerate(seq_lens.tolist()):
        q_len = starts[s + 1] - starts[s]
        if q_len == 0 or length == 0:
            continue
        k, v = _gather_kv(k_cache, block_tables[s], length), _gather_kv(v_cache, block_tables[s], length)
        rows = torch.arange(q_len, device=q.device)[:, None] + (length - q_len)
        mask = torch.arange(length, device=q.device)[None, :] <= rows
        qs = q[starts[s]:starts[s + 1]].transpose(0, 1)  # [heads, q_len, D]
        out[starts[s]:starts[s + 1]] = _attend(qs, k, v, mask[None], scale).transpose(0, 1).to(q.dtype)
    return out


@jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_ptr, m_ptr, l_ptr,
                   scale, group, head_dim, page_size, table_stride, num_splits,
                   stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
                   stride_ot, stride_oh, DIRECT: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    t, kvh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g  # the query heads that share this kv head
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=(g[:, None] < group) & (d[None, :] < head_dim), other=0.0).to(tl.float32)
    length = tl.load(lens_ptr + t)
    # this split's share of the sequence, in whole tiles
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < hi
        page = tl.load(table_ptr + t * table_stride + n // page_size, mask=valid, other=0).to(tl.int64)
        tok = n % page_size
        kv_mask = valid[:, None] & (d[None, :] < head_dim)
        k = tl.load(k_ptr + (page * stride_kp + kvh * stride_kh + tok * stride_kt)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + (page * stride_vp + kvh * stride_vh + tok * stride_vt)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out_mask = g < group
    if DIRECT:  # one split: normalise and store the output (an empty sequence gives zeros)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask[:, None] & (d[None, :] < head_dim))
    else:  # unnormalised partial result + its running max and sum, merged by _merge_kernel
        row = (t * (group * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=out_mask[:, None])
        tl.store(m_ptr + row, m_i, mask=out_mask)
        tl.store(l_ptr + row, l_i, mask=out_mask)


@jit
def _merge_kernel(part_ptr, m_ptr, l_ptr, out_ptr, head_dim, num_splits,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (token, head): softmax-weighted sum of the splits' partial outputs into the contiguous
    ``[T, heads, head_dim]`` output."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    l = tl.load(l_ptr + row * num_splits + s, mask=s < num_splits, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # an empty sequence: every split is empty
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
    part = tl.load(part_ptr + (row * num_splits + s)[:, None] * BLOCK_D + d[None, :],
                   mask=(s[:, None] < num_splits), other=0.0)
    total = tl.sum(w * l, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * part, axis=0) / total
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(q: torch.Tensor, kv_heads: int) -> int:
    """Enough (slot, kv head, split) programs for about two waves over the GPU's SMs; one on CPU."""
    if not q.is_cuda:
        return 1
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return max(1, min(16, (2 * sms) // max(1, q.shape[0] * kv_heads)))


def _check_cache(k_cache, v_cache):
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged attention needs the cache's head_dim contiguous (stride 1)")


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, num_splits=None):
    """Triton ragged decode attention; same signature as :func:`paged_decode_attention_reference`."""
    _check_cache(k_cache, v_cache)
    tokens, heads, head_dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    splits = num_splits or DECODE_LAUNCH["num_splits"] or _default_splits(q, kv_heads)
    out = q.new_empty(tokens, heads, head_dim)  # contiguous whatever q's strides: the merge kernel relies on it
    if tokens == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    table = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    block_g, block_d = next_power_of_2(group), next_power_of_2(head_dim)
    block_n = DECODE_LAUNCH["block_n"] or max(16, min(64, 16384 // (block_g * block_d)))  # [G, N, D] in registers
    direct = splits == 1
    rows = 1 if direct else tokens * heads * splits  # scratch only when splits are merged
    partial = torch.empty(rows, block_d, dtype=torch.float32, device=q.device)
    m = torch.empty(rows, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    _decode_kernel[(tokens, kv_heads, splits)](
        q, k_cache, v_cache, table, lens, out, partial, m, l_sum, scale, group, head_dim, page_size,
        table.stride(0), splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), DIRECT=direct,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, **launch_options(DECODE_LAUNCH))
    if not direct:
        _merge_kernel[(tokens * heads,)](partial, m, l_sum, out, head_dim, splits,
                                         BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d, num_warps=1)
    return out


@jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, starts_ptr, out_ptr,
                  scale, group, head_dim, page_size, table_stride,
                  stride_qt, stride_qh, stride_ot, stride_oh, stride_kp, stride_kh, stride_kt,
                  stride_vp, stride_vh, stride_vt,
                  UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, tile, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = head // group
    first = tl.load(starts_ptr + seq).to(tl.int64)  # int64: row * stride passes 2^31 on long prefills
    q_len = tl.load(starts_ptr + seq + 1) - first
    length = tl.load(lens_ptr + seq)
    context = length - q_len  # positions before this chunk's first query
    i = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # query index within the sequence's chunk
    d = tl.arange(0, BLOCK_D)
    row_ok = i < q_len
    q = tl.load(q_ptr + (first + i)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < head_dim), other=0.0)
    # causal: this tile's last query sees positions < context + (tile + 1) * BLOCK_Q
    end = tl.where(tile * BLOCK_Q < q_len, tl.minimum(length, context + (tile + 1) * BLOCK_Q), 0)
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < end
        page = tl.load(table_ptr + seq * table_stride + n // page_size, mask=valid, other=0).to(tl.int64)
        tok = n % page_size
        kv_mask = valid[:, None] & (d[None, :] < head_dim)
        k = tl.load(k_ptr + (page * stride_kp + kvh * stride_kh + tok * stride_kt)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        s = dot(q, tl.trans(k), UPCAST) * scale  # [BLOCK_Q, BLOCK_N]
        visible = (n[None, :] <= context + i[:, None]) & valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + (page * stride_vp + kvh * stride_vh + tok * stride_vt)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (first + i)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < head_dim))


def paged_chunk_attention(q, k_cache, v_cache, block_tables, seq_lens, query_starts, scale=None,
                          max_query_len=None):
    """Triton ragged causal chunk attention; same signature as :func:`paged_chunk_attention_reference`.
    ``max_query_len`` (the chunk's width) sizes the grid without a host sync; a value below the longest
    sequence's query count would leave its later queries zero (the reference raises)."""
    _check_cache(k_cache, v_cache)
    tokens, heads, head_dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = q.new_zeros(tokens, heads, head_dim)  # contiguous whatever q's strides
    sequences = len(seq_lens)
    if tokens == 0 or sequences == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    starts = query_starts.to(torch.int32).contiguous()
    table = block_tables.to(torch.int32).contiguous()
    block_q = 16
    max_q = tokens if max_query_len is None else max(1, min(int(max_query_len), tokens))  # host sizes only
    block_d = max(16, next_power_of_2(head_dim))
    _chunk_kernel[(sequences, _cdiv(max_q, block_q), heads)](
        q, k_cache, v_cache, table, seq_lens.to(torch.int32).contiguous(), starts, out, scale, heads // kv_heads,
        head_dim, page_size, table.stride(0), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), UPCAST=interpreted_bf16(q), BLOCK_Q=block_q, BLOCK_N=32, BLOCK_D=block_d, num_warps=4)
    return out

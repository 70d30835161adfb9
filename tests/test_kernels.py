"""Every Triton kernel against its PyTorch reference: under the interpreter on CPU, natively on CUDA.

Shapes are tiny but odd (1, 5, 37, 123), with grouped-query ratios, ragged lengths including zero and
exactly full pages, fp32, fp16 and bf16. The engine test checks that the whole model generates the same
tokens with the kernels as with the references.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (also set in conftest.py)

import pytest  # noqa: E402

pytest.importorskip("triton")

from mor_lab import kernels  # noqa: E402
from mor_lab.kernels import attention, multi_lora, rmsnorm, rotary, router, swiglu  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) per dtype. fp32: the kernels accumulate in another order (tl.dot runs in exact fp32, not TF32,
# also on CUDA). fp16 rounds once per stored value where the reference rounds after each eager op. bf16 has
# 8 significant bits (an ulp is 2^-7 relative), and Triton's interpreter rounds fp32 -> bf16 by truncation
# where CUDA rounds to nearest: interpreted bf16 is checked to about two ulps.
TOL = {torch.float32: (1e-5, 1e-5) if not CUDA else (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (2e-2, 2e-2)}
# multi-LoRA in 16 bits: the reference rounds x A^T, its product with B^T, the scale and the sum separately
LORA_TOL = {torch.float32: (1e-5, 1e-5) if not CUDA else (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
            torch.bfloat16: (6e-2, 6e-2)}
ATTN_TOL = {torch.float32: (2e-5, 1e-4) if not CUDA else (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
            torch.bfloat16: (2e-2, 2e-2)}
DTYPE_IDS = ["fp32", "fp16", "bf16"]  # test ids: `pytest -k bf16` runs one dtype (scripts/gpu_check.sh)
EXACT_ROUNDING = {torch.float32, torch.float16} | ({torch.bfloat16} if CUDA else set())  # see above


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.use("triton"):
        yield


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def close(a, b, tol):
    atol, rtol = tol
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def test_dispatch_override_and_errors():
    x = rand(3, 8)
    assert kernels.use_triton(x)
    with kernels.use("reference"):
        assert not kernels.use_triton(x)
    with kernels.use("auto"):
        assert kernels.use_triton(x) == CUDA
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("fast")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,d", [(1, 5), (5, 37), (37, 123), (3, 64)])
def test_rms_norm(rows, d, dtype):
    x, w = rand(rows, d, dtype=dtype), rand(d, dtype=dtype, seed=1) + 1
    close(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_reference(x, w, 1e-5), TOL[dtype])
    res = rand(rows, d, dtype=dtype, seed=2)
    y, h = rmsnorm.add_rms_norm(x, res, w, 1e-6)
    y_ref, h_ref = rmsnorm.add_rms_norm_reference(x, res, w, 1e-6)
    if dtype in EXACT_ROUNDING:
        assert torch.equal(h, h_ref)  # the residual add is one rounding in both
    close(h, h_ref, TOL[dtype])
    close(y, y_ref, TOL[dtype])
    w_rows = rand(rows, d, dtype=dtype, seed=3)  # one weight per token (per-step norms in one batch)
    close(rmsnorm.rms_norm(x, w_rows, 1e-5), rmsnorm.rms_norm_reference(x, w_rows, 1e-5), TOL[dtype])


def test_rms_norm_keeps_leading_shape_and_empty():
    x, w = rand(2, 5, 37), rand(37)
    assert rmsnorm.rms_norm(x, w, 1e-5).shape == (2, 5, 37)
    assert rmsnorm.rms_norm(x[:0], w, 1e-5).shape == (0, 5, 37)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (5, 37), (3, 1123)])
def test_silu_mul(shape, dtype):
    g, u = rand(*shape, dtype=dtype) * 3, rand(*shape, dtype=dtype, seed=1)
    close(swiglu.silu_mul(g, u), swiglu.silu_mul_reference(g, u), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,heads,dim", [((1,), 1, 2), ((5,), 3, 10), ((2, 37), 4, 16), ((123,), 9, 64)])
def test_apply_rotary(lead, heads, dim, dtype):
    x = rand(*lead, heads, dim, dtype=dtype)
    angles = rand(*lead, 1, dim // 2, seed=1) * 3
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    close(rotary.apply_rotary(x, cos, sin), rotary.apply_rotary_reference(x, cos, sin), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,d,k", [(1, 5, 1), (37, 123, 5), (8, 1500, 3)])
def test_router_gather_and_gated_scatter_add(rows, d, k, dtype):
    x = rand(rows, d, dtype=dtype)
    index = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:k].sort().values.to(DEVICE)
    assert torch.equal(router.router_gather(x, index), router.router_gather_reference(x, index))
    out, gate = rand(len(index), d, dtype=dtype, seed=1), rand(len(index), seed=2).sigmoid() * 0.1
    got = router.gated_scatter_add(x.clone(), index, out, gate)
    close(got, router.gated_scatter_add_reference(x.clone(), index, out, gate), TOL[dtype])
    untouched = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    untouched[index] = False
    assert torch.equal(got[untouched], x[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,d_in,d_out,rank,adapters", [(1, 5, 7, 1, 1), (37, 40, 123, 4, 3), (5, 64, 37, 8, 2)])
def test_multi_lora_linear(rows, d_in, d_out, rank, adapters, dtype):
    x, w = rand(rows, d_in, dtype=dtype), rand(d_out, d_in, dtype=dtype, seed=1) / d_in ** 0.5
    a, b = rand(adapters, rank, d_in, dtype=dtype, seed=2) / d_in ** 0.5, rand(adapters, d_out, rank, dtype=dtype,
                                                                                 seed=3)
    ids = torch.randint(-1, adapters, (rows,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    scales = torch.linspace(0.5, 2.0, adapters, device=DEVICE)
    bias = rand(d_out, dtype=dtype, seed=5)
    for bb in (None, bias):
        got = multi_lora.multi_lora_linear(x, w, bb, a, b, ids, scales)
        close(got, multi_lora.multi_lora_linear_reference(x, w, bb, a, b, ids, scales), LORA_TOL[dtype])
    # B stored as [n, r, out] and passed transposed (coalesced loads): same result
    got_t = multi_lora.multi_lora_linear(x, w, None, a, b.transpose(1, 2).contiguous().transpose(1, 2), ids, scales)
    close(got_t, multi_lora.multi_lora_linear_reference(x, w, None, a, b, ids, scales), LORA_TOL[dtype])
    no_adapter = torch.full_like(ids, -1)
    close(multi_lora.multi_lora_linear(x, w, None, a, b, no_adapter, scales), x.float() @ w.float().T, LORA_TOL[dtype])


def paged_cache(lengths, kv_heads, dim, page_size, dtype, seed=0):
    """A shuffled page pool holding each sequence's keys/values, and the block tables that find them."""
    pages_per_seq = [max(1, -(-n // page_size)) for n in lengths]
    total = sum(pages_per_seq) + 2  # spare pages: tables need not cover the pool
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    table = torch.zeros(len(lengths), max(pages_per_seq), dtype=torch.int32)
    used = 0
    for s, count in enumerate(pages_per_seq):
        table[s, :count] = order[used:used + count].int()
        used += count
    k = rand(total, kv_heads, page_size, dim, dtype=dtype, seed=seed + 1)
    v = rand(total, kv_heads, page_size, dim, dtype=dtype, seed=seed + 2)
    return k, v, table.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


# lengths: ragged, zero, exactly one full page (8), two full pages (16), one past a page
DECODE_CASES = [([5], 1, 1, 16), ([0, 8, 16, 1, 9], 4, 2, 16), ([37, 3, 0, 8], 6, 2, 10), ([123, 17, 64], 8, 8, 32),
                ([33, 1], 3, 3, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lengths,heads,kv_heads,dim", DECODE_CASES)
def test_paged_decode_attention(lengths, heads, kv_heads, dim, dtype):
    k, v, table, lens = paged_cache(lengths, kv_heads, dim, 8, dtype)
    q = rand(len(lengths), heads, dim, dtype=dtype, seed=7)
    want = attention.paged_decode_attention_reference(q, k, v, table, lens)
    for splits in (1, 3):
        close(attention.paged_decode_attention(q, k, v, table, lens, num_splits=splits), want, ATTN_TOL[dtype])
    assert torch.all(want[lens == 0] == 0)


def test_paged_decode_attention_on_the_contiguous_kv_cache():
    """mor_lab's KVCache is one page of `capacity` positions per (step, slot): no copy needed."""
    steps, batch, kv_heads, cap, dim = 3, 4, 2, 13, 16
    cache = rand(steps, batch, kv_heads, cap, dim)
    pool = cache.view(steps * batch, kv_heads, cap, dim)
    step_of = torch.tensor([0, 2, 1, 2], device=DEVICE)
    table = (step_of * batch + torch.arange(batch, device=DEVICE))[:, None]
    lens = torch.tensor([13, 0, 5, 1], device=DEVICE)
    q = rand(batch, 4, dim, seed=3)
    close(attention.paged_decode_attention(q, pool, pool, table, lens),
          attention.paged_decode_attention_reference(q, pool, pool, table, lens), ATTN_TOL[torch.float32])


CHUNK_CASES = [([5], [5], 1, 1, 16), ([8, 16, 7], [1, 16, 3], 4, 2, 16), ([37, 0, 9], [20, 0, 1], 6, 3, 10),
               ([40, 17], [33, 17], 2, 1, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lengths,q_lens,heads,kv_heads,dim", CHUNK_CASES)
def test_paged_chunk_attention(lengths, q_lens, heads, kv_heads, dim, dtype):
    k, v, table, lens = paged_cache(lengths, kv_heads, dim, 8, dtype, seed=1)
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0)
    q = rand(int(starts[-1]), heads, dim, dtype=dtype, seed=9)
    want = attention.paged_chunk_attention_reference(q, k, v, table, lens, starts)
    close(attention.paged_chunk_attention(q, k, v, table, lens, starts), want, ATTN_TOL[dtype])
    # the last query of each sequence is exactly a decode query
    last = starts[1:][torch.tensor(q_lens, device=DEVICE) > 0] - 1
    seqs = torch.tensor([s for s, n in enumerate(q_lens) if n > 0], device=DEVICE)
    close(want[last], attention.paged_decode_attention_reference(q[last], k, v, table[seqs], lens[seqs]),
          ATTN_TOL[dtype])


def test_gated_scatter_add_accumulates_repeated_indices():
    """A row named several times gets every update, in index order (``index_add_``), not a race."""
    for dtype in DTYPES:
        h = rand(6, 37, dtype=dtype)
        index = torch.tensor([3, 0, 3, 5, 3, 0], device=DEVICE)
        out, gate = rand(6, 37, dtype=dtype, seed=1), rand(6, seed=2).sigmoid()
        want = h.clone().index_add_(0, index, (gate[:, None] * out).to(dtype))
        close(router.gated_scatter_add(h.clone(), index, out, gate), want, TOL[dtype])
        close(router.gated_scatter_add_reference(h.clone(), index, out, gate), want, TOL[dtype])


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_attention_with_strided_q(splits):
    """q as the decoder may hand it over: heads-major storage viewed [T, heads, D] (the merge path used to
    store as if the output were laid out like q), and a head_dim that is not contiguous."""
    k, v, table, lens = paged_cache([5, 0, 17, 9], 2, 16, 8, torch.float32)
    q = rand(4, 4, 16, seed=7)
    want = attention.paged_decode_attention_reference(q, k, v, table, lens)
    transposed = q.transpose(0, 1).contiguous().transpose(0, 1)  # stride(-1) == 1, not contiguous
    strided_d = q.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # head_dim not contiguous
    for view in (transposed, strided_d):
        assert torch.equal(view, q) and not view.is_contiguous()
        got = attention.paged_decode_attention(view, k, v, table, lens, num_splits=splits)
        assert got.is_contiguous()
        close(got, want, ATTN_TOL[torch.float32])


def test_paged_chunk_attention_with_strided_q_and_max_query_len():
    k, v, table, lens = paged_cache([8, 16, 7], 2, 16, 8, torch.float32, seed=1)
    q_lens = [1, 16, 3]
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0)
    q = rand(20, 4, 16, seed=9)
    want = attention.paged_chunk_attention_reference(q, k, v, table, lens, starts)
    for view in (q.transpose(0, 1).contiguous().transpose(0, 1), q.permute(2, 0, 1).contiguous().permute(1, 2, 0)):
        close(attention.paged_chunk_attention(view, k, v, table, lens, starts), want, ATTN_TOL[torch.float32])
    # the grid sized by the caller's bound (no host sync), exact or loose, gives the same result
    for bound in (16, 17, 40):
        close(attention.paged_chunk_attention(q, k, v, table, lens, starts, max_query_len=bound), want,
              ATTN_TOL[torch.float32])
    with pytest.raises(ValueError, match="max_query_len"):
        attention.paged_chunk_attention_reference(q, k, v, table, lens, starts, max_query_len=15)


def test_paged_attention_over_a_cache_past_2_31_elements():
    """Page offsets are int64: a cache of more than 2^31 elements (allocated lazily: only the pages the
    sequences read are ever touched) read from its last pages."""
    kv_heads, page, dim = 2, 16, 64
    pages = 2**31 // (kv_heads * page * dim) + 8
    k_cache = torch.empty(pages, kv_heads, page, dim, dtype=torch.float16, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    assert k_cache.numel() > 2**31
    lengths = [20, 5]
    table = torch.tensor([[pages - 1, pages - 4], [pages - 3, 0]], dtype=torch.int32, device=DEVICE)
    for p_ in (pages - 1, pages - 4, pages - 3):
        k_cache[p_], v_cache[p_] = rand(kv_heads, page, dim, dtype=torch.float16, seed=p_ % 7), \
            rand(kv_heads, page, dim, dtype=torch.float16, seed=p_ % 5)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = rand(2, 4, dim, dtype=torch.float16, seed=3)
    close(attention.paged_decode_attention(q, k_cache, v_cache, table, lens, num_splits=2),
          attention.paged_decode_attention_reference(q, k_cache, v_cache, table, lens), ATTN_TOL[torch.float16])
    starts = torch.tensor([0, 3, 5], device=DEVICE)
    qc = rand(5, 4, dim, dtype=torch.float16, seed=4)
    close(attention.paged_chunk_attention(qc, k_cache, v_cache, table, lens, starts, max_query_len=3),
          attention.paged_chunk_attention_reference(qc, k_cache, v_cache, table, lens, starts),
          ATTN_TOL[torch.float16])


def test_every_dot_goes_through_the_precision_helper():
    """On a GPU ``tl.dot`` on fp32 defaults to TF32, which neither the interpreter nor the references use:
    every kernel multiplies through ``_triton.dot``, which fixes the precision."""
    import inspect
    from mor_lab.kernels import _triton
    for module in (attention, multi_lora, rmsnorm, rotary, router, swiglu):
        assert "tl.dot(" not in inspect.getsource(module), module.__name__
    assert 'input_precision="ieee"' in inspect.getsource(_triton)


# --- the engine through the dispatcher: same tokens with the kernels as with the references -------------

import mor_lab  # noqa: E402
from mor_lab.engine.plan import LoopStructure  # noqa: E402
from mor_lab.engine.policies import FixedLoops, LoopExit  # noqa: E402
from mor_lab.models.cache import Chunk, KVCache  # noqa: E402
from mor_lab.models.decoder import LoRA, StepDelta  # noqa: E402

STRUCTURE = LoopStructure(prelude=1, block=1, loops=3, coda=1)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
RULE = FixedLoops([0.4, 0.3, 0.3], seed=1)


def tiny_recursive(relaxed: bool):
    model = mor_lab.random_decoder(num_layers=3, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
                                   seed=5, std=0.3)
    model.plan = STRUCTURE.plan()
    if relaxed:  # each loop its own LoRA (different ranks) and its own input norm: the relaxation
        g = torch.Generator().manual_seed(1)
        for step, rank in zip(STRUCTURE.loop_steps(0).start + torch.arange(3), (2, 4, 3)):
            lora = {name: LoRA(i, o, int(rank), scale=0.5) for name, i, o in
                    (("q_proj", 32, 32), ("v_proj", 32, 16), ("down_proj", 128, 32))}
            for m in lora.values():
                m.A.data, m.B.data = torch.randn(m.A.shape, generator=g) * 0.3, torch.randn(m.B.shape, generator=g) * 0.3
            norms = {"input_layernorm": 1 + 0.2 * torch.randn(32, generator=g)}
            model.step_deltas[str(int(step))] = StepDelta(lora, norms)
    return model.to(DEVICE)


def generate_both(model):
    """The plain engine, static-batching loops with exits, and CDB with 2 slots for 3 requests."""
    full, _ = mor_lab.generate_ids(model, PROMPTS, 3, eos_token_ids=[])
    static, _ = mor_lab.generate_ids(model, PROMPTS, 3, eos_token_ids=[], policy=LoopExit(RULE))
    cdb, _ = mor_lab.generate_ids(model, PROMPTS, 3, eos_token_ids=[], policy=LoopExit(RULE), slots=2,
                                  mode="continuous")
    return full, static, cdb


def run_steps(model, h, cache, chunk):
    rope = model.rope(chunk.positions)
    for step in range(model.num_steps):
        h = model.run_step(step, h, rope, cache, chunk)
    return h


@pytest.mark.parametrize("relaxed", [False, True])
def test_engine_tokens_identical_with_kernels_and_references(relaxed):
    model = tiny_recursive(relaxed)
    with kernels.use("reference"):
        want = generate_both(model)
    got = generate_both(model)  # the autouse fixture forces the Triton kernels
    assert got == want
    assert want[1] == want[2]  # CDB (multi-LoRA across loops when relaxed) == static batching


def test_engine_hidden_states_close_with_kernels_and_references():
    """Prefill (chunk attention) then one decode step (decode attention) straight through the layers."""
    model = tiny_recursive(relaxed=True)
    lengths = torch.tensor([3, 0, 5], device=DEVICE)
    states = []
    for backend in ("reference", "triton"):
        with kernels.use(backend):
            cache = KVCache.for_model(model, 3, 8)
            ids = torch.arange(1, int(lengths.sum()) + 1, device=DEVICE)
            h = run_steps(model, model.embed(ids), cache, Chunk.prefill(lengths))
            d = run_steps(model, model.embed(torch.tensor([7, 8, 9], device=DEVICE)), cache, Chunk.decode(lengths))
            states.append((h, d))
    for a, b in zip(*states):
        close(a, b, (1e-4, 1e-4) if not CUDA else (5e-3, 5e-3))

"""Every row kernel on a tensor of more than 2^31 elements, natively on CUDA (scripts/gpu_check.sh runs it).

Row and program offsets (``row * d``) are int64 in the kernels; in int32 they wrap past 2^31 elements and
the last rows read and write someone else's memory. The interpreter cannot run a grid this large on a
CPU in test time (the cache-side case, which it can, is in test_kernels.py), so this file needs a GPU
with about 20 GiB free. Only the rows past the 2^31 boundary are compared with the reference.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the >2^31-element kernel runs need a CUDA GPU (scripts/gpu_check.sh)", allow_module_level=True)
pytest.importorskip("triton")

from mor_lab import kernels  # noqa: E402
from mor_lab.kernels import multi_lora, rmsnorm, rotary, router, swiglu  # noqa: E402

BIG = 2**31 + 2**21  # elements: just past int32
DTYPE = torch.bfloat16
TOL = dict(atol=2e-2, rtol=2e-2)
TAIL = 4  # rows compared: the last ones, whose int32 offsets would have wrapped


@pytest.fixture(autouse=True)
def gpu_memory():
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    with kernels.use("triton"), torch.inference_mode():
        yield
    torch.cuda.empty_cache()


def big(rows, cols, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(rows, cols, device="cuda", dtype=DTYPE, generator=g)


def test_rms_norm_and_add_rms_norm():
    d = 4096
    x, res, w = big(BIG // d, d), big(BIG // d, d, 1), big(1, d, 2)[0] + 1
    y = rmsnorm.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y[-TAIL:], rmsnorm.rms_norm_reference(x[-TAIL:], w, 1e-5), **TOL)
    del y
    y, h = rmsnorm.add_rms_norm(x, res, w, 1e-5)
    y_ref, h_ref = rmsnorm.add_rms_norm_reference(x[-TAIL:], res[-TAIL:], w, 1e-5)
    torch.testing.assert_close(h[-TAIL:], h_ref, **TOL)
    torch.testing.assert_close(y[-TAIL:], y_ref, **TOL)


def test_silu_mul():
    gate, up = big(BIG // 8192, 8192), big(BIG // 8192, 8192, 1)
    out = swiglu.silu_mul(gate, up)
    torch.testing.assert_close(out[-TAIL:], swiglu.silu_mul_reference(gate[-TAIL:], up[-TAIL:]), **TOL)


def test_apply_rotary():
    heads, dim = 32, 128
    x = big(BIG // (heads * dim), heads * dim).view(-1, heads, dim)
    angles = torch.rand(x.shape[0], 1, dim // 2, device="cuda") * 6
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    out = rotary.apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[-TAIL:], rotary.apply_rotary_reference(x[-TAIL:], cos[-TAIL:], sin[-TAIL:]),
                               **TOL)


def test_router_gather_and_gated_scatter_add():
    d = 4096
    x = big(BIG // d, d)
    index = torch.arange(x.shape[0] - 1, -1, -1, device="cuda")  # every row, reversed: out rows past 2^31 too
    got = router.router_gather(x, index)
    assert torch.equal(got[-TAIL:], x[:TAIL]) and torch.equal(got[:TAIL], x[-TAIL:].flip(0))
    gate = torch.full((len(index),), 0.5, device="cuda")
    expected_tail = x[-TAIL:] + (0.5 * got[:TAIL].flip(0)).to(DTYPE)
    router.gated_scatter_add(x, index, got, gate)  # x[i] += 0.5 * x[i]
    torch.testing.assert_close(x[-TAIL:], expected_tail, **TOL)


@pytest.mark.parametrize("k_dim,n_dim", [(4096, 64), (64, 4096)])  # x past 2^31, then y past 2^31
def test_multi_lora_linear(k_dim, n_dim):
    m_dim = BIG // max(k_dim, n_dim)
    x = big(m_dim, k_dim)
    w = big(n_dim, k_dim, 1) / k_dim ** 0.5
    a, b = big(2, 8 * k_dim, 2).view(2, 8, k_dim) / k_dim ** 0.5, big(2, n_dim * 8, 3).view(2, n_dim, 8)
    ids = torch.arange(m_dim, device="cuda") % 3 - 1
    scales = torch.tensor([0.5, 2.0], device="cuda")
    y = multi_lora.multi_lora_linear(x, w, None, a, b, ids, scales)
    want = multi_lora.multi_lora_linear_reference(x[-TAIL:], w, None, a, b, ids[-TAIL:], scales)
    torch.testing.assert_close(y[-TAIL:], want, atol=6e-2, rtol=6e-2)

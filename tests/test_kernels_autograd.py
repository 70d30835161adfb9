"""Gradients through the dispatcher: with the Triton path forced, training must still get every gradient.

The Triton kernels are forward-only launches; autograd cannot see through them. The dispatcher sends a
call to the PyTorch reference whenever autograd needs its result (grad mode on and an input that
requires grad), so a training step with the kernels on gets the same gradients as with them off.
Under the interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py), natively on CUDA.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import mor_lab  # noqa: E402
from mor_lab import kernels  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


def paged(lengths, kv_heads=2, dim=8, page=4):
    pages = [max(1, -(-n // page)) for n in lengths]
    table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    start = 0
    for s, n in enumerate(pages):
        table[s, :n] = torch.arange(start, start + n)
        start += n
    k, v = rand(start, kv_heads, page, dim, seed=11), rand(start, kv_heads, page, dim, seed=12)
    return k, v, table.to(DEVICE), torch.tensor(lengths, device=DEVICE)


def scatter_into_copy(h, index, out, gate):
    """In place on a copy: the leaf ``h`` keeps its gradient."""
    return kernels.gated_scatter_add(h.clone(), index, out, gate.sigmoid())


def cases():
    """(name, dispatched function, args builder): every kernel the models reach through mor_lab.kernels."""
    yield "rms_norm", kernels.rms_norm, lambda: (rand(5, 37), rand(37, seed=1) + 1, 1e-5)
    yield "add_rms_norm", kernels.add_rms_norm, lambda: (rand(5, 37), rand(5, 37, seed=1), rand(37, seed=2), 1e-5)
    yield "silu_mul", kernels.silu_mul, lambda: (rand(5, 37), rand(5, 37, seed=1))
    yield "apply_rotary", kernels.apply_rotary, lambda: (rand(5, 3, 8), rand(5, 1, 8, seed=1, grad=False).cos(),
                                                          rand(5, 1, 8, seed=2, grad=False).sin())
    yield "multi_lora_linear", kernels.multi_lora_linear, lambda: (
        rand(5, 12), rand(7, 12, seed=1), rand(7, seed=2), rand(3, 2, 12, seed=3), rand(3, 7, 2, seed=4),
        torch.tensor([0, 2, -1, 1, 0], device=DEVICE), torch.tensor([0.5, 1.0, 2.0], device=DEVICE))
    yield "router_gather", kernels.router_gather, lambda: (rand(6, 9), torch.tensor([4, 0, 2], device=DEVICE))
    yield "gated_scatter_add", scatter_into_copy, lambda: (  # index 0 repeats: the adds accumulate
        rand(6, 9), torch.tensor([4, 0, 2, 0], device=DEVICE), rand(4, 9, seed=1), rand(4, seed=2))
    yield "paged_decode_attention", kernels.paged_decode_attention, lambda: (rand(3, 4, 8), *paged([5, 0, 9]))
    yield "paged_chunk_attention", kernels.paged_chunk_attention, lambda: (
        rand(6, 4, 8), *paged([5, 9]), torch.tensor([0, 2, 6], device=DEVICE))


def grads(fn, make, backend):
    args = make()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with kernels.use(backend):
        out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    assert out.requires_grad, f"{fn.__name__} under {backend!r} returned a tensor autograd cannot see through"
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE)
    return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)


@pytest.mark.parametrize("name,fn,make", list(cases()), ids=[c[0] for c in cases()])
def test_gradients_with_the_triton_path_forced_match_the_reference(name, fn, make):
    want_out, want = grads(fn, make, "reference")
    got_out, got = grads(fn, make, "triton")
    torch.testing.assert_close(got_out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_kernels_still_run_without_grad():
    """Inference (no_grad / inference_mode, or inputs without grad) keeps the Triton path."""
    x, w = rand(3, 8), rand(8, seed=1)
    with kernels.use("triton"):
        assert not kernels.use_triton(x, w)
        assert not kernels.use_triton(x.detach(), w)  # the weight needs a gradient too
        with torch.no_grad():
            assert kernels.use_triton(x, w)
        with torch.inference_mode():
            assert kernels.use_triton(x, w)
        assert kernels.use_triton(x.detach(), w.detach())


def test_training_step_gets_the_same_gradients_with_kernels_on_and_off():
    """A relaxed recursive decoder (per-loop LoRA and norms), one loss.backward() per backend."""
    from mor_lab.models.decoder import LoRA, StepDelta
    model = mor_lab.random_decoder(num_layers=2, vocab_size=32, hidden_size=16, num_heads=4, num_kv_heads=2,
                                   intermediate_size=24, seed=3, std=0.3)
    model.plan = [0, 1, 1]
    g = torch.Generator().manual_seed(1)
    lora = {"q_proj": LoRA(16, 16, 2), "down_proj": LoRA(24, 16, 2)}
    for m in lora.values():
        m.A.data, m.B.data = torch.randn(m.A.shape, generator=g) * 0.3, torch.randn(m.B.shape, generator=g) * 0.3
    model.step_deltas["2"] = StepDelta(lora, {"input_layernorm": 1 + 0.2 * torch.randn(16, generator=g)})
    model = model.to(DEVICE).train()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with kernels.use(backend):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
            loss.backward()
        results[backend] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss_ref, want), (loss_got, got) = results["reference"], results["triton"]
    torch.testing.assert_close(loss_got, loss_ref)
    missing = sorted(n for n in want if want[n] is not None and got[n] is None)
    assert not missing, f"no gradient with the Triton path forced: {missing}"
    for n in want:
        if want[n] is not None:
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.skipif(not CUDA, reason="the SmolLM2-shaped bf16 step is the GPU check (scripts/gpu_check.sh)")
def test_smollm2_shaped_bf16_training_step_gets_every_gradient_with_kernels_on_auto():
    """Random weights at SmolLM2-135M's shape, bf16, kernels on "auto" (the Triton kernels on CUDA): one
    step of loss.backward() reaches every parameter, with the gradients of the reference path."""
    model = mor_lab.random_decoder(num_layers=30, vocab_size=49152, hidden_size=576, num_heads=9, num_kv_heads=3,
                                   intermediate_size=1536, seed=0).to(device=DEVICE, dtype=torch.bfloat16).train()
    ids = torch.randint(0, 49152, (4, 129), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = {}
    for backend in ("auto", "reference"):
        model.zero_grad(set_to_none=True)
        with kernels.use(backend):
            logits = model(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, 49152), ids[:, 1:].reshape(-1)).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    missing = sorted(n for n, g in grads["auto"].items() if g is None)
    assert not missing, f"no gradient with kernels on auto: {missing[:5]} ... ({len(missing)})"
    for n, g in grads["auto"].items():  # to the run-to-run noise of atomics (flash backward, embedding grads)
        want = grads["reference"][n].float()
        torch.testing.assert_close(g.float(), want, atol=2e-2 * want.abs().max().item() + 1e-6, rtol=2e-2, msg=n)

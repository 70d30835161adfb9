"""Triton kernels for the adaptive-depth hot paths, each beside a PyTorch reference of the same signature.

The models and engine call only the functions below. Each one picks its backend per call:

- ``"auto"`` (default): the Triton kernel when the tensors are on CUDA and Triton is installed,
  the PyTorch reference otherwise (CPU, MPS, no Triton);
- ``"triton"``: always the kernel. On a machine without CUDA this runs in Triton's interpreter
  (``TRITON_INTERPRET=1``, set by this module before ``triton`` is imported when no GPU is present):
  slow, but it checks the kernels' logic on a laptop;
- ``"reference"``: always the PyTorch reference.

Choose with ``with kernels.use("triton"): ...``, ``kernels.set_backend(...)`` or the environment variable
``MOR_LAB_KERNELS=auto|triton|reference``.

Whatever the backend, a call whose result autograd needs (grad mode on and any tensor argument requiring
grad: training, uptraining, exit-head fitting) goes to the reference. The kernels are forward-only
launches that autograd cannot see through; registering each with a hand-written backward would be a
second implementation of every kernel's math to keep in step with the first, for training steps whose
time goes to the matmuls (cuBLAS either way) and whose references autograd already differentiates and
``torch.compile`` already fuses. Inference (``inference_mode`` / ``no_grad``, where the engine runs)
keeps the kernels.

The kernels (one file each): ``rmsnorm`` (fused RMSNorm, optionally with the residual add),
``swiglu`` (``silu(gate) * up``), ``rotary``, ``multi_lora`` (each row its own LoRA adapter over one shared weight),
``router`` (gather / gated scatter-add for expert-choice routing) and ``attention`` (ragged attention over
a paged KV cache: one query per slot for decode, several causal queries per slot for a chunk).
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "reference")

if not torch.cuda.is_available() and "triton" not in __import__("sys").modules:
    # No GPU: the only way a Triton kernel can run is the interpreter, and Triton reads this when a
    # kernel is decorated (at import of the kernel modules below) and for its own library functions when
    # triton itself is imported, so setting it after that would be too late: leave INTERPRET false then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_backend = _check(os.environ.get("MOR_LAB_KERNELS", "auto"))


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for the whole process (``auto``, ``triton`` or ``reference``)."""
    global _backend
    _backend = _check(name)


@contextmanager
def use(name: str):
    """``with kernels.use("triton"): ...``: force a backend inside the block (tests, notebooks, benchmarks)."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


def needs_grad(*tensors) -> bool:
    """Would autograd need the result of a call on these arguments? (Non-tensors are ignored.)"""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def use_triton(x: torch.Tensor, *others) -> bool:
    """Does a call on ``x`` (and ``others``) go to the Triton kernel? Not when autograd needs the result:
    see the module docstring. (Also lets callers keep their own fast fallback.)"""
    if _backend == "reference" or needs_grad(x, *others):
        return False
    if _backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernels.use('triton') needs the triton package (pip install triton)")
        if not x.is_cuda and not INTERPRET:
            raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the "
                               "environment, or import mor_lab before anything that imports triton (transformers "
                               "can, through torch._dynamo)")
        return True
    return HAS_TRITON and x.is_cuda


from . import attention, multi_lora, rmsnorm, rotary, router, swiglu  # noqa: E402  (after the env setup)


def _dispatch(module, name: str):
    kernel, reference = getattr(module, name), getattr(module, f"{name}_reference")

    def call(x, *args, **kwargs):
        return (kernel if use_triton(x, *args, *kwargs.values()) else reference)(x, *args, **kwargs)

    call.__name__, call.__doc__ = name, reference.__doc__
    return call


rms_norm = _dispatch(rmsnorm, "rms_norm")
add_rms_norm = _dispatch(rmsnorm, "add_rms_norm")
silu_mul = _dispatch(swiglu, "silu_mul")
apply_rotary = _dispatch(rotary, "apply_rotary")
multi_lora_linear = _dispatch(multi_lora, "multi_lora_linear")
router_gather = _dispatch(router, "router_gather")
gated_scatter_add = _dispatch(router, "gated_scatter_add")
paged_decode_attention = _dispatch(attention, "paged_decode_attention")
paged_chunk_attention = _dispatch(attention, "paged_chunk_attention")

KERNELS = ("rms_norm", "add_rms_norm", "silu_mul", "apply_rotary", "multi_lora_linear", "router_gather",
           "gated_scatter_add", "paged_decode_attention", "paged_chunk_attention")

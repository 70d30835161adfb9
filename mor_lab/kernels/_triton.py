"""Triton if installed; otherwise stand-ins so the references import and the kernels fail only when called."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - e.g. macOS: references only
    triton = None

    class tl:  # noqa: N801 - mimics the module name in annotations
        constexpr = "constexpr"


def jit(fn):
    return fn if triton is None else triton.jit(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_options(settings: dict) -> dict:
    """The ``num_warps`` / ``num_stages`` of a module's launch settings that are set (None: Triton's default)."""
    return {k: settings[k] for k in ("num_warps", "num_stages") if settings.get(k) is not None}


def num_warps(block: int) -> int:
    """Warps for a row-wise kernel of ``block`` elements (the interpreter ignores it)."""
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def interpreted_bf16(t) -> bool:
    """Must a kernel feed ``tl.dot`` fp32 copies of ``t``'s bf16 values? Only in Triton's interpreter (``t`` on
    the CPU), whose dot multiplies bf16 operands as their raw integer bits (triton 3.x). The fp32 copies
    give the same products (exact for bf16) and the same fp32 sums as bf16 tensor cores."""
    import torch
    return t.dtype == torch.bfloat16 and not t.is_cuda


@jit
def dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` summed in fp32. fp32 inputs multiply in exact fp32 ("ieee"): the GPU default would be TF32
    (10-bit mantissas), which the interpreter and the references do not use. 16-bit inputs use the
    tensor cores either way. ``UPCAST``: see :func:`interpreted_bf16`."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out

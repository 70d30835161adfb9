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


def num_warps(block: int) -> int:
    """Warps for a row-wise kernel of ``block`` elements (the interpreter ignores it)."""
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1

"""The engine's fast paths for inference passes: matmul layouts measured per row count, oneDNN-prepacked
weights, fused q/k/v and gate/up buffers (:class:`FastPaths`, turned on by :func:`fast_paths`).

Outside a ``fast_paths`` block (training, HF parity in the engine's ``exact`` mode) every projection is a
plain ``F.linear``: the fast paths change the summation order, so they stay off wherever exact numbers
matter. ``engine.cost.measure_layouts`` picks the layouts on the device.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("linear", "transposed", "packed")


class FastPaths:
    """What the engine turns on for its decode passes (``fast_paths(...)``); off everywhere else.

    ``layouts`` (``head_layouts`` for the LM head): which matmul computes ``x @ W^T`` for how many rows,
    as ``((min_rows, layout), ...)``: ``linear`` is ``F.linear``; ``transposed`` is ``(W @ x^T)^T``, the same
    product, which on some CPUs' BLAS runs up to 2x faster at 4-32 rows; ``packed`` multiplies with a
    copy of ``W`` that oneDNN prepacked once (a plain BLAS call repacks ``W`` on every call, which at a
    few rows costs as much as the product: prepacked, a pass over a layer costs about the same for 4
    rows as for 1). The engine's cost model measures them on the device and picks per row count
    (``engine.cost.measure_layouts``); ``packed`` costs one more copy of the weights in memory.
    ``fused``: q/k/v and gate/up run as one matmul each over weights stored side by side.
    ``decode_attention``: one query per row attends through two small matmuls instead of SDPA, whose
    per-call overhead dominates at decode sizes on a CPU. None of these keep HF's summation order: the
    ``exact`` engine mode leaves them all off (the HF parity tests use it).
    """

    def __init__(self):
        self.enabled = False
        self.layouts: tuple = ()
        self.head_layouts: tuple = ()
        self.fused = False
        self.decode_attention = False


FAST = FastPaths()
_FIELDS = ("enabled", "layouts", "head_layouts", "fused", "decode_attention")


@contextmanager
def fast_paths(layouts=((1, "linear"), (3, "transposed")), head_layouts=((1, "linear"), (3, "transposed")),
               fused: bool = True, decode_attention: bool = True):
    """Inside the block, inference passes take the fast paths (see :class:`FastPaths`)."""
    for table in (layouts, head_layouts):
        for _, name in table:
            if name not in LAYOUTS:
                raise ValueError(f"unknown matmul layout {name!r}; allowed: {', '.join(LAYOUTS)}")
    saved = tuple(getattr(FAST, f) for f in _FIELDS)
    for f, value in zip(_FIELDS, (True, tuple(layouts), tuple(head_layouts), fused, decode_attention)):
        setattr(FAST, f, value)
    try:
        yield FAST
    finally:
        for f, value in zip(_FIELDS, saved):
            setattr(FAST, f, value)


def layout_for(rows: int, table) -> str:
    """The layout of ``table`` (``((min_rows, layout), ...)``, ascending) for ``rows`` rows."""
    name = "linear"
    for min_rows, layout in table:
        if rows >= min_rows:
            name = layout
    return name


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, head: bool = False) -> torch.Tensor:
    """``x @ W^T + b``, in the layout the engine measured fastest for this many rows (``FastPaths``)."""
    if not FAST.enabled or x.dim() != 2 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    layout = layout_for(x.shape[0], FAST.head_layouts if head else FAST.layouts)
    if layout == "transposed":
        y = torch.mm(weight, x.T).T.contiguous()
        return y if bias is None else y + bias
    if layout == "packed" and weight.dtype in PACKABLE:
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


PACKABLE = (torch.float32, torch.bfloat16)  # the dtypes oneDNN prepacks (float64 falls back to F.linear)
_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its version, oneDNN prepacked copy)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked copy of ``weight``, made once and remade when ``weight`` changes in place (its
    version counter) or is freed (a weak reference drops the copy)."""
    import weakref
    version = tensor_version(weight)
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == version:
        return entry[2]
    key = id(weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    _PACKED[key] = (weakref.ref(weight, lambda _, k=key: _PACKED.pop(k, None)), version, packed)
    return packed


def tensor_version(t: torch.Tensor) -> int:
    """In-place updates bump a tensor's version; an inference tensor has none (and cannot be updated
    outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def packing_available() -> bool:
    """Can this PyTorch build prepack weights with oneDNN (CPU builds with MKL-DNN)?"""
    try:
        w = torch.zeros(4, 8)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8), torch.ops.mkldnn._reorder_linear_weight(w, None), None,
                                           "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


def fused_weight(linears: list[nn.Linear]) -> torch.Tensor | None:
    """The weights of ``linears`` stacked ``[sum(out), in]`` in one buffer, the parameters rebound as views
    of it (no extra memory; in-place updates and ``load_state_dict`` keep them in sync). ``None`` when
    they have biases. Rebuilt when a parameter moved (``.to()``, a new Parameter)."""
    if any(l.bias is not None for l in linears):
        return None
    pointers = tuple(l.weight.data_ptr() for l in linears)
    cached = getattr(linears[0], "_fused_with", None)
    if cached is not None and cached[1] == pointers and cached[0].dtype == linears[0].weight.dtype:
        return cached[0]
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the parameters stay trainable
        fused = torch.cat([l.weight.detach() for l in linears])
        offset = 0
        for l in linears:
            l.weight.data = fused[offset:offset + l.weight.shape[0]]
            offset += l.weight.shape[0]
    linears[0]._fused_with = (fused, tuple(l.weight.data_ptr() for l in linears))
    return fused

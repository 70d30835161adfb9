"""``mor-lab bench kernels``: every Triton kernel against its PyTorch reference and against fair baselines.

On CUDA, for each kernel at the shapes of a real decode batch:

- warm-up (Triton compiles) at exactly the shapes and arguments that are then timed;
- CUDA-event timings with the L2 cache flushed before each run: median, min and max (not means), eager and
  replayed from a CUDA graph (which also proves the wrapper never synchronises the host);
- every timed output, the baselines' included, checked against the reference (``ok`` per row);
- bytes and FLOPs over the time, as fractions of this device's *measured* peaks (a streaming read and
  copy; a bf16 8192^3 matmul) and of the *nominal* ones (H200: 4.8 TB/s, ~989 dense bf16 TFLOP/s);
- ragged decode attention against a *fair* padded ``scaled_dot_product_attention``: no mask where none is
  needed (flash, grouped-query), and for ragged lengths a length mask over KV heads expanded beforehand
  (``attn_mask`` together with ``enable_gqa`` falls back to the slow math backend); the backend that
  ran is recorded; multi-LoRA linear against one dense matmul of the same shape;
- the Triton, CUDA, driver and torch versions.

The engine with kernels on and off is measured by ``bench cdb`` / ``bench mor`` (``--kernels on|off``).
Without a GPU it says so and runs the correctness pass instead: every kernel (fp32, fp16, bf16) through
Triton's interpreter against its reference, and the baselines too, on tiny odd shapes.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from .common import environment

# nominal peaks: (HBM GB/s, dense bf16 TFLOP/s), matched against torch.cuda.get_device_name
NOMINAL_PEAKS = {"H200": (4800, 989), "H100 SXM": (3350, 989), "H100 NVL": (3900, 835), "H100 PCIe": (2000, 756),
                 "H100": (3350, 989), "A100": (2039, 312), "L40S": (864, 362), "L4": (300, 121), "A10": (600, 125),
                 "RTX 4090": (1008, 165)}
# (atol, rtol) of a checked output, per dtype: kernels sum in another order and round once per stored value
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
LORA_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}
# launch settings tried on a GPU (the first of each list is the default), so one run says what bounds a kernel
DECODE_SWEEP = [{"num_splits": s, "num_warps": w} for s in (None, 1, 2, 4) for w in (4, 8)]
LORA_SWEEP = [{"block_m": None, "block_n": 64, "block_k": 32, "num_warps": 4, "num_stages": None},
              {"block_m": None, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3},
              {"block_m": None, "block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 3},
              {"block_m": None, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 4},
              {"block_m": None, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4},
              {"block_m": 64, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}]
TARGETS = {"decode_bandwidth_fraction": 0.6, "decode_speedup_vs_padded_sdpa": 1.0, "multi_lora_vs_dense": 1.3}


@dataclass
class Baseline:
    """Another way to compute what the kernel computes, timed beside it (and checked)."""
    fn: Callable
    note: str
    context: Callable = contextlib.nullcontext  # entered around the timing (an SDPA backend choice)
    backend: str | None = None
    check: Callable | None = None  # (output, reference output) -> (max error, ok); default: the case's check


@dataclass
class Case:
    name: str
    kernel: Callable
    reference: Callable
    nbytes: int  # what the kernel must move: its memory roofline
    flops: int
    shape: str
    time_reference: bool = True  # the reference is eager PyTorch worth timing (not a per-sequence loop)
    tolerance: dict = field(default_factory=lambda: TOLERANCE)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    reset: Callable = lambda: None  # in-place kernels: restore the inputs before a checked call


def _error(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]) -> tuple[float, bool]:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return float("inf"), False
    if not got.numel():
        return 0.0, True
    atol, rtol = tol
    err = (got - want).abs()
    return float(f"{err.max().item():.3g}"), bool((err <= atol + rtol * want.abs()).all().item())


def _random(device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)
    return r


def _paged(r, lengths, kv_heads, hd, page, dtype, device):
    """A shuffled page pool with every sequence's keys/values, its block table, and the same keys/values as a
    dense padded ``[batch, kv_heads, max_len, hd]`` cache (zeros past each length) for the padded baselines."""
    pages_per = [max(1, -(-n // page)) for n in lengths]
    perm = torch.randperm(sum(pages_per), device=device, generator=torch.Generator(device=device).manual_seed(1))
    table = torch.zeros(len(lengths), max(pages_per), dtype=torch.int32, device=device)
    used = 0
    for s, c in enumerate(pages_per):
        table[s, :c] = perm[used:used + c].int()
        used += c
    kc, vc = r(sum(pages_per), kv_heads, page, hd, dt=dtype), r(sum(pages_per), kv_heads, page, hd, dt=dtype)
    max_len = max(lengths)

    def dense(cache):  # [batch, kv_heads, pages * page, hd] -> the first max_len positions
        return cache[table.long()].permute(0, 2, 1, 3, 4).reshape(len(lengths), kv_heads, -1, hd)[:, :, :max_len]
    lens = torch.tensor(lengths, device=device, dtype=torch.int32)
    valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
    dk, dv = (dense(c) * valid[:, None, :, None] for c in (kc, vc))
    return kc, vc, table, lens, dk.contiguous(), dv.contiguous(), valid


def _sdpa_baseline(q, k, v, mask, group, note) -> Baseline:
    """Padded SDPA the fair way: grouped-query without a mask (flash can run), else with KV heads expanded
    (the efficient / cuDNN backends take a mask, but not together with ``enable_gqa``). Returns the first
    backend that accepts the call, in the order flash, cuDNN, efficient, math, and says which."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if mask is None:
        args, kwargs = (q, k, v), {"enable_gqa": group > 1}
    else:
        k, v = (t.repeat_interleave(group, 1) if group > 1 else t for t in (k, v))  # outside the timed call
        args, kwargs = (q, k, v), {"attn_mask": mask}

    def fn():
        return F.scaled_dot_product_attention(*args, **kwargs)
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if not q.is_cuda:
        order = [SDPBackend.MATH]
    last = None
    for backend in order:
        try:
            with sdpa_kernel([backend]):
                fn()
        except RuntimeError as e:  # this backend does not take these inputs: try the next
            last = e
            continue
        return Baseline(fn, note + ("" if mask is None else ", KV heads expanded beforehand"),
                        context=lambda b=backend: sdpa_kernel([b]), backend=backend.name)
    raise RuntimeError(f"no SDPA backend ran the padded baseline: {last}")


def cases(device: torch.device, dtype: torch.dtype, small: bool):
    """Every kernel at a decode batch's shapes (``small``: tiny odd shapes for the interpreter)."""
    r = _random(device)
    e = torch.tensor([], dtype=dtype).element_size()
    rows, d, f = (37, 123, 77) if small else (4096, 4096, 14336)
    x, w, res = r(rows, d, dt=dtype), r(d, dt=dtype) + 1, r(rows, d, dt=dtype)
    yield Case("rms_norm", lambda: kernels.rmsnorm.rms_norm(x, w, 1e-5),
               lambda: kernels.rmsnorm.rms_norm_reference(x, w, 1e-5), 2 * rows * d * e, 4 * rows * d,
               f"[{rows}, {d}]")
    yield Case("add_rms_norm", lambda: kernels.rmsnorm.add_rms_norm(x, res, w, 1e-5)[0],
               lambda: kernels.rmsnorm.add_rms_norm_reference(x, res, w, 1e-5)[0], 4 * rows * d * e, 5 * rows * d,
               f"[{rows}, {d}]")
    gate, up = r(rows, f, dt=dtype), r(rows, f, dt=dtype)
    yield Case("silu_mul", lambda: kernels.swiglu.silu_mul(gate, up),
               lambda: kernels.swiglu.silu_mul_reference(gate, up), 3 * rows * f * e, 5 * rows * f, f"[{rows}, {f}]")
    heads, hd = (3, 10) if small else (32, 128)
    q = r(rows, heads, hd, dt=dtype)
    ang = r(rows, 1, hd // 2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    yield Case("apply_rotary", lambda: kernels.rotary.apply_rotary(q, cos, sin),
               lambda: kernels.rotary.apply_rotary_reference(q, cos, sin), 2 * q.numel() * e + 2 * cos.numel() * e,
               6 * q.numel(), f"[{rows}, {heads}, {hd}]")
    k_sel = rows // 2
    index = torch.randperm(rows, device=device, generator=torch.Generator(device=device).manual_seed(2))[:k_sel]
    index = index.sort().values
    out, gsel = r(k_sel, d, dt=dtype), r(k_sel).sigmoid()
    yield Case("router_gather", lambda: kernels.router.router_gather(x, index),
               lambda: kernels.router.router_gather_reference(x, index), 2 * k_sel * d * e, 0,
               f"{k_sel} of [{rows}, {d}]")
    h_kernel, h_reference = x.clone(), x.clone()  # updated in place: reset to x before a checked call
    yield Case("gated_scatter_add", lambda: kernels.router.gated_scatter_add(h_kernel, index, out, gsel),
               lambda: kernels.router.gated_scatter_add_reference(h_reference, index, out, gsel),
               3 * k_sel * d * e, 2 * k_sel * d, f"{k_sel} of [{rows}, {d}]",
               reset=lambda: (h_kernel.copy_(x), h_reference.copy_(x)))
    yield from _lora_cases(r, device, dtype, small, e)
    yield from _attention_cases(r, device, dtype, small, e)


def _lora_cases(r, device, dtype, small, e):
    shapes = [(5, 40, 37, 4, 3)] if small else [(m, 4096, 4096, 16, 4) for m in (64, 512)] + [(128, 576, 1536, 8, 4)]
    for m, din, dout, rank, n in shapes:
        xl, wl = r(m, din, dt=dtype), r(dout, din, dt=dtype) / math.sqrt(din)
        a, b = r(n, rank, din, dt=dtype) / math.sqrt(din), r(n, rank, dout, dt=dtype).transpose(1, 2)
        ids = torch.arange(m, device=device) % (n + 1) - 1  # every adapter and "none"
        scales = torch.ones(n, device=device)
        plain = ids < 0

        def check_dense(got, want, plain=plain, dtype=dtype):  # rows without an adapter are the dense product
            return _error(got[plain], want[plain], LORA_TOLERANCE[dtype])
        dense = Baseline(lambda xl=xl, wl=wl: xl @ wl.T, "one dense matmul of the same shape (the yardstick; "
                         "checked on the rows without an adapter)", check=check_dense)
        yield Case(f"multi_lora_linear[m={m},{din}->{dout}]",
                   lambda xl=xl, wl=wl, a=a, b=b, ids=ids, s=scales:
                   kernels.multi_lora.multi_lora_linear(xl, wl, None, a, b, ids, s),
                   lambda xl=xl, wl=wl, a=a, b=b, ids=ids, s=scales:
                   kernels.multi_lora.multi_lora_linear_reference(xl, wl, None, a, b, ids, s),
                   (m * din + din * dout + m * dout + n * rank * (din + dout)) * e,
                   2 * m * din * dout + 2 * m * rank * (din + dout),
                   f"x [{m}, {din}] W [{dout}, {din}] rank {rank}, {n} adapters", tolerance=LORA_TOLERANCE,
                   baselines={"dense_matmul": dense})


def _attention_cases(r, device, dtype, small, e):
    if small:
        configs = [("full", [37] * 5, 4, 2, 16, 8), ("ragged", [1, 9, 18, 28, 37], 4, 2, 16, 8)]  # (0: test_kernels)
    else:
        ragged = torch.linspace(128, 2048, 64).long().tolist()
        smollm2 = torch.randint(16, 513, (128,), generator=torch.Generator().manual_seed(3)).tolist()
        configs = [("full", [2048] * 64, 32, 8, 128, 16), ("ragged", ragged, 32, 8, 128, 16),
                   ("smollm2-ragged", smollm2, 9, 3, 64, 16)]
    for name, lengths, heads, kv_heads, hd, page in configs:
        kc, vc, table, lens, dk, dv, valid = _paged(r, lengths, kv_heads, hd, page, dtype, device)
        batch, group = len(lengths), heads // kv_heads
        q = r(batch, heads, hd, dt=dtype)
        full = min(lengths) == max(lengths)
        sdpa = _sdpa_baseline(q[:, :, None], dk, dv, None if full else valid[:, None, None, :], group,
                              "padded SDPA over a dense [batch, kv_heads, max_len, head_dim] cache")
        sdpa_fn = sdpa.fn
        sdpa.fn = lambda f=sdpa_fn: f()[:, :, 0]  # [batch, heads, 1, hd] -> [batch, heads, hd]
        padded_bytes = 2 * batch * max(lengths) * kv_heads * hd * e * (1 if full else group)
        sdpa.note += f" (reads {padded_bytes / 2**20:.0f} MiB of KV)"
        baselines = {"padded_sdpa": sdpa}
        if not full:  # the floor of any padded kernel: flash, grouped-query, every slot read to the longest
            longest = lens == max(lengths)
            floor = _sdpa_baseline(q[:, :, None], dk, dv, None, group, "padded SDPA without the length mask: "
                                   "the floor of any padded kernel (checked on the longest slots, the only "
                                   f"ones it computes right; reads {padded_bytes // group / 2**20:.0f} MiB of KV)")
            floor_fn = floor.fn
            floor.fn = lambda f=floor_fn: f()[:, :, 0]
            floor.check = lambda got, want, rows=longest, dt=dtype: _error(got[rows], want[rows], TOLERANCE[dt])
            baselines["padded_sdpa_unmasked_floor"] = floor
        total = sum(lengths)
        yield Case(f"paged_decode_attention[{name}]",
                   lambda q=q, kc=kc, vc=vc, t=table, ln=lens:
                   kernels.attention.paged_decode_attention(q, kc, vc, t, ln),
                   lambda q=q, kc=kc, vc=vc, t=table, ln=lens:
                   kernels.attention.paged_decode_attention_reference(q, kc, vc, t, ln),
                   2 * total * kv_heads * hd * e + 2 * q.numel() * e, 4 * total * heads * hd,
                   f"batch {batch}, lengths {min(lengths)}..{max(lengths)}, {heads}/{kv_heads} heads, d {hd}, "
                   f"page {page}", time_reference=False, baselines=baselines)
    seqs, q_len, length, heads, kv_heads, hd, page = (3, 5, 20, 4, 2, 16, 8) if small else \
        (16, 128, 1024, 32, 8, 128, 16)
    kc, vc, table, lens, dk, dv, _ = _paged(r, [length] * seqs, kv_heads, hd, page, dtype, device)
    starts = torch.arange(seqs + 1, device=device) * q_len
    qc = r(seqs * q_len, heads, hd, dt=dtype)
    causal = torch.arange(length, device=device)[None, :] <= \
        torch.arange(q_len, device=device)[:, None] + length - q_len
    sdpa = _sdpa_baseline(qc.view(seqs, q_len, heads, hd).transpose(1, 2), dk, dv, causal[None, None],
                          heads // kv_heads, "padded SDPA, causal mask over the dense cache")
    sdpa_fn = sdpa.fn
    sdpa.fn = lambda f=sdpa_fn: f().transpose(1, 2).reshape(seqs * q_len, heads, hd)
    pairs = seqs * sum(length - q_len + j + 1 for j in range(q_len))
    yield Case("paged_chunk_attention",
               lambda: kernels.attention.paged_chunk_attention(qc, kc, vc, table, lens, starts, max_query_len=q_len),
               lambda: kernels.attention.paged_chunk_attention_reference(qc, kc, vc, table, lens, starts),
               2 * seqs * length * kv_heads * hd * e + 2 * qc.numel() * e, 4 * pairs * heads * hd,
               f"{seqs} sequences x {q_len} causal queries over {length} positions, {heads}/{kv_heads} heads, d {hd}",
               time_reference=False, baselines={"padded_sdpa": sdpa})


def check(case: Case, dtype) -> tuple[dict, torch.Tensor]:
    """The kernel's and every baseline's output against the reference's, from the same inputs; returns the
    row and the reference output."""
    case.reset()
    with kernels.use("triton"):
        got = case.kernel().clone()
    want = case.reference().clone()
    err, ok = _error(got, want, case.tolerance[dtype])
    row = {"max_abs_err": err, "tolerance": list(case.tolerance[dtype]), "ok": ok}
    for name, base in case.baselines.items():
        with base.context():
            out = base.fn()
        b_err, b_ok = (base.check or (lambda g, w: _error(g, w, case.tolerance[dtype])))(out, want)
        row.setdefault("baselines", {})[name] = {"note": base.note, "backend": base.backend, "max_abs_err": b_err,
                                                 "ok": b_ok}
        row["ok"] = row["ok"] and b_ok
    return row, want


def _failed(case_name: str, dtype, error: BaseException) -> dict:
    """A case that raised: recorded as a failure with its error (never as "skipped"), the others still run."""
    import traceback
    return {"kernel": case_name, "dtype": _name(dtype), "ok": False, "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=-3)}


def _cases_or_failure(device, dtype, small):
    """The cases; building one that raises yields a failed row instead (and stops this dtype's list)."""
    try:
        yield from cases(device, dtype, small)
    except Exception as e:  # noqa: BLE001 - recorded in the report, which then fails
        yield _failed("building the cases", dtype, e)


def correctness_pass(dtypes=(torch.float32, torch.float16, torch.bfloat16), device=None) -> list[dict]:
    """Every kernel (interpreted on CPU) and baseline against the reference on tiny odd shapes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with torch.inference_mode():
        for dtype in dtypes:
            for case in _cases_or_failure(device, dtype, small=True):
                if isinstance(case, dict):
                    rows.append(case)
                    continue
                try:
                    rows.append({"kernel": case.name, "dtype": _name(dtype), "shape": case.shape,
                                 **check(case, dtype)[0]})
                except Exception as e:  # noqa: BLE001 - a failed row, and all_ok false
                    rows.append(_failed(case.name, dtype, e))
    return rows


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- GPU timing -----------------------------------------------------------------------------------------

def _stats(ms: list[float]) -> dict:
    return {"median": round(statistics.median(ms), 4), "min": round(min(ms), 4), "max": round(max(ms), 4),
            "runs": len(ms)}


def time_cuda(fn, reps: int, flush: torch.Tensor, context=contextlib.nullcontext) -> dict:
    """Milliseconds per call (CUDA events), each run after an L2 flush; warm-up first at these arguments,
    so Triton compiles (and the allocator settles) outside the timed runs."""
    with context():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    return _stats([s.elapsed_time(e) for s, e in events])


def capture_cuda_graph(fn):
    """``fn`` captured once in a CUDA graph: returns (replay, the output tensor each replay refills). Capture
    fails if the call synchronises the host (``.item()``, ``int(tensor)``): the kernel wrappers never do."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def measure_peaks(device) -> dict:
    """This device's measured peaks (bf16 8192^3 matmul; streaming read and copy of 4 GiB) and nominal ones."""
    flush = torch.empty(2**28, dtype=torch.uint8, device=device)
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = time_cuda(lambda: a @ b, 20, flush)["median"]
    del a, b
    x = torch.empty(2**32, dtype=torch.uint8, device=device)
    x.view(torch.float32).normal_()
    read = time_cuda(lambda: x.view(torch.float32).sum(), 10, flush)["median"]
    y = torch.empty_like(x)
    copy = time_cuda(lambda: y.copy_(x), 10, flush)["median"]
    del x, y
    name = torch.cuda.get_device_name(device)
    nominal = next((v for k, v in NOMINAL_PEAKS.items() if k in name), (None, None))
    return {"bf16_matmul_tflops": round(2 * n**3 / mm / 1e9, 1), "read_gbs": round(2**32 / read / 1e6, 1),
            "copy_gbs": round(2 * 2**32 / copy / 1e6, 1), "nominal_bandwidth_gbs": nominal[0],
            "nominal_bf16_tflops": nominal[1],
            "note": "bandwidth: the better of a streaming read (sum) and a copy (read + write) of 4 GiB"}


def gpu_pass(quick: bool, dtype=torch.bfloat16) -> tuple[list[dict], dict]:
    device = torch.device("cuda")
    peaks = measure_peaks(device)
    bandwidth = max(peaks["read_gbs"], peaks["copy_gbs"])
    reps = 10 if quick else 50
    flush = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB: past the L2
    rows = []
    with torch.inference_mode():
        for case in _cases_or_failure(device, dtype, small=False):
            if isinstance(case, dict):
                rows.append(case)
                continue
            try:
                rows.append(_time_case(case, dtype, reps, flush, peaks, bandwidth))
                if not quick and (result := sweep(case, dtype, reps, flush)) is not None:
                    rows[-1]["sweep"] = result  # a failed setting does not fail the row: the default is timed
            except Exception as e:  # noqa: BLE001 - a failed row, and all_ok false; the other kernels still run
                rows.append(_failed(case.name, dtype, e))
            case.reset()
    return rows, peaks


def _time_case(case: Case, dtype, reps, flush, peaks, bandwidth) -> dict:
    row, want = check(case, dtype)
    row = {"kernel": case.name, "dtype": _name(dtype), "shape": case.shape, **row}
    with kernels.use("triton"):
        t = time_cuda(case.kernel, reps, flush)
        try:
            replay, out = capture_cuda_graph(case.kernel)
        except RuntimeError as e:  # recorded as a failure: the wrappers are meant to be capturable
            row["cuda_graph_error"] = f"{type(e).__name__}: {e}"
            row["ok"] = False
        else:
            case.reset()
            replay()
            row["cuda_graph_max_abs_err"], graph_ok = _error(out, want, case.tolerance[dtype])
            row["ok"] = row["ok"] and graph_ok
            row["cuda_graph_ms"] = time_cuda(replay, reps, flush)
    ms = t["median"]
    gbs, tflops = case.nbytes / ms / 1e6, case.flops / ms / 1e9
    row.update({"ms": t, "gb_per_s": round(gbs, 1), "tflop_per_s": round(tflops, 2),
                "fraction_of_measured_bandwidth": round(gbs / bandwidth, 3),
                "fraction_of_measured_matmul": round(tflops / peaks["bf16_matmul_tflops"], 4)})
    if peaks["nominal_bandwidth_gbs"]:
        row["fraction_of_nominal_bandwidth"] = round(gbs / peaks["nominal_bandwidth_gbs"], 3)
        row["fraction_of_nominal_matmul"] = round(tflops / peaks["nominal_bf16_tflops"], 4)
    if case.time_reference:
        ref = time_cuda(case.reference, reps, flush)
        row["reference_ms"] = ref
        row["speedup_vs_reference"] = round(ref["median"] / ms, 2)
    for name, base in case.baselines.items():
        b = time_cuda(base.fn, reps, flush, base.context)
        row["baselines"][name].update({"ms": b, "kernel_over_baseline": round(ms / b["median"], 3)})
    return row


@contextlib.contextmanager
def launch_settings(settings: dict, **values):
    """Temporarily change a kernel module's launch settings (``attention.DECODE_LAUNCH``, ...)."""
    saved = dict(settings)
    settings.update(values)
    try:
        yield
    finally:
        settings.clear()
        settings.update(saved)


def sweep(case: Case, dtype, reps, flush) -> dict | None:
    """Median time (and check) of the kernel under each launch setting of its sweep; the best one."""
    if case.name.startswith("paged_decode_attention"):
        settings, configs = kernels.attention.DECODE_LAUNCH, DECODE_SWEEP
    elif case.name.startswith("multi_lora_linear"):
        settings, configs = kernels.multi_lora.MATMUL_LAUNCH, LORA_SWEEP
    else:
        return None
    want = case.reference()
    tried = []
    for config in configs:
        try:
            with launch_settings(settings, **config), kernels.use("triton"):
                err, ok = _error(case.kernel(), want, case.tolerance[dtype])
                tried.append({"config": config, "median_ms": time_cuda(case.kernel, reps, flush)["median"],
                              "max_abs_err": err, "ok": ok})
        except Exception as e:  # noqa: BLE001 - e.g. a tile too large for shared memory: recorded, not fatal
            tried.append({"config": config, "error": f"{type(e).__name__}: {e}"[:300], "ok": False})
    good = [t for t in tried if t["ok"]]
    best = min(good, key=lambda t: t["median_ms"]) if good else None
    return {"tried": tried, "best": best, "all_settings_ok": len(good) == len(tried)}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with its measured figure (``None`` and not met when its row failed)."""
    by = {r["kernel"]: r for r in rows}

    def get(name, *keys):
        value = by.get(name)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value
    out = []
    for name in ("paged_decode_attention[full]", "paged_decode_attention[ragged]"):
        frac = get(name, "fraction_of_nominal_bandwidth")
        out.append({"target": f"{name} (batch 64, caches up to 2k): >= 60% of the nominal HBM bandwidth",
                    "measured": frac, "of_measured_bandwidth": get(name, "fraction_of_measured_bandwidth"),
                    "met": frac is not None and frac >= TARGETS["decode_bandwidth_fraction"]})
    for name in ("paged_decode_attention[ragged]", "paged_decode_attention[smollm2-ragged]"):
        ratio = get(name, "baselines", "padded_sdpa", "kernel_over_baseline")
        floor = get(name, "baselines", "padded_sdpa_unmasked_floor", "kernel_over_baseline")
        out.append({"target": f"{name}: faster than the fair padded SDPA "
                              f"({get(name, 'baselines', 'padded_sdpa', 'backend')} backend)",
                    "measured": None if ratio is None else round(1 / ratio, 3), "unit": "speedup",
                    "speedup_vs_unmasked_floor": None if floor is None else round(1 / floor, 3),
                    "met": ratio is not None and ratio < 1.0})
    for name in sorted(n for n in by if n.startswith("multi_lora_linear")):
        ratio = get(name, "baselines", "dense_matmul", "kernel_over_baseline")
        out.append({"target": f"{name}: within 1.3x of one dense matmul", "measured": ratio, "unit": "x dense",
                    "met": ratio is not None and ratio <= TARGETS["multi_lora_vs_dense"]})
    return out


def versions(device) -> dict:
    triton_version = getattr(__import__("triton"), "__version__", None) if kernels.HAS_TRITON else None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version()})
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    return info


def run(model_name: str | None = None, quick: bool = False, device: str | None = None,
        max_new_tokens: int | None = None, batch_sizes=None, dtype: str | torch.dtype | None = None) -> dict:
    """The suite; ``dtype``: of the timed GPU pass (default bfloat16). ``model_name``, ``max_new_tokens`` and
    ``batch_sizes`` are the engine suites' options: unused here."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if getattr(torch, dtype, None) not in TOLERANCE:
            raise ValueError(f"bench kernels: unknown dtype {dtype!r} (use bfloat16, float16 or float32)")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.bfloat16
    report = {"suite": "kernels", "quick": quick, "environment": environment(device), "versions": versions(device)}
    if device.type != "cuda" or not kernels.HAS_TRITON:
        print("mor-lab bench kernels: timings need a CUDA GPU (none here), so nothing is timed. Running the "
              "correctness pass instead: every kernel in Triton's interpreter (TRITON_INTERPRET=1) and every "
              "baseline against the PyTorch reference, fp32/fp16/bf16, on tiny shapes.", file=sys.stderr)
        if not kernels.HAS_TRITON:
            return {**report, "mode": "unavailable", "all_ok": False, "note": "triton is not installed", "results": []}
        rows = correctness_pass(device=device)
        all_ok = all(r["ok"] for r in rows)
        if not all_ok:
            print("mor-lab bench kernels: CHECK FAILED for " + ", ".join(
                f"{r['kernel']} ({r['dtype']})" for r in rows if not r["ok"]), file=sys.stderr)
        return {**report, "mode": "interpreter-correctness", "all_ok": all_ok, "results": rows,
                "note": "no GPU: correctness only, no timings (interpreter timings would mean nothing)"}
    rows, peaks = gpu_pass(quick, dtype)
    all_ok = all(r["ok"] for r in rows)
    if not all_ok:
        print("mor-lab bench kernels: CHECK FAILED for " + ", ".join(r["kernel"] for r in rows if not r["ok"]),
              file=sys.stderr)
    return {**report, "mode": "gpu", "all_ok": all_ok, "peaks": peaks, "results": rows, "targets": targets(rows),
            "note": "ms: CUDA events after warm-up at the timed shapes, L2 flushed before each run (median, "
                    "min, max); fractions of the measured peaks and of the nominal ones; every timed output "
                    "(kernel, CUDA-graph replay and baselines) checked against the reference. The tiny odd "
                    "shapes in fp32/fp16/bf16 are the native kernel tests (tests/test_kernels*.py)"}


def load_gpu_report(name: str = "kernels-gpu.json") -> dict | None:
    """The recorded GPU run of this suite (``docs/bench/<name>``, from the repo root or ``notebooks/``), if any."""
    import json
    from pathlib import Path
    for folder in (Path("docs/bench"), Path("../docs/bench"), Path(__file__).resolve().parents[2] / "docs/bench"):
        if (folder / name).is_file():
            report = json.loads((folder / name).read_text())
            return report if report.get("mode") == "gpu" else None
    return None


def format_table(report: dict) -> str:
    """The per-kernel rows of a GPU report as a fixed-width text table, then the targets."""
    v = report.get("versions", {})
    lines = [f"{v.get('gpu', '?')}  torch {v.get('torch')}  triton {v.get('triton')}  CUDA {v.get('cuda')}  "
             f"driver {v.get('driver')}", f"peaks: {report.get('peaks')}",
             f"{'kernel':40s} {'median ms':>10s} {'graph ms':>9s} {'GB/s':>7s} {'of BW':>6s} {'TFLOP/s':>8s} "
             f"{'baseline':>32s} {'ok':>3s}"]
    for r in report["results"]:
        if "ms" not in r:
            lines.append(f"{r['kernel']:40s} FAILED: {r.get('error', r)}")
            continue
        graph = r.get("cuda_graph_ms", {}).get("median", float("nan"))
        base = ", ".join(f"{n} {b['ms']['median']:.4f} ({b.get('backend') or '-'})"
                         for n, b in r.get("baselines", {}).items() if "ms" in b)
        if "reference_ms" in r:
            base = f"eager {r['reference_ms']['median']:.4f}" + (f", {base}" if base else "")
        frac = r.get("fraction_of_nominal_bandwidth", r["fraction_of_measured_bandwidth"])
        lines.append(f"{r['kernel']:40s} {r['ms']['median']:10.4f} {graph:9.4f} {r['gb_per_s']:7.0f} {frac:6.0%} "
                     f"{r['tflop_per_s']:8.2f} {base:>32s} {'yes' if r['ok'] else 'NO':>3s}")
        best = (r.get("sweep") or {}).get("best")
        if best:
            lines.append(f"{'':40s} best launch setting {best['config']}: {best['median_ms']:.4f} ms")
    for t in report.get("targets", []):
        lines.append(f"{'met ' if t['met'] else 'MISSED'}  {t['target']}: {t['measured']}")
    return "\n".join(lines)


VIEW_OPS = {"t", "select", "permute", "view", "_unsafe_view", "transpose", "expand", "slice", "detach", "alias",
            "unsqueeze", "squeeze", "reshape", "as_strided"}  # no kernel launch: they only re-describe memory


def op_traffic(fn: Callable, *args, watch: torch.Tensor | None = None) -> list[dict]:
    """Run ``fn(*args)`` and list the ATen operations it dispatched (views left out): per op, the bytes of
    its tensor inputs and outputs (what an unfused eager run moves through memory) and whether it read
    ``watch`` (e.g. the shared weight). Counts what the reference implementations really do."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def tensors(values):
        for v in values:
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from tensors(v)

    watched = None if watch is None else watch.untyped_storage().data_ptr()
    ops: list[dict] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS:
                inputs = list(tensors(list(args) + list((kwargs or {}).values())))
                outputs = list(tensors([out]))
                ops.append({"op": name, "bytes": sum(t.numel() * t.element_size() for t in inputs + outputs),
                            "reads_watched": watched is not None and any(
                                t.untyped_storage().data_ptr() == watched for t in inputs)})
            return out

    with Recorder():
        fn(*args)
    return ops

"""``mor-lab bench kernels``: each Triton kernel against its PyTorch reference, and the CDB engine with and without.

On CUDA: time every kernel and its reference (``triton.testing.do_bench``), report GB/s and TFLOP/s and
their fraction of this device's measured peaks (streaming-read bandwidth, bf16 matmul); the ragged
decode attention also against padded ``scaled_dot_product_attention`` (the engine's reference path:
a dense ``[batch, heads, max_len]`` cache and a mask) on ragged lengths, and the multi-LoRA linear
against one dense matmul of the same shape. Then the whole continuous depth-wise batching engine with
the kernels vs with the references (same tokens expected).

Without a GPU it says so and runs the correctness pass instead: every kernel through Triton's
interpreter against its reference on tiny odd shapes. Both write the same JSON shape.
"""
from __future__ import annotations

import math
import sys

import torch

from .. import kernels
from .common import environment

NOMINAL_BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100": 2039,
                         "L40S": 864, "L4": 300, "A10": 600, "RTX 4090": 1008}


def _cases(device, dtype, quick: bool):
    """(name, kernel call, reference call, bytes moved, flops, shape note) for every kernel."""
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    e = torch.tensor([], dtype=dtype).element_size()
    big = not quick and device.type == "cuda"
    rows, d, f = (8192, 4096, 11008) if big else (37, 123, 77)
    x, w, res = r(rows, d), r(d) + 1, r(rows, d)
    yield ("rms_norm", lambda: kernels.rmsnorm.rms_norm(x, w, 1e-5),
           lambda: kernels.rmsnorm.rms_norm_reference(x, w, 1e-5), 2 * rows * d * e, 4 * rows * d, f"[{rows}, {d}]")
    yield ("add_rms_norm", lambda: kernels.rmsnorm.add_rms_norm(x, res, w, 1e-5)[0],
           lambda: kernels.rmsnorm.add_rms_norm_reference(x, res, w, 1e-5)[0], 4 * rows * d * e, 5 * rows * d,
           f"[{rows}, {d}]")
    gate, up = r(rows, f), r(rows, f)
    yield ("silu_mul", lambda: kernels.swiglu.silu_mul(gate, up), lambda: kernels.swiglu.silu_mul_reference(gate, up),
           3 * rows * f * e, 5 * rows * f, f"[{rows}, {f}]")
    heads, hd = (32, 128) if big else (3, 10)
    q = r(rows, heads, hd)
    ang = r(rows, 1, hd // 2, dt=torch.float32)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    yield ("apply_rotary", lambda: kernels.rotary.apply_rotary(q, cos, sin),
           lambda: kernels.rotary.apply_rotary_reference(q, cos, sin), 2 * q.numel() * e + 2 * cos.numel() * e,
           3 * q.numel(), f"[{rows}, {heads}, {hd}]")
    k_sel = rows // 2
    index = torch.randperm(rows, device=device)[:k_sel].sort().values
    out, gsel = r(k_sel, d), r(k_sel, dt=torch.float32).sigmoid()
    yield ("router_gather", lambda: kernels.router.router_gather(x, index),
           lambda: kernels.router.router_gather_reference(x, index), 2 * k_sel * d * e, 0, f"{k_sel} of [{rows}, {d}]")
    h1, h2 = x.clone(), x.clone()
    yield ("gated_scatter_add", lambda: kernels.router.gated_scatter_add(h1, index, out, gsel),
           lambda: kernels.router.gated_scatter_add_reference(h2, index, out, gsel), 3 * k_sel * d * e,
           2 * k_sel * d, f"{k_sel} of [{rows}, {d}]")
    for m in ((64, 512) if big else (5,)):
        din, dout, rank, n = (4096, 4096, 16, 4) if big else (40, 37, 4, 3)
        xl, wl = r(m, din), r(dout, din) / math.sqrt(din)
        a, b = r(n, rank, din), r(n, rank, dout).transpose(1, 2)
        ids = torch.arange(m, device=device) % (n + 1) - 1  # every adapter and "none"
        scales = torch.ones(n, device=device)
        yield (f"multi_lora_linear[m={m}]", lambda: kernels.multi_lora.multi_lora_linear(xl, wl, None, a, b, ids, scales),
               lambda: kernels.multi_lora.multi_lora_linear_reference(xl, wl, None, a, b, ids, scales),
               (m * din + din * dout + m * dout) * e, 2 * m * din * dout + 4 * m * rank * (din + dout),
               f"x [{m}, {din}] W [{dout}, {din}] rank {rank}, {n} adapters", lambda: xl @ wl.T)
    yield from _attention_cases(device, dtype, big, r, e)


def _attention_cases(device, dtype, big, r, e):
    batch, heads, kv_heads, hd, page = (64, 32, 8, 128, 16) if big else (5, 4, 2, 16, 8)
    for name, lengths in (("full", [2048 if big else 37] * batch),
                          ("ragged", torch.linspace(128 if big else 0, 2048 if big else 37, batch).long().tolist())):
        pages_per = [max(1, -(-n // page)) for n in lengths]
        table = torch.zeros(batch, max(pages_per), dtype=torch.int32, device=device)
        perm = torch.randperm(sum(pages_per), device=device).int()
        used = 0
        for s, c in enumerate(pages_per):
            table[s, :c] = perm[used:used + c]
            used += c
        kc, vc = r(sum(pages_per), kv_heads, page, hd), r(sum(pages_per), kv_heads, page, hd)
        lens = torch.tensor(lengths, device=device, dtype=torch.int32)
        q = r(batch, heads, hd)
        # the padded baseline: a dense [batch, kv_heads, max_len, hd] cache and a length mask
        max_len = max(lengths)
        dense_k, dense_v = r(batch, kv_heads, max_len, hd), r(batch, kv_heads, max_len, hd)
        mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        total = sum(lengths)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q[:, :, None], dense_k, dense_v, attn_mask=mask, enable_gqa=True)
        yield (f"paged_decode_attention[{name}]",
               lambda: kernels.attention.paged_decode_attention(q, kc, vc, table, lens),
               lambda: kernels.attention.paged_decode_attention_reference(q, kc, vc, table, lens) if not big else sdpa(),
               2 * total * kv_heads * hd * e + 2 * q.numel() * e, 4 * total * heads * hd,
               f"batch {batch}, lengths {min(lengths)}..{max(lengths)}, {heads}/{kv_heads} heads, d {hd}, page {page}",
               None, "padded SDPA" if big else "reference")
    seqs, q_len = (16, 128) if big else (3, 5)
    lengths = [1024 if big else 20] * seqs
    pages_per = -(-lengths[0] // page)
    table = torch.arange(seqs * pages_per, device=device, dtype=torch.int32).view(seqs, pages_per)
    kc, vc = r(seqs * pages_per, kv_heads, page, hd), r(seqs * pages_per, kv_heads, page, hd)
    lens = torch.tensor(lengths, device=device, dtype=torch.int32)
    starts = torch.arange(seqs + 1, device=device) * q_len
    qc = r(seqs * q_len, heads, hd)
    total_pairs = seqs * sum(lengths[0] - q_len + j + 1 for j in range(q_len))
    yield ("paged_chunk_attention", lambda: kernels.attention.paged_chunk_attention(qc, kc, vc, table, lens, starts),
           lambda: kernels.attention.paged_chunk_attention_reference(qc, kc, vc, table, lens, starts),
           2 * sum(lengths) * kv_heads * hd * e + 2 * qc.numel() * e, 4 * total_pairs * heads * hd,
           f"{seqs} sequences x {q_len} causal queries over {lengths[0]} positions")


def correctness_pass(dtypes=(torch.float32, torch.float16)) -> list[dict]:
    """Every kernel (Triton, interpreted on CPU) against its reference on tiny odd shapes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with kernels.use("triton"):
        for dtype in dtypes:
            for case in _cases(device, dtype, quick=True):
                name, kernel, reference, note = case[0], case[1], case[2], case[5]
                got, want = kernel().float(), reference().float()
                err = (got - want).abs().max().item() if got.numel() else 0.0
                tol = (1e-4 if device.type == "cpu" else 5e-3) if dtype == torch.float32 else \
                    1e-2 * max(1.0, want.abs().max().item())  # CUDA fp32 dots may use tf32
                rows.append({"kernel": name, "dtype": str(dtype).replace("torch.", ""), "shape": note,
                             "max_abs_err": float(f"{err:.3g}"), "tolerance": float(f"{tol:.3g}"), "ok": err <= tol})
    return rows


def _measure_peaks(device) -> dict:
    import triton.testing
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=50)
    x = torch.empty(2**30, device=device, dtype=torch.uint8)  # 1 GiB: well past the L2
    ms_copy = triton.testing.do_bench(lambda: x.view(torch.float32).sum(), warmup=5, rep=30)
    name = torch.cuda.get_device_name(device)
    nominal = next((v for k, v in NOMINAL_BANDWIDTH_GBS.items() if k in name), None)
    return {"bf16_matmul_tflops": round(2 * n**3 / ms / 1e9, 1), "read_bandwidth_gbs": round(x.numel() / ms_copy / 1e6, 1),
            "nominal_bandwidth_gbs": nominal}


def gpu_pass(quick: bool, dtype=torch.bfloat16) -> tuple[list[dict], dict]:
    import triton.testing
    device = torch.device("cuda")
    peaks = _measure_peaks(device)
    bandwidth = peaks["nominal_bandwidth_gbs"] or peaks["read_bandwidth_gbs"]
    rows = []
    with kernels.use("triton"):
        for case in _cases(device, dtype, quick):
            name, kernel, reference, nbytes, flops, note = case[:6]
            dense = case[6] if len(case) > 6 else None
            baseline = case[7] if len(case) > 7 else "reference"
            ms_k = triton.testing.do_bench(kernel, warmup=10, rep=50)
            ms_r = triton.testing.do_bench(reference, warmup=10, rep=50)
            row = {"kernel": name, "dtype": str(dtype).replace("torch.", ""), "shape": note,
                   "kernel_ms": round(ms_k, 4), f"{baseline.replace(' ', '_').lower()}_ms": round(ms_r, 4),
                   "speedup": round(ms_r / ms_k, 2), "gb_per_s": round(nbytes / ms_k / 1e6, 1),
                   "bandwidth_fraction": round(nbytes / ms_k / 1e6 / bandwidth, 3),
                   "tflop_per_s": round(flops / ms_k / 1e9, 2),
                   "matmul_peak_fraction": round(flops / ms_k / 1e9 / peaks["bf16_matmul_tflops"], 3)}
            if dense is not None:
                ms_d = triton.testing.do_bench(dense, warmup=10, rep=50)
                row["dense_matmul_ms"] = round(ms_d, 4)
                row["vs_dense_matmul"] = round(ms_k / ms_d, 3)
            rows.append(row)
    return rows, peaks


def engine_pass(model_name, quick: bool, batch_size: int, max_new_tokens: int | None) -> list[dict]:
    """The CDB engine (recursive SmolLM2, fixed exit distribution) with the kernels vs the references."""
    from ..engine.cdb import cdb_generate
    from ..engine.loops import FixedLoops, LoopStructure
    from ..models.hf import load_pretrained
    from .cdb import EXIT_PROBS, _timed, lower_init_recursive
    from .generate import bench_prompts

    device = torch.device("cuda")
    model, tokenizer = load_pretrained(model_name, device=device)
    structure = LoopStructure.middle_cycle(model.num_steps, 4)
    recursive = lower_init_recursive(model, structure)
    rule = FixedLoops(EXIT_PROBS, seed=0)
    max_new_tokens = max_new_tokens or (16 if quick else 32)
    prompts = bench_prompts(tokenizer, batch_size * 2, model.config.vocab_size, seed=batch_size)
    rows, outputs = [], {}
    for backend in ("reference", "triton"):
        with kernels.use(backend):
            cdb_generate(recursive, structure, prompts[:2], 2, 2, rule)  # warm-up (and Triton compilation)
            (ids, _), seconds = _timed(lambda: cdb_generate(recursive, structure, prompts, max_new_tokens, batch_size,
                                                            rule))
        outputs[backend] = ids
        tokens = sum(map(len, ids))
        rows.append({"method": f"recursive_cdb[{backend}]", "batch_size": batch_size, "requests": len(prompts),
                     "tokens_per_s": round(tokens / seconds, 2), "seconds": round(seconds, 3), "new_tokens": tokens})
    same = [a == b for a, b in zip(outputs["reference"], outputs["triton"])]
    rows[-1]["speedup_vs_reference"] = round(rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    rows[-1]["identical_rows"] = f"{sum(same)}/{len(same)}"
    return rows


def run(model_name: str | None = None, quick: bool = False, device: str | None = None,
        max_new_tokens: int | None = None, batch_sizes=(32,)) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"suite": "kernels", "quick": quick, "environment": environment(device)}
    if device.type != "cuda" or not kernels.HAS_TRITON:
        print("mor-lab bench kernels: timing the Triton kernels needs a CUDA GPU (none here). Running the "
              "correctness pass instead: every kernel in Triton's interpreter (TRITON_INTERPRET=1) against its "
              "PyTorch reference on tiny shapes.", file=sys.stderr)
        if not kernels.HAS_TRITON:
            return {**report, "mode": "unavailable", "note": "triton is not installed", "results": []}
        rows = correctness_pass()
        return {**report, "mode": "interpreter-correctness", "all_ok": all(r["ok"] for r in rows), "results": rows,
                "note": "no GPU: correctness only; timings from the interpreter mean nothing"}
    rows, peaks = gpu_pass(quick)
    engine = []
    try:
        for b in batch_sizes:
            engine += engine_pass(model_name, quick, b, max_new_tokens)
    except (ImportError, OSError, ValueError) as e:  # no offline model: kernel timings still stand
        engine = [{"method": "recursive_cdb", "skipped": f"{type(e).__name__}: {e}"}]
    check = correctness_pass()
    return {**report, "mode": "gpu", "peaks": peaks, "results": rows, "engine": engine,
            "correctness": {"all_ok": all(r["ok"] for r in check), "rows": check},
            "note": "fractions are of the nominal bandwidth when the GPU is known (else the measured streaming "
                    "read) and of a measured bf16 8192^3 matmul; paged_decode_attention is timed against padded "
                    "SDPA over a dense cache (the engine's reference path), multi_lora_linear also against one "
                    "dense matmul of the same shape"}


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
    """The per-kernel rows of a GPU report as a fixed-width text table, then the engine rows."""
    lines = [f"{report['environment'].get('gpu', '?')}  peaks: {report.get('peaks')}",
             f"{'kernel':36s} {'ms':>9s} {'vs baseline':>11s} {'GB/s':>8s} {'of peak BW':>10s} {'TFLOP/s':>8s} "
             f"{'vs dense':>8s}"]
    for r in report["results"]:
        lines.append(f"{r['kernel']:36s} {r['kernel_ms']:9.4f} {r['speedup']:10.2f}x {r['gb_per_s']:8.0f} "
                     f"{r['bandwidth_fraction']:10.0%} {r['tflop_per_s']:8.2f} {r.get('vs_dense_matmul', ''):>8}")
    for r in report.get("engine", []):
        lines.append(str(r))
    return "\n".join(lines)

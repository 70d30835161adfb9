"""Shared benchmark plumbing: timed engine runs, the cost-model columns, peak memory, roofline, JSON.

Speed targets live here, not in timed tests: machines are shared and noisy, so every suite measures
its methods side by side in one run (interleaved repeats, medians) and reports ratios. Every row that
comes from the engine carries the cost model's columns: ``predicted_s`` (the run priced pass by pass),
``prediction_error``, ``ideal_speedup`` (the reference's ideal time over this run's ideal time: the same
work with every pass at full batch), ``fraction_of_ideal`` (measured speedup / ideal speedup), the
pass counts and the predicted time per kind of pass (the per-step cost breakdown).
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..engine.cost import resident_bytes


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self.peak_bytes = resident_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, resident_bytes())

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


@contextmanager
def timer(device: torch.device):
    """``with timer(dev) as t: ...`` then ``t()`` is the elapsed seconds (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    box = {}
    yield lambda: box["s"]
    sync()
    box["s"] = time.perf_counter() - start


def machine_peaks(device: torch.device, quick: bool = False) -> dict:
    """Measured matmul GFLOP/s (fp32) and memory bandwidth (GB/s, streaming read) of this device."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    reps = 3 if quick else 10
    with timer(device) as t:
        for _ in range(reps):
            torch.mm(a, b)
    gflops = 2 * n**3 * reps / t() / 1e9
    x = torch.randn((64 if device.type == "cpu" else 1024) * 2**20 // 4 * 4, device=device)
    x.sum()
    with timer(device) as t:
        for _ in range(reps):
            x.sum()
    bandwidth = x.numel() * x.element_size() * reps / t() / 1e9
    return {"matmul_gflops": round(gflops, 1), "bandwidth_gbs": round(bandwidth, 1),
            "threads": torch.get_num_threads()}


def environment(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "cpu": _cpu_name()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The engine dtype a benchmark runs in; a clear error for one the device cannot run."""
    from ..engine.scheduler import DTYPES
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if torch.device(device).type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU cannot run bfloat16; use --dtype float16 or float32")
    return dtype


def engine_runs(jobs: dict, repeats: int, device) -> dict:
    """Run every job ``repeats`` times, interleaved (a-b-c, a-b-c, ...) so drift in the machine's speed
    hits all alike; returns name -> (ids, trace of the median run, seconds of every run)."""
    out: dict[str, tuple] = {}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    runs: dict[str, list] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            with timer(device) as elapsed:
                ids, trace = job()
            times[name].append(elapsed())
            runs[name].append((ids, trace))
    for name in jobs:
        order = sorted(range(repeats), key=lambda i: times[name][i])
        ids, trace = runs[name][order[len(order) // 2]]
        out[name] = (ids, trace, times[name])
    return out


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def cost_columns(cost, trace, seconds: float, reference=None, reference_seconds: float | None = None,
                 reference_cost=None) -> dict:
    """The cost model's columns of a row; with a reference run (same requests), the speedups and ideal.
    ``reference_cost``: the reference model's own cost model when it is another model (MoR vs vanilla)."""
    reference_cost = reference_cost or cost
    predicted = cost.predict(trace)
    row = {"predicted_s": round(predicted, 4), "prediction_error": round(predicted / seconds - 1, 3),
           "passes": trace.pass_counts(),
           "predicted_breakdown_s": {k: round(v, 4) for k, v in cost.breakdown(trace).items()}}
    if reference is not None:
        ideal = reference_cost.ideal(reference) / cost.ideal(trace)
        measured = reference_seconds / seconds
        row.update({"speedup": round(measured, 3), "ideal_speedup": round(ideal, 3),
                    "fraction_of_ideal": round(measured / ideal, 3),
                    "predicted_speedup": round(reference_cost.predict(reference) / predicted, 3)})
    return row


def write_json(report: dict, path: str | Path | None) -> str:
    text = json.dumps(report, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


def hf_reference(model_name, device: torch.device):
    """The same checkpoint through Hugging Face transformers (the ``hf`` rows), loaded without progress
    bars, EOS disabled so that every engine produces exactly ``max_new_tokens``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from ..models.hf import resolve

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(resolve(model_name)), dtype=torch.float32)
    finally:
        if bars:
            logging.enable_progress_bar()
    model.generation_config.eos_token_id = None
    return model.to(device).eval()

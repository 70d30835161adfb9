"""``mor-lab bench generate``: HF transformers' ``generate`` vs the mor_lab engine, side by side.

Same prompts (real English text of different lengths), greedy, EOS disabled so that both produce
exactly ``max_new_tokens`` per prompt; batch sizes 1, 8, 32; the same dtype for both. Rows: ``hf``,
``mor_lab_exact`` (HF's summation order: the tokens must be identical) and ``mor_lab`` (the engine's
fast paths: the matmul layout measured fastest here, fused projections). Reports tokens/s, peak
memory, whether the tokens are identical, each method's fraction of this machine's roofline for this
model (measured bandwidth and matmul rate vs the bytes and FLOPs of a decode step), and the cost
model's prediction of the engine's runs. Repeats are interleaved; medians reported.
"""
from __future__ import annotations

import torch

from ..engine.cost import CostModel, head_flops, layer_flops, layer_params
from ..engine.generate import generate_ids
from ..models.hf import load_pretrained
from .common import PeakMemory, cost_columns, environment, hf_reference, machine_peaks, median, parse_dtype, timer


def bench_prompts(tokenizer, count: int, vocab_size: int, seed: int = 0, words: tuple[int, int] = (8, 60)
                  ) -> list[list[int]]:
    """``count`` prompts of ``words`` (min, max) words from CPython's documentation (random ids without a tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(words[0], words[1] + 1, (count,), generator=generator).tolist()
    if tokenizer is None:
        return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    from pydoc_data.topics import topics
    texts = [topics[k] for k in sorted(topics)]
    prompts = []
    for i, n in enumerate(lengths):
        words = texts[(i * 7) % len(texts)].split()
        prompts.append(tokenizer(" ".join(words[:n])).input_ids)
    return prompts


def roofline(model, batch_size: int, context: int, peaks: dict) -> dict:
    """Upper bound on decode tokens/s: weights are read once per step, KV once per token."""
    c = model.config
    element = next(model.parameters()).element_size()
    weight_bytes = (c.num_layers * layer_params(c) + c.vocab_size * c.hidden_size) * element
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * element
    flops = c.num_layers * layer_flops(c, context) + head_flops(c)
    compute_limit = peaks["matmul_gflops"] * 1e9 / flops
    memory_limit = peaks["bandwidth_gbs"] * 1e9 * batch_size / (weight_bytes + batch_size * kv_bytes)
    return {"bytes_per_step": weight_bytes + batch_size * kv_bytes, "flops_per_token": flops,
            "tokens_per_s_limit": round(min(compute_limit, memory_limit), 2),
            "bound": "memory" if memory_limit < compute_limit else "compute"}


def _hf_generate(hf_model, prompts, max_new_tokens, pad_id):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as HF decoder-only generation expects
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    device = hf_model.device
    out = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return out[:, width:].tolist()


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(1, 8, 32),
        max_new_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
        repeats: int | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype, device)
    max_new_tokens = max_new_tokens or (16 if quick else 64)
    repeats = repeats or (1 if quick else 3)
    model, tokenizer = load_pretrained(model_name, device=device)
    model = model.to(torch_dtype)
    hf_model = hf_reference(model_name, device).to(torch_dtype)
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0)
    prompts = bench_prompts(tokenizer, max(batch_sizes), model.config.vocab_size)
    peaks = machine_peaks(device, quick)
    cost = CostModel.calibrate(model, max_rows=max(batch_sizes), reps=2 if quick else 5)
    exact_cost = CostModel.calibrate(model, max_rows=max(batch_sizes), reps=2 if quick else 5, fast=False)
    costs = {"mor_lab_exact": exact_cost, "mor_lab": cost}  # exact mode runs F.linear: priced as it runs

    methods = {
        "hf": lambda p: (_hf_generate(hf_model, p, max_new_tokens, pad_id), None),
        "mor_lab_exact": lambda p: generate_ids(model, p, max_new_tokens, eos_token_ids=[], exact=True,
                                                cost=exact_cost),
        "mor_lab": lambda p: generate_ids(model, p, max_new_tokens, eos_token_ids=[], cost=cost),
    }
    for run_method in methods.values():  # warm-up
        run_method(prompts[:2])
    results = []
    for batch_size in batch_sizes:
        batch = prompts[:batch_size]
        context = sum(map(len, batch)) / batch_size + max_new_tokens / 2
        limit = roofline(model, batch_size, int(context), peaks)
        outputs, times, traces, mems = {}, {m: [] for m in methods}, {}, {}
        for _ in range(repeats):  # interleaved: drift hits every method alike
            for method, run_method in methods.items():
                with PeakMemory(device) as mem, timer(device) as elapsed:
                    outputs[method], traces[method] = run_method(batch)
                times[method].append(elapsed())
                mems[method] = mem.mb
        rows = {}
        for method in methods:
            seconds = median(times[method])
            tokens = sum(map(len, outputs[method]))
            tokens_per_s = tokens / seconds
            row = {"method": method, "batch_size": batch_size, "tokens_per_s": round(tokens_per_s, 2),
                   "peak_mem_mb": round(mems[method], 1), "seconds": round(seconds, 3),
                   "seconds_all": [round(t, 3) for t in times[method]], "new_tokens": tokens,
                   "roofline_fraction": float(f"{tokens_per_s / limit['tokens_per_s_limit']:.3g}"),
                   "roofline": limit}
            if traces[method] is not None:
                row.update(cost_columns(costs[method], traces[method], seconds))
                same = [a == b for a, b in zip(outputs["hf"], outputs[method])]
                row["identical_to_hf"] = all(same)
                row["identical_rows"] = f"{sum(same)}/{len(same)}"
                row["speedup_vs_hf"] = round(tokens_per_s / (sum(map(len, outputs["hf"])) / median(times["hf"])), 3)
            rows[method] = row
        results += rows.values()
    return {"suite": "generate", "model": str(model_name or "SmolLM2-135M-Instruct (offline)"),
            "quick": quick, "max_new_tokens": max_new_tokens, "dtype": str(torch_dtype).replace("torch.", ""),
            "repeats": repeats, "environment": environment(device), "results": results,
            "cost_model": {"calibration_s": round(cost.seconds, 2), "layouts": cost.layouts,
                           "head_layouts": cost.head_layouts},
            "roofline": {**peaks, "weight_bytes_per_step": results[0]["roofline"]["bytes_per_step"],
                         "note": "limit = min(matmul_gflops / flops_per_token, bandwidth * batch / bytes_per_step)"}}

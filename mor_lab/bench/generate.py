"""``mor-lab bench generate``: HF transformers' ``generate`` vs the mor_lab engine, side by side.

Same prompts (real English text of different lengths), greedy, EOS disabled so that both produce
exactly ``max_new_tokens`` per prompt; batch sizes 1, 8, 32. Reports tokens/s, peak memory, whether
the tokens are identical, and each method's fraction of this machine's roofline for this model.
"""
from __future__ import annotations

import torch

from ..engine.generate import generate_ids
from ..models.hf import load_pretrained
from .common import PeakMemory, environment, hf_reference, machine_peaks, timer


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
    layer_params = c.num_parameters(include_embeddings=False) - c.hidden_size
    head_params = c.vocab_size * c.hidden_size
    weight_bytes = (layer_params + head_params) * element
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * element
    flops = 2 * (layer_params + head_params) + 4 * c.num_layers * c.num_heads * c.head_dim * context
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
        max_new_tokens: int | None = None, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_new_tokens = max_new_tokens or (16 if quick else 64)
    model, tokenizer = load_pretrained(model_name, device=device)
    hf_model = hf_reference(model_name, device)
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0)
    prompts = bench_prompts(tokenizer, max(batch_sizes), model.config.vocab_size)
    peaks = machine_peaks(device, quick)

    methods = {
        "hf": lambda p: _hf_generate(hf_model, p, max_new_tokens, pad_id),
        "mor_lab": lambda p: generate_ids(model, p, max_new_tokens, eos_token_ids=[])[0],
    }
    for run_method in methods.values():  # warm-up
        run_method(prompts[:2])
    results = []
    for batch_size in batch_sizes:
        batch = prompts[:batch_size]
        context = sum(map(len, batch)) / batch_size + max_new_tokens / 2
        limit = roofline(model, batch_size, int(context), peaks)
        outputs = {}
        for method, run_method in methods.items():
            with PeakMemory(device) as mem, timer(device) as elapsed:
                outputs[method] = run_method(batch)
            tokens = sum(map(len, outputs[method]))
            tokens_per_s = tokens / elapsed()
            results.append({"method": method, "batch_size": batch_size, "tokens_per_s": round(tokens_per_s, 2),
                            "peak_mem_mb": round(mem.mb, 1), "seconds": round(elapsed(), 3),
                            "new_tokens": tokens,
                            "roofline_fraction": float(f"{tokens_per_s / limit['tokens_per_s_limit']:.3g}")})
        same = [a == b for a, b in zip(outputs["hf"], outputs["mor_lab"])]
        hf_row, ours = results[-2], results[-1]
        ours["identical_to_hf"] = all(same)
        ours["identical_rows"] = f"{sum(same)}/{len(same)}"
        ours["speedup_vs_hf"] = round(ours["tokens_per_s"] / hf_row["tokens_per_s"], 3)
        hf_row["roofline"] = ours["roofline"] = limit
    return {"suite": "generate", "model": str(model_name or "SmolLM2-135M-Instruct (offline)"),
            "quick": quick, "max_new_tokens": max_new_tokens, "dtype": "float32",
            "environment": environment(device), "results": results,
            "roofline": {**peaks, "weight_bytes_per_step": results[0]["roofline"]["bytes_per_step"],
                         "note": "limit = min(matmul_gflops / flops_per_token, bandwidth * batch / bytes_per_step)"}}

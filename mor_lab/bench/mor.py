"""``mor-lab bench mor``: decode throughput of Mixture-of-Recursions against a vanilla model.

SmolLM2's 30-layer shape with random weights (speed only): ``vanilla`` runs 30 layers per token;
``mor{N}`` (N = 2, 3, 4 recursions) is MIDDLE_CYCLE with expert-choice routing (first and last layer
unique, a shared block of 14, 9 or 7 layers). Its decode-time routing is the real causal rule (router
logit > threshold, per token and loop); on random weights the thresholds are calibrated to the top-k
boundary of the capacities ``(N - r) / N`` (:func:`mor_lab.mor.calibrate_thresholds`), so the routed
depths follow the capacities. Each MoR model decodes with static batching (``mor{N}_static``: a step
waits for its deepest row; the next batch starts when this one ends) and with continuous depth-wise
batching (``mor{N}_cdb``: freed slots take the next token or request at once). Greedy, EOS disabled,
more requests than slots. Recursion-wise KV caching (the default scheme) throughout.

KV memory per row is what the batch holds at the end (``batch x context x per-token KV``, per-token KV
from the measured routed depths). A second mode gives every model the same memory for weights + KV
cache and runs each at the largest batch that fits (how the paper measured its up-to-2.06x).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from ..engine.cdb import cdb_generate
from ..engine.generate import generate_ids
from ..engine.trace import Trace
from ..models.config import ModelConfig
from ..mor.model import MoRConfig, MoRModel, RoutedDepth, RoutedExit, calibrate_thresholds
from .common import environment, timer

SMOLLM2_SHAPE = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, max_position_embeddings=8192,
                            rope={"rope_type": "default", "rope_theta": 100000.0})
PAPER_MEMORY_SPEEDUP = 2.06  # MoR's best throughput ratio over vanilla at equal memory (paper, Fig. 4a)


def bench_prompts(count: int, vocab_size: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in sizes]


def build_models(shape: ModelConfig, recursions, device, seed: int = 0) -> dict[str, MoRModel]:
    """The vanilla model and one expert-choice MoR model per N_r, random weights, calibrated thresholds."""
    torch.manual_seed(seed)
    models = {"vanilla": MoRModel(MoRConfig(shape, kind="vanilla")).to(device).eval()}
    calibration = torch.randint(3, shape.vocab_size, (4, 96), generator=torch.Generator().manual_seed(seed + 1))
    for n in recursions:
        model = MoRModel(MoRConfig(shape, kind="expert", num_recursions=n)).to(device).eval()
        calibrate_thresholds(model, calibration.to(device))
        models[f"mor{n}"] = model
    return models


def _static(model, prompts, max_new_tokens, slots, policy_factory):
    ids, trace = [], Trace(num_steps=model.num_steps)
    for i in range(0, len(prompts), slots):  # static batching: the next batch starts when this one ends
        out, part = generate_ids(model, prompts[i:i + slots], max_new_tokens, eos_token_ids=[],
                                 policy=policy_factory())
        ids += out
        trace.tokens += part.tokens
        trace.engine_steps += part.engine_steps
    return ids, trace


def decode_one(model: MoRModel, method: str, prompts, max_new_tokens: int, batch_size: int) -> dict:
    """Serve ``prompts`` with ``batch_size`` slots; one row of the report."""
    def fn():
        if method == "cdb":
            return cdb_generate(model, model.structure, prompts, max_new_tokens, batch_size, RoutedExit())
        return _static(model, prompts, max_new_tokens, batch_size,
                       RoutedDepth if model.structure is not None else (lambda: None))
    with torch.inference_mode(), timer(model.device) as elapsed:
        ids, trace = fn()
    seconds = elapsed()
    tokens = sum(map(len, ids))
    decoded = [t for seq in trace.tokens for t in seq[1:]]  # the first token of each request comes from prefill
    mean_layers = sum(t.num_steps for t in decoded) / max(1, len(decoded))
    st = model.structure
    mean_loops = (mean_layers - st.prelude - st.coda) / st.block if st else 1.0
    context = sum(map(len, prompts)) / len(prompts) + max_new_tokens
    kinds = tuple({s.kind for s in trace.engine_steps} - {"prefill"})
    return {"batch_size": batch_size, "requests": len(prompts), "tokens_per_s": round(tokens / seconds, 2),
            "seconds": round(seconds, 3), "new_tokens": tokens, "mean_layers": round(mean_layers, 3),
            "mean_loops": round(mean_loops, 3),
            "kv_cache_mb": round(batch_size * context * model.kv_bytes_per_token(mean_loops) / 2**20, 3),
            "utilization": round(trace.utilization(kinds), 3)}


def kv_memory(models: dict[str, MoRModel], context: int, batch_size: int) -> list[dict]:
    """KV cache per scheme at the capacities' routed depths, against ALGORITHMS.md's formulas."""
    vanilla = models["vanilla"].kv_bytes_per_token() * context * batch_size / 2**20
    rows = [{"model": "vanilla", "scheme": "full", "kv_cache_mb": round(vanilla, 2)}]
    for name, model in models.items():
        if model.structure is None:
            continue
        st, n = model.structure, model.num_recursions
        mean_loops = sum(model.router.config.capacity)
        for scheme, formula in (("recursion", (n + 1) / (2 * n)), ("share", 1 / n)):
            shared = dataclasses.replace(model.mor, kv_scheme=scheme)
            probe = MoRModel.__new__(MoRModel)  # only the accounting: no weights needed
            probe.mor, probe.structure = shared, st
            entries = MoRModel.kv_entries_per_token(probe, mean_loops)
            mb = entries * 2 * model.config.num_kv_heads * model.config.head_dim * model.dtype.itemsize * \
                context * batch_size / 2**20
            rows.append({"model": name, "scheme": scheme, "kv_cache_mb": round(mb, 2),
                         "vs_vanilla": round(mb / vanilla, 3),
                         "loop_kv_vs_all_loops": round((entries - st.prelude - st.coda) / (n * st.block), 4),
                         "formula": round(formula, 4)})
    return rows


def weight_bytes(model: MoRModel) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(8, 32), max_new_tokens: int | None = None,
        device: str | None = None, recursions=(2, 3, 4), shape: ModelConfig | None = None,
        max_memory_batch: int | None = None) -> dict:
    if model_name is not None:
        raise ValueError("bench mor uses SmolLM2's shape with random weights; it takes no --model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = shape or SMOLLM2_SHAPE
    max_new_tokens = max_new_tokens or (8 if quick else 32)
    lengths = (4, 12) if quick else (16, 64)
    max_memory_batch = max_memory_batch or max(batch_sizes) * (2 if quick else 8)
    models = build_models(shape, recursions, device)
    warm = bench_prompts(2, shape.vocab_size, (4, 6))
    for name, model in models.items():  # warm-up
        decode_one(model, "cdb" if model.structure else "static", warm, 2, 2)

    results = []
    for batch_size in batch_sizes:
        prompts = bench_prompts(batch_size * 3 // 2 if quick else batch_size * 2, shape.vocab_size, lengths,
                                seed=batch_size)
        rows = {"vanilla": {"method": "vanilla", **decode_one(models["vanilla"], "static", prompts, max_new_tokens,
                                                              batch_size)}}
        for n in recursions:
            for method in ("static", "cdb"):
                rows[f"mor{n}_{method}"] = {"method": f"mor{n}_{method}", **decode_one(
                    models[f"mor{n}"], method, prompts, max_new_tokens, batch_size)}
        vanilla = rows["vanilla"]
        for n in recursions:
            for method in ("static", "cdb"):
                r = rows[f"mor{n}_{method}"]
                r["speedup_vs_vanilla"] = round(r["tokens_per_s"] / vanilla["tokens_per_s"], 3)
                r["ideal_speedup"] = round(vanilla["mean_layers"] / r["mean_layers"], 3)
                r["fraction_of_ideal"] = round(r["speedup_vs_vanilla"] / r["ideal_speedup"], 3)
            rows[f"mor{n}_cdb"]["speedup_vs_static"] = round(
                rows[f"mor{n}_cdb"]["tokens_per_s"] / rows[f"mor{n}_static"]["tokens_per_s"], 3)
        results += rows.values()

    # Equal memory for weights + KV: the vanilla model at the largest batch size, each MoR model at the
    # largest batch that fits the same bytes (capped to keep CPU runs short; the uncapped size is reported).
    base_batch = max(batch_sizes)
    context = (lengths[0] + lengths[1]) / 2 + max_new_tokens
    budget = weight_bytes(models["vanilla"]) + base_batch * context * models["vanilla"].kv_bytes_per_token()
    memory_rows = []
    for name, model in models.items():
        loops = sum(model.router.config.capacity) if model.structure else None
        fits = int((budget - weight_bytes(model)) // (context * model.kv_bytes_per_token(loops)))
        batch = min(fits, max_memory_batch)
        prompts = bench_prompts(batch * 3 // 2 if quick else batch * 2, shape.vocab_size, lengths, seed=batch)
        row = decode_one(model, "cdb" if model.structure else "static", prompts, max_new_tokens, batch)
        memory_rows.append({"method": "vanilla" if model.structure is None else f"{name}_cdb", **row,
                            "max_batch_in_budget": fits, "capped": fits > batch,
                            "weights_mb": round(weight_bytes(model) / 2**20, 1)})
    for row in memory_rows:
        row["speedup_vs_vanilla"] = round(row["tokens_per_s"] / memory_rows[0]["tokens_per_s"], 3)

    return {"suite": "mor", "model": "random weights, shape " + json.dumps(shape.to_dict()),
            "quick": quick, "max_new_tokens": max_new_tokens, "prompt_lengths": list(lengths), "dtype": "float32",
            "recursions": list(recursions), "routing": "expert-choice, capacities (N-r)/N, causal threshold rule "
                                                      "calibrated to the top-k boundary; recursion-wise KV caching",
            "environment": environment(device), "results": results,
            "kv_memory": {"context": int(context), "batch_size": base_batch,
                          "rows": kv_memory(models, int(context), base_batch)},
            "equal_memory": {"budget_mb": round(budget / 2**20, 1), "paper_speedup": PAPER_MEMORY_SPEEDUP,
                             "max_batch_cap": max_memory_batch, "results": memory_rows},
            "note": "ideal speedup = vanilla layers per token / mean layers per decoded token (30 / (2 + K x mean "
                    "loops)); kv_cache_mb counts what the batch holds at the end (recursion-wise: only tokens "
                    "that reached a loop are cached in it)."}

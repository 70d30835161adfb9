"""``mor-lab bench mor``: decode throughput of Mixture-of-Recursions against a vanilla model, on the one engine.

SmolLM2's 30-layer shape with random weights (speed only): ``vanilla`` runs 30 layers per token;
``mor{N}`` (N = 2, 3, 4 recursions) is MIDDLE_CYCLE with expert-choice routing (first and last layer
unique, a shared block of 14, 9 or 7 layers). Its decode-time routing is the real causal rule (router
logit > threshold, per token and loop); on random weights the thresholds are calibrated to the top-k
boundary of the capacities ``(N - r) / N`` (:func:`mor_lab.mor.calibrate_thresholds`), so the routed
depths follow the capacities. Each MoR model decodes with static batching (``mor{N}_static``: a step
waits for its deepest row; the next batch starts when this one ends) and with continuous depth-wise
batching (``mor{N}_cdb``: freed slots take the next token or request at once; ``mor{N}_cdb_cost``: twice
as many sequences in flight as slots, the head called when the cost model says the wait pays). Greedy,
EOS disabled, more requests than slots. Recursion-wise KV caching (the default scheme) throughout.

Every row carries the cost model's columns against ``vanilla`` (``bench.common.cost_columns``; each
model priced by its own calibration). A shape sweep repeats N_r = 3 with a 4x smaller vocabulary and a
wider shape whose head is under 7 % of a token. KV memory per scheme is checked against the formulas,
and a second mode gives every model the same memory for weights + KV cache and runs each at the
largest batch that fits (how the paper measured its up-to-2.06x). Last, the lab's trained family
(``lab:vanilla``, ``lab:mor-expert-3``, ...: routers that learned, a 4k vocabulary, so a cheap head) runs
the same methods on their held-out text (``lab_models``).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from ..engine.cost import CostModel, weight_bytes
from ..engine.generate import generate_ids
from ..engine.policies import RoutedDepth
from ..models.config import ModelConfig
from ..mor.model import MoRConfig, MoRModel, calibrate_thresholds
from .cdb import SHAPES, SMOLLM2_SHAPE
from .common import cost_columns, engine_runs, environment, median, parse_dtype

PAPER_MEMORY_SPEEDUP = 2.06  # MoR's best throughput ratio over vanilla at equal memory (paper, Fig. 4a)
HEAD_RULES = ("every-step", "cost")


def bench_prompts(count: int, vocab_size: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in sizes]


def build_models(shape: ModelConfig, recursions, device, seed: int = 0, dtype=torch.float32) -> dict[str, MoRModel]:
    """The vanilla model and one expert-choice MoR model per N_r, random weights, calibrated thresholds."""
    torch.manual_seed(seed)
    models = {"vanilla": MoRModel(MoRConfig(shape, kind="vanilla")).to(device).eval()}
    calibration = torch.randint(3, shape.vocab_size, (4, 96), generator=torch.Generator().manual_seed(seed + 1))
    for n in recursions:
        model = MoRModel(MoRConfig(shape, kind="expert", num_recursions=n)).to(device).eval()
        calibrate_thresholds(model, calibration.to(device))
        models[f"mor{n}"] = model
    return {k: m.to(dtype) for k, m in models.items()}


def _jobs(model, prompts, max_new_tokens, batch_size, rules, cost):
    run = lambda **kw: (lambda: generate_ids(model, prompts, max_new_tokens, eos_token_ids=[], slots=batch_size,  # noqa
                                             cost=cost, **kw))
    if model.structure is None:
        return {"static": run()}
    jobs = {"static": run(policy=RoutedDepth())}
    for rule in rules:
        jobs["cdb" if rule == "every-step" else "cdb_cost"] = run(policy=RoutedDepth(), mode="continuous",
                                                                  head_rule=rule)
    return jobs


def describe(model: MoRModel, ids, trace, seconds: float, prompts, max_new_tokens: int, batch_size: int) -> dict:
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


def measure(models, costs, prompts, max_new_tokens, batch_size, rules, repeats, device) -> list[dict]:
    jobs = {}
    for name, model in models.items():
        for method, job in _jobs(model, prompts, max_new_tokens, batch_size, rules, costs[name]).items():
            jobs["vanilla" if model.structure is None else f"{name}_{method}"] = job
    results = engine_runs(jobs, repeats, device)
    _, ref_trace, ref_times = results["vanilla"]
    rows = {}
    for key, (ids, trace, times) in results.items():
        name = key if key == "vanilla" else key.split("_")[0]
        seconds = median(times)
        row = {"method": key, **describe(models[name], ids, trace, seconds, prompts, max_new_tokens, batch_size),
               "seconds_all": [round(t, 3) for t in times]}
        row.update(cost_columns(costs[name], trace, seconds, ref_trace, median(ref_times), costs["vanilla"]))
        row["speedup_vs_vanilla"] = row.pop("speedup")
        rows[key] = row
    for key in rows:
        if "_cdb" in key:
            static = key.split("_")[0] + "_static"
            rows[key]["speedup_vs_static"] = round(rows[key]["tokens_per_s"] / rows[static]["tokens_per_s"], 3)
            rows[key]["same_tokens_as_static"] = results[key][0] == results[static][0]
    return list(rows.values())


def lab_family(batch_sizes, max_new_tokens: int, rules, repeats: int, device, quick: bool) -> dict:
    """The committed lab models (``lab:vanilla``, ``lab:mor-expert-3``, ...; trained routers deciding depth
    at decode time) side by side, on prompts cut from their held-out text. Their 4k vocabulary makes the
    head cheap, the regime where skipped loops should show most; their small layers make per-pass
    overhead large, which the cost model's columns separate out. Empty when the checkpoints are absent."""
    from ..checkpoints import FAMILY, available, heldout_blocks, load_lab, model_dir
    present = [name for name in FAMILY if f"{name}@seed0" in available()]
    if "vanilla" not in present:
        return {"models": present, "results": [], "note": "lab:vanilla is missing: train the family (mor-lab train)"}
    models = {name: load_lab(name, device=device, with_tokenizer=False)[0] for name in present}
    blocks = heldout_blocks(model_dir("vanilla"))
    g = torch.Generator().manual_seed(0)
    results = []
    for batch_size in batch_sizes:
        count = batch_size * 3 // 2 if quick else batch_size * 2
        lengths = torch.randint(16, 65, (count,), generator=g).tolist()
        prompts = [blocks[i % len(blocks), :n].tolist() for i, n in enumerate(lengths)]
        costs = {name: CostModel.calibrate(m, max_rows=2 * batch_size, reps=2 if quick else 5)
                 for name, m in models.items()}
        results += measure(models, costs, prompts, max_new_tokens, batch_size, rules, repeats, device)
    return {"models": present, "results": results,
            "note": "trained checkpoints (seed 0), routing by their routers' decode-time rule; greedy, EOS disabled"}


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


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(8, 32), max_new_tokens: int | None = None,
        device: str | None = None, recursions=(2, 3, 4), shape: ModelConfig | None = None,
        max_memory_batch: int | None = None, dtype: str | None = None, head_rule: str | None = None, shapes=None,
        repeats: int | None = None, kernels: str | None = None, random_weights: bool = True) -> dict:
    """``random_weights`` is accepted for symmetry with ``bench cdb``: this suite always uses random weights."""
    if model_name is not None:
        raise ValueError("bench mor uses SmolLM2's shape with random weights; it takes no --model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype, device)
    rules = HEAD_RULES if head_rule in (None, "both") else (head_rule,)
    shape = shape or SMOLLM2_SHAPE
    max_new_tokens = max_new_tokens or (12 if quick else 32)
    repeats = repeats or 3
    lengths = (4, 12) if quick else (16, 64)
    max_memory_batch = max_memory_batch or max(batch_sizes) * (2 if quick else 8)
    from .. import kernels as kernel_backends
    backend = {"on": "triton", "off": "reference", None: "auto", "auto": "auto"}[kernels]
    with kernel_backends.use(backend):
        models = build_models(shape, recursions, device, dtype=torch_dtype)
        rows_needed = 2 * max(max(batch_sizes), 1)
        costs = {name: CostModel.calibrate(m, max_rows=rows_needed, reps=2 if quick else 5)
                 for name, m in models.items()}
        warm = bench_prompts(2, shape.vocab_size, (4, 6))
        for name, model in models.items():  # warm-up
            for job in _jobs(model, warm, 2, 2, rules, costs[name]).values():
                job()

        results = []
        for batch_size in batch_sizes:
            prompts = bench_prompts(batch_size * 3 // 2 if quick else batch_size * 2, shape.vocab_size, lengths,
                                    seed=batch_size)
            results += measure(models, costs, prompts, max_new_tokens, batch_size, rules, repeats, device)

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
            method = "static" if model.structure is None else "cdb"
            job = _jobs(model, prompts, max_new_tokens, batch, ("every-step",), costs[name])[method]
            ids, trace, times = engine_runs({"run": job}, 1, device)["run"]
            row = describe(model, ids, trace, median(times), prompts, max_new_tokens, batch)
            memory_rows.append({"method": "vanilla" if model.structure is None else f"{name}_cdb", **row,
                                "max_batch_in_budget": fits, "capped": fits > batch,
                                "weights_mb": round(weight_bytes(model) / 2**20, 1)})
        for row in memory_rows:
            row["speedup_vs_vanilla"] = round(row["tokens_per_s"] / memory_rows[0]["tokens_per_s"], 3)

        sweep = []
        if shapes is None:
            shapes = () if device.type == "cuda" else ("smollm2_vocab_div4", "wide_small_head")
        for name in shapes:
            if name not in SHAPES:
                raise ValueError(f"unknown shape {name!r}; allowed: {', '.join(SHAPES)}")
            swept = build_models(SHAPES[name], (3,), device, dtype=torch_dtype)
            swept_costs = {k: CostModel.calibrate(m, max_rows=rows_needed, reps=2 if quick else 5)
                           for k, m in swept.items()}
            b = base_batch
            prompts = bench_prompts(b * 3 // 2 if quick else b * 2, SHAPES[name].vocab_size, lengths, seed=b)
            for row in measure(swept, swept_costs, prompts, max_new_tokens, b, rules, repeats, device):
                regime = swept_costs["vanilla"].regime(b)
                sweep.append({"shape": name, "head_share": regime["head_share"], "regime": regime["regime"], **row})
            del swept
        lab = lab_family(batch_sizes, max_new_tokens, rules, repeats, device, quick)

    return {"suite": "mor", "model": "random weights, shape " + json.dumps(shape.to_dict()),
            "quick": quick, "max_new_tokens": max_new_tokens, "prompt_lengths": list(lengths),
            "dtype": str(torch_dtype).replace("torch.", ""), "kernels": backend, "repeats": repeats,
            "recursions": list(recursions), "routing": "expert-choice, capacities (N-r)/N, causal threshold rule "
                                                      "calibrated to the top-k boundary; recursion-wise KV caching",
            "environment": environment(device), "results": results, "shape_sweep": sweep, "lab_models": lab,
            "cost_model": {name: {"calibration_s": round(c.seconds, 2), "regime": c.regime(max(batch_sizes))}
                           for name, c in costs.items()},
            "kv_memory": {"context": int(context), "batch_size": base_batch,
                          "rows": kv_memory(models, int(context), base_batch)},
            "equal_memory": {"budget_mb": round(budget / 2**20, 1), "paper_speedup": PAPER_MEMORY_SPEEDUP,
                             "max_batch_cap": max_memory_batch, "results": memory_rows},
            "note": "speedups are against vanilla at the same batch (static batching, full depth); ideal_speedup = "
                    "vanilla's ideal time (cost model) / this run's ideal time (its own cost model: the same depths "
                    "with every pass at full batch); kv_cache_mb counts what the batch holds at the end "
                    "(recursion-wise: only tokens that reached a loop are cached in it)."}

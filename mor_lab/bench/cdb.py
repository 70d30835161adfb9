"""``mor-lab bench cdb``: continuous depth-wise batching against static batching, measured for real.

Same requests (more than slots, different lengths), greedy, EOS disabled, all on the one engine. The
recursive model is SmolLM2 converted to MIDDLE_CYCLE with N_r = 4 (1 + 4 x 7 + 1 steps; the shared
block initialised from the original layers 1..7 by ``recursive.convert(init="lower")``, not uptrained:
this suite measures the scheduler, not quality); ``--random-weights`` uses SmolLM2's shape with random
weights instead (no model package needed). The ``*_exit`` / ``*_cdb*`` rows use a fixed exit-depth
distribution (40/30/20/10 % after loops 1-4: mean 2.0 loops), so the scheduler's efficiency is
measurable independently of model quality; the ``*_conf`` rows use the model's own confidence
(logit-lens margin after each loop, one head call per test). ``recursive_cdb`` calls the head whenever a
token leaves the loops; ``recursive_cdb_cost`` lets twice as many sequences be in flight as slots and
calls the head when the cost model says the wait pays (``--head-rule``).

Every row has the cost model's columns (``bench.common.cost_columns``): measured vs predicted time,
the ideal speedup of the same depths with every pass at full batch, the fraction of it reached. A
shape sweep (random weights) shows how the gain changes with the LM head's share of a token's cost:
SmolLM2's shape, the same layers with a 4x smaller vocabulary, and a wider shape whose head is under
7 % of a token (an 8B Llama's proportions, scaled down).
"""
from __future__ import annotations

import dataclasses

import torch

from ..engine.cost import CostModel, weight_bytes
from ..engine.generate import generate_ids
from ..engine.plan import LoopStructure
from ..engine.policies import ConfidenceLoops, FixedLoops, LoopExit
from ..engine.trace import NOT_BUSY
from ..models.config import ModelConfig
from ..models.decoder import random_decoder
from ..models.hf import load_pretrained
from ..recursive import convert
from .common import cost_columns, engine_runs, environment, median, parse_dtype
from .generate import bench_prompts

EXIT_PROBS = [0.4, 0.3, 0.2, 0.1]
LOOPS = 4
SMOLLM2_SHAPE = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, max_position_embeddings=8192,
                            rope={"rope_type": "default", "rope_theta": 100000.0})
SHAPES = {
    "smollm2": SMOLLM2_SHAPE,
    "smollm2_vocab_div4": dataclasses.replace(SMOLLM2_SHAPE, vocab_size=49152 // 4),
    # An 8B Llama's proportions (d 4096, ffn 3.5 d, GQA 4:1, head ~7 % of a token's weights), scaled down:
    "wide_small_head": dataclasses.replace(SMOLLM2_SHAPE, hidden_size=1024, intermediate_size=3584, num_heads=16,
                                           num_kv_heads=4, vocab_size=24576),
}
HEAD_RULES = ("every-step", "cost")


def random_recursive(shape: ModelConfig, loops: int = LOOPS, seed: int = 0, device=None, dtype=torch.float32):
    """A MIDDLE_CYCLE recursive model of ``shape`` with random weights: only its physical layers exist."""
    st = LoopStructure.middle_cycle(shape.num_layers, loops)
    physical = dataclasses.replace(shape, num_layers=st.prelude + st.block + st.coda)
    model = random_decoder(physical, seed=seed)
    model.plan = st.plan()
    return model.to(device=device, dtype=dtype).eval()


def _methods(recursive, prompts, n, B, rules, threshold, cost):
    fixed, conf = FixedLoops(EXIT_PROBS, seed=0), ConfidenceLoops(threshold)
    run = lambda policy, **kw: (lambda: generate_ids(recursive, prompts, n, eos_token_ids=[], policy=policy,  # noqa
                                                     slots=B, cost=cost, **kw))
    jobs = {"recursive_full": run(None),
            "recursive_static_exit": run(LoopExit(fixed))}
    for rule in rules:
        suffix = "" if rule == "every-step" else "_cost"
        jobs[f"recursive_cdb{suffix}"] = run(LoopExit(fixed), mode="continuous", head_rule=rule)
    if "cost" in rules:  # the same KV memory as the cost rule's 2B sequences in flight, at full depth
        jobs["recursive_full_2x_slots"] = lambda: generate_ids(recursive, prompts, n, eos_token_ids=[], slots=2 * B,
                                                                cost=cost)
    if threshold is not None:
        jobs["recursive_static_exit_conf"] = run(LoopExit(conf))
        jobs["recursive_cdb_conf"] = run(LoopExit(conf), mode="continuous", head_rule=rules[-1])
    return jobs


def decode_utilization(trace) -> float:
    """Fraction of slot x pass cells doing useful work in the passes after prefill."""
    return trace.utilization(tuple({s.kind for s in trace.engine_steps} - {"prefill"}))


def queue_utilization(trace) -> float:
    """Slot utilization of the shared block's passes until the last request was admitted."""
    newest = max(q for s in trace.engine_steps for q in s.sequences if q is not None)
    end = min(i for i, s in enumerate(trace.engine_steps) if newest in s.sequences)
    steps = [s for s in trace.engine_steps[:end] if s.kind == "loop"]
    cells = sum(trace.slots for _ in steps)
    busy = sum(sum(a not in NOT_BUSY for a in s.activity) for s in steps)
    return busy / cells if cells else 1.0


def measure(recursive, prompts, max_new_tokens, batch_size, rules, threshold, cost, repeats, device,
            reference_model=None) -> list[dict]:
    """Every method at one batch size, side by side; rows with the cost-model columns."""
    jobs = _methods(recursive, prompts, max_new_tokens, batch_size, rules, threshold, cost)
    if reference_model is not None:
        jobs = {"original": lambda: generate_ids(reference_model, prompts, max_new_tokens, eos_token_ids=[],
                                                 slots=batch_size), **jobs}
    results = engine_runs(jobs, repeats, device)
    st = LoopStructure.of(recursive)
    full_ids, full_trace, full_times = results["recursive_full"]
    rows = {}
    for method, (ids, trace, times) in results.items():
        seconds = median(times)
        tokens = sum(map(len, ids))
        row = {"method": method, "batch_size": batch_size, "requests": len(prompts),
               "tokens_per_s": round(tokens / seconds, 2), "seconds": round(seconds, 3),
               "seconds_all": [round(t, 3) for t in times], "new_tokens": tokens}
        if method != "original":
            loops = [(len(t.steps) - st.prelude - st.coda) / st.block for seq in trace.tokens for t in seq[1:]]
            row["mean_loops"] = round(sum(loops) / max(1, len(loops)), 3)
            row["utilization"] = round(decode_utilization(trace), 3)
            if "cdb" in method:
                row["utilization_queue_nonempty"] = round(queue_utilization(trace), 3)
            row["in_flight"] = 2 * batch_size if method.endswith("_cost") or method.endswith("_2x_slots") or (
                method == "recursive_cdb_conf" and rules[-1] == "cost") else batch_size
            row.update(cost_columns(cost, trace, seconds, full_trace, median(full_times)))
            row["speedup_vs_recursive_full"] = row.pop("speedup")
            row["same_tokens_as_static_exit"] = None
        rows[method] = row
    for cdb in [m for m in rows if m.startswith("recursive_cdb")]:
        static = "recursive_static_exit_conf" if cdb.endswith("_conf") else "recursive_static_exit"
        rows[cdb]["speedup_vs_static_exit"] = round(rows[cdb]["tokens_per_s"] / rows[static]["tokens_per_s"], 3)
        rows[cdb]["same_tokens_as_static_exit"] = results[cdb][0] == results[static][0]
        if rows[cdb]["in_flight"] > batch_size and "recursive_full_2x_slots" in rows:
            rows[cdb]["speedup_vs_full_same_kv_memory"] = round(
                rows[cdb]["tokens_per_s"] / rows["recursive_full_2x_slots"]["tokens_per_s"], 3)
    return list(rows.values())


def shape_sweep(shapes, batch_size, max_new_tokens, requests, rules, repeats, device, dtype, quick) -> list[dict]:
    """CDB vs static vs full depth on random-weight recursive models of several shapes (fixed exits)."""
    out = []
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; allowed: {', '.join(SHAPES)}")
        model = random_recursive(SHAPES[name], device=device, dtype=dtype)
        cost = CostModel.calibrate(model, max_rows=2 * batch_size, reps=2 if quick else 5)
        prompts = bench_prompts(None, requests, model.config.vocab_size, seed=batch_size, words=(4, 24))
        rows = measure(model, prompts, max_new_tokens, batch_size, rules, None, cost, repeats, device)
        regime = cost.regime(batch_size)
        for row in rows:
            row.update({"shape": name, "head_share": regime["head_share"], "regime": regime["regime"],
                        "weights_mb": round(weight_bytes(model) / 2**20, 1)})
        out += rows
        del model
    return out


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(8, 32), max_new_tokens: int | None = None,
        device: str | None = None, threshold: float = 0.5, random_weights: bool = False, dtype: str | None = None,
        head_rule: str | None = None, shapes=None, repeats: int | None = None, kernels: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype, device)
    rules = HEAD_RULES if head_rule in (None, "both") else (head_rule,)
    if any(r not in HEAD_RULES for r in rules):
        raise ValueError(f"--head-rule must be one of {', '.join(HEAD_RULES)} or both, got {head_rule!r}")
    max_new_tokens = max_new_tokens or (24 if quick else 48)
    repeats = repeats or 3
    from .. import kernels as kernel_backends
    backend = {"on": "triton", "off": "reference", None: "auto", "auto": "auto"}[kernels]
    with kernel_backends.use(backend):
        if random_weights:
            if model_name is not None:
                raise ValueError("--random-weights uses SmolLM2's shape; it takes no --model")
            original, tokenizer = None, None
            recursive = random_recursive(SMOLLM2_SHAPE, device=device, dtype=torch_dtype)
            init = "random weights (SmolLM2's shape)"
        else:
            original, tokenizer = load_pretrained(model_name, device=device)
            original = original.to(torch_dtype)
            loops = min(LOOPS, max(1, original.num_steps - 2))
            recursive = convert(original, strategy="middle_cycle", num_recursions=loops, init="lower",
                                tie_norms=True).model.eval()
            init = "lower (not uptrained)"
        st = LoopStructure.of(recursive)
        cost = CostModel.calibrate(recursive, max_rows=2 * max(batch_sizes), reps=2 if quick else 5)
        warm = bench_prompts(tokenizer, 2, recursive.config.vocab_size, words=(4, 8))
        for job in _methods(recursive, warm, 2, 2, rules, threshold, cost).values():
            job()  # warm-up (and Triton compilation on a GPU)
        results = []
        for batch_size in batch_sizes:
            prompts = bench_prompts(tokenizer, batch_size * 3 // 2 if quick else batch_size * 2,
                                    recursive.config.vocab_size, seed=batch_size, words=(4, 24))
            results += measure(recursive, prompts, max_new_tokens, batch_size, rules, threshold, cost, repeats,
                               device, reference_model=original)
        sweep = []
        if shapes is None:
            shapes = () if random_weights and device.type == "cuda" else tuple(SHAPES)
        if shapes:
            b = max(batch_sizes)
            sweep = shape_sweep(shapes, b, max_new_tokens, b * 3 // 2 if quick else b * 2, rules, repeats, device,
                                torch_dtype, quick)
    return {"suite": "cdb", "model": "random weights" if random_weights else str(model_name or
                                                                            "SmolLM2-135M-Instruct (offline)"),
            "quick": quick, "dtype": str(torch_dtype).replace("torch.", ""), "kernels": backend,
            "structure": {"prelude": st.prelude, "block": st.block, "loops": st.loops, "coda": st.coda,
                          "strategy": "MIDDLE_CYCLE", "init": init},
            "exit_distribution": EXIT_PROBS, "confidence_threshold": threshold, "max_new_tokens": max_new_tokens,
            "repeats": repeats, "environment": environment(device), "cost_model": _cost_summary(cost, batch_sizes),
            "results": results, "shape_sweep": sweep,
            "note": "speedups are against recursive_full (the same recursive model at full depth, static batching); "
                    "ideal_speedup = the cost model's ideal time of recursive_full / of this run (the same depths "
                    "with every pass at full batch B); fraction_of_ideal = measured / ideal; prediction_error = "
                    "predicted / measured - 1. The cost head rule keeps 2B sequences in flight (in_flight; twice "
                    "the KV cache) and its head calls batch up to 2B rows, so it can exceed the ideal at B: "
                    "speedup_vs_full_same_kv_memory compares it with full depth at 2B slots "
                    "(recursive_full_2x_slots)"}


def _cost_summary(cost: CostModel, batch_sizes) -> dict:
    return {"calibration_s": round(cost.seconds, 2), "layouts": cost.layouts, "head_layouts": cost.head_layouts,
            "layer_ms": {n: round(cost.layer(n) * 1e3, 3) for n in (1, 4, 8, 16, 32, 64)},
            "head_ms": {n: round(cost.head(n) * 1e3, 3) for n in (1, 4, 8, 16, 32, 64)},
            "overhead_ms_per_pass": round(cost.overhead_s * 1e3, 3),
            "regime": {b: cost.regime(b) for b in batch_sizes}}

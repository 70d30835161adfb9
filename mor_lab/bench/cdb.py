"""``mor-lab bench cdb``: continuous depth-wise batching against static batching, measured for real.

Same requests (more than slots, different lengths), greedy, EOS disabled. The recursive model is
SmolLM2 converted to MIDDLE_CYCLE with N_r = 4 (1 + 4 x 7 + 1 steps; the shared block initialised
from the original layers 1..7, not uptrained: this suite measures the scheduler, not quality). The
``recursive_static_exit`` / ``recursive_cdb`` rows use a fixed exit-depth distribution (40/30/20/10%
after loops 1-4: mean 2.0 loops, ideal speedup 2.0x), so the scheduler's efficiency is measurable
independently of model quality; the ``*_conf`` rows use the model's own confidence (logit-lens margin).
Requests are short prompts (4-24 words) and longer generations, so decoding, where the scheduler acts,
dominates the time.

Two ideals: ``ideal_speedup`` = N_r / mean loops (the loops alone, the issue's definition), and
``compute_ideal_speedup`` = FLOPs per token at full depth / at the mean depth, where the prelude, coda
and LM head (about 8 layers' worth of FLOPs on SmolLM2) do not shrink with early exit.
"""
from __future__ import annotations

import torch

from ..engine.cdb import cdb_generate
from ..engine.loops import ConfidenceLoops, FixedLoops, LoopStructure, static_generate
from ..early_exit.evaluate import flops_per_token
from ..engine.trace import Trace
from ..models.decoder import Decoder
from ..models.hf import load_pretrained
from .common import environment, hf_reference, timer
from .generate import _hf_generate, bench_prompts

EXIT_PROBS = [0.4, 0.3, 0.2, 0.1]


def lower_init_recursive(model, structure: LoopStructure) -> Decoder:
    """A recursive copy of ``model``: prelude/coda layers kept, the shared block = the first K middle layers."""
    keep = list(range(structure.prelude + structure.block)) + \
        list(range(model.config.num_layers - structure.coda, model.config.num_layers))
    config = type(model.config).from_dict({**model.config.to_dict(), "num_layers": len(keep)})
    recursive = Decoder(config, structure.plan()).to(device=model.device, dtype=model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        state.update({f"layers.{new}.{k}": v for k, v in model.layers[old].state_dict().items()})
    recursive.load_state_dict(state)
    return recursive.eval()


def queue_utilization(trace: Trace) -> float:
    """Slot utilization of the loop steps before the last admission (while requests were waiting)."""
    last = max(i for i, s in enumerate(trace.engine_steps) if s.kind == "prefill")
    steps = [s for s in trace.engine_steps[:last] if s.kind == "loop"]
    cells = sum(len(s.activity) for s in steps)
    return sum(a != "idle" for s in steps for a in s.activity) / cells if cells else 1.0


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(8, 32), max_new_tokens: int | None = None,
        device: str | None = None, threshold: float = 0.5) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_new_tokens = max_new_tokens or (32 if quick else 64)
    model, tokenizer = load_pretrained(model_name, device=device)
    structure = LoopStructure.middle_cycle(model.num_steps, 4)
    recursive = lower_init_recursive(model, structure)
    hf_model = hf_reference(model_name, device)
    fixed, conf = FixedLoops(EXIT_PROBS, seed=0), ConfidenceLoops(threshold)

    methods = {
        "hf": lambda p, b: ([row for i in range(0, len(p), b)
                             for row in _hf_generate(hf_model, p[i:i + b], max_new_tokens, 0)], None),
        "original": lambda p, b: static_generate(model, structure, p, max_new_tokens, b),
        "recursive_full": lambda p, b: static_generate(recursive, structure, p, max_new_tokens, b),
        "recursive_static_exit": lambda p, b: static_generate(recursive, structure, p, max_new_tokens, b, fixed),
        "recursive_cdb": lambda p, b: cdb_generate(recursive, structure, p, max_new_tokens, b, fixed),
        "recursive_static_exit_conf": lambda p, b: static_generate(recursive, structure, p, max_new_tokens, b, conf),
        "recursive_cdb_conf": lambda p, b: cdb_generate(recursive, structure, p, max_new_tokens, b, conf),
    }
    cdb_generate(recursive, structure, bench_prompts(tokenizer, 2, model.config.vocab_size), 2, 2, fixed)  # warm-up
    results = []
    for batch_size in batch_sizes:
        prompts = bench_prompts(tokenizer, batch_size * 3 // 2 if quick else batch_size * 2, model.config.vocab_size,
                                seed=batch_size, words=(4, 24))
        context = sum(map(len, prompts)) / len(prompts) + max_new_tokens / 2
        full_flops = flops_per_token(recursive, recursive.num_steps, context)
        rows = {}
        for method, fn in methods.items():
            with timer(device) as elapsed:
                ids, trace = fn(prompts, batch_size)
            seconds = elapsed()
            tokens = sum(map(len, ids))
            row = {"method": method, "batch_size": batch_size, "requests": len(prompts),
                   "tokens_per_s": round(tokens / seconds, 2), "seconds": round(seconds, 3), "new_tokens": tokens}
            if trace is not None and method.startswith("recursive"):
                loops = [(len(t.steps) - structure.prelude - structure.coda) / structure.block
                         for seq in trace.tokens for t in seq[1:]]
                row["mean_loops"] = round(sum(loops) / max(1, len(loops)), 3)
                kinds = tuple({s.kind for s in trace.engine_steps} - {"prefill"})  # decode-time batch slots
                row["utilization"] = round(trace.utilization(kinds), 3)
                if "cdb" in method:
                    row["utilization_queue_nonempty"] = round(queue_utilization(trace), 3)
            rows[method] = row
            results.append(row)
        full = rows["recursive_full"]["tokens_per_s"]
        for method in ("recursive_static_exit", "recursive_cdb", "recursive_static_exit_conf", "recursive_cdb_conf"):
            r = rows[method]
            r["speedup_vs_recursive_full"] = round(r["tokens_per_s"] / full, 3)
            ideal = structure.loops / r["mean_loops"]
            r["ideal_speedup"] = round(ideal, 3)
            r["fraction_of_ideal"] = round(r["speedup_vs_recursive_full"] / ideal, 3)
            steps = structure.prelude + structure.coda + r["mean_loops"] * structure.block
            compute_ideal = full_flops / flops_per_token(recursive, steps, context)
            r["compute_ideal_speedup"] = round(compute_ideal, 3)
            r["fraction_of_compute_ideal"] = round(r["speedup_vs_recursive_full"] / compute_ideal, 3)
        rows["recursive_cdb"]["speedup_vs_static_exit"] = round(
            rows["recursive_cdb"]["tokens_per_s"] / rows["recursive_static_exit"]["tokens_per_s"], 3)
        rows["recursive_cdb_conf"]["speedup_vs_static_exit"] = round(
            rows["recursive_cdb_conf"]["tokens_per_s"] / rows["recursive_static_exit_conf"]["tokens_per_s"], 3)
    return {"suite": "cdb", "model": str(model_name or "SmolLM2-135M-Instruct (offline)"), "quick": quick,
            "structure": {"prelude": structure.prelude, "block": structure.block, "loops": structure.loops,
                          "coda": structure.coda, "strategy": "MIDDLE_CYCLE", "init": "lower (not uptrained)"},
            "exit_distribution": EXIT_PROBS, "confidence_threshold": threshold, "max_new_tokens": max_new_tokens,
            "environment": environment(device), "results": results,
            "note": "ideal_speedup = N_r / mean loops (loops only); compute_ideal_speedup = estimated FLOPs per "
                    "token at full depth / at the mean depth, with the prelude, coda and LM head that do not "
                    "shrink (flops_per_token)"}

"""``mor-lab bench early-exit``: full, static, CALM (batch / per row), FREE (fixed / adaptive), side by side.

All methods share one trained exit after ``shallow_layer`` depth steps and one confidence measure. The
exit (adapter + meta classifier, ``early_exit.recipes``) is the committed one trained on SmolLM2's own
greedy continuations of chat prompts (``heads="linear"`` or ``"block"``; the default for SmolLM2), or a
linear exit trained on corpus blocks and cached (``heads="corpus"``; any other model). So the methods
differ only in what they do with a confident token: nothing (full), always exit (static), exit the batch
when every row is confident (CALM's batch semantics), exit the row with state propagation (CALM per row), or defer its deep
layers to a synchronized parallel pass (FREE). Greedy, EOS disabled, the same chat prompts, the one
engine in static batches of ``batch_size``.

Every row has the cost model's columns (``bench.common.cost_columns``): the ideal speedup counts what
the policy's exit tests cost (an LM-head call per tested token with a logit-based measure), so a row
that exits often but tests every token can still have an ideal below 1. The peer a user would reach
for is measured too: Hugging Face's self-speculative early exit (``generate(...,
assistant_early_exit=L)``: exact, batch 1 only; its draft is the unadapted shallow exit), and every
row at batch 1 reports its ratio to it.
"""
from __future__ import annotations

import torch

from ..early_exit.evaluate import (agreement, forced_agreement, generated_perplexity, pareto_front, run_policy,
                                   teacher_forced_perplexity)
from ..early_exit.recipes import COMMITTED_ADAPTERS, committed_exit_heads, pretrained_exit_heads
from ..engine.cost import CostModel, decode_flops
from ..engine.generate import encode_prompts
from ..engine.policies import early_exit_policy
from ..models.hf import load_pretrained
from ..train.data import load_corpus, tokenize
from .common import cost_columns, engine_runs, environment, hf_reference, median, timer

CHAT_PROMPTS = [
    "What is the capital of France?", "Explain what a Python list comprehension is.",
    "Give me three tips for sleeping well.", "Write a short poem about autumn leaves.",
    "How does a hash table work?", "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet in two sentences.", "Why is the sky blue?",
    "What is the difference between a list and a tuple in Python?", "Name three uses of machine learning.",
    "How do vaccines train the immune system?", "Describe a cat to someone who has never seen one.",
    "What is recursion? Give an example.", "Translate 'good morning' into Spanish and French.",
    "What are the benefits of regular exercise?", "Explain the water cycle to a child.",
]
METHODS = ("full", "static", "calm", "calm_per_row", "free", "free_adaptive")
make_policy = early_exit_policy  # the name notebooks and older code use


def corpus_blocks(tokenizer, count: int, prompt: int = 32, continuation: int = 64):
    """``count`` held-out pydoc blocks as (prompt ids, continuation ids) for teacher-forced perplexity."""
    ids = tokenize(tokenizer, load_corpus("pydoc").validation)
    size = prompt + continuation
    blocks = [ids[i * size:(i + 1) * size].tolist() for i in range(count)]
    return [b[:prompt] for b in blocks], [b[prompt:] for b in blocks]


def _timed_run(model, prompts, policy, max_new_tokens, batch_size, cost):
    """One greedy run of a policy, shaped for ``engine_runs``: (the run, its trace)."""
    run_ = run_policy(model, prompts, policy, max_new_tokens, slots=batch_size, cost=cost)
    return run_, run_.trace


def exit_heads(model, tokenizer, kind: str, shallow_layer: int, measure: str, quick: bool):
    """The benchmark's exit: committed heads of type ``kind`` ("linear", "block"), or ("corpus") a linear
    exit trained on corpus blocks (cached; small in the quick setting)."""
    if kind == "corpus":
        return pretrained_exit_heads(model, tokenizer, [shallow_layer], measure=measure, progress=False,
                                     tokens=2048 if quick else None, steps=40 if quick else None)
    if kind not in COMMITTED_ADAPTERS:
        raise ValueError(f"unknown heads {kind!r}; allowed: corpus, {', '.join(COMMITTED_ADAPTERS)}")
    heads = committed_exit_heads(model, kind, measure)
    if shallow_layer not in heads.exit_layers:
        raise ValueError(f"the committed {kind} exit heads exit after {heads.exit_layers} layers, not "
                         f"{shallow_layer}: pass --shallow-layer {heads.exit_layers[-1]} or --heads corpus")
    return heads


def hf_early_exit(hf_model, prompts, max_new_tokens: int, exit_layer: int, repeats: int, device):
    """HF's self-speculative early exit at batch 1 (exact): ids and seconds per repeat."""
    times, ids = [], None
    for _ in range(repeats):
        with timer(device) as elapsed:
            out = [hf_model.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=max_new_tokens,
                                     assistant_early_exit=exit_layer, pad_token_id=0)[0, len(p):].tolist()
                   for p in prompts]
        times.append(elapsed())
        ids = out
    return ids, times


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(1, 8), max_new_tokens: int | None = None,
        device: str | None = None, shallow_layer: int | None = None, threshold: float = 0.5,
        sweep=(0.1, 0.3, 0.5, 0.7, 0.9), measure: str = "margin", repeats: int | None = None,
        peer: bool = True, heads: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_new_tokens = max_new_tokens or (16 if quick else 48)
    repeats = repeats or (1 if quick else 3)
    model, tokenizer = load_pretrained(model_name, device=device)
    shallow_layer = shallow_layer or round(2 * model.num_steps / 3)
    heads_kind = heads or ("linear" if model_name is None else "corpus")
    heads = exit_heads(model, tokenizer, heads_kind, shallow_layer, measure, quick)
    prompt_ids = encode_prompts(tokenizer, CHAT_PROMPTS, chat=True)
    corpus_prompts, corpus_targets = corpus_blocks(tokenizer, 2 if quick else 8, continuation=32 if quick else 64)
    cost = CostModel.calibrate(model, max_rows=max(8, max(batch_sizes)), reps=2 if quick else 5)
    policy_of = lambda method, tau=threshold: (  # noqa: E731
        lambda: early_exit_policy(method, shallow_layer, tau, heads, measure))
    run_policy(model, prompt_ids[:2], None, 2, cost=cost)  # warm-up
    hf_model = hf_reference(model_name, device) if peer else None

    results = []
    for batch_size in batch_sizes:
        prompts = prompt_ids[:max(batch_size, 2 if quick else 4)]
        jobs = {method: (lambda m=method: _timed_run(model, prompts, policy_of(m)(), max_new_tokens, batch_size,
                                                     cost)) for method in METHODS}
        runs = engine_runs(jobs, repeats, device)  # interleaved: the machine's drift hits every method alike
        full, _, full_times = runs["full"]
        reference = full.token_ids
        peer_seconds = None
        if hf_model is not None and batch_size == 1:
            peer_ids, peer_times = hf_early_exit(hf_model, prompts, max_new_tokens, shallow_layer, repeats, device)
            peer_seconds = median(peer_times)
            tokens = sum(map(len, peer_ids))
            results.append({"method": "hf_assistant_early_exit", "batch_size": 1, "exit_layer": shallow_layer,
                            "tokens_per_s": round(tokens / peer_seconds, 2),
                            "speedup": round(median(full_times) / peer_seconds, 3),
                            "agreement": round(agreement(peer_ids, reference), 3), "prompts": len(prompts),
                            "new_tokens": tokens, "note": "HF self-speculative decoding with the model's first "
                                                          f"{shallow_layer} layers as draft: exact by construction"})
        for method in METHODS:
            run_, _, times = runs[method]
            seconds = median(times)
            ids, layers = run_.token_ids, run_.mean_layers
            tokens = sum(map(len, ids))
            row = {"method": method, "batch_size": batch_size, "threshold": None if method in ("full", "static")
                   else ("adaptive" if method == "free_adaptive" else threshold),
                   "tokens_per_s": round(tokens / seconds, 2), "mean_layers": round(layers, 2),
                   "agreement": round(agreement(ids, reference), 3), "prompts": len(prompts), "new_tokens": tokens,
                   "seconds_all": [round(t, 3) for t in times]}
            row.update(cost_columns(cost, run_.trace, seconds, full.trace, median(full_times)))
            context = sum(map(len, prompts)) / len(prompts) + max_new_tokens / 2
            tests = row["passes"].get("test", 0) / max(1, tokens)
            row["gflops_per_token"] = round(decode_flops(model.config, layers, context, 1 + tests,
                                                         model.num_steps - layers) / 1e9, 4)
            if peer_seconds is not None:
                row["speedup_vs_hf_early_exit"] = round(peer_seconds / seconds, 3)
            if method != "full" and batch_size == batch_sizes[-1]:
                row["forced_agreement"] = round(forced_agreement(model, prompts, reference, policy_of(method)()), 3)
                row["generated_ppl_under_full"] = round(generated_perplexity(model, prompts, ids), 3)
            if batch_size == batch_sizes[-1]:  # teacher-forced perplexity of the strategy on held-out text
                row["corpus_ppl"] = round(teacher_forced_perplexity(model, corpus_prompts, corpus_targets,
                                                                    policy_of(method)()), 3)
            results.append(row)

    frontier = threshold_sweep(model, prompt_ids[:2 if quick else 4], shallow_layer, heads, max_new_tokens, sweep,
                               measure, cost)
    return {"suite": "early-exit", "model": str(model_name or "SmolLM2-135M-Instruct (offline)"),
            "quick": quick, "heads": heads_kind, "shallow_layer": shallow_layer, "num_layers": model.num_steps,
            "confidence": measure, "max_new_tokens": max_new_tokens, "repeats": repeats,
            "corpus_ppl": f"teacher-forced on {len(corpus_prompts)} held-out pydoc blocks "
                          f"({len(corpus_prompts[0])} + {len(corpus_targets[0])} tokens)",
            "cost_model": {"calibration_s": round(cost.seconds, 2),
                           "regime": {b: cost.regime(b) for b in batch_sizes}},
            "environment": environment(device), "results": results, "pareto": frontier}


def threshold_sweep(model, prompt_ids, shallow_layer, heads, max_new_tokens, thresholds, measure="margin",
                    cost=None) -> dict:
    """Speed/quality points at batch 1 for FREE and CALM over thresholds, and each method's Pareto front."""
    full = run_policy(model, prompt_ids, None, max_new_tokens, slots=1, cost=cost)
    out = {}
    for method in ("free", "calm"):
        points = []
        for tau in thresholds:
            r = run_policy(model, prompt_ids, early_exit_policy(method, shallow_layer, tau, heads, measure),
                           max_new_tokens, slots=1, cost=cost)
            point = {"threshold": tau, "speedup": round(full.seconds / r.seconds, 3),
                     "agreement": round(agreement(r.token_ids, full.token_ids), 3), "mean_layers": round(r.mean_layers, 2)}
            if cost is not None:
                point["ideal_speedup"] = round(cost.ideal(full.trace) / cost.ideal(r.trace), 3)
            points.append(point)
        front = pareto_front([(p["speedup"], p["agreement"]) for p in points])
        out[method] = {"points": points, "front": [points[i]["threshold"] for i in front]}
    best = {m: max([p["speedup"] for p in out[m]["points"] if p["agreement"] >= 0.9], default=None) for m in out}
    out["best_speedup_at_90pct_agreement"] = best
    return out

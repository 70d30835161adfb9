"""``mor-lab bench early-exit``: full, static, CALM (batch / per row), FREE (fixed / adaptive), side by side.

All methods share one trained exit after ``shallow_layer`` depth steps (adapter + meta classifier from
``early_exit.recipes``, cached) and the margin confidence, so they differ only in what they do with a
confident token: nothing (full), always exit (static), exit the batch when every row is confident
(CALM's batch semantics), exit the row with state propagation (CALM per row), or defer its deep
layers to a synchronized parallel pass (FREE). Greedy, EOS disabled, same chat prompts.
"""
from __future__ import annotations

import torch

from ..early_exit.decoding import CalmExit, StaticExit
from ..early_exit.evaluate import (agreement, flops_per_token, forced_agreement, generated_perplexity,
                                   pareto_front, run_policy, teacher_forced_perplexity)
from ..early_exit.free import FreeDecoding
from ..early_exit.recipes import pretrained_exit_heads
from ..early_exit.threshold import AdaptiveThreshold
from ..engine.generate import encode_prompts
from ..engine.policy import DepthPolicy
from ..models.hf import load_pretrained
from ..train.data import load_corpus, tokenize
from .common import environment

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


def make_policy(method: str, shallow_layer: int, threshold: float, heads, measure: str = "margin"):
    if method == "full":
        return DepthPolicy()
    if method == "static":
        return StaticExit(shallow_layer, heads)
    if method in ("calm", "calm_per_row"):
        return CalmExit(threshold, [shallow_layer], measure=measure, per_row=method == "calm_per_row",
                        heads=heads)
    if method == "free":
        return FreeDecoding(shallow_layer, threshold, heads, measure=measure)
    if method == "free_adaptive":
        return FreeDecoding(shallow_layer, AdaptiveThreshold(), heads, measure=measure)
    raise ValueError(f"unknown early-exit method {method!r}")


METHODS = ("full", "static", "calm", "calm_per_row", "free", "free_adaptive")


def corpus_blocks(tokenizer, count: int, prompt: int = 32, continuation: int = 64):
    """``count`` held-out pydoc blocks as (prompt ids, continuation ids) for teacher-forced perplexity."""
    ids = tokenize(tokenizer, load_corpus("pydoc").validation)
    size = prompt + continuation
    blocks = [ids[i * size:(i + 1) * size].tolist() for i in range(count)]
    return [b[:prompt] for b in blocks], [b[prompt:] for b in blocks]


def estimated_flops(model, method: str, mean_layers: float, shallow_layer: int, context: float,
                    measure: str = "margin") -> float:
    """GFLOPs per token: executed layers + LM-head calls (a logit-based confidence test at the exit costs
    one more head call for the tokens that continue; the meta classifier does not) + state propagation."""
    if method in ("full", "static") or measure not in ("softmax", "margin"):
        head_calls = 1.0
    else:
        exited = (model.num_steps - mean_layers) / max(1, model.num_steps - shallow_layer)
        head_calls = 2.0 - exited
    return flops_per_token(model, mean_layers, int(context), head_calls) / 1e9


def _measure(model, prompt_ids, method, shallow_layer, threshold, heads, max_new_tokens, batch_size,
             measure="margin"):
    """Run ``prompt_ids`` in batches of ``batch_size``; returns (token ids, seconds, mean layers)."""
    ids, seconds, layers = [], 0.0, []
    for i in range(0, len(prompt_ids), batch_size):
        policy = make_policy(method, shallow_layer, threshold, heads, measure)
        run = run_policy(model, prompt_ids[i:i + batch_size], policy, max_new_tokens)
        ids += run.token_ids
        seconds += run.seconds
        layers.append(run.mean_layers)
    return ids, seconds, sum(layers) / len(layers)


def run(model_name: str | None = None, quick: bool = False, batch_sizes=(1, 8), max_new_tokens: int | None = None,
        device: str | None = None, shallow_layer: int | None = None, threshold: float = 0.5,
        sweep=(0.1, 0.3, 0.5, 0.7, 0.9), measure: str = "margin") -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_new_tokens = max_new_tokens or (16 if quick else 48)
    model, tokenizer = load_pretrained(model_name, device=device)
    shallow_layer = shallow_layer or round(2 * model.num_steps / 3)
    heads = pretrained_exit_heads(model, tokenizer, [shallow_layer], progress=False,
                                  tokens=2048 if quick else None, steps=40 if quick else None)
    prompt_ids = encode_prompts(tokenizer, CHAT_PROMPTS, chat=True)
    corpus_prompts, corpus_targets = corpus_blocks(tokenizer, 2 if quick else 8, continuation=32 if quick else 64)
    run_policy(model, prompt_ids[:2], DepthPolicy(), 2)  # warm-up

    results = []
    for batch_size in batch_sizes:
        prompts = prompt_ids[:max(batch_size, 2 if quick else 4)]
        reference, full_seconds, _ = _measure(model, prompts, "full", shallow_layer, threshold, heads,
                                              max_new_tokens, batch_size)
        for method in METHODS:
            if method == "full":
                ids, seconds, layers = reference, full_seconds, float(model.num_steps)
            else:
                ids, seconds, layers = _measure(model, prompts, method, shallow_layer, threshold, heads,
                                                max_new_tokens, batch_size, measure)
            tokens = sum(map(len, ids))
            row = {"method": method, "batch_size": batch_size, "threshold": None if method in ("full", "static")
                   else ("adaptive" if method == "free_adaptive" else threshold),
                   "tokens_per_s": round(tokens / seconds, 2), "speedup": round(full_seconds / seconds, 3),
                   "mean_layers": round(layers, 2), "agreement": round(agreement(ids, reference), 3),
                   "prompts": len(prompts), "new_tokens": tokens}
            context = sum(map(len, prompts)) / len(prompts) + max_new_tokens / 2
            row["gflops_per_token"] = round(estimated_flops(model, method, layers, shallow_layer, context, measure), 4)
            if method != "full" and batch_size == batch_sizes[-1]:
                policy = make_policy(method, shallow_layer, threshold, heads, measure)
                row["forced_agreement"] = round(forced_agreement(model, prompts, reference, policy), 3)
                row["generated_ppl_under_full"] = round(generated_perplexity(model, prompts, ids), 3)
            if batch_size == batch_sizes[-1]:  # teacher-forced perplexity of the strategy on held-out text
                policy = make_policy(method, shallow_layer, threshold, heads, measure)
                row["corpus_ppl"] = round(teacher_forced_perplexity(model, corpus_prompts, corpus_targets, policy), 3)
            results.append(row)

    frontier = threshold_sweep(model, prompt_ids[:2 if quick else 4], shallow_layer, heads, max_new_tokens, sweep,
                               measure)
    return {"suite": "early-exit", "model": str(model_name or "SmolLM2-135M-Instruct (offline)"),
            "quick": quick, "shallow_layer": shallow_layer, "num_layers": model.num_steps,
            "confidence": measure, "max_new_tokens": max_new_tokens,
            "corpus_ppl": f"teacher-forced on {len(corpus_prompts)} held-out pydoc blocks "
                          f"({len(corpus_prompts[0])} + {len(corpus_targets[0])} tokens)",
            "environment": environment(device), "results": results, "pareto": frontier}


def threshold_sweep(model, prompt_ids, shallow_layer, heads, max_new_tokens, thresholds, measure="margin") -> dict:
    """Speed/quality points at batch 1 for FREE and CALM over thresholds, and each method's Pareto front."""
    reference, full_seconds, _ = _measure(model, prompt_ids, "full", shallow_layer, 0.0, heads, max_new_tokens, 1)
    out = {}
    for method in ("free", "calm"):
        points = []
        for tau in thresholds:
            ids, seconds, layers = _measure(model, prompt_ids, method, shallow_layer, tau, heads, max_new_tokens, 1,
                                            measure)
            points.append({"threshold": tau, "speedup": round(full_seconds / seconds, 3),
                           "agreement": round(agreement(ids, reference), 3), "mean_layers": round(layers, 2)})
        front = pareto_front([(p["speedup"], p["agreement"]) for p in points])
        out[method] = {"points": points, "front": [points[i]["threshold"] for i in front]}
    best = {m: max([p["speedup"] for p in out[m]["points"] if p["agreement"] >= 0.9], default=None) for m in out}
    out["best_speedup_at_90pct_agreement"] = best
    return out

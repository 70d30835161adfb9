"""Measuring depth policies side by side: speed, layers per token, and quality against the full model.

Used by ``mor-lab bench early-exit`` and the notebooks alike. Quality is measured three ways:
``agreement`` (positional token agreement of the greedy output with the full model's greedy output:
strict, one early difference shifts the rest), ``forced_agreement`` (teacher-forced on the full
model's output: does the policy predict the same next token given the same prefix?), and perplexity
(of the generated text under the full model; or teacher-forced, of each policy on a corpus).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..engine.generate import generate_ids
from ..engine.trace import Trace


@dataclass
class PolicyRun:
    method: str
    batch_size: int
    seconds: float
    new_tokens: int
    mean_layers: float  # depth steps per generated token (decode steps; the prefill token is full depth)
    token_ids: list[list[int]] = field(repr=False)
    trace: Trace = field(repr=False)
    threshold: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


def decode_layers_per_token(trace: Trace) -> float:
    """Mean depth steps of the tokens produced by decode steps (each sequence's first token comes from
    the full-depth prefill, whatever the policy)."""
    counts = [t.num_steps for seq in trace.tokens for t in seq[1:]]
    return sum(counts) / len(counts) if counts else float(trace.num_steps)


def run_policy(model, prompt_ids, policy, max_new_tokens: int, name: str | None = None,
               threshold: float | None = None, slots: int | None = None, **engine) -> PolicyRun:
    """Greedy decoding with EOS disabled (every method produces the same number of tokens), timed;
    ``slots``: static batches of this many requests (default all at once)."""
    ids, trace = generate_ids(model, prompt_ids, max_new_tokens, eos_token_ids=[], policy=policy, slots=slots,
                              **engine)
    return PolicyRun(name or getattr(policy, "name", "full"), slots or len(prompt_ids), trace.seconds,
                     sum(map(len, ids)), decode_layers_per_token(trace), ids, trace, threshold)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of positions where the tokens equal the reference's (positional, greedy outputs)."""
    same = total = 0
    for out, ref in zip(outputs, reference):
        total += len(ref)
        same += sum(a == b for a, b in zip(out, ref))
    return same / total if total else 1.0


def forced_agreement(model, prompt_ids, reference: list[list[int]], policy) -> float:
    """Teacher-forced on the reference continuation: how often the policy's top-1 equals it."""
    _, trace = generate_ids(model, prompt_ids, forced=reference, policy=policy)
    pairs = [(t.predicted, r) for seq, ref in zip(trace.tokens, reference) for t, r in zip(seq, ref)]
    return sum(p == r for p, r in pairs) / len(pairs)


def teacher_forced_perplexity(model, prompt_ids, continuations: list[list[int]], policy=None) -> float:
    """Perplexity of ``continuations`` when every token is predicted through ``policy`` (cache included)."""
    _, trace = generate_ids(model, prompt_ids, forced=continuations, policy=policy)
    logprobs = [t.logprob for seq in trace.tokens for t in seq]
    return math.exp(-sum(logprobs) / len(logprobs))


@torch.inference_mode()
def generated_perplexity(model, prompt_ids, outputs: list[list[int]]) -> float:
    """Perplexity of the generated tokens under the full model (how plausible the output is)."""
    nll, count = 0.0, 0
    for prompt, out in zip(prompt_ids, outputs):
        ids = torch.tensor([prompt + out], device=model.device)
        logp = model(ids)[0, len(prompt) - 1:-1].float().log_softmax(-1)
        nll -= logp[torch.arange(len(out)), torch.tensor(out, device=model.device)].sum().item()
        count += len(out)
    return math.exp(nll / count)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (speedup, quality), both to maximise; sorted by speedup."""
    front = []
    for i, (s, q) in enumerate(points):
        if not any((s2 >= s and q2 >= q) and (s2 > s or q2 > q) for s2, q2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])

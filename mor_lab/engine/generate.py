"""Batched generation: prompts of different lengths, one preallocated KV cache, a trace of the work.

The engine prefills all prompts in one packed pass (projections and MLPs see only real tokens; each
row attends only to its own), then decodes one token per live row per engine step. Rows stop on EOS or ``max_new_tokens``; a
finished row leaves the batch (its slot is recorded as idle in the trace: static batching does not
refill slots; the continuous depth-wise batching engine does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.cache import Chunk, KVCache
from .policy import Decision, DepthPolicy, logit_lens, run_steps  # noqa: F401 (logit_lens re-exported)
from .sampling import Sampler
from .trace import IDLE, EngineStep, TokenTrace, Trace


@dataclass
class GenerationOutput:
    texts: list[str]  # generated text per prompt (prompt excluded)
    token_ids: list[list[int]]  # generated ids per prompt (prompt excluded)
    trace: Trace
    prompt_ids: list[list[int]]


def chat_prompt(tokenizer, prompt, system: str | None = None) -> str:
    """Wrap a user message (or a list of chat messages) in the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; pass chat=False and plain prompts")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and isinstance(prompt, str):
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts, chat: bool = False) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if not prompts:
        raise ValueError("the prompt list is empty; pass at least one prompt")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat:
            ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        elif isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens); give every prompt some text")
        encoded.append(ids)
    return encoded


def check_prompts(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt list is empty; pass at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = model.config.max_position_embeddings
    vocab = model.config.vocab_size
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens); give every prompt some text")
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context of {limit} tokens. Shorten the prompt or lower max_new_tokens")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], max_new_tokens: int = 64, sampler: Sampler | None = None,
                 eos_token_ids: list[int] | None = None, record_predictions: bool = False,
                 policy: DepthPolicy | None = None, forced: list[list[int]] | None = None):
    """The engine core: token ids in, (generated ids per prompt, Trace) out.

    ``policy`` decides the depth of every decode step (default: the full model). Prompts are always
    prefilled at full depth, so every layer's KV exists for every prompt token.
    ``forced`` (teacher forcing): feed these continuations instead of sampling; each TokenTrace then
    records the policy's own ``predicted`` token and the ``logprob`` of the forced one (for
    teacher-forced agreement and perplexity of any depth policy).
    """
    if forced is not None:
        if len(forced) != len(prompt_ids) or not all(forced):
            raise ValueError("forced needs one non-empty continuation per prompt")
        max_new_tokens = max(map(len, forced))
    check_prompts(model, prompt_ids, max_new_tokens)
    sampler = sampler or Sampler()
    policy = policy or DepthPolicy()
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    device, all_steps = model.device, list(range(model.num_steps))
    batch = len(prompt_ids)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    cache = KVCache.for_model(model, batch, int(lengths.max()) + max_new_tokens)
    trace = Trace(num_steps=model.num_steps, tokens=[[] for _ in range(batch)])
    outputs: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))  # sequence served by each row of the (compacted) batch

    # Prefill: all prompts in one packed pass (no work on padding); keep each row's last token.
    chunk = Chunk.prefill(lengths)
    ids = torch.tensor([t for p in prompt_ids for t in p], device=device)
    last = lengths.cumsum(0) - 1
    h, lens = run_steps(model, model.embed(ids), all_steps, cache, chunk, record=record_predictions,
                        pick=lambda x: x[last])
    decision = Decision(model.head(h[last]), [all_steps] * batch, None, [], lens)
    trace.engine_steps.append(EngineStep("prefill", list(range(batch)), ["prefill"] * batch, int(lengths.sum())))
    policy.begin(model, batch)

    for t in range(max_new_tokens):
        next_tokens = sampler(decision.logits).tolist()
        if forced is not None:
            predicted = next_tokens
            next_tokens = [forced[seq][t] for seq in live]
            rows = torch.arange(len(live), device=device)
            logprobs = decision.logits.float().log_softmax(-1)[rows, torch.tensor(next_tokens, device=device)]
        keep = []
        for row, seq in enumerate(live):
            token = next_tokens[row]
            outputs[seq].append(token)
            top1, conf = _lens_row(decision.lens, row)
            deferred = bool(decision.deferred[row]) if decision.deferred else False
            record = TokenTrace(token, decision.steps[row], top1, conf, deferred)
            if forced is not None:
                record.predicted, record.logprob = predicted[row], float(logprobs[row])
            trace.tokens[seq].append(record)
            limit = len(forced[seq]) if forced is not None else max_new_tokens
            if (forced is not None or token not in eos) and len(outputs[seq]) < limit:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            rows = torch.tensor(keep, device=device)
            cache.keep_rows(rows)
            policy.keep_rows(keep)
            lengths = lengths[rows]
            live = [live[r] for r in keep]
            next_tokens = [next_tokens[r] for r in keep]
        x = model.embed(torch.tensor(next_tokens, device=device))
        decision = policy.decode(x, lengths, cache, t, record=record_predictions)
        lengths = lengths + 1
        for sub in decision.substeps:
            activity, sequences = [IDLE] * batch, [None] * batch
            for row, seq in enumerate(live):
                activity[seq], sequences[seq] = sub.activity[row], (seq if sub.activity[row] != IDLE else None)
            trace.engine_steps.append(EngineStep(sub.kind, sequences, activity, sub.tokens))
    return outputs, trace


def _lens_row(lens, row: int):
    if lens is None:
        return None, None
    top1, conf = lens
    return top1[:, row].tolist(), conf[:, row].tolist()


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, chat: bool = False, eos_token_id: int | list[int] | None = None,
             record_predictions: bool = False, policy: DepthPolicy | None = None) -> GenerationOutput:
    """Generate for a batch of prompts (strings, chat messages with ``chat=True``, or token-id lists).

    Mirrors ``transformers``' ``generate`` arguments. ``record_predictions`` adds the per-step
    logit-lens top-1 token and confidence of every generated token to the trace. ``policy`` picks the
    depth of each decode step (default: full depth; see ``mor_lab.early_exit`` for the others).
    """
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    eos = sorted({e for e in eos + model.config.eos_token_ids if e is not None})
    token_ids, trace = generate_ids(model, prompt_ids, max_new_tokens, sampler, eos, record_predictions, policy)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return GenerationOutput(texts, token_ids, trace, prompt_ids)

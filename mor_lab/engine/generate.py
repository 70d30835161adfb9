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


def logit_lens(model, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token and its probability if the model stopped here (final norm + LM head)."""
    probs = model.head(h).float().softmax(-1)
    conf, top1 = probs.max(-1)
    return top1, conf


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], max_new_tokens: int = 64, sampler: Sampler | None = None,
                 eos_token_ids: list[int] | None = None, record_predictions: bool = False):
    """The engine core: token ids in, (generated ids per prompt, Trace) out."""
    check_prompts(model, prompt_ids, max_new_tokens)
    sampler = sampler or Sampler()
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    device, steps = model.device, range(model.num_steps)
    batch = len(prompt_ids)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    cache = KVCache.for_model(model, batch, int(lengths.max()) + max_new_tokens)
    trace = Trace(num_steps=model.num_steps, tokens=[[] for _ in range(batch)])
    outputs: list[list[int]] = [[] for _ in range(batch)]
    live = list(range(batch))  # sequence served by each row of the (compacted) batch

    # Prefill: all prompts in one packed pass (no work on padding); keep each row's last token.
    chunk = Chunk.prefill(lengths)
    ids = torch.tensor([t for p in prompt_ids for t in p], device=device)
    h, lens = _run_all_steps(model, model.embed(ids), chunk, cache, record_predictions, lengths.cumsum(0) - 1)
    trace.engine_steps.append(EngineStep("prefill", list(range(batch)), ["prefill"] * batch, int(lengths.sum())))

    for t in range(max_new_tokens):
        next_tokens = sampler(model.head(h)).tolist()
        keep = []
        for row, seq in enumerate(live):
            token = next_tokens[row]
            outputs[seq].append(token)
            trace.tokens[seq].append(TokenTrace(token, list(steps), *(_lens_row(lens, row))))
            if token not in eos and len(outputs[seq]) < max_new_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            rows = torch.tensor(keep, device=device)
            cache.keep_rows(rows)
            lengths = lengths[rows]
            live = [live[r] for r in keep]
            next_tokens = [next_tokens[r] for r in keep]
        chunk = Chunk.decode(lengths)
        x = model.embed(torch.tensor(next_tokens, device=device))
        h, lens = _run_all_steps(model, x, chunk, cache, record_predictions)
        lengths = lengths + 1
        serving = set(live)
        trace.engine_steps.append(EngineStep(
            "decode", [s if s in serving else None for s in range(batch)],
            ["decode" if s in serving else IDLE for s in range(batch)], len(live)))
    return outputs, trace


def _run_all_steps(model, h, chunk, cache, record: bool, last: torch.Tensor | None = None):
    """Every depth step on the packed tokens ``h`` ``[N, d]``; returns the rows' last hidden states ``[B, d]``.

    ``last`` indexes each row's last token in the packed layout (decode chunks: one token per row).
    With ``record``, also the logit lens after each step: (top1, confidence), each ``[steps, B]``.
    """
    rope = model.rope(chunk.positions)
    lens = [] if record else None
    pick = (lambda x: x) if last is None else (lambda x: x[last])
    for step in range(model.num_steps):
        h = model.run_step(step, h, rope, cache, chunk)
        if record:
            lens.append(logit_lens(model, pick(h)))
    if record:
        lens = (torch.stack([a for a, _ in lens]), torch.stack([b for _, b in lens]))
    return pick(h), lens


def _lens_row(lens, row: int):
    if lens is None:
        return None, None
    top1, conf = lens
    return top1[:, row].tolist(), conf[:, row].tolist()


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, chat: bool = False, eos_token_id: int | list[int] | None = None,
             record_predictions: bool = False) -> GenerationOutput:
    """Generate for a batch of prompts (strings, chat messages with ``chat=True``, or token-id lists).

    Mirrors ``transformers``' ``generate`` arguments. ``record_predictions`` adds the per-step
    logit-lens top-1 token and confidence of every generated token to the trace.
    """
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    eos = sorted({e for e in eos + model.config.eos_token_ids if e is not None})
    token_ids, trace = generate_ids(model, prompt_ids, max_new_tokens, sampler, eos, record_predictions)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return GenerationOutput(texts, token_ids, trace, prompt_ids)

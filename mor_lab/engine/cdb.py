"""Continuous depth-wise batching (CDB): a scheduler with B slots over a recursive model.

Every engine step runs the shared block once on every occupied slot, whatever loop each slot's
token is in: the weights are the same for every loop, and each slot reads and writes the KV cache of
its own loop's depth steps (``Decoder.run_shared_layer``). A token that exits (exit rule) or reaches
N_r goes through state propagation, the coda and the head; its slot immediately takes the same
sequence's next token at loop 0, or, when that sequence is finished, the next request from the queue
(prefilled at full depth). So the batch stays full instead of idling until its slowest token exits.

Exactness: for the same exit decisions, outputs equal running each sequence alone (tested).
"""
from __future__ import annotations

from collections import deque

import torch

from ..models.cache import Chunk, KVCache
from .generate import check_prompts
from .loops import LoopStructure, finish_tokens
from .policy import run_steps, subset_chunk
from .sampling import Sampler
from .trace import IDLE, EngineStep, TokenTrace, Trace

PRELUDE = -1  # slot state: the input token still needs the prelude steps


@torch.inference_mode()
def cdb_generate(model, structure: LoopStructure, prompt_ids: list[list[int]], max_new_tokens: int, slots: int,
                 rule, eos_token_ids=(), sampler: Sampler | None = None, request_ids: list[int] | None = None):
    """Serve all prompts through ``slots`` batch slots; returns (generated ids per prompt, Trace)."""
    structure.check(model)
    check_prompts(model, prompt_ids, max_new_tokens)
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    sampler, eos = sampler or Sampler(), set(eos_token_ids)
    ids_of = request_ids or list(range(len(prompt_ids)))
    device, d = model.device, model.config.hidden_size
    cache = KVCache.for_model(model, slots, max(map(len, prompt_ids)) + max_new_tokens)
    lengths = torch.zeros(slots, dtype=torch.long, device=device)
    hidden = torch.zeros(slots, d, device=device, dtype=model.dtype)
    seq_of: list[int | None] = [None] * slots
    loop_of = [0] * slots
    inputs = [0] * slots  # the token each slot is processing
    queue = deque(range(len(prompt_ids)))
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    trace = Trace(num_steps=model.num_steps, tokens=[[] for _ in prompt_ids])

    def emit(slot: int, token: int, steps: list[int]) -> None:
        seq = seq_of[slot]
        outputs[seq].append(token)
        trace.tokens[seq].append(TokenTrace(token, steps))
        if token in eos or len(outputs[seq]) >= max_new_tokens:
            seq_of[slot] = None
        else:
            inputs[slot], loop_of[slot] = token, PRELUDE

    while queue or any(s is not None for s in seq_of):
        admitted = []
        while queue and None in seq_of:
            slot = seq_of.index(None)
            seq_of[slot] = queue.popleft()
            admitted.append(slot)
        if admitted:
            _prefill(model, admitted, [prompt_ids[seq_of[s]] for s in admitted], cache, lengths, sampler, emit)
            trace.engine_steps.append(EngineStep("prefill", [seq_of[s] if s in admitted else None for s in range(slots)],
                                                 ["prefill" if s in admitted else IDLE for s in range(slots)],
                                                 sum(len(prompt_ids[seq_of[s]]) for s in admitted if seq_of[s] is not None)))
            if None in seq_of and queue:
                continue  # requests that finished at prefill free their slot at once
        starting = [s for s in range(slots) if seq_of[s] is not None and loop_of[s] == PRELUDE]
        if starting:
            mask = _mask(starting, slots, device)
            x = model.embed(torch.tensor([inputs[s] for s in starting], device=device))
            hidden[starting], _ = run_steps(model, x, range(structure.prelude), cache, subset_chunk(lengths, mask))
            for s in starting:
                loop_of[s] = 0
        busy = [s for s in range(slots) if seq_of[s] is not None]
        if not busy:
            continue
        _run_block(model, structure, busy, hidden, loop_of, lengths, cache)
        trace.engine_steps.append(EngineStep("loop", [seq_of[s] for s in range(slots)],
                                             [f"loop {loop_of[s] - 1}" if s in busy else IDLE for s in range(slots)],
                                             len(busy)))
        done = [loop_of[s] for s in busy]
        leave = rule(model, hidden[busy], [ids_of[seq_of[s]] for s in busy], [len(outputs[seq_of[s]]) for s in busy],
                     done)
        exiting = [s for s, go, k in zip(busy, leave, done) if go or k >= structure.loops]
        if exiting:
            rows = torch.tensor(exiting, device=device)
            loops_done = [loop_of[s] for s in exiting]
            logits = finish_tokens(model, structure, hidden[exiting], rows, loops_done, lengths, cache)
            lengths[rows] += 1
            for s, token, k in zip(exiting, sampler(logits).tolist(), loops_done):
                emit(s, token, structure.steps_for(k))
    return outputs, trace


def _mask(slots_on: list[int], slots: int, device) -> torch.Tensor:
    mask = torch.zeros(slots, dtype=torch.bool, device=device)
    mask[slots_on] = True
    return mask


def _prefill(model, admitted, prompts, cache, lengths, sampler, emit) -> None:
    """New requests in free slots: full-depth prefill of their prompts (one packed pass), first token."""
    cache.reset_rows(admitted)
    counts = torch.zeros_like(lengths)
    counts[admitted] = torch.tensor([len(p) for p in prompts], device=lengths.device)
    lengths[admitted] = 0
    order = sorted(range(len(admitted)), key=lambda i: admitted[i])  # packed order is ascending slot
    flat = torch.tensor([t for i in order for t in prompts[i]], device=lengths.device)
    chunk = Chunk.build(lengths, counts)
    h, _ = run_steps(model, model.embed(flat), range(model.num_steps), cache, chunk)
    last = counts[sorted(admitted)].cumsum(0) - 1
    lengths[admitted] = counts[admitted]
    tokens = sampler(model.head(h[last])).tolist()
    for slot, token in zip(sorted(admitted), tokens):
        emit(slot, token, list(range(model.num_steps)))


def _run_block(model, structure: LoopStructure, busy, hidden, loop_of, lengths, cache) -> None:
    """One pass of the shared block over every busy slot, each at its own loop."""
    slots = len(lengths)
    chunk = subset_chunk(lengths, _mask(busy, slots, lengths.device))
    rope = model.rope(chunk.positions)
    loops = torch.tensor([min(loop_of[s], structure.loops - 1) for s in range(slots)], device=lengths.device)
    h = hidden[busy]
    for j in range(structure.block):
        steps = structure.prelude + loops * structure.block + j
        h = model.run_shared_layer(structure.shared_layer(model, j), h, rope, cache, chunk, steps)
    hidden[busy] = h
    for s in busy:
        loop_of[s] += 1

"""The one engine: B slots, a request queue, and one step loop for every depth policy.

Every generation in mor_lab — full depth, early exit, FREE, a recursive model with exits, MoR routing —
runs through :class:`Scheduler`. A policy (``engine/policies``) splits the model's depth steps into
segments with a decision after each; the scheduler moves packed tokens (``Tokens``) through them:

1. **admit** requests into free cache rows: their prompt tokens join the running tokens (``prefill``);
2. **one engine step**: for each group of segments that share physical layers (a recursive model's
   loops are one group), in plan order, run every running token at those segments as *one ragged
   pass per layer*, each token at its own depth step and KV page; then ask the policy who leaves;
   leaving tokens get their skipped steps' KV by state propagation (batched per layer) and wait;
3. **head call**, when the head rule says so: the waiting tokens run the ``finish`` steps (a coda) and
   the final norm + LM head once, the emitting ones are sampled, and a row whose sequence goes on
   gets its next token at segment 0; a finished row takes the next request.

Two modes. ``static``: requests in groups of B; a group's tokens move in lockstep, and the head call
waits until every token of the step has left (a finished row's slot idles: today's batching).
``continuous``: a freed slot takes the next token or request at once; with a recursive model this
is continuous depth-wise batching (tokens of different loops share the shared block's passes). Head
rules (continuous): ``every-step`` calls the head whenever a token waits; ``cost`` lets more sequences
be in flight than block slots (``in_flight``), so a token that left the loops waits for a fuller head
call while its slot serves another sequence — the cost model (``engine/cost.py``) picks how many.

Exactness: for the same exit or routing decisions, every mode and every B gives the same tokens as
each sequence run alone (tested). Host synchronisation: the sampled tokens are read once per head
call; policy decisions are tensors (group sizes are read where a pass must know them).
"""
from __future__ import annotations

import time
from collections import deque
from functools import partial

import torch

from .. import kernels
from ..models.cache import Chunk, KVCache
from ..models.fast_paths import fast_paths
from .policies.base import Context, DepthPolicy
from .sampling import Sampler
from .tokens import Tokens
from .trace import IDLE, WAIT, EngineStep, Pass, TokenTrace, Trace

MODES = ("static", "continuous")
HEAD_RULES = ("every-step", "cost")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_prompts(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt list is empty; pass at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
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


def _row_cols(rows: torch.Tensor) -> torch.Tensor:
    """Index of each token within its row (rows sorted ascending)."""
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return torch.arange(len(rows), device=rows.device) - first


class Scheduler:
    """One engine run's configuration; :meth:`run` serves a list of prompts and returns (ids, Trace).

    ``slots``: B, the most rows one pass runs (default: every prompt at once in static mode, 8 in
    continuous mode). ``in_flight``: cache rows, i.e. sequences in flight (default B, or 2B with the
    ``cost`` head rule). ``exact``: keep HF's summation order (no fused projections, no transposed
    matmul layout): the HF parity tests use it. ``cost``: a calibrated ``CostModel`` (the ``cost`` head
    rule calibrates one when not given).
    """

    def __init__(self, model, policy: DepthPolicy | None = None, slots: int | None = None, mode: str = "static",
                 head_rule: str = "every-step", in_flight: int | None = None, sampler: Sampler | None = None,
                 eos_token_ids=None, record_predictions: bool = False, exact: bool = False, cost=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if head_rule not in HEAD_RULES:
            raise ValueError(f"head_rule must be one of {HEAD_RULES} (every-step: a head call whenever a token "
                             f"waits; cost: wait for a fuller head call when the cost model says so), got {head_rule!r}")
        if mode == "static" and head_rule != "every-step":
            raise ValueError("the cost head rule needs mode='continuous' (static batching has one head call per "
                             "decode step already)")
        for name, value in (("slots", slots), ("in_flight", in_flight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (batch slots), got {value!r}")
        if in_flight is not None and slots is not None and in_flight < slots:
            raise ValueError(f"in_flight ({in_flight}) must be >= slots ({slots}): every slot needs a sequence")
        if policy is not None and not isinstance(policy, DepthPolicy):
            hint = (f"wrap it: policy=LoopExit({type(policy).__name__}(...)) (mor_lab.engine.policies)"
                    if callable(policy) else "see mor_lab.engine.policies")
            raise TypeError(f"policy must be a DepthPolicy, got {type(policy).__name__}: an exit rule is not a "
                            f"policy; {hint}")
        self.model, self.policy = model, policy or DepthPolicy()
        self.slots, self.mode, self.head_rule, self.in_flight = slots, mode, head_rule, in_flight
        self.sampler = sampler or Sampler()
        self.eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.record, self.exact, self.cost = record_predictions, exact, cost

    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompt_ids: list[list[int]], max_new_tokens: int = 64, forced: list[list[int]] | None = None,
            request_ids: list[int] | None = None) -> tuple[list[list[int]], Trace]:
        """Serve every prompt; returns (generated ids per prompt, Trace). ``forced``: teacher forcing, one
        continuation per prompt (the policy's own top choice and the forced token's logprob are traced).
        ``request_ids``: the ids exit rules see (default 0..n-1), to reproduce a batched run's decisions."""
        if forced is not None:
            if len(forced) != len(prompt_ids) or not all(forced):
                raise ValueError("forced needs one non-empty continuation per prompt")
            max_new_tokens = max(map(len, forced))
        check_prompts(self.model, prompt_ids, max_new_tokens)
        if request_ids is not None and len(request_ids) != len(prompt_ids):
            raise ValueError(f"request_ids needs one id per prompt ({len(prompt_ids)}), got {len(request_ids)}")
        model = self.model
        n = len(prompt_ids)
        B = self.slots or (n if self.mode == "static" else min(n, 8))
        R = self.in_flight or (2 * B if self.head_rule == "cost" else B)
        self.B, self.R = B, R
        self.prompts, self.forced, self.max_new_tokens = prompt_ids, forced, max_new_tokens
        self.request_ids = torch.tensor(request_ids if request_ids is not None else range(n), device=model.device)
        capacity = max(map(len, prompt_ids)) + max_new_tokens
        self.policy.bind(model, R, capacity)
        self._groups()
        self.cache = KVCache.for_model(model, R, capacity, storage=self.policy.cache_storage(),
                                       extra_steps=self.policy.extra_pages())
        device = model.device
        self.row_seq = [-1] * R  # host: which prompt each row serves (admission bookkeeping, per request)
        self.row_seq_t = torch.full((R,), -1, dtype=torch.long, device=device)
        self.row_generated = torch.zeros(R, dtype=torch.long, device=device)
        self.row_since = torch.zeros(R, dtype=torch.long, device=device)
        self.row_logits = None  # [R, vocab] exit-test logits of the rows' current tokens, when a test made them
        self.row_has_logits = torch.zeros(R, dtype=torch.bool, device=device)
        d = model.config.hidden_size
        self.running = Tokens.empty(d, device, model.dtype)
        self.waiting = Tokens.empty(d, device, model.dtype)
        self.queue = deque(range(n))
        self.outputs: list[list[int]] = [[] for _ in range(n)]
        labels = [self.policy.label(i) for i in range(len(self.policy.segments))]
        self.trace = Trace(num_steps=model.num_steps, tokens=[[] for _ in range(n)], slots=B,
                           labeler=partial(_label, R, labels, self.group_kind))
        self.lens: dict[int, list] = {}
        self.tick = 0
        self.head_batch = self._head_batch() if self.head_rule == "cost" else None
        start = time.perf_counter()
        context = fast_paths(**self._fast_settings()) if not self.exact else _null()
        with context:
            while self.queue or any(s >= 0 for s in self.row_seq):
                self._admit()
                self._step()
                if self._head_due():
                    self._head_call()
                self.tick += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.trace.seconds = time.perf_counter() - start
        return self.outputs, self.trace

    def _fast_settings(self) -> dict:
        from .cost import fast_settings
        return fast_settings(self.model, self.cost)

    def _head_batch(self) -> int:
        from .cost import CostModel
        if self.cost is None:
            self.cost = CostModel.calibrate(self.model, max_rows=self.R)
        return self.cost.head_batch(self.R - self.B, self.policy)

    # ---------------------------------------------------------------------------------------------
    def _groups(self) -> None:
        """Segments that run the same physical layers form one group: one pass per layer for all of them."""
        plan, p = self.model.plan, self.policy
        keys, self.group_of = [], []
        for seg in p.segments:
            key = tuple(plan[s] for s in seg)
            if key not in keys:
                keys.append(key)
            self.group_of.append(keys.index(key))
        self.group_layers = [list(k) for k in keys]
        device = self.model.device
        self.group_of_t = torch.tensor(self.group_of, device=device)
        self.seg_start = torch.tensor([seg.start for seg in p.segments], device=device)
        self.seg_stop = torch.tensor([seg.stop for seg in p.segments], device=device)
        self.last_seg = len(p.segments) - 1
        self.finish_start = p.finish.start if len(p.finish) else self.model.num_steps
        segs = [[i for i, g in enumerate(self.group_of) if g == k] for k in range(len(keys))]
        self.group_kind = ["loop" if len(s) > 1 else p.label(s[0]) for s in segs]
        self.steps_for = [p.steps_for(i) for i in range(len(p.segments))]

    def _admit(self) -> None:
        free = [r for r, s in enumerate(self.row_seq) if s < 0]
        if not free or not self.queue:
            return
        if self.mode == "static" and len(free) < self.R:
            return  # static batching: the next group starts when this one has finished
        take = min(len(free), len(self.queue), self.B if self.mode == "static" else len(free))
        rows, seqs = free[:take], [self.queue.popleft() for _ in range(take)]
        model, device = self.model, self.model.device
        rows_t = torch.tensor(rows, device=device)
        self.cache.reset_rows(rows_t)
        self.policy.admit(rows_t)
        lengths = torch.tensor([len(self.prompts[s]) for s in seqs], device=device)
        flat = torch.tensor([t for s in seqs for t in self.prompts[s]], device=device)
        row = torch.repeat_interleave(rows_t, lengths)
        pos = _row_cols(row)
        emit = pos == torch.repeat_interleave(lengths - 1, lengths)
        self.running = Tokens.cat([self.running, Tokens.new(row, pos, model.embed(flat), emit, prefill=True)])
        for r, s in zip(rows, seqs):
            self.row_seq[r] = s
        self.row_seq_t[rows_t] = torch.tensor(seqs, device=device)
        self.row_generated[rows_t] = 0
        self.row_has_logits[rows_t] = False
        self.row_since[rows_t] = self.tick

    def _context(self, tokens: Tokens, final: torch.Tensor | None = None) -> Context:
        ctx = Context(self.request_ids[self.row_seq_t[tokens.row]], self.row_generated[tokens.row], self.trace,
                      side=self._side_layer)
        ctx.final = final if final is not None else torch.zeros(len(tokens), dtype=torch.bool, device=tokens.row.device)
        return ctx

    # ---------------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One engine step: every group of segments once, in plan order."""
        for g in range(len(self.group_layers)):
            if not len(self.running):
                return
            here = self.group_of_t[self.running.seg] == g
            if not bool(here.any()):
                continue
            here = self._cap(here)
            sub, rest = self.running.select(here).ordered(), self.running.select(~here)
            h_out = self._layers(g, sub)
            final = sub.seg == self.last_seg
            ctx = self._context(sub, final)
            sub.h = self.policy.combine(sub, sub.h, h_out, ctx)
            decision = self.policy.decide(sub, sub.h, ctx) if not bool(final.all()) else None
            leave = final if decision is None else final | decision.leave
            go = sub.select(~leave)
            go.seg = go.seg + 1
            parts = [rest, go] + ([decision.extra] if decision is not None and decision.extra is not None else [])
            self.running = Tokens.cat(parts)
            if bool(leave.any()):
                self._leave(sub, leave, decision, ctx)

    def _cap(self, here: torch.Tensor) -> torch.Tensor:
        """At most B rows per pass (more sequences than slots are in flight under the cost head rule):
        the rows whose token has waited longest go first."""
        if self.R <= self.B:
            return here
        rows = torch.unique(self.running.row[here])
        if len(rows) <= self.B:
            return here
        order = torch.argsort(self.row_since[rows] * self.R + rows)
        allowed = torch.zeros(self.R, dtype=torch.bool, device=rows.device)
        allowed[rows[order[:self.B]]] = True
        return here & allowed[self.running.row]

    def _layers(self, g: int, sub: Tokens) -> torch.Tensor:
        """One ragged pass per physical layer of group ``g`` over ``sub``, each token at its own step."""
        model, cache = self.model, self.cache
        segs = torch.unique(sub.seg)
        step0 = int(self.seg_start[segs[0]]) if len(segs) == 1 else self.seg_start[sub.seg]
        cols = _row_cols(sub.row)
        slots = cache.slots(step0, sub.row, cols, sub.pos)
        chunk = Chunk.from_tokens(sub.row, slots, sub.pos, self.R, cols)
        chunk.track_lengths = False  # one length update for the whole pass, below
        rope = model.rope(sub.pos)
        rows, tokens, keys = chunk.batch_size, len(sub), _attended(chunk, slots, sub.h)
        prompt = int(sub.prefill.sum())
        kind = "prefill" if prompt == tokens else "layer"
        gathered = _gathered(chunk, step0, sub.h)
        h = sub.h
        layers = self.group_layers[g]
        for j, layer in enumerate(layers):
            steps = step0 + j
            h = model.run_layer(layer, h, rope, cache, chunk, steps)
            self.trace.passes.append(Pass(kind, rows, tokens, keys, prompt, gathered))
            if self.record:
                self._lens_store(sub, h, steps)
        cache.advance(step0, len(layers), chunk)
        self._record_step(g, sub)
        return h

    def _side_layer(self, layer, step: int, tokens: Tokens, h: torch.Tensor) -> torch.Tensor:
        """A layer outside the plan (a policy's exit block) over ``tokens`` (row-major), with its own page."""
        cols = _row_cols(tokens.row)
        slots = self.cache.slots(step, tokens.row, cols, tokens.pos)
        chunk = Chunk.from_tokens(tokens.row, slots, tokens.pos, self.R, cols)
        out = layer(h, self.model.rope(tokens.pos), self.cache, step, chunk, None)
        self.trace.passes.append(Pass("layer", chunk.batch_size, len(tokens), _attended(chunk, slots, h), 0,
                                      _gathered(chunk, step, h)))
        return out

    def _record_step(self, g: int, sub: Tokens) -> None:
        """Keep this pass's rows as tensors; ``Trace.engine_steps`` labels them when read (``_label``)."""
        self.trace.pending.append((g, sub.row, sub.seg, sub.prefill, self.waiting.row, tuple(self.row_seq), len(sub)))

    def _leave(self, sub: Tokens, leave: torch.Tensor, decision, ctx: Context) -> None:
        out = sub.select(leave)
        propagate = torch.full((len(sub),), self.policy.propagate, dtype=torch.bool, device=leave.device)
        if decision is not None and decision.propagate is not None:
            propagate = decision.propagate
        propagate = propagate[leave]
        if decision is not None and decision.deferred is not None:
            out.deferred = decision.deferred[leave]
        if decision is not None and decision.logits is not None:  # the exit test's logits are the output
            has = leave & sub.emit & ~ctx.final
            if bool(has.any()):
                if self.row_logits is None:
                    self.row_logits = decision.logits.new_zeros(self.R, decision.logits.shape[-1])
                self.row_logits[sub.row[has]] = decision.logits[has].to(self.row_logits.dtype)
                self.row_has_logits[sub.row[has]] = True
        if bool(propagate.any()):
            p = out.select(propagate)
            stop = self.seg_stop[p.seg]
            steps = torch.arange(self.model.num_steps, device=stop.device)
            skipped = (steps[None, :] >= stop[:, None]) & (steps[None, :] < self.finish_start)
            some = skipped.any(1)
            if bool(some.any()):
                p, skipped = p.select(some), skipped[some]
                layers = self.model.propagate(p.h, p.row, p.pos, skipped, self.cache)
                self.trace.passes.append(Pass("propagate", len(p), len(p), layers))  # keys: the layers projected
        self.policy.left(out, self._context(out))
        self.waiting = Tokens.cat([self.waiting, out])

    # ---------------------------------------------------------------------------------------------
    def _ready(self) -> torch.Tensor:
        """Waiting tokens whose row has nothing left running: a row's tokens (a prompt, FREE's catch-up
        batch) finish in one head call, so its coda page is written in position order and its next token
        sees every earlier one at every step."""
        if not len(self.running):
            return torch.ones(len(self.waiting), dtype=torch.bool, device=self.waiting.row.device)
        return ~torch.isin(self.waiting.row, self.running.row)

    def _head_due(self) -> bool:
        if not len(self.waiting) or not bool(self._ready().any()):
            return False
        if self.mode == "static":
            return not len(self.running)
        if self.head_rule == "every-step":
            return True
        running_rows = len(torch.unique(self.running.row)) if len(self.running) else 0
        if running_rows < self.B and (self.queue or running_rows < len(set(self.row_seq) - {-1})):
            return True  # the block would run under-full: bring the waiting sequences back
        waiting_rows = int((self.waiting.emit & self._ready()).sum())
        return waiting_rows >= self.head_batch or running_rows == 0

    def _head_call(self) -> None:
        """The waiting tokens' finish steps and one head call; sample, stop or go on, free rows."""
        model, policy = self.model, self.policy
        ready = self._ready()
        fin, self.waiting = self.waiting.select(ready).ordered(), self.waiting.select(~ready)
        h = fin.h
        if len(policy.finish):
            cols = _row_cols(fin.row)
            step0 = policy.finish.start
            slots = self.cache.slots(step0, fin.row, cols, fin.pos)
            chunk = Chunk.from_tokens(fin.row, slots, fin.pos, self.R, cols)
            chunk.track_lengths = False
            rope = model.rope(fin.pos)
            prompt = int(fin.prefill.sum())
            kind = "prefill" if prompt == len(fin) else "layer"
            keys = _attended(chunk, slots, h)
            gathered = _gathered(chunk, step0, h)
            for s in policy.finish:
                h = model.run_layer(model.plan[s], h, rope, self.cache, chunk, s)
                self.trace.passes.append(Pass(kind, chunk.batch_size, len(fin), keys, prompt, gathered))
                if self.record:
                    self._lens_store(fin, h, s)
            self.cache.advance(step0, len(policy.finish), chunk)
        carried = fin.emit & self.row_has_logits[fin.row]
        need = fin.head & ~carried
        logits = None
        if bool(need.any()):
            sel = need.nonzero().squeeze(1)
            part = fin.select(sel)
            logits = model.head(policy.head_input(part, h[sel]))
            self.trace.passes.append(Pass("head", len(sel), len(sel)))
            policy.observe(part, logits, self._context(part))
        emit = fin.emit.nonzero().squeeze(1)
        if not len(emit):
            return
        rows = fin.row[emit]
        out = torch.empty(len(emit), model.config.vocab_size, device=model.device,
                          dtype=logits.dtype if logits is not None else self.row_logits.dtype)
        from_test = carried[emit]
        if bool(from_test.any()):
            out[from_test] = self.row_logits[rows[from_test]].to(out.dtype)
        if logits is not None:
            index = torch.full((len(fin),), -1, dtype=torch.long, device=model.device)
            index[sel] = torch.arange(len(sel), device=model.device)
            fresh = ~from_test
            if bool(fresh.any()):
                out[fresh] = logits[index[emit[fresh]]]
        self.row_has_logits[rows] = False
        self._emit(fin.select(emit), out)

    def _emit(self, tok: Tokens, logits: torch.Tensor) -> None:
        model = self.model
        sampled = self.sampler(logits)
        rows = tok.row.tolist()
        seqs = [self.row_seq[r] for r in rows]
        index = self.row_generated[tok.row].tolist()
        if self.forced is not None:
            predicted = sampled.tolist()
            tokens = [self.forced[s][i] for s, i in zip(seqs, index)]
            chosen = torch.tensor(tokens, device=model.device)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logprobs = wide.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1).tolist()
        else:
            tokens = sampled.tolist()
            chosen = sampled
        segs, deferred = tok.seg.tolist(), tok.deferred.tolist()
        lens = self._lens_take(rows) if self.record else None
        done, going = [], []
        for k, (r, s, t) in enumerate(zip(rows, seqs, tokens)):
            self.outputs[s].append(t)
            record = TokenTrace(t, self.steps_for[segs[k]], *(lens[k] if lens else (None, None)), deferred[k])
            if self.forced is not None:
                record.predicted, record.logprob = predicted[k], logprobs[k]
            self.trace.tokens[s].append(record)
            limit = len(self.forced[s]) if self.forced is not None else self.max_new_tokens
            stop = len(self.outputs[s]) >= limit or (self.forced is None and t in self.eos)
            (done if stop else going).append(k)
        device = model.device
        self.row_generated[tok.row] += 1
        if done:
            done_rows = tok.row[torch.tensor(done, device=device)]
            for k in done:
                self.row_seq[rows[k]] = -1
            self.row_seq_t[done_rows] = -1
            self.policy.release(done_rows)
        if going:
            keep = torch.tensor(going, device=device)
            nxt = Tokens.new(tok.row[keep], tok.pos[keep] + 1, model.embed(chosen[keep]),
                             torch.ones(len(going), dtype=torch.bool, device=device), prefill=False)
            self.row_since[tok.row[keep]] = self.tick
            self.running = Tokens.cat([self.running, nxt])

    # ---------------------------------------------------------------------------------------------
    def _lens_store(self, tokens: Tokens, h: torch.Tensor, steps) -> None:
        """``record_predictions``: keep each emitting token's state after every step it runs."""
        emit = tokens.emit.nonzero().squeeze(1).tolist()
        step_list = [steps] * len(tokens) if isinstance(steps, int) else steps.tolist()
        for i in emit:
            self.lens.setdefault(int(tokens.row[i]), []).append((step_list[i], h[i].clone()))

    def _lens_take(self, rows: list[int]):
        """(top-1 token, its probability) after every step of each row's emitted token, one head call."""
        entries = [self.lens.pop(r, []) for r in rows]
        states = [h for e in entries for _, h in e]
        if not states:
            return [([], []) for _ in rows]
        probs = self.model.head(torch.stack(states)).float().softmax(-1)
        conf, top1 = probs.max(-1)
        conf, top1 = conf.tolist(), top1.tolist()
        out, k = [], 0
        for e in entries:
            out.append((top1[k:k + len(e)], conf[k:k + len(e)]))
            k += len(e)
        return out


def _attended(chunk: Chunk, slots: torch.Tensor, h: torch.Tensor) -> int:
    """Query-key pairs a pass's attention computes: each token's own keys with the paged kernels; on the
    reference path every row's queries against the longest row's keys (``kv_len``), padding masked."""
    if kernels.use_triton(h):
        return int((slots + 1).sum())
    return chunk.batch_size * chunk.width * chunk.kv_len


def _gathered(chunk: Chunk, step, h: torch.Tensor) -> int:
    """Cache slots a pass's attention copies (``KVCache.read``): none when its tokens are one page's rows
    0..n-1 (views) or when the paged kernels read the cache in place."""
    if (isinstance(step, int) and chunk.all_rows) or kernels.use_triton(h):
        return 0
    return chunk.batch_size * chunk.kv_len


def _label(rows_total: int, labels: list[str], group_kind: list[str], record) -> EngineStep:
    """A pass record as an EngineStep: what each of the ``rows_total`` slots did."""
    g, rows, segs, prefill, waiting, row_seq, tokens = record
    activity, sequences = [IDLE] * rows_total, [None] * rows_total
    for r in set(waiting.tolist()):
        activity[r], sequences[r] = WAIT, row_seq[r]
    for r, seg, first in zip(rows.tolist(), segs.tolist(), prefill.tolist()):
        activity[r] = "prefill" if first else labels[seg]
        sequences[r] = row_seq[r]
    kind = "prefill" if bool(prefill.all()) else group_kind[g]
    return EngineStep(kind, sequences, activity, tokens)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

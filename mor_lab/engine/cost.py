"""What a token costs on this device: a cost model measured in seconds, and the library's one accounting.

In memory-bound decoding (a CPU at batch <= 32, a GPU at moderate batch) a pass over a layer costs
about the same for 4 rows as for 32: the weights are read once whatever the rows. So speed is decided
by how many passes (and LM-head calls) an engine step makes, not by how many layers each token
skipped. :class:`CostModel` measures, on the machine it runs on and in the model's dtype:

- one decoder-layer pass over ``n`` tokens (the real code path: norms, projections, rotary, cache
  write, attention, MLP), cycling through the model's own layers so the weights come from memory;
- the extra cost per attended key; the final norm + LM head (+ sampling) over ``n`` rows; an exit test
  (the head plus softmax and top-2); a state-propagation pass (norm + K/V projections); router scores;
- the engine's own bookkeeping per pass, fitted on a short real run.

From a run's ``Trace.passes`` it predicts the run's time (:meth:`predict`) and the **ideal** time of the
same work with perfect scheduling (:meth:`ideal`: every pass at the full B slots). A benchmark's
``ideal_speedup`` is the ideal of the reference run over the ideal of this run; ``fraction_of_ideal`` is
the measured speedup over that.

The module is also the library's one FLOPs/bytes accounting (:func:`layer_flops`, :func:`head_flops`,
:func:`decode_flops`, :func:`weight_bytes`, :func:`kv_bytes_per_token`).
"""
from __future__ import annotations

import dataclasses
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# ------------------------------------------------------------------------------------------------
# FLOPs and bytes: the one accounting.
def layer_params(config) -> int:
    """Weights of one decoder layer's matmuls (q, k, v, o, gate, up, down)."""
    c = config
    return c.hidden_size * c.head_dim * 2 * (c.num_heads + c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size


def layer_flops(config, context: float) -> float:
    """FLOPs of one depth step for one token: 2 x matmul weights + attention over ``context`` keys."""
    return 2 * layer_params(config) + 4 * config.num_heads * config.head_dim * context


def head_flops(config) -> float:
    return 2 * config.vocab_size * config.hidden_size


def kv_projection_flops(config) -> float:
    """State propagation of one skipped step for one token: the K and V projections."""
    return 2 * 2 * config.hidden_size * config.head_dim * config.num_kv_heads


def decode_flops(config, layers: float, context: float, head_calls: float = 1.0, skipped: float = 0.0) -> float:
    """FLOPs per generated token: ``layers`` depth steps, ``head_calls`` LM-head evaluations (an exit test
    at a logit-based exit is one more), ``skipped`` steps filled by state propagation."""
    return layers * layer_flops(config, context) + skipped * kv_projection_flops(config) + \
        head_calls * head_flops(config)


def weight_bytes(model) -> int:
    """Bytes of distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(config, steps: float, dtype=torch.float32) -> float:
    """KV-cache bytes one token keeps over ``steps`` cached depth steps."""
    return steps * 2 * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------
def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear in ``x``; linear extrapolation past the last point (compute-bound growth)."""
    if x <= xs[0]:
        return ys[0] * x / xs[0] if x < xs[0] else ys[0]
    i = bisect_left(xs, x)
    if i >= len(xs):
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return ys[-1] + slope * (x - xs[-1])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, reps: int, device) -> float:
    """The fastest of ``reps`` timed calls (after one warm-up): noise on a shared machine only adds time."""
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _envelope(ys: list[float]) -> list[float]:
    """Costs never fall as rows grow: a point above a later one is noise, lowered to it."""
    out = list(ys)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


@dataclass
class CostModel:
    """Measured pass costs on one device, for one model (shape and dtype). Seconds throughout."""
    device: str
    dtype: str
    threads: int
    rows: list[int]
    layer_s: list[float]  # one layer pass over n tokens (decode shape, ``ref_keys`` keys each)
    head_s: list[float]  # final norm + LM head + sampling over n rows
    test_s: list[float]  # an exit test over n rows (head + softmax + top-2)
    propagate_s: list[float]  # a state-propagation pass over n rows (norm + K/V projections)
    key_s: float  # attention, per token and key beyond ``ref_keys``
    ref_keys: int
    small_s: float  # a router or classifier pass (d -> 1)
    overhead_s: float = 0.0  # engine bookkeeping per pass, fitted on a real run
    num_steps: int = 0
    transposed_min_rows: int | None = None  # the matmul layouts measured fastest (decoder.FastPaths)
    head_transposed_min_rows: int | None = None
    seconds: float = 0.0  # how long the calibration took
    notes: dict = field(default_factory=dict)

    # -- the prices ----------------------------------------------------------------------------
    def layer(self, tokens: int, keys: int = 0) -> float:
        extra = max(0.0, keys - tokens * self.ref_keys) * self.key_s
        return _interp(self.rows, self.layer_s, tokens) + extra

    def head(self, rows: int) -> float:
        return _interp(self.rows, self.head_s, rows)

    def test(self, rows: int) -> float:
        return _interp(self.rows, self.test_s, rows)

    def propagate(self, rows: int) -> float:
        return _interp(self.rows, self.propagate_s, rows)

    def price(self, kind: str, rows: int, tokens: int, keys: int = 0) -> float:
        if kind in ("layer", "prefill"):
            return self.layer(tokens, keys)
        if kind == "head":
            return self.head(rows)
        if kind == "test":
            return self.test(rows)
        if kind == "propagate":
            return self.propagate(rows)
        return self.small_s  # router, classifier

    # -- a run ---------------------------------------------------------------------------------
    def breakdown(self, trace) -> dict[str, float]:
        """Predicted seconds per pass kind, plus the engine's bookkeeping."""
        out: dict[str, float] = {}
        for p in trace.passes:
            out[p.kind] = out.get(p.kind, 0.0) + self.price(p.kind, p.rows, p.tokens, p.keys)
        out["bookkeeping"] = self.overhead_s * _bookkept(trace)
        return out

    def predict(self, trace) -> float:
        """The run's time as the sum of its passes' prices."""
        return sum(self.breakdown(trace).values())

    def ideal(self, trace, slots: int | None = None) -> float:
        """The same work with perfect scheduling: every decode pass at ``slots`` (default the run's B) rows.

        Per kind, the decode tokens the run pushed through passes of that kind are repacked into full
        passes; prompt tokens (whether in prefill passes or riding in mixed ones) are priced at the best
        per-token rate the calibration measured (the largest chunk), the same for every schedule of the
        same prompts; attention keys are the same total."""
        B = slots or trace.slots
        totals: dict[str, list[int]] = {}
        prompt_steps = 0
        for p in trace.passes:
            entry = totals.setdefault("layer" if p.kind == "prefill" else p.kind, [0, 0])
            entry[0] += p.tokens - p.prefill
            entry[1] += p.keys
            prompt_steps += p.prefill
        t = prompt_steps * self.layer_s[-1] / self.rows[-1]
        passes = prompt_steps / self.rows[-1]
        for kind, (tokens, keys) in totals.items():
            full = tokens / B
            if kind == "layer":
                t += full * self.layer(B) + max(0.0, keys - (tokens + prompt_steps) * self.ref_keys) * self.key_s
            else:
                t += full * self.price(kind, B, B)
            passes += full
        return t + self.overhead_s * passes

    # -- the regime ----------------------------------------------------------------------------
    def regime(self, slots: int) -> dict:
        """Memory- or compute-bound at ``slots`` rows, and the LM head's share of a full-depth token."""
        ratio = self.layer(slots) / self.layer(1)
        steps = self.num_steps
        per_token = (steps * self.layer(slots) + self.head(slots)) / slots
        return {"regime": "memory-bound" if ratio < slots / 4 else "compute-bound",
                "layer_pass_ratio_vs_1_row": round(ratio, 2),
                "head_share": round(self.head(slots) / slots / per_token, 3) if steps else None,
                "head_in_layers": round(self.head(slots) / self.layer(slots), 2)}

    def head_batch(self, extra_rows: int, policy=None) -> int:
        """How many tokens a head call should wait for (the ``cost`` head rule): the fewest whose
        per-token cost of the head call (coda + head + the next tokens' first segment) is within 10 %
        of the best reachable with ``extra_rows`` sequences in flight beyond the slots."""
        if extra_rows < 1:
            return 1
        finish = len(policy.finish) if policy is not None and hasattr(policy, "finish") else 0
        first = len(policy.segments[0]) if policy is not None and hasattr(policy, "segments") else 0

        def per_token(n: int) -> float:
            return ((finish + first) * self.layer(n) + self.head(n)) / n

        best = min(per_token(n) for n in range(1, extra_rows + 1))
        return next(n for n in range(1, extra_rows + 1) if per_token(n) <= 1.1 * best)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- calibration ---------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model, max_rows: int = 64, reps: int = 3, fast: bool = True, fit_overhead: bool = True
                  ) -> "CostModel":
        """Measure this model's pass costs here (a few seconds for SmolLM2 on a 2-core CPU)."""
        from ..models.decoder import fast_paths
        start = time.perf_counter()
        device = model.device
        layouts = measure_layouts(model, reps) if fast else (None, None)
        rows = [n for n in CALIBRATION_ROWS if n <= max(max_rows, 4)]
        if rows[-1] < max_rows:
            rows.append(max_rows)
        settings = dict(transposed_min_rows=layouts[0], head_transposed_min_rows=layouts[1]) if fast else None
        context = fast_paths(**settings) if fast else _Null()
        with torch.inference_mode(), context:
            layer_s, head_s, test_s, prop_s = [], [], [], []
            ref_keys = 32
            scratch = _Scratch(model, max(rows), ref_keys)
            for n in rows:
                layer_s.append(_best_time(lambda: scratch.layers(n), reps, device) / scratch.count)
                head_s.append(_best_time(lambda: scratch.head(n), reps, device))
                test_s.append(_best_time(lambda: scratch.test(n), reps, device))
                prop_s.append(_best_time(lambda: scratch.propagate(n), reps, device))
            del scratch
            long_keys = 512
            long = _Scratch(model, 8, long_keys)
            t_long = _best_time(lambda: long.layers(8), reps, device) / long.count
            short = _interp(rows, layer_s, 8)
            key_s = max(0.0, (t_long - short) / (8 * (long_keys - ref_keys)))
            del long
            small_s = _best_time(lambda: torch.nn.functional.linear(torch.randn(8, model.config.hidden_size,
                                                                                  device=device, dtype=model.dtype),
                                                                      torch.randn(1, model.config.hidden_size,
                                                                                  device=device, dtype=model.dtype)),
                                   reps, device)
        layer_s, head_s, test_s, prop_s = (_envelope(v) for v in (layer_s, head_s, test_s, prop_s))
        cost = cls(device=str(device), dtype=str(model.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                   rows=rows, layer_s=layer_s, head_s=head_s, test_s=test_s, propagate_s=prop_s, key_s=key_s,
                   ref_keys=ref_keys, small_s=small_s, num_steps=model.num_steps,
                   transposed_min_rows=layouts[0], head_transposed_min_rows=layouts[1])
        if fit_overhead:
            cost.overhead_s = _fit_overhead(model, cost, exact=not fast)
        cost.seconds = time.perf_counter() - start
        return cost


def _bookkept(trace) -> int:
    """Bookkeeping events of a run: its engine steps (group passes) and head calls."""
    return len(trace.engine_steps) + sum(p.kind == "head" for p in trace.passes)


def _fit_overhead(model, cost: CostModel, exact: bool) -> float:
    """The engine's per-event bookkeeping: a short real run, its measured time minus its priced passes."""
    from .scheduler import Scheduler
    prompts = [[(7 * i + j) % model.config.vocab_size for j in range(4 + i)] for i in range(4)]
    engine = Scheduler(model, slots=4, eos_token_ids=[], exact=exact, cost=cost)
    engine.run(prompts[:2], 2)  # warm-up
    best = None
    for _ in range(3):
        _, trace = engine.run(prompts, 6)
        work = sum(cost.price(p.kind, p.rows, p.tokens, p.keys) for p in trace.passes)
        residual = (trace.seconds - work) / max(1, _bookkept(trace))
        best = residual if best is None else min(best, residual)
    return max(0.0, best)


def measure_layouts(model, reps: int = 3) -> tuple[int | None, int | None]:
    """From how many rows ``(W @ x^T)^T`` beats ``x @ W^T`` on this device, for a layer's largest
    projection and for the LM head (None: never, up to 32 rows). Measured, never assumed: which is
    faster depends on the BLAS and the CPU."""
    device, dtype = model.device, model.dtype
    layer = model.layers[len(model.layers) // 2]
    weights = {"layer": [l.mlp.up_proj.weight for l in model.layers[:8]], "head": [model.lm_head.weight]}
    out = []
    with torch.inference_mode():
        for name in ("layer", "head"):
            found = None
            for n in (2, 3, 4, 8, 16, 32):
                x = torch.randn(n, layer.mlp.up_proj.in_features, device=device, dtype=dtype)
                plain = _best_time(lambda: [torch.nn.functional.linear(x, w) for w in weights[name]], reps, device)
                flipped = _best_time(lambda: [torch.mm(w, x.T).T.contiguous() for w in weights[name]], reps, device)
                if flipped < 0.95 * plain:
                    found = n
                    break
            out.append(found)
    return out[0], out[1]


def fast_settings(model, cost: CostModel | None) -> dict:
    """The fast paths the engine turns on: the measured layouts when a cost model is given, else a cached
    measurement for this model's shape on this device."""
    if cost is not None:
        return dict(transposed_min_rows=cost.transposed_min_rows, head_transposed_min_rows=cost.head_transposed_min_rows)
    key = (model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size, str(model.dtype),
           str(model.device), torch.get_num_threads())
    if key not in _LAYOUTS:
        _LAYOUTS[key] = measure_layouts(model, reps=3)
    rows, head = _LAYOUTS[key]
    return dict(transposed_min_rows=rows, head_transposed_min_rows=head)


_LAYOUTS: dict[tuple, tuple[int | None, int | None]] = {}


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Scratch:
    """A scratch KV cache and inputs to time passes through the model's real layer code."""

    def __init__(self, model, rows: int, keys: int):
        from ..models.cache import KVCache
        self.model = model
        self.layers_list = list(range(len(model.layers)))
        self.count = len(self.layers_list)
        c = model.config
        self.cache = KVCache(len(model.layers), rows, keys, c.num_kv_heads, c.head_dim, model.dtype, model.device)
        self.cache.lengths.fill_(keys - 1)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.h = (torch.randn(rows, c.hidden_size, generator=g) * 0.1).to(model.device, model.dtype)
        self.keys = keys

    def _chunk(self, n: int):
        from ..models.cache import Chunk
        rows = torch.arange(n, device=self.model.device)
        slots = torch.full((n,), self.keys - 1, device=self.model.device)
        return Chunk.from_tokens(rows, slots, slots, self.cache.batch_size, torch.zeros_like(rows))

    def layers(self, n: int) -> None:
        chunk = self._chunk(n)
        rope = self.model.rope(chunk.positions)
        h = self.h[:n]
        for layer in self.layers_list:
            self.model.run_layer(layer, h, rope, self.cache, chunk, layer)

    def head(self, n: int) -> None:
        self.model.head(self.h[:n]).argmax(-1)

    def test(self, n: int) -> None:
        self.model.head(self.h[:n]).float().softmax(-1).topk(2, dim=-1)

    def propagate(self, n: int) -> None:
        layer = self.model.layers[0]
        chunk = self._chunk(n)
        rope = self.model.rope(chunk.positions)
        layer.self_attn.project_kv(layer.input_layernorm(self.h[:n]), rope)

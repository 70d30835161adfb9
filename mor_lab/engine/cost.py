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
from functools import partial

import torch

CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_TOKENS = 512  # a prompt-sized chunk, measured once: prefill passes run far past the decode rows


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


def _typical_time(fn, reps: int, device) -> float:
    """The median of ``reps`` timed calls (after one warm-up). Not the fastest: a real run meets this
    shared machine at its typical speed, and priced at its best the runs measured 10-40 % slower than
    predicted."""
    return _sweep_times([[fn]], reps, device)[0][0]


def _sweep_times(curves: list[list], reps: int, device) -> list[list[float]]:
    """The median time of every call in ``curves`` (lists of calls), measured in ``reps`` interleaved sweeps
    over all of them: a burst of noise on a shared machine lands on different points in each sweep, not
    on one point's every repetition (a kink in the curve that no run would see)."""
    times = [[[] for _ in calls] for calls in curves]
    for calls in curves:
        for fn in calls:
            fn()  # warm-up: a matmul library's first call per shape plans it
    for _ in range(max(1, reps)):
        for c, calls in enumerate(curves):
            for i, fn in enumerate(calls):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[c][i].append(time.perf_counter() - start)
    return [[sorted(t)[(len(t) - 1) // 2] for t in curve] for curve in times]


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
    propagate_s: list[float]  # a state-propagation call over n rows (norm + K/V projections + writes)
    key_s: float  # attention, per token and key beyond ``ref_keys``
    ref_keys: int
    small_s: float  # a router or classifier pass (d -> 1)
    overhead_s: float = 0.0  # engine bookkeeping per pass, fitted on a real run
    gather_s: float = 0.0  # per cache slot a ragged pass copies out of the KV cache (``Pass.gathered``)
    prefill_tokens: int = 0  # a prompt-sized pass (tokens) ...
    prefill_s: float = 0.0  # ... and its measured time: prices prompt chunks past ``rows[-1]``
    propagate_layers: int = 1  # the layers one calibrated propagation call projected
    num_steps: int = 0
    layouts: list = field(default_factory=list)  # the matmul layouts measured fastest: ((min_rows, layout), ...)
    head_layouts: list = field(default_factory=list)  # the same for the LM head (models.fast_paths)
    seconds: float = 0.0  # how long the calibration took
    notes: dict = field(default_factory=dict)

    # -- the prices ----------------------------------------------------------------------------
    def layer(self, tokens: int, keys: int = 0, gathered: int = 0) -> float:
        """One layer pass over ``tokens`` tokens attending to ``keys`` keys in all, copying ``gathered``
        cache slots (a ragged pass on the reference attention path)."""
        extra = max(0.0, keys - tokens * self.ref_keys) * self.key_s + gathered * self.gather_s
        if self.prefill_tokens > self.rows[-1] and tokens > self.rows[-1]:  # a prompt chunk: the measured point
            return _interp([self.rows[-1], self.prefill_tokens], [self.layer_s[-1], self.prefill_s], tokens) + extra
        return _interp(self.rows, self.layer_s, tokens) + extra

    def prompt_token_s(self) -> float:
        """The best per-token rate of a layer pass the calibration measured (the largest chunk)."""
        if self.prefill_tokens > self.rows[-1]:
            return self.prefill_s / self.prefill_tokens
        return self.layer_s[-1] / self.rows[-1]

    def head(self, rows: int) -> float:
        return _interp(self.rows, self.head_s, rows)

    def test(self, rows: int) -> float:
        return _interp(self.rows, self.test_s, rows)

    def propagate(self, rows: int, layers: int | None = None) -> float:
        """A propagation call over ``rows`` tokens projecting ``layers`` layers (default: as calibrated)."""
        scale = 1.0 if layers is None else max(1, layers) / self.propagate_layers
        return _interp(self.rows, self.propagate_s, rows) * scale

    def price(self, kind: str, rows: int, tokens: int, keys: int = 0, gathered: int = 0) -> float:
        if kind in ("layer", "prefill"):
            return self.layer(tokens, keys, gathered)
        if kind == "head":
            return self.head(rows)
        if kind == "test":
            return self.test(rows)
        if kind == "propagate":
            return self.propagate(rows, keys or None)
        return self.small_s  # router, classifier

    # -- a run ---------------------------------------------------------------------------------
    def breakdown(self, trace) -> dict[str, float]:
        """Predicted seconds per pass kind, plus the engine's bookkeeping."""
        out: dict[str, float] = {}
        for p in trace.passes:
            out[p.kind] = out.get(p.kind, 0.0) + self.price(p.kind, p.rows, p.tokens, p.keys)
            if p.gathered:  # the KV copies of ragged passes, apart: what mixing depths costs this path
                out["gather"] = out.get("gather", 0.0) + p.gathered * self.gather_s
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
        same prompts; attention keys are the same total. Gathered KV copies are left out: the reference
        attention path copies a ragged pass's keys, the GPU kernels read the pages in place."""
        B = slots or trace.slots
        totals: dict[str, list[int]] = {}
        prompt_steps = 0
        for p in trace.passes:
            entry = totals.setdefault("layer" if p.kind == "prefill" else p.kind, [0, 0])
            entry[0] += p.tokens - p.prefill
            entry[1] += p.keys
            prompt_steps += p.prefill
        t = prompt_steps * self.prompt_token_s()
        calls = {kind: sum(1 for p in trace.passes if p.kind == kind) for kind in totals}
        for kind, (tokens, keys) in totals.items():
            full = tokens / B
            if kind == "layer":
                t += full * self.layer(B) + max(0.0, keys - (tokens + prompt_steps) * self.ref_keys) * self.key_s
            elif kind == "propagate":  # the layers per call as the run had them
                t += full * self.propagate(B, round(keys / max(1, calls[kind])))
            else:
                t += full * self.price(kind, B, B)
        # bookkeeping is paid per engine step and head call (as fitted), not per pass: the run's events,
        # fewer in proportion when its passes are repacked into fewer, full ones
        run_passes = sum(p.kind in ("layer", "prefill") for p in trace.passes)
        ideal_passes = prompt_steps / max(self.rows[-1], self.prefill_tokens) + totals.get("layer", [0])[0] / B
        shrink = min(1.0, ideal_passes / run_passes) if run_passes else 1.0
        return t + self.overhead_s * _bookkept(trace) * shrink

    # -- the regime ----------------------------------------------------------------------------
    def regime(self, slots: int) -> dict:
        """Memory- or compute-bound at ``slots`` rows (from the measured curve), and the LM head's share of a
        full-depth token."""
        ratio = self.layer(slots) / self.layer(1)
        steps = self.num_steps
        per_token = (steps * self.layer(slots) + self.head(slots)) / slots
        # memory-bound while a row added to a pass costs less than half of what a pass of one row costs
        # (reading the weights dominates); one row alone reads every weight for one token: memory-bound
        marginal = (ratio - 1) / (slots - 1) if slots > 1 else 0.0
        return {"regime": "memory-bound" if marginal < 0.5 else "compute-bound",
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
        from ..models.fast_paths import fast_paths
        start = time.perf_counter()
        device = model.device
        rows = [n for n in CALIBRATION_ROWS if n <= max(max_rows, 4)]
        if rows[-1] < max_rows:
            rows.append(max_rows)
        layouts = measure_layouts(model, reps, max_rows=rows[-1]) if fast else ((), ())
        if fast:  # an engine run without this cost model uses them too, instead of measuring again
            _LAYOUTS[_layout_key(model)] = layouts
        settings = dict(layouts=layouts[0], head_layouts=layouts[1]) if fast else None
        context = fast_paths(**settings) if fast else _Null()
        with torch.inference_mode(), context:
            ref_keys = min(32, model.config.max_position_embeddings // 4)
            scratch = _Scratch(model, max(rows), ref_keys)
            kinds = (scratch.layers, scratch.head, scratch.test, scratch.propagate)
            curves = _sweep_times([[partial(kind, n) for n in rows] for kind in kinds], reps, device)
            layer_s, head_s, test_s, prop_s = curves
            layer_s = [t / scratch.count for t in layer_s]
            del scratch
            # keys beyond the reference, at the largest decode batch (the per-key cost grows with the rows'
            # share of the attention; 8 rows of long keys priced 32 rows' keys at half what they cost)
            wide = min(rows[-1], 64)
            long_keys = min(ref_keys + 128, model.config.max_position_embeddings)
            long = _Scratch(model, wide, long_keys)
            t_ref, t_long, t_ragged = (curve[0] / long.count for curve in _sweep_times(
                [[partial(long.layers_at, wide, ref_keys)], [partial(long.layers, wide)],
                 [partial(long.layers, wide, ragged=True)]], reps, device))
            key_s = max(0.0, (t_long - t_ref) / (wide * (long_keys - ref_keys)))
            gather_s = max(0.0, (t_ragged - t_long) / (wide * long_keys))
            del long
            prefill_tokens, prefill_s = 0, 0.0
            if rows[-1] < PREFILL_TOKENS:  # prompt chunks run hundreds of tokens: one measured point there
                prefill_tokens = PREFILL_TOKENS
                chunk = _Scratch(model, prefill_tokens, ref_keys)
                prefill_s = _typical_time(lambda: chunk.layers(prefill_tokens), reps, device) / chunk.count
                del chunk
            small_s = _typical_time(lambda: torch.nn.functional.linear(torch.randn(8, model.config.hidden_size,
                                                                                  device=device, dtype=model.dtype),
                                                                      torch.randn(1, model.config.hidden_size,
                                                                                  device=device, dtype=model.dtype)),
                                   reps, device)
        layer_s, head_s, test_s, prop_s = (_envelope(v) for v in (layer_s, head_s, test_s, prop_s))
        cost = cls(device=str(device), dtype=str(model.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                   rows=rows, layer_s=layer_s, head_s=head_s, test_s=test_s, propagate_s=prop_s, key_s=key_s,
                   gather_s=gather_s, prefill_tokens=prefill_tokens, prefill_s=max(prefill_s, layer_s[-1]),
                   ref_keys=ref_keys, small_s=small_s, num_steps=model.num_steps,
                   propagate_layers=len({model.plan[s] for s in propagation_steps(model)}),
                   layouts=[list(x) for x in layouts[0]], head_layouts=[list(x) for x in layouts[1]])
        if fit_overhead:
            cost.overhead_s = _fit_overhead(model, cost, exact=not fast)
        cost.seconds = time.perf_counter() - start
        return cost


def _bookkept(trace) -> int:
    """Bookkeeping events of a run: its engine steps (group passes) and head calls."""
    return len(trace.engine_steps) + sum(p.kind == "head" for p in trace.passes)


def _fit_overhead(model, cost: CostModel, exact: bool) -> float:
    """The engine's per-event bookkeeping (Python, packing tokens, building chunks, sampling): a short real
    run shaped like a benchmark's (a recursive model: continuous depth-wise batching with exits; else static
    full depth), its measured time minus its priced passes, per engine step and head call."""
    from .plan import LoopStructure
    from .policies import FixedLoops, LoopExit
    from .scheduler import Scheduler
    st = LoopStructure.of(model)
    slots = 8
    prompts = [[(7 * i + j) % model.config.vocab_size for j in range(4 + i % 5)] for i in range(2 * slots)]
    if st is not None:
        probs = [1.0 / st.loops] * st.loops
        make = lambda: Scheduler(model, LoopExit(FixedLoops(probs)), slots=slots, mode="continuous",  # noqa: E731
                                 eos_token_ids=[], exact=exact, cost=cost)
    else:
        make = lambda: Scheduler(model, slots=slots, eos_token_ids=[], exact=exact, cost=cost)  # noqa: E731
    make().run(prompts[:2], 2)  # warm-up
    residuals = []
    for _ in range(3):
        _, trace = make().run(prompts, 8)
        work = sum(cost.price(p.kind, p.rows, p.tokens, p.keys, p.gathered) for p in trace.passes)
        residuals.append((trace.seconds - work) / max(1, _bookkept(trace)))
    return max(0.0, sorted(residuals)[1])  # the median, as the prices are


def measure_layouts(model, reps: int = 3, max_rows: int = 64) -> tuple[tuple, tuple]:
    """The fastest way to compute ``x @ W^T`` here for each row count up to ``max_rows``, for a layer's
    projections and for the LM head: ``((min_rows, layout), ...)`` tables for ``models.fast_paths.fast_paths``.

    Candidates (``fast_paths.LAYOUTS``): ``F.linear``; ``(W @ x^T)^T``; oneDNN-prepacked weights (when this
    PyTorch can prepack and there is memory for one more copy of the weights). Measured, never assumed:
    which wins depends on the BLAS, the CPU and the rows."""
    from ..models.fast_paths import PACKABLE, fast_paths, linear, packed_weight, packing_available
    device, dtype = model.device, model.dtype
    candidates = ["linear", "transposed"]
    if device.type == "cpu" and dtype in PACKABLE and packing_available() and memory_allows_copy(weight_bytes(model)):
        candidates.append("packed")
    samples = {"layer": [l.mlp.up_proj.weight for l in model.layers[:8]], "head": [model.lm_head.weight]}
    sizes = [n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if n <= max(max_rows, 4)]
    tables = []
    with torch.inference_mode():
        for name in ("layer", "head"):
            best = []
            for n in sizes:
                x = torch.randn(n, samples[name][0].shape[1], device=device, dtype=dtype)
                times = {}
                for layout in candidates:
                    table = ((1, layout),)
                    with fast_paths(layouts=table, head_layouts=table):
                        if layout == "packed":
                            for w in samples[name]:
                                packed_weight(w)
                        times[layout] = _typical_time(lambda: [linear(x, w) for w in samples[name]], reps, device)
                best.append([n, times])
            choice = [min(times, key=times.get) for _, times in best]
            for i in range(1, len(choice) - 1):  # one row count out of line with both neighbours: noise
                if choice[i - 1] == choice[i + 1] != choice[i] and \
                        best[i][1][choice[i - 1]] < 1.05 * best[i][1][choice[i]]:
                    choice[i] = choice[i - 1]
            table = []
            for (n, _), layout in zip(best, choice):  # keep only the row counts where the choice changes
                if not table or table[-1][1] != layout:
                    table.append((n, layout))
            tables.append(tuple(table))
    return tables[0], tables[1]


def memory_allows_copy(nbytes: int) -> bool:
    """Is there room for a prepacked copy of the weights (``nbytes``)? It needs four times ``nbytes``: the
    weights themselves (memory-mapped safetensors count once touched), the copy, the fused q/k/v and
    gate/up buffers (up to one more), and as much again for activations and KV. Reads the container's
    limit (cgroup), ``MOR_LAB_MEMORY_MB`` (a budget for this process, e.g. Binder's 2 GB, which
    binder/start sets) and the machine's available memory; ``MOR_LAB_PACKED_WEIGHTS=0`` says no."""
    import os
    if os.environ.get("MOR_LAB_PACKED_WEIGHTS", "1").strip().lower() in ("0", "false", "no"):
        return False
    room = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except OSError:
        return False
    for limit_path, used_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, used = open(limit_path).read().strip(), int(open(used_path).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            room.append(int(limit) - used)
        break
    budget = os.environ.get("MOR_LAB_MEMORY_MB", "").strip()
    if budget:
        if not budget.isdigit():
            raise ValueError(f"MOR_LAB_MEMORY_MB must be a whole number of megabytes, got {budget!r}")
        room.append(int(budget) * 2**20 - resident_bytes())
    return bool(room) and min(room) > 4 * nbytes


def resident_bytes() -> int:
    """This process's resident memory now (Linux); elsewhere its lifetime peak (the nearest figure there)."""
    import os
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fast_settings(model, cost: CostModel | None) -> dict:
    """The fast paths the engine turns on: the measured layouts when a cost model is given, else a cached
    measurement for this model's shape on this device."""
    if cost is not None and cost.layouts:
        return dict(layouts=tuple(map(tuple, cost.layouts)), head_layouts=tuple(map(tuple, cost.head_layouts)))
    key = _layout_key(model)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = measure_layouts(model, reps=3, max_rows=64)
    layers, head = _LAYOUTS[key]
    return dict(layouts=layers, head_layouts=head)


_LAYOUTS: dict[tuple, tuple[tuple, tuple]] = {}  # measured layouts per model shape here (calibrations fill it too)


def _layout_key(model) -> tuple:
    c = model.config
    return (c.hidden_size, c.intermediate_size, c.vocab_size, str(model.dtype), str(model.device),
            torch.get_num_threads(), len(model.layers))


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def propagation_steps(model) -> list[int]:
    """The steps a typical early exit skips: the loops after the first (a recursive model), or the last
    third of the layers (a vanilla one). The cost model prices propagation calls like these."""
    from .plan import LoopStructure
    st = LoopStructure.of(model)
    if st is not None:
        return list(st.skipped_steps(1))
    return list(range(model.num_steps - model.num_steps // 3, model.num_steps))


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

    def _chunk(self, n: int, keys: int | None = None):
        from ..models.cache import Chunk
        rows = torch.arange(n, device=self.model.device)
        slots = torch.full((n,), (keys or self.keys) - 1, device=self.model.device)
        return Chunk.from_tokens(rows, slots, slots, self.cache.batch_size, torch.zeros_like(rows))

    def layers_at(self, n: int, keys: int) -> None:
        """:meth:`layers` with each token seeing ``keys`` keys (at most the scratch cache's)."""
        chunk = self._chunk(n, keys)
        rope = self.model.rope(chunk.positions)
        for layer in self.layers_list:
            self.model.run_layer(layer, self.h[:n], rope, self.cache, chunk, layer)

    def layers(self, n: int, ragged: bool = False) -> None:
        """One pass over each layer for ``n`` tokens; ``ragged``: the tokens' steps given one per token, the
        way a pass of tokens at different depths reads the cache (a gathered copy on the reference path)."""
        chunk = self._chunk(n)
        rope = self.model.rope(chunk.positions)
        h = self.h[:n]
        for layer in self.layers_list:
            steps = torch.full((n,), layer, device=h.device) if ragged else layer
            self.model.run_layer(layer, h, rope, self.cache, chunk, steps)

    def head(self, n: int) -> None:
        self.model.head(self.h[:n]).argmax(-1)

    def test(self, n: int) -> None:
        self.model.head(self.h[:n]).float().softmax(-1).topk(2, dim=-1)

    def propagate(self, n: int) -> None:
        """One state-propagation pass through the model's own code: the K/V of one shared layer's steps
        (the largest group of tied steps), written into each of them, for ``n`` tokens."""
        from ..models.cache import KVCache
        if getattr(self, "_prop_cache", None) is None:
            self._prop_cache = KVCache.for_model(self.model, self.cache.batch_size, self.keys)
            self._prop_skip = torch.zeros(self.cache.batch_size, self.model.num_steps, dtype=torch.bool,
                                          device=self.model.device)
            self._prop_skip[:, propagation_steps(self.model)] = True
        self._prop_cache.lengths.fill_(self.keys - 1)
        rows = torch.arange(n, device=self.model.device)
        self.model.propagate(self.h[:n], rows, rows, self._prop_skip[:n], self._prop_cache)

"""The depth explorer: one prompt box, one plan picker, one knob; depth per token, batch timeline, tokens/s.

``DepthExplorer().widget`` is the whole app (``mor-lab explore`` serves it with Voila from
``notebooks/depth_explorer.ipynb``). Every plan is a depth policy of the library's one engine (and a
model), nothing re-implemented:

- ``full``: every token runs all 30 layers (``generate_ids`` with the default policy);
- ``early exit (CALM)``: one trained exit after 20 layers, per-row exit with state propagation;
- ``FREE``: the same exit, confident tokens defer their deep layers to a synchronized parallel pass;
- ``recursive + CDB``: the lab's trained recursive model (``lab:recursive-3``: prelude + 3 loops of a
  shared block + coda, trained from scratch on Python's docs and source), continuous depth-wise
  batching over 2 slots, a token leaves the loops when the logit lens is confident;
- ``MoR``: the lab's trained expert-choice MoR model (``lab:mor-expert-3``): its router decides every
  token's recursions at decode time, under continuous depth-wise batching.

The lab models speak the text they were trained on (Python documentation and code, their own 4k
tokenizer, no chat template). Where a checkpoint is missing, the plan falls back to SmolLM2 cut into
a recursive model without training (the text degrades, the schedule is real) and the summary says so.

The knob is the confidence threshold (margin of the top two probabilities) for the early-exit and
recursive plans, and the capacity of the second recursion (the third gets its square) for MoR.
Each prompt line is one request; with more requests than slots the CDB timeline shows refills.
"""
from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from .engine.trace import Trace
from .runtime import pick

FULL, EARLY, FREE, RECURSIVE, MOR = "full", "early exit (CALM)", "FREE", "recursive + CDB", "MoR"
PLANS = (FULL, EARLY, FREE, RECURSIVE, MOR)
KNOBS = {FULL: None, EARLY: "confidence ≥", FREE: "confidence ≥", RECURSIVE: "confidence ≥", MOR: "capacity"}
DEFAULT_PROMPTS = "What is a KV cache?\nWhy is the sky blue?\nName three prime numbers."
EXIT_LAYER = 20  # the exit shared with notebooks 01, 02 and `mor-lab bench early-exit`
CDB_SLOTS = 2


@dataclass
class ExploreRun:
    plan: str
    knob: float | None
    prompts: list[str]
    tokens: list[list[str]]  # generated tokens per prompt, as text
    depths: list[list[int]]  # layers (depth steps) each generated token ran
    max_depth: int  # depth steps of the plan at full depth
    trace: Trace
    seconds: float
    model: str = "SmolLM2-135M-Instruct"  # which model the plan ran

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_depth(self) -> float:
        flat = [d for seq in self.depths for d in seq]
        return sum(flat) / len(flat) if flat else 0.0


class DepthLab:
    """The models behind the explorer, built lazily: SmolLM2 with its committed exit head, the lab's trained
    recursive and MoR models."""

    def __init__(self, model=None, tokenizer=None, max_new_tokens: int | None = None):
        if model is None:
            from .models.hf import load_pretrained
            model, tokenizer = load_pretrained()
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens or pick(quick=8, full=40)
        self._heads = self._recursive = self._mor = None
        self.notes: dict[str, str] = {}  # plan -> what model it runs (shown in the summary)

    # -- the pieces each plan needs ----------------------------------------------------------------
    def heads(self):
        """The committed exit heads (trained on SmolLM2's own chat continuations) when they fit the model,
        else the corpus recipe's, trained once and cached."""
        if self._heads is None:
            from .early_exit.recipes import committed_exit_heads, pretrained_exit_heads
            try:
                self._heads, which = committed_exit_heads(self.model, "linear"), "the committed exit head"
            except ValueError:  # another backbone, or no committed heads in this checkout
                self._heads = pretrained_exit_heads(self.model, self.tokenizer, [EXIT_LAYER], progress=False)
                which = "an exit head trained on corpus blocks (cached)"
            for plan in (EARLY, FREE):
                self.notes[plan] = f"SmolLM2-135M-Instruct, {which} after layer {EXIT_LAYER}"
        return self._heads

    def recursive(self):
        """(model, tokenizer, chat): lab:recursive-3, else SmolLM2 cut without training."""
        if self._recursive is None:
            lab = _lab_model("recursive-3")
            if lab is not None:
                self._recursive = (*lab, False)
                self.notes[RECURSIVE] = "lab:recursive-3 (trained, N_r = 3)"
            else:
                from .recursive import convert
                cut = convert(self.model, strategy="middle_cycle", num_recursions=4, init="lower",
                              tie_norms=True).model.eval()
                self._recursive = (cut, self.tokenizer, True)
                self.notes[RECURSIVE] = "SmolLM2 cut into 4 loops, untrained (lab:recursive-3 is missing)"
        return self._recursive

    def mor(self, capacity: float | None):
        """(model, tokenizer, chat) of lab:mor-expert-3; ``capacity`` of the second recursion (the third
        gets its square) recalibrates the router's decode thresholds on its held-out text; None, or the
        slider step nearest the trained capacity, keeps the trained router as it is."""
        import torch

        from .mor.model import calibrate_thresholds
        if self._mor is None:
            lab = _lab_model("mor-expert-3")
            if lab is None:
                from .checkpoints import model_dir
                model_dir("mor-expert-3")  # raises the error that says how to train it
            from .checkpoints import heldout_blocks, model_dir
            model, tokenizer = lab
            self._trained = (list(model.router.config.capacity), model.router.threshold.clone())
            self._calibration = heldout_blocks(model_dir("mor-expert-3"))[:4, :128].to(model.device)
            self._mor, self._mor_capacity = (model, tokenizer, False), None
            self.notes[MOR] = "lab:mor-expert-3 (trained router, N_r = 3)"
        model = self._mor[0]
        if capacity is None or abs(capacity - self._trained[0][1]) <= 0.025:  # the slider step nearest: as trained
            model.router.config.capacity = list(self._trained[0])
            model.router.threshold.copy_(self._trained[1])
            self._mor_capacity = None
        elif self._mor_capacity != capacity:
            model.router.config.capacity = [1.0, capacity, capacity * capacity]
            with torch.no_grad():
                calibrate_thresholds(model, self._calibration)
            self._mor_capacity = capacity
        return self._mor

    # -- one run -----------------------------------------------------------------------------------
    def policy(self, plan: str, knob: float | None):
        """(model, tokenizer, chat, policy, engine options) of a plan: the explorer picks a policy, never an
        engine."""
        from .engine.policies import CalmExit, ConfidenceLoops, DepthPolicy, FreeDecoding, LoopExit, RoutedDepth
        threshold = 0.5 if knob is None else float(knob)
        smollm2 = (self.model, self.tokenizer, True)
        if plan == FULL:
            return (*smollm2, DepthPolicy(), {})
        if plan == EARLY:
            return (*smollm2, CalmExit(threshold, [EXIT_LAYER], measure="margin", per_row=True, heads=self.heads()), {})
        if plan == FREE:
            return (*smollm2, FreeDecoding(EXIT_LAYER, threshold, self.heads()), {})
        continuous = {"slots": CDB_SLOTS, "mode": "continuous"}
        if plan == RECURSIVE:
            return (*self.recursive(), LoopExit(ConfidenceLoops(threshold)), continuous)
        if plan == MOR:
            return (*self.mor(knob), RoutedDepth(), continuous)
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")

    def run(self, prompts: list[str], plan: str, knob: float | None = None) -> ExploreRun:
        from .engine.generate import encode_prompts, generate_ids

        prompts = [p.strip() for p in prompts if p.strip()] or ["Hello!"]
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
        model, tokenizer, chat, policy, engine = self.policy(plan, knob)
        ids = encode_prompts(tokenizer, prompts, chat=chat)
        out, trace = generate_ids(model, ids, self.max_new_tokens, policy=policy, **engine)
        tokens = [[tokenizer.decode([t]) for t in seq] for seq in out]
        depths = [[tt.num_steps for tt in seq] for seq in trace.tokens]
        return ExploreRun(plan, knob, prompts, tokens, depths, model.num_steps, trace, trace.seconds,
                          self.notes.get(plan, "SmolLM2-135M-Instruct"))


def _lab_model(name: str):
    """(model, tokenizer) of ``lab:<name>`` seed 0, or None when it is not in the checkpoints."""
    from .checkpoints import available, load_lab
    return load_lab(name) if f"{name}@seed0" in available() else None


# -------------------------------------------------------------------------------------------------
# Figures and the app
def depth_figure(run: ExploreRun, width: int = 72) -> go.Figure:
    from .viz.tokens import text_heatmap
    names = [p if len(p) <= 18 else p[:17] + "…" for p in run.prompts]
    knob = "" if run.knob is None else f", {KNOBS[run.plan]} {run.knob:.2f}"
    fig = text_heatmap(run.tokens, run.depths, value_name="layers run", units=f"of {run.max_depth}",
                       title=f"{run.plan}{knob}: {run.mean_depth:.1f} of {run.max_depth} layers per token on average",
                       colorscale="Viridis", zmin=1, zmax=run.max_depth, fmt=".0f", width=width,
                       sequence_names=names)
    fig.update_layout(height=max(fig.layout.height, 280))  # room for a readable colorbar with one prompt
    return fig


def timeline_figure(run: ExploreRun) -> go.Figure:
    from .viz.timeline import utilization_timeline
    fig = utilization_timeline(run.trace)
    fig.update_layout(width=None, autosize=True)
    return fig


def summary_html(run: ExploreRun) -> str:
    return (f"<b>{run.tokens_per_s:.1f} tokens/s</b> ({run.new_tokens} tokens in {run.seconds:.2f} s, "
            f"{len(run.prompts)} request(s)) · <b>{run.mean_depth:.1f}</b> of {run.max_depth} layers per token · "
            f"batch utilization <b>{run.trace.utilization():.0%}</b> · model: {run.model}")


def _output(fig: go.Figure) -> dict:
    """``fig`` as an output of the Output widget, set as widget state rather than captured from the
    kernel's display messages (which Voila's executor waits on forever for an Output widget written
    while the notebook runs). Plotly's own mimetype only: JupyterLab and Voila draw it with the plotly
    renderer extension; no CDN-backed HTML copy (an offline page would wait for it)."""
    import plotly.io as pio
    return {"output_type": "display_data", "data": pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict()),
            "metadata": {}}


class DepthExplorer:
    """The app: prompts (one per line), a plan, a knob; figures and the summary update on every change."""

    def __init__(self, lab: DepthLab | None = None, prompts: str = DEFAULT_PROMPTS, plan: str = EARLY,
                 knob: float = 0.5):
        import ipywidgets as w

        self.lab = lab or DepthLab()
        self.prompt = w.Textarea(value=prompts, description="prompts", placeholder="one prompt per line",
                                 continuous_update=False, layout=w.Layout(width="640px", height="90px"))
        self.plan = w.Dropdown(options=PLANS, value=plan, description="plan")
        self.knob = w.FloatSlider(value=knob, min=0.05, max=1.0, step=0.05, readout_format=".2f",
                                  description="confidence ≥", continuous_update=False,
                                  style={"description_width": "initial"}, layout=w.Layout(width="420px"))
        self.status = w.HTML()
        self.summary = w.HTML()
        self.figures = w.Output()  # depth over text, then the timeline: plotly's own renderer, redrawn per run
        for control in (self.prompt, self.plan, self.knob):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HTML("<h2>mor_lab depth explorer</h2><p>Type prompts (one request per line), "
                                     "pick a depth plan and move the threshold or capacity: the colors show how "
                                     "many layers each generated token ran; below, what every batch slot did at "
                                     "every engine step.</p>"),
                              self.prompt, w.HBox([self.plan, self.knob]), self.status, self.summary,
                              self.figures])
        self.last: ExploreRun | None = None
        self.update()

    def update(self) -> ExploreRun | None:
        plan = self.plan.value
        label = KNOBS[plan]
        self.knob.disabled = label is None
        self.knob.description = label or "(no knob)"
        self.status.value = f"<i>running {plan}…</i>"
        try:
            run = self.lab.run(self.prompt.value.splitlines(), plan, None if label is None else self.knob.value)
        except Exception as e:  # shown in the app, not swallowed: the user sees what went wrong
            self.status.value = f"<b style='color:#D55E00'>{type(e).__name__}: {e}</b>"
            raise
        self.figures.outputs = (_output(depth_figure(run)), _output(timeline_figure(run)))
        self.summary.value = summary_html(run)
        self.status.value = ""
        self.last = run
        return run

    def _repr_mimebundle_(self, **kwargs):
        """The live app, plus a static copy of the last run (the depth figure and the summary) for viewers
        without a kernel or widget manager (a saved notebook, nbviewer)."""
        from .viz.widgets import static_bundle
        bundle = {}
        if self.last is not None:
            bundle = static_bundle(depth_figure(self.last), f"<p>{summary_html(self.last)}</p>")
            bundle["text/plain"] = (f"depth explorer: {self.last.plan}, {self.last.mean_depth:.1f} of "
                                    f"{self.last.max_depth} layers per token, {self.last.tokens_per_s:.1f} tokens/s")
        text = bundle.get("text/plain")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        if text:
            bundle["text/plain"] = text
        return bundle

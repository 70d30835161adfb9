"""Static batching vs continuous depth-wise batching, side by side, driven by the real schedulers.

``SchedulerDashboard`` runs the one engine in static and in continuous mode (``generate_ids`` with a
``LoopExit`` policy) with a fixed exit-depth distribution and draws both slot x step timelines colored
by loop. Sliders change
the batch size and the distribution (rerunning both schedulers) and play the timelines step by step.
With ``FixedLoops`` the exit decisions do not depend on the model's weights, so a tiny random model
shows exactly the schedule a large one would get, in milliseconds.
"""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go

from ..engine.generate import generate_ids
from ..engine.policies import FixedLoops, LoopExit
from ..engine.trace import Trace
from .timeline import utilization_timeline
from .widgets import static_bundle

DISTRIBUTIONS = {  # exit after loop 1, 2, 3, 4
    "40/30/20/10 % (the benchmark's)": [0.4, 0.3, 0.2, 0.1],
    "uniform": [0.25, 0.25, 0.25, 0.25],
    "mostly shallow": [0.7, 0.1, 0.1, 0.1],
    "mostly deep": [0.1, 0.1, 0.1, 0.7],
    "never exit early": [0.0, 0.0, 0.0, 1.0],
}


def loop_steps(trace: Trace) -> int:
    """Engine steps that ran the shared block (or a loop substep of static batching)."""
    return sum(1 for s in trace.engine_steps if s.kind.startswith("loop"))


def token_loops(trace: Trace, structure) -> list[list[int]]:
    """Loops each decoded token ran, per request (the first token, from prefill, left out: prefill runs
    every loop)."""
    st = structure
    return [[(len(t.steps) - st.prelude - st.coda) // st.block for t in seq[1:]] for seq in trace.tokens]


def static_step_loops(loops: list[list[int]], slots: int) -> list[int]:
    """The loops static batching runs at each decode step: the deepest token of the step, requests taken
    in groups of ``slots`` (each group decodes together until its longest request ends)."""
    out = []
    for g in range(0, len(loops), slots):
        group = loops[g:g + slots]
        out += [max(seq[i] for seq in group if i < len(seq)) for i in range(max(map(len, group)))]
    return out


def expected_max_loops(probs: list[float], rows: int) -> float:
    """Expected loops of the deepest of ``rows`` tokens whose exits are drawn independently from ``probs``
    (exit after loop 1, 2, ...): the sum over k of P(max >= k) = 1 - P(every row exits before loop k)."""
    total, before = 0.0, 0.0
    for p in probs:
        total += 1 - before ** rows
        before += p
    return total


def scheduler_runs(model, prompts: list[list[int]], max_new_tokens: int, slots: int, probs: list[float],
                   seed: int = 0) -> dict[str, tuple[list, Trace]]:
    """Both modes of the engine on the same requests and the same per-token exit depths."""
    rule = FixedLoops(probs, seed=seed)
    run = lambda mode: generate_ids(model, prompts, max_new_tokens, eos_token_ids=[], policy=LoopExit(rule),  # noqa
                                    slots=slots, mode=mode)
    return {"static batching": run("static"), "continuous depth-wise batching": run("continuous")}


def schedule_summary(runs: dict[str, tuple[list, Trace]]) -> str:
    """HTML: loop passes of the shared block, useful slot fraction, tokens per loop pass, for each scheduler."""
    cells = []
    for name, (ids, trace) in runs.items():
        passes = loop_steps(trace)
        kinds = tuple(k for k in {s.kind for s in trace.engine_steps} if k.startswith("loop"))
        tokens = sum(map(len, ids))
        cells.append(f"<b>{name}</b>: {passes} passes of the shared block, {trace.utilization(kinds):.0%} of "
                     f"slots busy, {tokens / max(1, passes):.2f} tokens per pass")
    return "<br>".join(cells)


class SchedulerDashboard:
    """Batch size, exit distribution and a step player over the two schedulers' timelines."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int = 6, slots: int = 4):
        self.model, self.prompts, self.max_new_tokens = model, prompts, max_new_tokens
        self.figures = {name: go.FigureWidget() for name in ("static batching", "continuous depth-wise batching")}
        self.summary = widgets.HTML()
        style, layout = {"description_width": "initial"}, widgets.Layout(width="420px")
        self.slots = widgets.IntSlider(value=slots, min=1, max=12, description="batch slots", style=style,
                                       layout=layout, continuous_update=False)
        self.distribution = widgets.Dropdown(options=list(DISTRIBUTIONS), description="exit distribution",
                                             style=style, layout=layout)
        self.step = widgets.IntSlider(value=0, min=0, max=1, description="show steps up to", style=style,
                                      layout=layout)
        self.play = widgets.Play(interval=150, min=0, max=1, step=1, description="play")
        widgets.jslink((self.play, "value"), (self.step, "value"))
        self.slots.observe(lambda _: self.rerun(), names="value")
        self.distribution.observe(lambda _: self.rerun(), names="value")
        self.step.observe(lambda change: self.reveal(change["new"]), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.slots, self.distribution]),
                                    widgets.HBox([self.play, self.step]), self.summary, *self.figures.values()])
        self.rerun()

    def rerun(self) -> dict:
        """Run both schedulers with the current controls and redraw."""
        self.runs = scheduler_runs(self.model, self.prompts, self.max_new_tokens, self.slots.value,
                                   DISTRIBUTIONS[self.distribution.value])
        longest = 0
        for name, (_, trace) in self.runs.items():
            source = utilization_timeline(trace, title=f"{name}: {trace.utilization():.0%} of slot-steps busy")
            fig = self.figures[name]
            with fig.batch_update():
                fig.data = []
                fig.add_traces(source.data)
                fig.layout = source.layout
                fig.layout.height = 120 + 26 * self.slots.value
            longest = max(longest, len(trace.engine_steps))
        self.summary.value = schedule_summary(self.runs)
        self.step.max = self.play.max = longest
        self.step.value = self.play.value = longest
        self.reveal(longest)
        return self.runs

    def reveal(self, step: int) -> None:
        """Show the engine steps up to ``step`` (the timelines drawn so far, as the scheduler ran them)."""
        for fig in self.figures.values():
            fig.layout.xaxis.range = [-0.5, max(step, 1) + 0.5]

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(next(iter(self.figures.values())), f"<p>{self.summary.value}</p>")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

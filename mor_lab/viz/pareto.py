"""Speed against quality: threshold sweeps as Pareto plots, FREE's deferred tokens, a slider over runs.

A sweep point is a dict ``{"threshold", "speedup", "agreement"[, "mean_layers"]}``, the format of
``mor_lab.bench.early_exit.threshold_sweep``; a sweep is ``{method: [points]}``. Speedups are wall
clock on the machine that ran the sweep, so the axis says so. The dashboard does not decode: a
slider picks among runs computed beforehand with the real engine, so it answers instantly.
"""
from __future__ import annotations

import contextlib

import ipywidgets as widgets
import plotly.graph_objects as go

from ..early_exit.evaluate import pareto_front
from ..engine.trace import Trace
from .timeline import ACTIVITY_COLORS
from .tokens import text_heatmap
from .widgets import static_bundle

METHOD_COLORS = {"free": "#009E73", "calm": "#0072B2", "calm_per_row": "#56B4E9", "free_adaptive": "#CC79A7",
                 "static": "#E69F00", "full": "#000000"}
HIGHLIGHT = "#D55E00"  # Okabe-Ito vermillion


def _hover(method: str, p: dict) -> str:
    layers = f"<br>{p['mean_layers']:.1f} layers per token" if p.get("mean_layers") is not None else ""
    tau = "" if p.get("threshold") is None else f" at threshold {p['threshold']:g}"
    return f"{method}{tau}<br>speedup {p['speedup']:.2f}x{_model_speedups(p)}<br>agreement {p['agreement']:.1%}{layers}"


def _model_speedups(p: dict) -> str:
    """The cost model's predicted / ideal speedups of a point, when the sweep has them."""
    parts = [f"{name} {p[key]:.2f}x" for key, name in (("predicted_speedup", "predicted"), ("ideal_speedup", "ideal"))
             if p.get(key) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _point(points: dict[str, list[dict]], method: str, threshold: float) -> dict:
    for p in points.get(method, []):
        if p.get("threshold") is not None and abs(p["threshold"] - threshold) < 1e-9:
            return p
    raise ValueError(f"no {method!r} point at threshold {threshold!r}; "
                     f"thresholds: {[p.get('threshold') for p in points.get(method, [])]}")


def pareto_figure(points: dict[str, list[dict]], highlight: tuple[str, float] | None = None,
                  title: str | None = None, where: str = "this machine") -> go.Figure:
    """Speedup (x) vs agreement with the full model (y), one color per method, its Pareto front as a line.

    The full model is the star at (1, 100%). ``highlight=(method, threshold)`` rings one point; the
    ring is the last trace, so :func:`update_pareto_highlight` can move it.
    """
    if not points:
        raise ValueError("pareto_figure needs at least one method with points")
    fig = go.Figure()
    for k, (method, pts) in enumerate(points.items()):
        color = METHOD_COLORS.get(method, ACTIVITY_COLORS["prefill"])
        front = pareto_front([(p["speedup"], p["agreement"]) for p in pts])
        fig.add_scatter(x=[pts[i]["speedup"] for i in front], y=[pts[i]["agreement"] for i in front],
                        mode="lines", line={"color": color, "dash": "dash", "width": 1.5},
                        name=f"{method}: Pareto front", hoverinfo="skip", legendgroup=method)
        fig.add_scatter(x=[p["speedup"] for p in pts], y=[p["agreement"] for p in pts], mode="markers+text",
                        marker={"color": color, "size": 10}, name=method, legendgroup=method,
                        text=["" if p.get("threshold") is None else f"{p['threshold']:g}" for p in pts],
                        textposition="top center", textfont={"color": color, "size": 10},
                        hovertext=[_hover(method, p) for p in pts], hovertemplate="%{hovertext}<extra></extra>")
    fig.add_scatter(x=[1], y=[1], mode="markers", name="full model", hovertemplate="full model<extra></extra>",
                    marker={"symbol": "star", "size": 16, "color": METHOD_COLORS["full"]})
    fig.add_scatter(x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
                    marker={"symbol": "circle-open", "size": 24, "color": HIGHLIGHT, "line": {"width": 3}})
    fig.add_vline(x=1, line={"color": "#999999", "width": 1, "dash": "dot"})
    fig.update_layout(
        title=title or "Speed vs quality: each point one threshold (labels), dashed: Pareto fronts",
        plot_bgcolor="white", height=460, width=720, legend={"orientation": "h", "y": -0.22},
        xaxis={"title": f"speedup over the full model (wall clock, measured on {where})", "showgrid": True,
               "gridcolor": "#EEEEEE"},
        yaxis={"title": "agreement with the full model's tokens", "tickformat": ".0%", "gridcolor": "#EEEEEE"})
    if highlight is not None:
        update_pareto_highlight(fig, points, *highlight)
    return fig


def update_pareto_highlight(fig: go.Figure, points: dict[str, list[dict]], method: str, threshold: float) -> dict:
    """Move the ring of a :func:`pareto_figure` to ``method``'s point at ``threshold``; returns that point."""
    p = _point(points, method, threshold)
    with fig.batch_update() if isinstance(fig, go.FigureWidget) else contextlib.nullcontext():
        fig.data[-1].x, fig.data[-1].y = [p["speedup"]], [p["agreement"]]
        fig.data[-1].name = f"selected: {method} at {threshold:g}"
    return p


def deep_pass_sizes(trace: Trace) -> list[list[int]]:
    """Per sequence, per token: how many tokens the deep pass that ran its deep layers covered.

    A FREE deep pass runs for a non-deferred token over [the deferred tokens before it + itself]; a
    token whose deep layers never ran (deferred at the end of the output) gets 0. Tokens that ran
    all their layers at once (the prefill token, a full model) get 1.
    """
    sizes = []
    for seq in trace.tokens:
        out, pending = [], 0
        for token in seq:
            if token.deferred:
                pending += 1
                continue
            out += [pending + 1] * (pending + 1)
            pending = 0
        sizes.append(out + [0] * pending)
    return sizes


def free_token_heatmap(trace: Trace, texts: list[list[str]], reference: list[list[int]] | None = None,
                       token_ids: list[list[int]] | None = None, shallow_layer: int | None = None,
                       title: str | None = None, width: int = 64,
                       sequence_names: list[str] | None = None) -> go.Figure:
    """Generated text colored by the layers a token ran *before it was emitted* (shallow or full).

    Hover says whether its deep layers were deferred and how large the deep pass that caught them up
    was; with ``reference`` (the full model's ids) and ``token_ids``, whether it differs from the
    full model's token at the same position.
    """
    L = trace.num_steps
    layers = [[t.num_steps for t in seq] for seq in trace.tokens]
    low = shallow_layer or min([n for seq in layers for n in seq] + [L])
    sizes = deep_pass_sizes(trace)
    notes, differ = [], 0
    for s, seq in enumerate(trace.tokens):
        row = []
        for j, (token, k) in enumerate(zip(seq, sizes[s])):
            if token.deferred:
                note = (f"<b>deferred</b>: its deep layers ran later, in a pass over {k} tokens" if k
                        else "<b>deferred</b>: the output ended before a deep pass")
            else:
                note = f"deep now: one pass over {k} token{'s' if k > 1 else ''}" + (
                    f" ({k - 1} deferred + this one)" if k > 1 else "")
            if reference is not None and token_ids is not None:
                same = j < len(reference[s]) and reference[s][j] == token_ids[s][j]
                differ += not same
                note += "<br>same token as the full model" if same else "<br><b>differs</b> from the full model"
            row.append(note)
        notes.append(row)
    num = sum(map(len, layers))
    deferred = sum(t.deferred for seq in trace.tokens for t in seq)
    default = f"Layers run before each token was emitted:<br>{deferred} of {num} tokens deferred their deep layers"
    if reference is not None and token_ids is not None:
        default += f", {differ} differ from the full model"
    colorscale = [[0, ACTIVITY_COLORS["shallow"]], [1, ACTIVITY_COLORS["deep"]]]
    return text_heatmap(texts, layers, title=title or default, value_name="layers before emitting",
                        units=f"of {L}", colorscale=colorscale, zmin=low, zmax=L, fmt=".0f", width=width,
                        sequence_names=sequence_names, notes=notes)


def _replace(target: go.FigureWidget, source: go.Figure) -> None:
    """Show ``source`` in the widget ``target`` (same trace types): one batched update, no new widget."""
    with target.batch_update():
        for old, new in zip(target.data, source.data):
            props = new.to_plotly_json()
            props.pop("type", None)
            old.update(props, overwrite=True)
        target.layout.update(source.layout.to_plotly_json(), overwrite=True)


class SweepDashboard:
    """A threshold slider over precomputed runs: the run's token heatmap and its point on the Pareto plot.

    ``points``: a sweep ``{method: [points]}``; ``heatmaps``: threshold -> figure of ``method``'s run
    at that threshold (e.g. :func:`free_token_heatmap`), all with the same trace types.
    """

    def __init__(self, points: dict[str, list[dict]], heatmaps: dict[float, go.Figure], method: str = "free",
                 threshold: float | None = None, where: str = "this machine"):
        if not heatmaps:
            raise ValueError("SweepDashboard needs at least one precomputed heatmap")
        self.points, self.heatmaps, self.method, self.where = points, dict(sorted(heatmaps.items())), method, where
        thresholds = list(self.heatmaps)
        threshold = thresholds[len(thresholds) // 2] if threshold is None else threshold
        for tau in thresholds:
            _point(points, method, tau)  # fail now, not on a slider move
        self.pareto = go.FigureWidget(pareto_figure(points, (method, threshold), where=where))
        self.heatmap = go.FigureWidget(self.heatmaps[threshold])
        self.summary = widgets.HTML()
        self.slider = widgets.SelectionSlider(options=[(f"{t:g}", t) for t in thresholds], value=threshold,
                                              description=f"{method} threshold", continuous_update=True,
                                              style={"description_width": "initial"},
                                              layout=widgets.Layout(width="480px"))
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.summary, self.pareto, self.heatmap])
        self.update(threshold)

    def update(self, threshold: float) -> dict:
        """Select ``threshold``: move the ring, swap in its heatmap, rewrite the summary."""
        p = update_pareto_highlight(self.pareto, self.points, self.method, threshold)
        _replace(self.heatmap, self.heatmaps[threshold])
        layers = f", {p['mean_layers']:.1f} layers per token" if p.get("mean_layers") is not None else ""
        self.summary.value = (f"{self.method} at threshold {threshold:g}: <b>{p['speedup']:.2f}x</b> the full "
                              f"model's speed (measured on {self.where}){_model_speedups(p)}, "
                              f"<b>{p['agreement']:.1%}</b> agreement{layers}.")
        return p

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.pareto, f"<p>{self.summary.value}</p>")
        bundle["text/html"] += static_bundle(self.heatmap)["text/html"]
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

"""Figures for recursive models: which physical weights each depth step runs, and what sharing costs.

A sharing plan is data (``SharingPlan``); these figures only draw it, so the heatmap a learner reads is
the plan the model runs.
"""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..recursive.relax import RankCurves
from ..recursive.sharing import SharingPlan
from .timeline import LOOP_COLORS
from .widgets import static_bundle

UNIQUE_COLOR = "#999999"  # prelude / coda of the middle variants: run once, never shared


def _loop_colorscale(loops: int) -> list:
    """Discrete colors: 0 = unique layer (gray), k = loop k - 1 (the loop palette of the timelines)."""
    colors = [UNIQUE_COLOR] + [LOOP_COLORS[k % len(LOOP_COLORS)] for k in range(loops)]
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def sharing_figure(plans: list[SharingPlan], title: str | None = None) -> go.Figure:
    """One panel per plan: depth step (x) by physical layer (y), colored by the recursion that runs it.

    A row with several colored cells is a shared layer: the same weights run once per loop.
    """
    loops = max(p.num_recursions for p in plans)
    fig = make_subplots(rows=1, cols=len(plans), subplot_titles=[f"{p.strategy} ({p.num_physical_layers} layers)"
                                                                 for p in plans], horizontal_spacing=0.04)
    for i, plan in enumerate(plans):
        z = [[None] * plan.num_steps for _ in range(plan.num_physical_layers)]
        text = [[""] * plan.num_steps for _ in range(plan.num_physical_layers)]
        for s in plan.steps:
            z[s.layer][s.step] = 0 if s.loop is None else s.loop + 1
            role = "unique (runs once)" if s.loop is None else f"loop {s.loop}"
            text[s.layer][s.step] = (f"depth step {s.step}<br>physical layer {s.layer}<br>{role}"
                                     f"<br>stands in for original layer {s.original}")
        fig.add_heatmap(z=z, text=text, hovertemplate="%{text}<extra></extra>", zmin=-0.5, zmax=loops + 0.5,
                        colorscale=_loop_colorscale(loops), showscale=i == 0, xgap=1, ygap=1, row=1, col=i + 1,
                        colorbar={"title": "recursion", "tickvals": list(range(loops + 1)),
                                  "ticktext": ["unique"] + [f"loop {k}" for k in range(loops)]})
        fig.update_xaxes(title_text="depth step", row=1, col=i + 1)
        fig.update_yaxes(title_text="physical layer" if i == 0 else None, autorange="reversed", row=1, col=i + 1)
    p = plans[0]
    fig.update_layout(title=title or f"Sharing strategies: {p.num_layers} layers, N_r = {p.num_recursions}",
                      width=max(720, 300 * len(plans)), height=420, margin={"t": 80})
    return fig


def perplexity_figure(rows: list[dict], x: str, group: str | None, baseline: float, title: str,
                      x_title: str, log_y: bool = True) -> go.Figure:
    """Perplexity (y) by ``x`` (a row key), one colored series per ``group`` value; the original model dashed.

    ``rows``: dicts with ``x``, optional ``group`` and ``ppl`` (and ``params`` for the hover text).
    """
    fig = go.Figure()
    series: dict = {}
    for r in rows:
        series.setdefault(r.get(group) if group else "recursive", []).append(r)
    for k, (name, points) in enumerate(series.items()):
        fig.add_scatter(x=[str(r[x]) for r in points], y=[r["ppl"] for r in points], name=str(name),
                        mode="lines+markers" if not group else "markers", marker={"size": 10,
                                                                                  "color": LOOP_COLORS[k % 7]},
                        hovertext=[f"{group or 'model'} {name}, {x_title} {r[x]}: perplexity {r['ppl']:.2f}"
                                   + (f", {r['params'] / 1e6:.1f}M parameters" if "params" in r else "")
                                   for r in points], hovertemplate="%{hovertext}<extra></extra>")
    fig.add_hline(y=baseline, line_dash="dash", line_color="#000000",
                  annotation_text=f"original model: {baseline:.2f}", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="perplexity (log scale)" if log_y else "perplexity",
                      yaxis_type="log" if log_y else None, width=720, height=420,
                      legend={"title": group or "", "orientation": "h", "y": -0.25})
    return fig


def rank_figure(curves: RankCurves, rank: int, title: str | None = None) -> go.Figure:
    """Relative residual left per projection (y) by LoRA rank (x); a marker line at ``rank``."""
    fig = go.Figure()
    for k, (name, curve) in enumerate(curves.residual.items()):
        fig.add_scatter(x=list(range(len(curve))), y=curve.tolist(), mode="lines", name=name,
                        line={"color": LOOP_COLORS[k % len(LOOP_COLORS)], "dash": "solid" if k < 4 else "dot"},
                        hovertemplate=f"{name}, rank %{{x}}: %{{y:.1%}} of the weight difference left<extra></extra>")
    fig.add_vline(x=rank, line_color="#000000", line_width=2)
    fig.update_layout(title=title or rank_title(curves, rank), xaxis_title="LoRA rank (per projection, per looped step)",
                      yaxis_title="weight difference left, ‖W_l − W_shared − BA‖ / ‖W_l‖", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05], width=720, height=420, legend={"title": "projection"})
    return fig


def rank_title(curves: RankCurves, rank: int) -> str:
    return (f"LoRA rank {rank}: {curves.left(rank):.0%} of the difference to the original layers left, "
            f"{curves.lora_parameters(rank) / 1e6:.1f}M LoRA parameters")


class RankDashboard:
    """A rank slider over :func:`rank_figure`: the marker line, the title and a summary follow it.

    ``shared_params``: parameters of the shared layers the LoRA relaxes, to put its size in proportion.
    """

    def __init__(self, curves: RankCurves, shared_params: int, rank: int = 8):
        self.curves, self.shared_params = curves, shared_params
        full = curves.full_rank
        ranks = sorted({0, full, *(2 ** i for i in range(full.bit_length()) if 2 ** i < full), rank})
        self.figure = go.FigureWidget(rank_figure(curves, rank))
        self.summary = widgets.HTML()
        self.slider = widgets.SelectionSlider(options=ranks, value=rank, description="LoRA rank",
                                              continuous_update=True, style={"description_width": "initial"},
                                              layout=widgets.Layout(width="480px"))
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.summary, self.figure])
        self.update(rank)

    def update(self, rank: int) -> float:
        """Move the marker to ``rank``; returns the mean residual left there."""
        with self.figure.batch_update():
            self.figure.layout.shapes[0].update(x0=rank, x1=rank)
            self.figure.layout.title.text = rank_title(self.curves, rank)
        params = self.curves.lora_parameters(rank)
        self.summary.value = (f"rank {rank}: the LoRA adds <b>{params / 1e6:.1f}M</b> parameters, "
                              f"<b>{params / self.shared_params:.0%}</b> of the shared layers it relaxes; "
                              f"<b>{self.curves.left(rank):.0%}</b> of the weight difference to the original "
                              f"layers remains (mean over projections).")
        return self.curves.left(rank)

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.figure, f"<p>{self.summary.value}</p>")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

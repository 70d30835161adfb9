"""Mixture-of-Recursions figures: recursion depth over text, router scores per loop, the capacity
schedule, loss curves at equal FLOPs, the throughput table, and a capacity / alpha dashboard.

The dashboard's update is a plain function of (model, ids, capacity scale, alpha) -> (depths, loss), so
tests drive it without a browser.
"""
from __future__ import annotations

import contextlib
import dataclasses

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..mor.routers import capacity_schedule
from ..train.losses import next_token_targets
from .tokens import TextLayout, text_heatmap, text_heatmap_style
from .widgets import static_bundle

DEPTH_COLORSCALE = "Viridis"
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"]


def depth_over_text(texts: list[list[str]], loops, num_recursions: int, title: str | None = None,
                    width: int = 72, notes=None) -> go.Figure:
    """Each token colored by how many recursions it ran (per sequence, per token)."""
    return text_heatmap(texts, loops, title=title or "Recursions per token", value_name="recursions",
                        units=f"of {num_recursions}", colorscale=DEPTH_COLORSCALE, zmin=1, zmax=num_recursions,
                        fmt=".0f", width=width, notes=notes)


def router_histograms(model, routing) -> go.Figure:
    """Router scores per recursion: expert-choice gate ``g`` of the candidates, split by selected or not;
    token-choice probability of each depth."""
    n = model.num_recursions
    fig = make_subplots(rows=1, cols=n, subplot_titles=[f"recursion {r}" for r in range(n)], shared_yaxes=True)
    if model.kind == "expert":
        loops = routing.loops
        for r, logits in enumerate(routing.router_logits):
            gate = model.router.gate(logits.detach()).float()
            for chosen, name, color in ((True, "selected", PALETTE[0]), (False, "not selected", PALETTE[1])):
                mask = (loops > r) if chosen else (loops == r)
                fig.add_trace(go.Histogram(x=gate[mask].flatten().numpy(), name=name, marker_color=color,
                                           opacity=0.75, nbinsx=30, showlegend=r == 0, legendgroup=name),
                              row=1, col=r + 1)
        fig.update_xaxes(title_text="gate g = score(logit) x alpha")
    else:
        probs = routing.probs.detach().float()
        for r in range(n):
            fig.add_trace(go.Histogram(x=probs[..., r].flatten().numpy(), name=f"depth {r + 1}", nbinsx=30,
                                       marker_color=PALETTE[r % len(PALETTE)], showlegend=False), row=1, col=r + 1)
        fig.update_xaxes(title_text="router probability")
    fig.update_layout(barmode="overlay", height=320, width=280 * n + 120, yaxis_title="tokens",
                      title=f"Router scores per recursion ({model.kind}-choice)", plot_bgcolor="white")
    return fig


def capacity_figure(capacity: list[float], warmup_steps: int = 0, steps: int | None = None) -> go.Figure:
    """Fraction of the sequence each recursion takes over training (cosine warm-up, then the capacities)."""
    steps = steps or max(1, 2 * warmup_steps) or 1
    xs = list(range(steps + 1))
    fig = go.Figure()
    for r in range(len(capacity)):
        ys = [capacity_schedule(capacity, s, warmup_steps)[r] for s in xs]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"recursion {r}: {capacity[r]:.2f}",
                                 line={"color": PALETTE[r % len(PALETTE)], "width": 3}))
    fig.update_layout(title="Expert-choice capacity per recursion" + (" (cosine warm-up)" if warmup_steps else ""),
                      xaxis_title="training step", yaxis_title="fraction of tokens selected", height=340, width=640,
                      yaxis={"range": [0, 1.05]}, plot_bgcolor="white")
    return fig


def loss_curves(results: dict, smooth: int = 10) -> go.Figure:
    """Training loss (moving average) and validation loss against training FLOPs, one color per model."""
    fig = go.Figure()
    for i, (name, (_, r)) in enumerate(results.items()):
        color = PALETTE[i % len(PALETTE)]
        losses = np.array(r.losses)
        k = max(1, min(smooth, len(losses)))
        avg = np.convolve(losses, np.ones(k) / k, mode="valid")
        fig.add_trace(go.Scatter(x=np.array(r.flops)[k - 1:], y=avg, mode="lines", name=f"{name} (train)",
                                 line={"color": color}))
        if r.val:
            fig.add_trace(go.Scatter(x=[f for f, _ in r.val], y=[v for _, v in r.val], mode="markers",
                                     name=f"{name} (validation)", marker={"color": color, "size": 10,
                                                                         "symbol": "diamond"}))
    fig.update_layout(title="Loss at equal training FLOPs", xaxis_title="training FLOPs",
                      yaxis_title="next-token loss (nats)", height=420, width=760, plot_bgcolor="white")
    return fig


def throughput_figure(report: dict) -> go.Figure:
    """Decode tokens/s per method and batch size from a ``bench mor`` report."""
    fig = go.Figure()
    rows = report["results"]
    for i, batch in enumerate(sorted({r["batch_size"] for r in rows})):
        sel = [r for r in rows if r["batch_size"] == batch]
        fig.add_trace(go.Bar(x=[r["method"] for r in sel], y=[r["tokens_per_s"] for r in sel], name=f"batch {batch}",
                             marker_color=PALETTE[i % len(PALETTE)],
                             text=[f"{r['mean_layers']:.1f} layers" for r in sel], textposition="outside"))
    fig.update_layout(barmode="group", title="Decode throughput (text: mean layers per token)",
                      yaxis_title="tokens / s", height=400, width=780, plot_bgcolor="white")
    return fig


# -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def router_settings(model, capacity_scale: float | None = None, alpha: float | None = None):
    """Temporarily scale an expert-choice model's capacities of recursions 1.. (recursion 0 keeps the model's
    own) and/or set alpha."""
    router = model.router
    saved = router.config
    config = saved
    if capacity_scale is not None:
        config = dataclasses.replace(config, capacity=list(saved.capacity[:1]) + [
            min(1.0, c * capacity_scale) for c in saved.capacity[1:]])
    if alpha is not None:
        config = dataclasses.replace(config, alpha=alpha)
    router.config = config
    try:
        yield router.config
    finally:
        router.config = saved


@torch.no_grad()
def routed_view(model, ids: torch.Tensor, capacity_scale: float = 1.0, alpha: float | None = None):
    """(recursions per token ``[B, T]``, next-token loss) of an expert-choice model under these settings."""
    with router_settings(model, capacity_scale, alpha):
        out = model(ids, next_token_targets(ids))
    return out.routing.loops, float(out.lm_loss)


class CapacityDashboard:
    """Sliders for the capacity (a scale on recursions 1..N_r-1) and alpha of a trained expert-choice model:
    the depth of every token and the loss follow."""

    def __init__(self, model, ids: torch.Tensor, texts: list[list[str]], width: int = 72):
        if model.kind != "expert":
            raise ValueError("CapacityDashboard needs an expert-choice model (capacity and alpha are its knobs)")
        self.model, self.ids, self.n = model, ids, model.num_recursions
        self.layout = TextLayout.wrap(texts, width)
        alpha = model.router.config.alpha
        loops, loss = routed_view(model, ids)
        self.base_loss = loss
        self.figure = go.FigureWidget(depth_over_text(texts, loops.tolist(), self.n,
                                                      self._title(1.0, alpha, loops, loss), width))
        self.summary = widgets.HTML()
        slider = dict(continuous_update=False, style={"description_width": "initial"},
                      layout=widgets.Layout(width="420px"))
        self.capacity = widgets.FloatSlider(value=1.0, min=0.1, max=1.5, step=0.1, description="capacity x",
                                            **slider)
        self.alpha = widgets.FloatLogSlider(value=alpha, base=10, min=-2, max=0.5, step=0.1,
                                            description="alpha", **slider)
        for w in (self.capacity, self.alpha):
            w.observe(lambda change: self.update(self.capacity.value, self.alpha.value), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.capacity, self.alpha]), self.summary, self.figure])
        self.update(1.0, alpha)

    def _title(self, scale, alpha, loops, loss):
        return (f"capacity x{scale:.1f}, alpha {alpha:.3g}: mean {float(loops.float().mean()):.2f} recursions, "
                f"loss {loss:.3f}")

    def update(self, capacity_scale: float, alpha: float) -> tuple[torch.Tensor, float]:
        loops, loss = routed_view(self.model, self.ids, capacity_scale, alpha)
        style = text_heatmap_style(self.layout, loops.tolist(), "recursions", f"of {self.n}", DEPTH_COLORSCALE,
                                   1, self.n, fmt=".0f")
        with self.figure.batch_update():
            self.figure.data[0].z = style["z"]
            self.figure.data[0].text = style["hover"]
            self.figure.data[1].textfont.color = style["text_colors"]
            self.figure.layout.title.text = self._title(capacity_scale, alpha, loops, loss)
        self.summary.value = (f"loss {loss:.4f} ({loss - self.base_loss:+.4f} vs the trained setting); "
                              f"tokens per recursion: {[int((loops > r).sum()) for r in range(self.n)]}")
        return loops, loss

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.figure, f"<p>{self.summary.value}</p>")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle


def table(rows: list[dict], columns: list[str] | None = None):
    """Rows of dicts as an HTML table (notebooks; no pandas needed)."""
    import html

    from IPython.display import HTML
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

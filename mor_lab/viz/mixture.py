"""FREE's adaptive threshold, drawn: the two weighted Beta densities, the posterior, the grid rule.

Reads ``AdaptiveThreshold.curves()`` (and optionally the calibration pairs behind it), so the figure
shows exactly what the controller computed: where the posterior of "the shallow exit was right"
crosses ``zeta`` on the grid, and which threshold that gives. ``mixture_figure`` also takes a list of
snapshots (one per refit) and adds a plotly slider over them: it works in a static notebook too.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Okabe-Ito: wrong = vermillion, right = bluish green, posterior = blue, threshold = black.
WRONG, RIGHT, POSTERIOR, THRESHOLD = "#D55E00", "#009E73", "#0072B2", "#000000"


def _pair_histograms(pairs, weights: tuple[float, float], bins: int = 20) -> list[go.Bar]:
    """Histograms of the calibration pairs per label, scaled like the weighted densities (pi_k * density)."""
    conf = np.array([c for c, _ in pairs], dtype=float)
    ok = np.array([bool(y) for _, y in pairs], dtype=bool)
    edges = np.linspace(0, 1, bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    bars = []
    for label, mask, color, w in (("wrong", ~ok, WRONG, weights[0]), ("right", ok, RIGHT, weights[1])):
        counts, _ = np.histogram(conf[mask], bins=edges)
        height = counts / (max(1, mask.sum()) * width) * w  # a density of this label, times its weight
        bars.append(go.Bar(x=centers, y=height, width=width, name=f"pairs: shallow was {label} ({mask.sum()})",
                           marker={"color": color, "opacity": 0.25, "line": {"width": 0}},
                           hovertemplate=f"shallow {label}<br>confidence %{{x:.2f}}<extra></extra>"))
    return bars


def _mixture_traces(curves: dict, pairs=None) -> list:
    """The traces of one snapshot: [histograms], two weighted densities, posterior, grid points, threshold."""
    c = curves["confidence"]
    traces = []
    if pairs:
        total = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
        weights = (float(total(curves["wrong"], c)), float(total(curves["right"], c)))
        traces += _pair_histograms(pairs, weights)
    traces += [
        go.Scatter(x=c, y=curves["wrong"], name="π₀·Beta(a₀, b₀): shallow was wrong", line={"color": WRONG},
                   hovertemplate="confidence %{x:.2f}<br>weighted density %{y:.2f}<extra>wrong</extra>"),
        go.Scatter(x=c, y=curves["right"], name="π₁·Beta(a₁, b₁): shallow was right", line={"color": RIGHT},
                   hovertemplate="confidence %{x:.2f}<br>weighted density %{y:.2f}<extra>right</extra>"),
        go.Scatter(x=c, y=curves["posterior"], name="posterior P(right | confidence)", yaxis="y2",
                   line={"color": POSTERIOR, "width": 3},
                   hovertemplate="confidence %{x:.2f}<br>P(right) %{y:.2f}<extra></extra>"),
    ]
    above = curves["grid_posterior"] > curves["zeta"]
    traces.append(go.Scatter(
        x=curves["grid"], y=curves["grid_posterior"], yaxis="y2", mode="markers", name="grid points (filled: > ζ)",
        marker={"color": [POSTERIOR if a else "white" for a in above], "size": 10,
                "line": {"color": POSTERIOR, "width": 2}},
        hovertemplate="grid %{x:.3f}<br>P(right) %{y:.2f}<extra></extra>"))
    tau = curves["threshold"]
    traces.append(go.Scatter(x=[tau, tau], y=[0, 1], yaxis="y2", mode="lines", name=f"threshold = {tau:.3f}",
                             line={"color": THRESHOLD, "width": 2, "dash": "dash"}, hoverinfo="skip"))
    return traces


def mixture_figure(curves: dict | list[dict], pairs=None, title: str | None = None,
                   labels: list[str] | None = None) -> go.Figure:
    """The fitted Beta mixture and its posterior (right axis), with the grid rule's zeta and threshold.

    ``curves``: ``AdaptiveThreshold.curves()``, or a list of them (one per refit: a slider steps
    through them). ``pairs``: the (confidence, shallow == deep) pairs behind each snapshot (one list,
    or a list of lists with ``curves`` a list), drawn as histograms on the same scale as the densities.
    """
    if isinstance(curves, list):
        snapshots, pair_lists = curves, pairs if pairs is not None else [None] * len(curves)
    else:
        snapshots, pair_lists = [curves], [pairs]
    if not snapshots:
        raise ValueError("mixture_figure needs at least one curves() snapshot")
    if len(pair_lists) != len(snapshots):
        raise ValueError(f"got {len(pair_lists)} pair lists for {len(snapshots)} snapshots; pass one per snapshot")
    labels = labels or [f"refit {i}" for i in range(len(snapshots))]
    fig = go.Figure()
    counts = []
    for i, (snap, snap_pairs) in enumerate(zip(snapshots, pair_lists)):
        traces = _mixture_traces(snap, snap_pairs)
        counts.append(len(traces))
        for trace in traces:
            trace.visible = i == len(snapshots) - 1  # the last snapshot shows first
            fig.add_trace(trace)
    zeta = snapshots[-1]["zeta"]
    fig.add_hline(y=zeta, yref="y2", line={"color": POSTERIOR, "dash": "dot", "width": 1},
                  annotation_text=f"ζ = {zeta:g}", annotation_position="top left")
    fig.update_layout(
        title=title or _title(snapshots[-1]), barmode="overlay", plot_bgcolor="white", height=460, width=820,
        legend={"orientation": "h", "y": -0.22}, margin={"b": 140},
        xaxis={"title": "shallow-exit confidence (top-1 − top-2 probability)", "range": [0, 1], "showgrid": False},
        yaxis={"title": "weighted density π·Beta", "rangemode": "tozero", "showgrid": False},
        yaxis2={"title": "P(shallow was right)", "overlaying": "y", "side": "right", "range": [0, 1.02],
                "showgrid": False})
    if len(snapshots) > 1:
        steps, start = [], 0
        for i, n in enumerate(counts):
            visible = [False] * sum(counts)
            visible[start:start + n] = [True] * n
            start += n
            steps.append({"method": "update", "label": labels[i],
                          "args": [{"visible": visible}, {"title.text": title or _title(snapshots[i])}]})
        fig.update_layout(sliders=[{"active": len(snapshots) - 1, "steps": steps, "y": -0.42,
                                    "currentvalue": {"prefix": "showing "}}], height=560, margin={"b": 220})
    return fig


def _title(curves: dict) -> str:
    return (f"Adaptive threshold: exit when confidence > {curves['threshold']:.3f} "
            f"(smallest grid point from which P(right) stays above ζ = {curves['zeta']:g})")


def threshold_history_figure(history: list[float], num_pairs: list[int] | None = None,
                             title: str = "The adaptive threshold, refit after refit") -> go.Figure:
    """The threshold after each refit (0 = initial); with ``num_pairs``, the calibration pairs seen so far."""
    steps = list(range(len(history)))
    fig = make_subplots(specs=[[{"secondary_y": num_pairs is not None}]])
    fig.add_scatter(x=steps, y=history, mode="lines+markers", line={"shape": "hv", "color": THRESHOLD},
                    name="threshold", hovertemplate="refit %{x}<br>threshold %{y:.3f}<extra></extra>")
    if num_pairs is not None:
        if len(num_pairs) != len(history):
            raise ValueError(f"got {len(num_pairs)} pair counts for {len(history)} thresholds; pass one per entry")
        fig.add_bar(x=steps, y=num_pairs, name="calibration pairs so far", secondary_y=True,
                    marker={"color": POSTERIOR, "opacity": 0.25},
                    hovertemplate="refit %{x}<br>%{y} pairs<extra></extra>")
        fig.update_yaxes(title_text="calibration pairs", secondary_y=True, showgrid=False, rangemode="tozero")
    fig.update_yaxes(title_text="exit threshold", range=[0, 1], secondary_y=False)
    fig.update_layout(title=title, plot_bgcolor="white", height=360, width=720,
                      xaxis={"title": "refit (0 = initial threshold)", "dtick": 1},
                      legend={"orientation": "h", "y": -0.25})
    return fig

"""Which confidence measure tells a token it may stop? Analysis on real text, and notebook 01's figures.

Analysis (small, numpy): :func:`layer_measures` computes CALM's four measures
(:func:`mor_lab.early_exit.confidence`) at every layer of one full forward pass, next to the label
every exit rule tries to predict: "this layer's top-1 equals the final top-1". :func:`auroc`,
:func:`exit_curve` and :func:`exit_tradeoff` say how well a measure predicts that label, per token
and in a batch. These are teacher-forced what-ifs: every token keeps the full model's context; the
real decoders (the engine's ``CalmExit``/``StaticExit`` policies) show what changes when it does not.

Measures go by their canonical names (``CANONICAL_MEASURES``: ``softmax_max``, ``softmax_diff``, ``state``,
``meta``); the methods that take a measure also accept the old aliases (``softmax``, ``margin``).

Figures: confidence vs agreement per layer, agreement vs fraction exited, layers saved vs agreement,
CALM's decaying threshold, and a threshold slider over a precomputed trade-off.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..early_exit.confidence import CANONICAL_MEASURES, calm_threshold, canonical_measure, confidence
from .widgets import static_bundle

# Okabe-Ito colors, one per measure, the same in every figure.
MEASURE_COLORS = {"softmax_max": "#0072B2", "softmax_diff": "#E69F00", "state": "#009E73", "meta": "#CC79A7"}
AGREEMENT_COLOR = "#000000"
BATCH_DASH = "dash"
DIVERGED_COLOR = "#D55E00"  # Okabe-Ito vermillion: text after the first difference


# ---------------------------------------------------------------------------------------------------
# Analysis

@dataclass
class LayerMeasures:
    """Per exit layer and token: each measure's confidence, and whether exiting there keeps the final top-1."""

    layers: list[int]  # layers executed at each exit point
    scores: dict[str, np.ndarray]  # measure -> [exits, tokens]; NaN where the measure is unavailable
    agrees: np.ndarray  # [exits, tokens] bool: the exit's top-1 equals the full model's top-1
    trained: list[bool]  # per exit: logits read through a trained exit head (else the plain logit lens)

    @property
    def num_tokens(self) -> int:
        return self.agrees.shape[1]

    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"no measurements after {layer} layers; measured: {self.layers}")
        return self.layers.index(layer)

    def available(self, layer: int | None = None) -> list[str]:
        """Measures with values (at ``layer``, or anywhere): ``meta`` only exists where a classifier was trained."""
        rows = slice(None) if layer is None else self.row(layer)
        return [m for m in CANONICAL_MEASURES if not np.isnan(self.scores[m][rows]).all()]

    def score(self, measure: str) -> np.ndarray:
        """``[exits, tokens]`` confidences under ``measure`` (a canonical name or an alias)."""
        return self.scores[canonical_measure(measure)]

    def agreement(self) -> np.ndarray:
        """``[exits]``: fraction of tokens whose exit top-1 equals the final top-1."""
        return self.agrees.mean(1)

    def mean(self, measure: str) -> np.ndarray:
        """``[exits]``: mean confidence under ``measure`` (NaN where unavailable)."""
        s = self.score(measure)
        return np.array([np.nan if np.isnan(r).all() else float(np.nanmean(r)) for r in s])

    def auroc(self, measure: str, min_count: int = 10) -> np.ndarray:
        """``[exits]``: how well ``measure`` ranks agreeing tokens above the others (see :func:`auroc`).

        NaN where fewer than ``min_count`` tokens agree (or disagree): too few to say anything.
        """
        out = []
        for s, y in zip(self.score(measure), self.agrees):
            enough = min(y.sum(), (~y).sum()) >= min_count
            out.append(auroc(s, y) if enough else float("nan"))
        return np.array(out)


@torch.inference_mode()
def layer_measures(model, hidden: torch.Tensor, layers=None, heads=None) -> LayerMeasures:
    """CALM's four measures at each of ``layers`` (default: every layer before the last), for every token.

    ``hidden`` is the ``[steps + 1, ..., d]`` stack of ``model(ids, return_hidden=True)`` (index 0 is
    the embedding). Logits come from the plain logit lens (final norm + LM head), or through the
    trained adapter at the exits of ``heads``, which also give ``meta`` (NaN elsewhere: a meta
    classifier exists only where one was trained). ``state`` compares with the previous layer's state.
    """
    num_steps = hidden.shape[0] - 1
    h = hidden.reshape(num_steps + 1, -1, hidden.shape[-1])
    layers = list(range(1, num_steps)) if layers is None else sorted(layers)
    if not layers or layers[0] < 1 or layers[-1] >= num_steps:
        raise ValueError(f"layers must lie in 1..{num_steps - 1} (the last layer is the reference), got {layers}")
    exits = set(heads.exit_layers) if heads is not None else set()
    final = model.head(h[num_steps]).argmax(-1)
    n = h.shape[1]
    scores = {m: np.full((len(layers), n), np.nan) for m in CANONICAL_MEASURES}
    agrees = np.zeros((len(layers), n), dtype=bool)
    for i, k in enumerate(layers):
        logits = heads.logits(model, h[k], k) if k in exits else model.head(h[k])
        agrees[i] = (logits.argmax(-1) == final).cpu().numpy()
        for m in ("softmax_max", "softmax_diff"):
            scores[m][i] = confidence(m, logits=logits).cpu().numpy()
        scores["state"][i] = confidence("state", hidden=h[k], prev_hidden=h[k - 1]).cpu().numpy()
        if k in exits:
            scores["meta"][i] = confidence("meta", hidden=h[k], classifier=heads.meta[str(k)]).cpu().numpy()
    return LayerMeasures(layers, scores, agrees, [k in exits for k in layers])


def auroc(score, label) -> float:
    """Chance that a random agreeing token scores above a random disagreeing one (ties count half).

    0.5 is a coin flip, 1.0 a perfect exit signal. NaN when either class is empty (NaN scores are dropped).
    """
    s, y = np.asarray(score, dtype=float), np.asarray(label, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied values share their mean rank
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def exit_curve(score, agrees) -> tuple[np.ndarray, np.ndarray]:
    """Exit the most confident tokens first: (fraction exited, agreement among the exited) after each token.

    A perfect measure stays at 1 until every agreeing token has left; a useless one hovers at the base rate.
    """
    s, y = np.asarray(score, dtype=float), np.asarray(agrees, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    if not len(s):
        raise ValueError("no scores to rank (all NaN or empty)")
    order = np.argsort(-s, kind="stable")
    k = np.arange(1, len(s) + 1)
    return k / len(s), np.cumsum(y[order]) / k


@dataclass
class Tradeoff:
    """A threshold rule at one exit, per row and in CALM's batch semantics (arrays over ``thresholds``)."""

    thresholds: np.ndarray
    exited: np.ndarray  # fraction of tokens that leave at the exit (each row on its own)
    layers_saved: np.ndarray  # fraction of all layers skipped
    agreement: np.ndarray  # fraction of tokens equal to the full model's top-1
    batch_exited: np.ndarray  # ... when a batch leaves only if all ``batch_size`` rows are confident
    batch_layers_saved: np.ndarray
    batch_agreement: np.ndarray
    exit_layer: int
    num_layers: int
    batch_size: int

    def at(self, threshold: float) -> int:
        """Index of the grid threshold nearest ``threshold``."""
        return int(np.abs(self.thresholds - threshold).argmin())


def exit_tradeoff(score, agrees, thresholds, exit_layer: int, num_layers: int, batch_size: int = 8,
                  seed: int = 0) -> Tradeoff:
    """What a threshold on ``score`` at one exit would save and cost, per row and per batch.

    A token that exits skips ``num_layers - exit_layer`` layers, and is right when ``agrees``. In CALM's
    batch semantics a batch step exits only when every row is confident; the batches here are random
    groups of ``batch_size`` tokens (rows of a batch are different texts), drawn with ``seed``.
    """
    s, y = np.asarray(score, dtype=float), np.asarray(agrees, dtype=bool)
    if not 0 < exit_layer < num_layers:
        raise ValueError(f"exit_layer must be in 1..{num_layers - 1}, got {exit_layer}")
    if not 1 <= batch_size <= len(s):
        raise ValueError(f"batch_size must be in 1..{len(s)} (the number of tokens), got {batch_size}")
    groups = np.random.default_rng(seed).permutation(len(s))[: len(s) // batch_size * batch_size]
    groups = groups.reshape(-1, batch_size)
    skip = (num_layers - exit_layer) / num_layers
    rows = []
    for tau in thresholds:
        ok = s >= tau  # NaN scores never exit
        batch = ok[groups].all(1)
        rows.append((ok.mean(), 1 - (ok & ~y).mean(), batch.mean(), 1 - (batch[:, None] & ~y[groups]).mean()))
    exited, agreement, batch_exited, batch_agreement = np.array(rows, dtype=float).reshape(-1, 4).T
    return Tradeoff(np.asarray(thresholds, dtype=float), exited, exited * skip, agreement, batch_exited,
                    batch_exited * skip, batch_agreement, exit_layer, num_layers, batch_size)


# ---------------------------------------------------------------------------------------------------
# Figures

def layer_confidence_figure(lens: LayerMeasures, trained: LayerMeasures | None = None,
                            title: str | None = None) -> go.Figure:
    """Per layer: agreement with the final layer and each measure's mean confidence (left), and how
    well each measure predicts agreement, as AUROC (right). ``trained`` exits are drawn as diamonds."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "agreement with the final layer vs mean confidence", "does the measure predict agreement? (AUROC)"))
    x = lens.layers
    fig.add_scatter(x=x, y=lens.agreement(), name="agreement (top-1 = final)", mode="lines+markers",
                    line={"color": AGREEMENT_COLOR, "width": 3}, row=1, col=1)
    for m in lens.available():
        color = MEASURE_COLORS[m]
        fig.add_scatter(x=x, y=lens.mean(m), name=f"mean {m}", legendgroup=m, mode="lines",
                        line={"color": color}, row=1, col=1)
        fig.add_scatter(x=x, y=lens.auroc(m), name=f"{m} AUROC", legendgroup=m, showlegend=False, mode="lines",
                        line={"color": color}, row=1, col=2)
    if trained is not None:
        marker = {"symbol": "diamond", "size": 11, "line": {"color": "white", "width": 1}}
        fig.add_scatter(x=trained.layers, y=trained.agreement(), name="trained exit head", mode="markers",
                        marker={**marker, "color": AGREEMENT_COLOR}, row=1, col=1)
        for m in trained.available():
            style = {**marker, "color": MEASURE_COLORS[m]}
            fig.add_scatter(x=trained.layers, y=trained.mean(m), name=f"mean {m} (trained exit)", legendgroup=m,
                            showlegend=m == "meta", mode="markers", marker=style, row=1, col=1)
            fig.add_scatter(x=trained.layers, y=trained.auroc(m), name=f"{m} AUROC (trained exit)",
                            legendgroup=m, showlegend=False, mode="markers", marker=style, row=1, col=2)
    fig.add_hline(y=0.5, line={"color": "gray", "dash": "dot"}, row=1, col=2)
    fig.update_xaxes(title_text="layers executed")
    fig.update_yaxes(title_text="fraction / mean confidence", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="AUROC (0.5 = chance)", range=[0.3, 1.02], row=1, col=2)
    fig.update_layout(title=title or f"Confidence measures on {lens.num_tokens} tokens, layer by layer",
                      width=1000, height=440, plot_bgcolor="white", legend={"orientation": "h", "y": -0.2})
    return fig


def _thin(x: np.ndarray, y: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` points of a long curve (keeps the saved figure small)."""
    idx = np.unique(np.linspace(0, len(x) - 1, min(points, len(x))).round().astype(int))
    return x[idx], y[idx]


def exit_curves_figure(measures: LayerMeasures, layer: int, title: str | None = None) -> go.Figure:
    """At one exit: agreement among the exited tokens as more and more tokens exit, most confident first.

    An oracle (exit exactly the agreeing tokens) and a random order (the base rate) frame the measures.
    """
    i = measures.row(layer)
    y = measures.agrees[i]
    fig = go.Figure()
    frac = np.arange(1, len(y) + 1) / len(y)
    oracle = np.minimum(1.0, y.sum() / np.arange(1, len(y) + 1))
    fig.add_scatter(x=frac, y=oracle, name="oracle (knows the answer)", mode="lines",
                    line={"color": AGREEMENT_COLOR, "dash": "dot"})
    for m in measures.available(layer):
        x, curve = _thin(*exit_curve(measures.scores[m][i], y))
        fig.add_scatter(x=x, y=curve, name=f"{m} (AUROC {auroc(measures.scores[m][i], y):.2f})", mode="lines",
                        line={"color": MEASURE_COLORS[m], "width": 2.5})
    fig.add_hline(y=float(y.mean()), line={"color": "gray", "dash": "dash"},
                  annotation_text=f"random order: {y.mean():.0%}", annotation_position="bottom right")
    where = "trained exit head" if measures.trained[i] else "plain logit lens"
    fig.update_layout(
        title=title or f"Exit after {layer} layers ({where}): exit the most confident tokens first",
        width=760, height=440, plot_bgcolor="white",
        xaxis={"title": "fraction of tokens exited", "range": [0, 1], "tickformat": ".0%"},
        yaxis={"title": "agreement among exited tokens", "range": [0, 1.02], "tickformat": ".0%"})
    return fig


def saved_vs_agreement_figure(curves: dict, points: dict | None = None, title: str = "") -> go.Figure:
    """Layers saved (x) vs agreement with the full model (y): the early-exit trade-off.

    ``curves``: name -> (layers saved, agreement, thresholds) arrays, one line per rule; ``points``:
    name -> (layers saved, agreement) for single points such as the oracle. Names containing "batch"
    are dashed.
    """
    fig = go.Figure()
    palette = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9"]
    for k, (name, (saved, agree, taus)) in enumerate(curves.items()):
        fig.add_scatter(x=saved, y=agree, name=name, mode="lines+markers", customdata=np.asarray(taus),
                        line={"color": palette[k % len(palette)], "dash": BATCH_DASH if "batch" in name else "solid"},
                        hovertemplate="threshold %{customdata:.2f}<br>%{x:.1%} of layers saved"
                                      "<br>%{y:.1%} agreement<extra></extra>")
    for k, (name, (saved, agree)) in enumerate((points or {}).items()):
        fig.add_scatter(x=[saved], y=[agree], name=name, mode="markers",
                        marker={"symbol": "star", "size": 14, "color": ["#D55E00", "#000000", "#999999"][k % 3]},
                        hovertemplate="%{x:.1%} of layers saved<br>%{y:.1%} agreement<extra></extra>")
    fig.update_layout(title=title, width=760, height=440, plot_bgcolor="white",
                      xaxis={"title": "layers saved (fraction of the full model's)", "tickformat": ".0%",
                             "rangemode": "tozero"},
                      yaxis={"title": "agreement with the full model", "tickformat": ".0%", "range": [0, 1.03]})
    return fig


def calm_threshold_figure(tau: float, max_len: int, temperature: float = 4.0, used: str | None = None) -> go.Figure:
    """CALM's decaying threshold over the generated tokens of one output, in both forms of ``calm_threshold``.

    ``form="calm"`` is the CALM paper's equation, ``form="free"`` what FREE's code computes; ``used`` names
    the one a run uses (drawn thicker).
    """
    t = np.arange(1, max_len + 1)
    fig = go.Figure()
    forms = {"calm": ("CALM paper: 0.9·tau + 0.1·exp(-T·t/N)", "#0072B2"),
             "free": ("FREE's code: 0.9·tau + 0.1·tau·exp(-T·t/N)", "#E69F00")}
    for form, (name, color) in forms.items():
        y = [calm_threshold(tau, int(i), max_len, temperature, form=form) for i in t]
        fig.add_scatter(x=t, y=y, name=name + (" (used below)" if form == used else ""), mode="lines+markers",
                        line={"color": color, "width": 3.5 if form == used else 1.5})
    fig.add_hline(y=tau, line={"color": "gray", "dash": "dot"}, annotation_text=f"tau = {tau:g}")
    fig.update_layout(title=f"CALM's decaying threshold, tau = {tau:g}, T = {temperature:g}, N = {max_len}",
                      width=760, height=380, plot_bgcolor="white", legend={"orientation": "h", "y": -0.25},
                      xaxis={"title": "generated token t (1 = the first)"},
                      yaxis={"title": "threshold", "range": [0.85 * tau, max(1.02 * tau, 0.9 * tau + 0.11)]})
    return fig


def depth_grid_figure(traces: dict, title: str | None = None) -> go.Figure:
    """Layers run by every generated token (columns) of every sequence (rows), one panel per decoder.

    Teacher-forced runs of the same text line up cell by cell. Cells where a later panel ran more layers
    than the first are marked: tokens the first rule let go and this one held.
    """
    names = list(traces)
    first = traces[names[0]]
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=names)
    for k, name in enumerate(names):
        tokens = traces[name].tokens
        width = max(map(len, tokens))
        z = np.full((len(tokens), width), np.nan)
        for s, seq in enumerate(tokens):
            z[s, :len(seq)] = [t.num_steps for t in seq]
        fig.add_heatmap(z=np.where(np.isnan(z), None, z).tolist(), zmin=1, zmax=first.num_steps,
                        colorscale="Viridis", showscale=k == 0, xgap=1, ygap=1, row=k + 1, col=1,
                        colorbar={"title": {"text": "layers run"}},
                        hovertemplate="sequence %{y}, token %{x}: %{z} layers<extra>" + name + "</extra>")
        if k:
            held = [(j, s) for s, (a, b) in enumerate(zip(first.tokens, tokens))
                    for j, (x, y) in enumerate(zip(a, b)) if y.num_steps > x.num_steps]
            fig.add_scatter(x=[j for j, _ in held], y=[s for _, s in held], mode="markers", row=k + 1, col=1,
                            name=f"held here, exited in '{names[0]}'", hoverinfo="skip",
                            marker={"symbol": "x-thin", "size": 9, "line": {"width": 2, "color": "black"}})
    fig.update_yaxes(title_text="sequence", autorange="reversed", dtick=1)
    fig.update_xaxes(title_text="generated token", row=len(names), col=1)
    fig.update_layout(title=title or "Layers run by each token", plot_bgcolor="white",
                      width=max(640, 22 * max(max(map(len, t.tokens)) for t in traces.values()) + 260),
                      height=150 + 60 * sum(len(t.tokens) for t in traces.values()) + 40 * len(names),
                      legend={"orientation": "h", "y": -0.25})
    return fig


def outputs_table(tokens: dict[str, list[list[str]]], reference: str | None = None,
                  row_names: list[str] | None = None) -> str:
    """Generated outputs side by side as an HTML table: one column per method, one row per prompt.

    ``tokens``: method -> per prompt, the generated token strings. With a ``reference`` method, each
    output is shown in gray up to its first token that differs from the reference, in color after.
    """
    names = list(tokens)
    n = len(tokens[names[0]])
    row_names = row_names or [f"prompt {i}" for i in range(n)]
    cell = "<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>"

    def show(seq: list[str], ref: list[str] | None) -> str:
        split = len(seq)
        if ref is not None:
            split = next((i for i, (a, b) in enumerate(zip(seq, ref)) if a != b), min(len(seq), len(ref)))
        same, rest = escape("".join(seq[:split])), escape("".join(seq[split:]))
        return f"<span style='color:#777'>{same}</span><span style='color:{DIVERGED_COLOR}'>{rest}</span>"

    head = "".join(f"<th style='text-align:left'>{escape(m)}</th>" for m in ["", *names])
    rows = []
    for i in range(n):
        ref = tokens[reference][i] if reference is not None else None
        cells = "".join(cell + show(tokens[m][i], None if m == reference else ref) + "</td>" for m in names)
        rows.append(f"<tr>{cell}<b>{escape(row_names[i])}</b></td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


# ---------------------------------------------------------------------------------------------------
# A threshold slider over a precomputed trade-off

def tradeoff_figure(t: Tradeoff, measure: str = "margin", break_even: float | None = None) -> go.Figure:
    """Layers saved and agreement against the threshold, per row (solid) and per batch (dashed).

    ``break_even``: the exit rate below which exiting costs more than it saves (the exit test is paid by
    every token): drawn as a level line next to the fraction of tokens that exit."""
    fig = go.Figure()
    lines = [("tokens exiting, per row", t.exited, "#009E73", "solid")] if break_even is not None else []
    lines += [("layers saved, per row", t.layers_saved, "#0072B2", "solid"),
             (f"layers saved, batch of {t.batch_size}", t.batch_layers_saved, "#0072B2", BATCH_DASH),
             ("agreement, per row", t.agreement, "#D55E00", "solid"),
             (f"agreement, batch of {t.batch_size}", t.batch_agreement, "#D55E00", BATCH_DASH)]
    for name, y, color, dash in lines:
        fig.add_scatter(x=t.thresholds, y=y, name=name, mode="lines", line={"color": color, "dash": dash, "width": 2.5})
    if break_even is not None:
        fig.add_hline(y=break_even, line={"color": "#009E73", "dash": "dot"},
                      annotation_text=f"break-even exit rate {break_even:.0%}", annotation_position="top right")
    fig.add_vline(x=float(t.thresholds[0]), line={"color": "black", "width": 1})
    fig.update_layout(title=f"What a {measure} threshold at the exit after {t.exit_layer} layers saves and costs",
                      width=760, height=440, plot_bgcolor="white", legend={"orientation": "h", "y": -0.25},
                      xaxis={"title": f"{measure} threshold at the exit after {t.exit_layer} layers"},
                      yaxis={"title": "fraction", "tickformat": ".0%", "range": [0, 1.02]})
    return fig


def tradeoff_summary(t: Tradeoff, i: int, break_even: float | None = None) -> str:
    """One HTML paragraph: what threshold ``t.thresholds[i]`` does per row and per batch."""
    cost = "" if break_even is None else (
        f" The exit test is paid by every token: at {t.exited[i]:.0%} exits this is "
        f"<b>{'cheaper' if t.exited[i] > break_even else 'dearer'}</b> than full depth "
        f"(break-even {break_even:.0%}, one token at a time).")
    return (f"threshold {t.thresholds[i]:.2f}: <b>{t.exited[i]:.0%}</b> of tokens exit after {t.exit_layer} of "
            f"{t.num_layers} layers, <b>{t.layers_saved[i]:.1%} of layers saved</b> at "
            f"<b>{t.agreement[i]:.1%} agreement</b>. In CALM's batch semantics (batch of {t.batch_size}) only "
            f"{t.batch_exited[i]:.0%} of batch steps exit: {t.batch_layers_saved[i]:.1%} saved, "
            f"{t.batch_agreement[i]:.1%} agreement." + cost)


class TradeoffDashboard:
    """A threshold slider over :func:`tradeoff_figure`: a marker line and a summary follow the slider."""

    def __init__(self, tradeoff: Tradeoff, threshold: float = 0.5, measure: str = "margin",
                 break_even: float | None = None):
        self.tradeoff, self.break_even = tradeoff, break_even
        self.figure = go.FigureWidget(tradeoff_figure(tradeoff, measure, break_even))
        self.summary = widgets.HTML()
        lo, hi = float(tradeoff.thresholds.min()), float(tradeoff.thresholds.max())
        step = float(np.diff(tradeoff.thresholds).min()) if len(tradeoff.thresholds) > 1 else 0.01
        self.slider = widgets.FloatSlider(value=threshold, min=lo, max=hi, step=step, readout_format=".2f",
                                          description=f"{measure} ≥", style={"description_width": "initial"},
                                          layout=widgets.Layout(width="480px"))
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.summary, self.figure])
        self.update(threshold)

    def update(self, threshold: float) -> int:
        """Move the marker to the grid threshold nearest ``threshold``; returns its index."""
        i = self.tradeoff.at(threshold)
        x = float(self.tradeoff.thresholds[i])
        self.figure.layout.shapes[-1].update(x0=x, x1=x)
        self.summary.value = tradeoff_summary(self.tradeoff, i, self.break_even)
        return i

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.figure, f"<p>{self.summary.value}</p>")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

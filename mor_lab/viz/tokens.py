"""Per-token figures: a value painted over the generated text, and the logit lens as layers x tokens.

The text heatmap lays tokens out like a highlighted paragraph: a grid of character cells, each token
spanning as many cells as it has characters, lines wrapped at ``width``. One ``go.Heatmap`` colors the
cells (hover shows token and value) and one text ``go.Scatter`` writes the tokens on top, so a slider
only has to restyle two traces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go

from ..early_exit.lens import lens_matrices, oracle_index
from ..engine.trace import Trace

CHAR_PX, LINE_PX = 10, 24  # one character cell, one line of text
FINAL_MARKER = "#D55E00"  # Okabe-Ito vermillion: visible on every Viridis color


def token_strings(tokenizer, token_ids) -> list[str]:
    """Each token decoded on its own (what a reader sees), for labels and hover text."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


def _label(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "→").replace("\r", "")


@dataclass
class TextLayout:
    """Where each token of one or more sequences sits on a wrapped character grid."""

    labels: list[str]  # display text per token (all sequences, flattened)
    row: np.ndarray  # line of each token
    start: np.ndarray  # first character column
    stop: np.ndarray  # one past the last column
    first_rows: list[int]  # first line of each sequence
    num_rows: int
    num_cols: int

    @classmethod
    def wrap(cls, texts: list[list[str]], width: int = 64) -> "TextLayout":
        """Lay out ``texts`` (per sequence, per token strings); a blank line separates sequences."""
        labels, rows, starts, first_rows = [], [], [], []
        row = 0
        for tokens in texts:
            first_rows.append(row)
            col = 0
            for text in tokens:
                label = _label(text) or " "
                if col > 0 and col + len(label) > width:
                    row, col = row + 1, 0
                labels.append(label)
                rows.append(row)
                starts.append(col)
                col += len(label)
                if "\n" in text:
                    row, col = row + 1, 0
            row += 2 if col > 0 else 1
        start = np.array(starts, dtype=int)
        stop = start + np.array([len(s) for s in labels], dtype=int)
        num_cols = max([width] + stop.tolist())
        return cls(labels, np.array(rows, dtype=int), start, stop, first_rows, max(row - 1, 1), num_cols)

    def cells(self) -> np.ndarray:
        """``[rows, cols]`` index of the token in each character cell (-1 for empty cells)."""
        index = np.full((self.num_rows, self.num_cols), -1)
        for k, (r, a, b) in enumerate(zip(self.row, self.start, self.stop)):
            index[r, a:b] = k
        return index


def _gaps(a: np.ndarray) -> list:
    """NaN -> None: plotly draws a gap for either, but only None survives a widget's JSON message."""
    return np.where(np.isnan(a), None, a).tolist()


def _flat(values) -> np.ndarray:
    if len(values) and np.ndim(values[0]) > 0:  # per-sequence arrays
        return np.concatenate([np.asarray(v, dtype=float) for v in values])
    return np.asarray(values, dtype=float)


def _text_colors(values: np.ndarray, colorscale, zmin: float, zmax: float) -> list[str]:
    """Black or white text, whichever reads better on each token's cell color."""
    scaled = np.clip((values - zmin) / ((zmax - zmin) or 1.0), 0, 1)
    colors = pc.sample_colorscale(colorscale, np.nan_to_num(scaled).tolist())
    rgb = np.array([pc.unlabel_rgb(c) for c in colors]).reshape(-1, 3)
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    return ["black" if y > 140 else "white" for y in luminance]


def text_heatmap_style(layout: TextLayout, values, value_name: str, units: str, colorscale, zmin: float,
                       zmax: float, fmt: str = ".2f", notes=None) -> dict:
    """The data a text heatmap shows for ``values``: heatmap z and hover, label colors."""
    v = _flat(values)
    if len(v) != len(layout.labels):
        raise ValueError(f"got {len(v)} values for {len(layout.labels)} tokens; pass one value per token")
    extra = [f"<br>{n}" for seq in notes for n in seq] if notes is not None else [""] * len(v)
    index = layout.cells()
    hover = [f"{s!r}<br>{value_name}: {x:{fmt}} {units}".strip() + e for s, x, e in zip(layout.labels, v, extra)]
    hover = np.array(hover + [""], dtype=object)  # empty cells (index -1) pick up the last, empty, entry
    return {"z": _gaps(np.where(index >= 0, v[index], np.nan)), "hover": hover[index].tolist(),
            "text_colors": _text_colors(v, colorscale, zmin, zmax)}


def text_heatmap(texts: list[list[str]], values, *, title: str, value_name: str, units: str = "",
                 colorscale="Viridis", zmin: float | None = None, zmax: float | None = None, fmt: str = ".2f",
                 width: int = 64, sequence_names: list[str] | None = None, notes=None) -> go.Figure:
    """Tokens as wrapped text, each cell colored by its value (depth, confidence, exit layer...).

    ``texts``, ``values`` and the optional hover ``notes`` are per sequence, per token. Returns a
    Figure with two traces: the heatmap (index 0) and the token labels (index 1).
    """
    layout = TextLayout.wrap(texts, width)
    v = _flat(values)
    zmin = float(np.nanmin(v)) if zmin is None else zmin
    zmax = float(np.nanmax(v)) if zmax is None else zmax
    style = text_heatmap_style(layout, values, value_name, units, colorscale, zmin, zmax, fmt, notes)
    colorbar = f"{value_name}<br>({units})" if units else value_name
    heat = go.Heatmap(z=style["z"], text=style["hover"], hovertemplate="%{text}<extra></extra>",
                      colorscale=colorscale, zmin=zmin, zmax=zmax, ygap=4, colorbar={"title": {"text": colorbar}})
    lead = np.array([len(s) - len(s.lstrip()) for s in layout.labels])
    trail = np.array([len(s) - len(s.rstrip()) for s in layout.labels])
    labels = go.Scatter(x=(layout.start + lead + layout.stop - trail - 1) / 2, y=layout.row,
                        text=[s.strip() for s in layout.labels], mode="text", hoverinfo="skip", showlegend=False,
                        textfont={"family": "monospace", "size": 13, "color": style["text_colors"]})
    names = sequence_names or [f"seq {i}" for i in range(len(texts))]
    fig = go.Figure([heat, labels])
    fig.update_layout(
        title=title, plot_bgcolor="white", width=max(560, layout.num_cols * CHAR_PX + 220),
        height=layout.num_rows * LINE_PX + 170, margin={"l": 70, "r": 20, "t": 60 + 22 * title.count("<br>"), "b": 60},
        xaxis={"title": "generated text (hover a token for its value)",
               "showticklabels": False, "showgrid": False, "zeroline": False,
               "range": [-0.5, layout.num_cols - 0.5]},
        yaxis={"title": "sequence", "autorange": "reversed", "tickvals": layout.first_rows, "ticktext": names,
               "showgrid": False, "zeroline": False})
    return fig


def lens_heatmap(trace: Trace, seq: int, labels: list[str], top1_labels: list[list[str]] | None = None,
                 title: str | None = None) -> go.Figure:
    """Logit lens of one sequence: confidence after each layer (y) for each generated token (x).

    A marker shows the first layer whose top-1 equals the final prediction (the oracle exit).
    ``top1_labels[j][i]``, if given, names token j's top-1 after its i-th step in the hover text.
    """
    conf, match = lens_matrices(trace, seq)
    steps, n = conf.shape
    tokens = trace.tokens[seq]
    hover = np.full((steps, n), "", dtype=object)
    for j, token in enumerate(tokens):
        for i, s in enumerate(token.steps):
            guess = f"<br>top-1 here: {top1_labels[j][i]!r}" if top1_labels else ""
            hover[s, j] = (f"token {j}: {labels[j]!r}<br>after layer {s + 1}: confidence {conf[s, j]:.2f}{guess}"
                           f"<br>top-1 = final: {'yes' if match[s, j] else 'no'}")
    layers = np.arange(1, steps + 1)
    heat = go.Heatmap(z=_gaps(conf), x=np.arange(n), y=layers, zmin=0, zmax=1, colorscale="Viridis", text=hover,
                      hovertemplate="%{text}<extra></extra>",
                      colorbar={"title": {"text": "confidence<br>(top-1 prob.)"}})
    exits = [t.steps[oracle_index(t)] + 1 for t in tokens]
    marker = go.Scatter(x=np.arange(n), y=exits, mode="markers", name="first layer where top-1 = final token",
                        marker={"symbol": "star", "size": 11, "color": FINAL_MARKER,
                                "line": {"color": "white", "width": 1}},
                        hovertemplate="oracle exit: layer %{y}<extra></extra>")
    fig = go.Figure([heat, marker])
    fig.update_layout(
        title=title or f"Logit lens, sequence {seq}: how sure is each layer of the token it will emit?",
        width=max(640, 26 * n + 260), height=560, legend={"orientation": "h", "y": -0.32}, plot_bgcolor="white",
        xaxis={"title": "generated token", "range": [-0.5, n - 0.5], "tickvals": list(range(n)),
               "ticktext": [_label(s) for s in labels], "tickangle": -60},
        yaxis={"title": "layers executed (depth step + 1)", "range": [0.5, steps + 0.5]})
    return fig

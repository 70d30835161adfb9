"""ipywidgets dashboards: a slider moves a threshold, the figure and the summary follow in place.

Update functions are plain functions of (figure, data, threshold) so tests can drive them without a
browser; the dashboard only wires a slider to them. Live outputs (the dashboard, ``show(fig,
live=True)``) carry a static copy of the figure in the same output, for viewers without a widget
manager (nbviewer, VS Code without a kernel).
"""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio
from IPython.display import display

from ..early_exit.lens import ExitSummary, batched_layers_saved, oracle_exits, threshold_exits
from ..engine.trace import Trace
from .tokens import TextLayout, text_heatmap, text_heatmap_style

EXIT_COLORSCALE = "Viridis"
VALUE_NAME = "layers executed"


def static_bundle(fig: go.Figure, html_prefix: str = "") -> dict:
    """Plotly JSON (JupyterLab, VS Code) and CDN-backed HTML (nbviewer) renderings of ``fig``."""
    fig = go.Figure(fig)
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    bundle["text/html"] = html_prefix + pio.to_html(fig, include_plotlyjs="cdn", full_html=False)
    return bundle


def show(fig: go.Figure, live: bool = False) -> None:
    """Display ``fig``; ``live=True`` as a FigureWidget that Python can update in place.

    The default is plotly's own output: hover, zoom and pan work, and it is saved with the notebook
    (a few tens of kB). A live FigureWidget also carries the static copy for viewers without a widget
    manager; note that a notebook that saves widget state stores ~5 MB of plotly.js per FigureWidget.
    """
    bundle = static_bundle(fig)
    if live:
        widget = fig if isinstance(fig, go.FigureWidget) else go.FigureWidget(fig)
        bundle.update(widget._repr_mimebundle_())  # the live view wins where a widget manager runs
    display(bundle, raw=True)


def summary_text(summary: ExitSummary, oracle: ExitSummary | None = None) -> str:
    """One HTML paragraph: what the threshold saves per token, in a batch, and what an oracle would."""
    line = (f"threshold {summary.threshold:.2f}: {summary.mean_layers:.1f} layers per token on average, "
            f"<b>{summary.layers_saved:.1%} of layers saved</b>, <b>{summary.agreement:.1%} agreement</b> "
            f"with the full model; a batch that waits for its deepest token saves only "
            f"{batched_layers_saved(summary):.1%}")
    if oracle is not None:
        line += f". An oracle that knew the answer would save {oracle.layers_saved:.1%} at 100% agreement"
    return line + "."


def exit_heatmap(trace: Trace, texts: list[list[str]], threshold: float, width: int = 64,
                 sequence_names: list[str] | None = None) -> go.Figure:
    """Generated text colored by the layer at which each token would exit under ``threshold``."""
    summary = threshold_exits(trace, threshold)
    return text_heatmap(texts, summary.layers, title=_exit_title(summary), value_name=VALUE_NAME,
                        units=f"of {trace.num_steps}", colorscale=EXIT_COLORSCALE, zmin=1, zmax=trace.num_steps,
                        fmt=".0f", width=width, sequence_names=sequence_names, notes=_agreement_notes(summary))


def _agreement_notes(summary: ExitSummary) -> list[list[str]]:
    return [["same token as the full model" if a else "<b>a different token</b> than the full model"
             for a in seq] for seq in summary.agrees]


def _exit_title(summary: ExitSummary) -> str:
    return (f"Exit layer per token at confidence threshold {summary.threshold:.2f}: "
            f"{summary.layers_saved:.0%} of layers saved, {summary.agreement:.0%} agreement")


def update_exit_heatmap(fig: go.Figure, trace: Trace, layout: TextLayout, threshold: float,
                        summary_html: widgets.HTML | None = None) -> ExitSummary:
    """Recolor an ``exit_heatmap`` (in place, one batched update) for a new ``threshold``."""
    summary = threshold_exits(trace, threshold)
    style = text_heatmap_style(layout, summary.layers, VALUE_NAME, f"of {trace.num_steps}", EXIT_COLORSCALE,
                               1, trace.num_steps, fmt=".0f", notes=_agreement_notes(summary))
    with fig.batch_update():
        fig.data[0].z = style["z"]
        fig.data[0].text = style["hover"]
        fig.data[1].textfont.color = style["text_colors"]
        fig.layout.title.text = _exit_title(summary)
    if summary_html is not None:
        summary_html.value = summary_text(summary, oracle_exits(trace))
    return summary


class ThresholdDashboard:
    """A confidence-threshold slider over the exit-layer text heatmap and a savings summary."""

    def __init__(self, trace: Trace, texts: list[list[str]], threshold: float = 0.5, width: int = 64,
                 sequence_names: list[str] | None = None):
        self.trace, self.layout = trace, TextLayout.wrap(texts, width)
        self.figure = go.FigureWidget(exit_heatmap(trace, texts, threshold, width, sequence_names))
        self.summary = widgets.HTML()
        self.slider = widgets.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.05, readout_format=".2f",
                                          description="confidence ≥", continuous_update=True,
                                          style={"description_width": "initial"},
                                          layout=widgets.Layout(width="480px"))
        self.slider.observe(lambda change: self.update(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.summary, self.figure])
        self.update(threshold)

    def update(self, threshold: float) -> ExitSummary:
        return update_exit_heatmap(self.figure, self.trace, self.layout, threshold, self.summary)

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.figure, f"<p>{self.summary.value}</p>")
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

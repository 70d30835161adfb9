"""Why ragged attention: the KV bytes a decode step reads with padding and without, for a CDB-like batch.

In decode, attention is memory bound (one query per slot, each cached key and value read once), so the
bytes read are the time. Padded attention reads every slot up to the longest one; a ragged kernel
(``mor_lab.kernels.attention``) stops each slot at its own length.
"""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch

from .widgets import static_bundle

SMOLLM2_ATTENTION = {"kv_heads": 3, "head_dim": 64, "bytes_per": 2}  # SmolLM2-135M in bf16


def decode_kv_bytes(lengths: torch.Tensor, kv_heads: int, head_dim: int, bytes_per: int) -> tuple[int, int]:
    """Bytes of keys + values one layer's decode step reads: (padded to the longest slot, ragged)."""
    per_position = 2 * kv_heads * head_dim * bytes_per
    return per_position * len(lengths) * int(lengths.max()), per_position * int(lengths.sum())


def request_lengths(slots: int, shortest: int, longest: int, seed: int = 3) -> torch.Tensor:
    """Cache lengths of ``slots`` requests, uniform in ``[shortest, longest]`` (the same draw for a seed)."""
    return torch.randint(shortest, longest + 1, (slots,), generator=torch.Generator().manual_seed(seed))


def ragged_title(lengths: torch.Tensor, attention: dict = SMOLLM2_ATTENTION) -> str:
    padded, ragged = decode_kv_bytes(lengths, **attention)
    return (f"{len(lengths)} slots, KV read per layer and decode step: padded attention {padded / 2**20:.1f} MiB,<br>"
            f"the ragged kernel {ragged / 2**20:.1f} MiB ({padded / ragged:.2f}x less)")


def ragged_figure(lengths: torch.Tensor, attention: dict = SMOLLM2_ATTENTION) -> go.Figure:
    """One bar per batch slot: the positions a ragged kernel reads, over what padding reads (gray)."""
    slots, longest = list(range(len(lengths))), int(lengths.max())
    fig = go.Figure([
        go.Bar(x=slots, y=[longest] * len(slots), name="padded: read", marker_color="#bbbbbb",
               hovertemplate="slot %{x}: padding reads %{y} positions<extra></extra>"),
        go.Bar(x=slots, y=lengths.tolist(), name="ragged: read", marker_color="#0072B2",
               hovertemplate="slot %{x}: its cache holds %{y} positions<extra></extra>")])
    fig.update_layout(barmode="overlay", title=ragged_title(lengths, attention), xaxis_title="batch slot",
                      yaxis_title="cache positions read", width=720, height=380, margin={"t": 90},
                      legend={"orientation": "h", "y": -0.25})
    return fig


class RaggedDashboard:
    """Sliders for the batch size and the shortest request: the bars and the bytes saved follow."""

    def __init__(self, slots: int = 16, shortest: int = 20, longest: int = 2048,
                 attention: dict = SMOLLM2_ATTENTION):
        self.longest, self.attention = longest, attention
        self.figure = go.FigureWidget(ragged_figure(request_lengths(slots, shortest, longest), attention))
        style, layout = {"description_width": "initial"}, widgets.Layout(width="480px")
        self.slots = widgets.IntSlider(value=slots, min=1, max=64, description="batch slots", style=style,
                                       layout=layout)
        self.shortest = widgets.IntSlider(value=shortest, min=1, max=longest, step=1,
                                          description="shortest request (positions)", style=style, layout=layout)
        for slider in (self.slots, self.shortest):
            slider.observe(lambda _: self.update(self.slots.value, self.shortest.value), names="value")
        self.widget = widgets.VBox([self.slots, self.shortest, self.figure])

    def update(self, slots: int, shortest: int) -> float:
        """Redraw for a new batch; returns how many times fewer bytes the ragged kernel reads."""
        lengths = request_lengths(slots, shortest, self.longest)
        with self.figure.batch_update():
            self.figure.data[0].update(x=list(range(slots)), y=[int(lengths.max())] * slots)
            self.figure.data[1].update(x=list(range(slots)), y=lengths.tolist())
            self.figure.layout.title.text = ragged_title(lengths, self.attention)
        padded, ragged = decode_kv_bytes(lengths, **self.attention)
        return padded / ragged

    def _repr_mimebundle_(self, **kwargs):
        bundle = static_bundle(self.figure)
        bundle.update(self.widget._repr_mimebundle_(**kwargs))
        return bundle

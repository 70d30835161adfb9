"""Batch utilization timeline: what every batch slot did at every engine step.

Drawn as horizontal bars (one per busy or idle cell), one trace per activity label, so the legend
names each activity and the colors stay fixed from notebook to notebook.
"""
from __future__ import annotations

import plotly.graph_objects as go

from ..engine.trace import IDLE, Trace

# Okabe-Ito colors (safe for the common color-vision deficiencies); idle is a pale gray.
ACTIVITY_COLORS = {
    "prefill": "#E69F00",  # orange
    "decode": "#0072B2",  # blue
    "shallow": "#56B4E9",  # sky blue
    "deep": "#009E73",  # bluish green
    IDLE: "#E5E5E5",  # pale gray: clearly "nothing here"
}
LOOP_COLORS = ["#56B4E9", "#009E73", "#CC79A7", "#D55E00", "#F0E442", "#0072B2", "#000000"]
OTHER_COLORS = ["#CC79A7", "#D55E00", "#F0E442", "#000000", "#999999"]


def activity_color(label: str, order: int = 0) -> str:
    """The fixed color of an activity label; ``"loop k"`` cycles through the loop palette."""
    if label in ACTIVITY_COLORS:
        return ACTIVITY_COLORS[label]
    if label.startswith("loop "):
        try:
            return LOOP_COLORS[int(label.split()[1]) % len(LOOP_COLORS)]
        except ValueError:
            pass
    return OTHER_COLORS[order % len(OTHER_COLORS)]


def utilization_timeline(trace: Trace, title: str | None = None, kinds: tuple[str, ...] | None = None) -> go.Figure:
    """Engine steps (x) by batch slots (y), colored by activity; the title reports utilization.

    ``kinds`` keeps only engine steps of those kinds (e.g. ``("decode",)``), as ``trace.utilization`` does.
    """
    steps = [(i, s) for i, s in enumerate(trace.engine_steps) if not kinds or s.kind in kinds]
    cells: dict[str, tuple[list, list, list]] = {}
    for i, step in steps:
        for slot, (label, seq) in enumerate(zip(step.activity, step.sequences)):
            xs, ys, hover = cells.setdefault(label, ([], [], []))
            xs.append(i)
            ys.append(slot)
            who = "nothing" if seq is None else f"sequence {seq}"
            hover.append(f"engine step {i} ({step.kind}, {step.tokens} tokens)<br>slot {slot}: {label}, {who}")
    labels = [a for a in cells if a != IDLE] + [IDLE] * (IDLE in cells)  # first seen first, idle last
    fig = go.Figure()
    for k, label in enumerate(labels):
        xs, ys, hover = cells[label]
        fig.add_bar(x=[1] * len(xs), base=[x - 0.5 for x in xs], y=ys, orientation="h", name=label, width=0.85,
                    marker={"color": activity_color(label, k), "line": {"width": 0}}, hovertext=hover,
                    hovertemplate="%{hovertext}<extra></extra>")
    slots = max((len(s.activity) for _, s in steps), default=0)
    util = trace.utilization(kinds)
    fig.update_layout(
        title=title or f"Batch utilization: {util:.0%} of slot-steps did useful work",
        barmode="overlay", bargap=0, plot_bgcolor="white", legend={"title": {"text": "activity"}},
        height=max(260, 46 * slots + 160), width=max(640, 14 * len(steps) + 260),
        xaxis={"title": "engine step (0 = prefill)", "range": [-0.6, len(trace.engine_steps) - 0.4],
               "showgrid": False, "zeroline": False},
        yaxis={"title": "batch slot", "tickvals": list(range(slots)), "autorange": "reversed", "showgrid": False})
    return fig

"""The cost of a token, drawn from the engine's calibrated cost model (``mor_lab.engine.cost``).

Three pictures every notebook can put next to a measured speedup:

- :func:`pass_cost_figure`: what one pass over a layer, and one LM-head call, cost as the rows grow
  (flat = memory-bound: the weights are read once whatever the rows);
- :func:`token_cost_figure`: what one token costs at batch B, split into its layers, its head call
  and (for a logit-based early exit) its exit test;
- :func:`run_cost_figure`: for engine runs, the measured time beside the cost model's prediction
  (split by kind of pass: the per-step cost breakdown) and the ideal of the same work.

:func:`run_cost_table` is the same as text rows, for printing.
"""
from __future__ import annotations

import plotly.graph_objects as go

KIND_COLORS = {"layer": "#0072B2", "prefill": "#E69F00", "head": "#D55E00", "test": "#CC79A7",
               "propagate": "#009E73", "router": "#56B4E9", "classifier": "#56B4E9", "gather": "#F0E442",
               "bookkeeping": "#999999"}
KIND_NAMES = {"layer": "layer passes", "prefill": "prefill", "head": "LM-head calls", "test": "exit tests",
              "propagate": "state propagation", "router": "router", "classifier": "exit classifier",
              "gather": "gathered KV reads (tokens at different depths)", "bookkeeping": "engine bookkeeping"}


def pass_cost_figure(cost, max_rows: int = 64, title: str | None = None) -> go.Figure:
    """Milliseconds of one layer pass and one head call against rows (measured on this machine)."""
    rows = [r for r in range(1, max_rows + 1)]
    fig = go.Figure()
    fig.add_scatter(x=rows, y=[cost.layer(r) * 1e3 for r in rows], name="one layer pass", mode="lines",
                    line={"color": KIND_COLORS["layer"]})
    fig.add_scatter(x=rows, y=[cost.head(r) * 1e3 for r in rows], name="one LM-head call", mode="lines",
                    line={"color": KIND_COLORS["head"]})
    fig.add_scatter(x=rows, y=[cost.layer(1) * 1e3 * r for r in rows], name="layer pass if cost grew with rows",
                    mode="lines", line={"color": KIND_COLORS["layer"], "dash": "dot"})
    top = max(cost.head(max_rows), cost.layer(max_rows)) * 1e3 * 1.3
    fig.update_layout(title=title or f"What a pass costs here ({cost.device}, {cost.dtype}, {cost.threads} threads)",
                      xaxis_title="rows (tokens) in the pass", yaxis_title="milliseconds", yaxis_range=[0, top],
                      width=760, height=420, plot_bgcolor="white", legend={"x": 0.02, "y": 0.98})
    return fig


def token_costs(cost, slots: int, exit_test: bool = False) -> dict[str, float]:
    """Milliseconds one token costs at batch ``slots`` at full depth: its layers, its head call, its test."""
    out = {"layers": cost.num_steps * cost.layer(slots) / slots * 1e3, "LM head": cost.head(slots) / slots * 1e3}
    if exit_test:
        out["exit test"] = cost.test(slots) / slots * 1e3
    return out


def token_cost_figure(cost, slots=(1, 4, 8, 16, 32), exit_test: bool = False, title: str | None = None) -> go.Figure:
    """Stacked bars: the per-token cost of a full-depth token at each batch size."""
    parts = [token_costs(cost, b, exit_test) for b in slots]
    fig = go.Figure()
    colors = {"layers": KIND_COLORS["layer"], "LM head": KIND_COLORS["head"], "exit test": KIND_COLORS["test"]}
    for name in parts[0]:
        fig.add_bar(x=[f"batch {b}" for b in slots], y=[p[name] for p in parts], name=name,
                    marker_color=colors[name],
                    hovertext=[f"{name}: {p[name]:.2f} ms of {sum(p.values()):.2f} ms ({p[name] / sum(p.values()):.0%})"
                               for p in parts], hovertemplate="%{hovertext}<extra></extra>")
    fig.update_layout(barmode="stack", title=title or "What one token costs at full depth, by batch size",
                      yaxis_title="milliseconds per token", width=760, height=420, plot_bgcolor="white")
    return fig


def run_cost_table(cost, runs: dict, reference: str | None = None) -> list[dict]:
    """One row per run (``name -> Trace``): measured s, predicted s, ideal s; with a reference run, the
    measured speedup, the ideal speedup and the fraction of it reached."""
    rows = []
    ref = runs[reference] if reference is not None else None
    for name, trace in runs.items():
        row = {"run": name, "measured_s": trace.seconds, "predicted_s": cost.predict(trace),
               "ideal_s": cost.ideal(trace), "passes": trace.pass_counts()}
        if ref is not None:
            row["speedup"] = ref.seconds / trace.seconds
            row["ideal_speedup"] = cost.ideal(ref) / cost.ideal(trace)
            row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
        rows.append(row)
    return rows


def run_cost_figure(cost, runs: dict, title: str | None = None) -> go.Figure:
    """Per run: the measured time, the prediction stacked by kind of pass, and the ideal (perfect schedule)."""
    names = list(runs)
    breakdowns = {n: cost.breakdown(t) for n, t in runs.items()}
    kinds = [k for k in KIND_NAMES if any(k in b for b in breakdowns.values())]
    fig = go.Figure()
    base = [0.0] * len(names)
    for kind in kinds:  # stacked by hand (explicit bases) so the measured bar can stand beside the stack
        heights = [breakdowns[n].get(kind, 0.0) for n in names]
        fig.add_bar(x=names, y=heights, base=list(base), name=KIND_NAMES[kind], marker_color=KIND_COLORS[kind],
                    offsetgroup="predicted", hovertemplate=f"{KIND_NAMES[kind]}: %{{y:.3f}} s (predicted)<extra></extra>")
        base = [b + h for b, h in zip(base, heights)]
    fig.add_bar(x=names, y=[runs[n].seconds for n in names], name="measured", marker_color="#000000",
                offsetgroup="measured", hovertemplate="measured: %{y:.3f} s<extra></extra>")
    fig.add_scatter(x=names, y=[cost.ideal(runs[n]) for n in names], name="ideal (every pass full)", mode="markers",
                    marker={"symbol": "diamond", "size": 12, "color": "#F0E442", "line": {"width": 1}},
                    hovertemplate="ideal: %{y:.3f} s<extra></extra>")
    fig.update_layout(barmode="group", title=title or "Measured time, the cost model's prediction by kind of pass, "
                                                         "and the ideal", yaxis_title="seconds", width=820, height=440,
                      plot_bgcolor="white")
    return fig

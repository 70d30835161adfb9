"""FREE figures (Beta mixture, threshold history, Pareto, deferred tokens, sweep dashboard) on synthetic data."""
import numpy as np
import plotly.graph_objects as go
import pytest

from mor_lab.early_exit.threshold import AdaptiveThreshold
from mor_lab.engine.trace import TokenTrace, Trace
from mor_lab.viz.mixture import mixture_figure, threshold_history_figure
from mor_lab.viz.pareto import (SweepDashboard, deep_pass_sizes, free_token_heatmap, pareto_figure,
                                update_pareto_highlight)


def fitted_threshold(seed=0) -> tuple[AdaptiveThreshold, list]:
    """A controller refitted on separable pairs: wrong exits near 0.2, right ones near 0.8."""
    rng = np.random.default_rng(seed)
    conf = np.concatenate([rng.beta(2, 8, 40), rng.beta(8, 2, 60)])
    labels = np.array([False] * 40 + [True] * 60)
    adaptive = AdaptiveThreshold()
    adaptive.observe(conf, labels)
    adaptive.refit()
    return adaptive, list(zip(conf.tolist(), labels.tolist()))


def test_mixture_figure_draws_the_controllers_numbers():
    adaptive, pairs = fitted_threshold()
    curves = adaptive.curves()
    fig = mixture_figure(curves, pairs)
    names = [t.name for t in fig.data]
    assert any("wrong" in n for n in names) and any("right" in n for n in names)
    posterior = next(t for t in fig.data if t.name.startswith("posterior"))
    np.testing.assert_allclose(posterior.y, curves["posterior"])
    threshold = fig.data[-1]
    assert list(threshold.x) == [adaptive.threshold] * 2 and f"{adaptive.threshold:.3f}" in threshold.name
    grid = next(t for t in fig.data if t.name.startswith("grid"))
    filled = [c != "white" for c in grid.marker.color]
    assert filled == (curves["grid_posterior"] > curves["zeta"]).tolist()
    assert str(adaptive.threshold)[:4] in fig.layout.title.text


def test_mixture_histograms_are_scaled_like_the_weighted_densities():
    adaptive, pairs = fitted_threshold()
    fig = mixture_figure(adaptive.curves(), pairs)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 2
    width = bars[0].width
    areas = [float(np.sum(b.y) * width) for b in bars]
    np.testing.assert_allclose(areas, adaptive.mixture.weights, atol=0.02)  # area = label weight


def test_mixture_slider_steps_through_snapshots():
    adaptive = AdaptiveThreshold()
    snapshots = [adaptive.curves()]
    fitted, pairs = fitted_threshold()
    snapshots.append(fitted.curves())
    fig = mixture_figure(snapshots, [[], pairs], labels=["initial", "after pairs"])
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["initial", "after pairs"]
    for step in steps:
        visible = step.args[0]["visible"]
        assert len(visible) == len(fig.data) and any(visible)
    shown = [t.visible for t in fig.data]
    assert shown == steps[-1].args[0]["visible"]  # the last snapshot is shown first
    with pytest.raises(ValueError, match="one per snapshot"):
        mixture_figure(snapshots, [pairs])


def test_threshold_history_figure():
    fig = threshold_history_figure([0.9, 0.3, 0.5667], num_pairs=[0, 12, 40])
    assert list(fig.data[0].y) == [0.9, 0.3, 0.5667] and list(fig.data[1].y) == [0, 12, 40]
    assert len(threshold_history_figure([0.9]).data) == 1
    with pytest.raises(ValueError, match="one per entry"):
        threshold_history_figure([0.9, 0.3], num_pairs=[0])


SWEEP = {
    "free": [{"threshold": 0.2, "speedup": 1.3, "agreement": 0.4, "mean_layers": 22.0},
             {"threshold": 0.5, "speedup": 1.1, "agreement": 0.8, "mean_layers": 26.0},
             {"threshold": 0.8, "speedup": 0.9, "agreement": 0.7, "mean_layers": 28.0}],  # dominated
    "calm": [{"threshold": 0.2, "speedup": 1.0, "agreement": 0.9},
             {"threshold": 0.5, "speedup": 0.95, "agreement": 0.97}],
}


def test_pareto_figure_fronts_and_highlight():
    fig = pareto_figure(SWEEP, highlight=("free", 0.5), where="a test")
    front = next(t for t in fig.data if t.name == "free: Pareto front")
    assert list(front.x) == [1.1, 1.3] and list(front.y) == [0.8, 0.4]  # 0.8 is dominated, sorted by speed
    calm = next(t for t in fig.data if t.name == "calm")
    assert list(calm.text) == ["0.2", "0.5"]
    assert list(fig.data[-1].x) == [1.1] and list(fig.data[-1].y) == [0.8]
    assert "a test" in fig.layout.xaxis.title.text
    p = update_pareto_highlight(fig, SWEEP, "calm", 0.2)
    assert p["agreement"] == 0.9 and list(fig.data[-1].x) == [1.0]
    with pytest.raises(ValueError, match="no 'calm' point at threshold 0.7"):
        update_pareto_highlight(fig, SWEEP, "calm", 0.7)


def free_trace() -> Trace:
    """Sequence 0: full (prefill), deferred, deferred, deep (pass of 3), deferred (never caught up).
    Sequence 1: full, deep (pass of 1)."""
    full, shallow = list(range(4)), list(range(2))
    seq0 = [TokenTrace(1, full), TokenTrace(2, shallow, deferred=True), TokenTrace(3, shallow, deferred=True),
            TokenTrace(4, full), TokenTrace(5, shallow, deferred=True)]
    seq1 = [TokenTrace(6, full), TokenTrace(7, full)]
    return Trace(num_steps=4, tokens=[seq0, seq1])


def test_deep_pass_sizes():
    assert deep_pass_sizes(free_trace()) == [[1, 3, 3, 3, 0], [1, 1]]


def test_free_token_heatmap_marks_deferred_tokens_and_differences():
    trace = free_trace()
    texts = [["a", "b", "c", "d", "e"], ["f", "g"]]
    ids = [[t.token_id for t in seq] for seq in trace.tokens]
    reference = [[1, 2, 9, 4, 5], [6, 7]]
    fig = free_token_heatmap(trace, texts, reference=reference, token_ids=ids, shallow_layer=2)
    assert "3 of 7 tokens deferred" in fig.layout.title.text and "1 differ" in fig.layout.title.text
    assert fig.data[0].zmin == 2 and fig.data[0].zmax == 4
    hover = [h for row in fig.data[0].text for h in row if h]
    assert any("pass over 3 tokens" in h and "'b'" in h for h in hover)
    assert any("ended before a deep pass" in h and "'e'" in h for h in hover)
    assert any("2 deferred + this one" in h and "'d'" in h for h in hover)
    assert any("<b>differs</b>" in h and "'c'" in h for h in hover)


def test_sweep_dashboard_swaps_heatmaps_and_moves_the_ring():
    trace = free_trace()
    texts = [["a", "b", "c", "d", "e"], ["f", "g"]]
    short = Trace(num_steps=4, tokens=[trace.tokens[1]])
    heatmaps = {0.2: free_token_heatmap(trace, texts), 0.5: free_token_heatmap(short, [["f", "g"]]),
                0.8: free_token_heatmap(trace, texts)}
    board = SweepDashboard(SWEEP, heatmaps, method="free", threshold=0.2)
    assert "1.30x" in board.summary.value and list(board.pareto.data[-1].x) == [1.3]
    board.slider.value = 0.5
    assert "0.5" in board.summary.value and "80.0%" in board.summary.value
    assert board.heatmap.layout.title.text == heatmaps[0.5].layout.title.text
    assert list(board.heatmap.data[1].text) == ["f", "g"]
    bundle = board._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle and bundle["text/html"].count("plotly-graph-div") >= 2
    with pytest.raises(ValueError, match="no 'calm' point"):
        SweepDashboard(SWEEP, {0.9: heatmaps[0.2]}, method="calm")


def test_sweep_points_show_the_cost_models_speedups_when_they_have_them():
    points = {"free": [dict(SWEEP["free"][0], predicted_speedup=0.8, ideal_speedup=0.9)] + SWEEP["free"][1:]}
    trace = free_trace()
    board = SweepDashboard(points, {0.2: free_token_heatmap(trace, [["a", "b", "c", "d", "e"], ["f", "g"]])},
                           method="free", threshold=0.2)
    assert "predicted 0.80x, ideal 0.90x" in board.summary.value
    assert any("ideal 0.90x" in h for h in board.pareto.data[1].hovertext)

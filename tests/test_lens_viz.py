"""Logit-lens analysis and the shared figures, on a hand-built trace (and once on SmolLM2)."""
import numpy as np
import plotly.graph_objects as go
import pytest

from mor_lab.early_exit.lens import (batched_layers_saved, lens_matrices, oracle_exits, oracle_index,
                                     threshold_exits, threshold_index, threshold_sweep)
from mor_lab.engine.trace import IDLE, EngineStep, TokenTrace, Trace
from mor_lab.viz import (TextLayout, ThresholdDashboard, activity_color, exit_heatmap, lens_heatmap, text_heatmap,
                         update_exit_heatmap, utilization_timeline)


def tok(token_id, top1, conf, steps=None):
    return TokenTrace(token_id, list(range(len(top1))) if steps is None else steps, top1, conf)


def worked_trace() -> Trace:
    """Four depth steps, two sequences. Final top-1 / oracle layer / exit layer at tau=0.5:
    A: 7 / 2 / 2 (agrees)   B: 3 / 1 / 1 (agrees)   C: 8 / 3 / 1 (top-1 is 1: disagrees)   D: 9 / 1 / 4
    """
    a = tok(7, [5, 7, 7, 7], [0.10, 0.60, 0.80, 0.90])
    b = tok(3, [3, 3, 4, 3], [0.70, 0.20, 0.30, 0.95])
    c = tok(8, [1, 2, 8, 8], [0.55, 0.30, 0.40, 0.45])
    d = tok(9, [9, 9, 9, 9], [0.20, 0.30, 0.40, 0.50])
    engine = [EngineStep("prefill", [0, 1], ["prefill", "prefill"], 9),
              EngineStep("decode", [0, 1], ["decode", "decode"], 2),
              EngineStep("decode", [0, None], ["decode", IDLE], 1)]
    return Trace(num_steps=4, tokens=[[a, b, c], [d]], labelled=engine)


TEXTS = [["The", " cat", " sat"], [" Yes"]]


def test_oracle_exit_is_first_step_matching_the_final_top1():
    trace = worked_trace()
    assert [oracle_index(t) for t in trace.tokens[0]] == [1, 0, 2]
    s = oracle_exits(trace)
    assert s.threshold is None
    assert [x.tolist() for x in s.layers] == [[2, 1, 3], [1]]
    assert [x.tolist() for x in s.exit_step] == [[1, 0, 2], [0]]
    np.testing.assert_allclose(s.confidence[0], [0.60, 0.70, 0.40])
    assert s.agreement == 1.0
    assert s.mean_layers == pytest.approx(7 / 4)
    assert s.layers_saved == pytest.approx(1 - 7 / 16)
    assert s.num_tokens == 4


def test_threshold_exit_math():
    trace = worked_trace()
    s = threshold_exits(trace, 0.5)
    assert [x.tolist() for x in s.layers] == [[2, 1, 1], [4]]
    assert [x.tolist() for x in s.agrees] == [[True, True, False], [True]]
    assert s.layers_saved == pytest.approx(0.5)
    assert s.agreement == pytest.approx(0.75)
    assert s.mean_layers == pytest.approx(2.0)
    assert batched_layers_saved(s) == pytest.approx(1 - 10 / 16)  # step 0 waits for D's 4 layers
    never = threshold_exits(trace, 0.99)  # nobody reaches it: full depth, full agreement
    assert never.layers_saved == 0.0 and never.agreement == 1.0
    always = threshold_exits(trace, 0.0)  # everyone leaves after the first step
    assert [x.tolist() for x in always.layers] == [[1, 1, 1], [1]]
    assert threshold_index(trace.tokens[0][2], 0.5) == 0
    curve = threshold_sweep(trace, [0.0, 0.5, 0.99])
    assert curve.shape == (3, 3)
    np.testing.assert_allclose(curve[:, 1], [0.75, 0.5, 0.0])


def test_lens_matrices_and_partial_depth():
    trace = worked_trace()
    conf, match = lens_matrices(trace, 0)
    assert conf.shape == match.shape == (4, 3)
    assert conf[1, 0] == pytest.approx(0.60)
    assert match[:, 1].tolist() == [True, True, False, True]
    short = Trace(num_steps=4, tokens=[[tok(5, [2, 5], [0.4, 0.9], steps=[0, 1])]])
    conf, match = lens_matrices(short, 0)
    assert np.isnan(conf[2:, 0]).all() and not match[2:, 0].any()
    assert oracle_exits(short).layers_saved == pytest.approx(0.0)  # ran 2 of its 2 steps, oracle needs both


def test_trace_without_predictions_gives_a_clear_error():
    trace = Trace(num_steps=2, tokens=[[TokenTrace(1, [0, 1])]])
    with pytest.raises(ValueError, match="record_predictions=True"):
        oracle_exits(trace)


def test_text_layout_wraps_and_breaks_lines():
    layout = TextLayout.wrap([["Hello", " world", ",\n", "again"], ["x"]], width=8)
    assert layout.row.tolist() == [0, 1, 1, 2, 4]  # " world" wraps, ",\n" ends its line, blank line between
    assert layout.labels[2] == ",↵"
    assert layout.first_rows == [0, 4]
    assert layout.num_rows == 5
    cells = layout.cells()
    assert (cells >= 0).sum() == sum(len(s) for s in layout.labels)


def test_text_heatmap_cells_and_hover():
    fig = text_heatmap(TEXTS, [[1, 2, 3], [4]], title="t", value_name="depth", units="layers", width=10)
    assert len(fig.data) == 2
    z = np.array(fig.data[0].z, dtype=float)
    assert np.isfinite(z).sum() == sum(len(t) for seq in TEXTS for t in seq)
    assert len(fig.data[1].text) == 4
    assert "depth: 2.00 layers" in "".join(str(h) for h in np.array(fig.data[0].text).ravel())
    assert fig.data[0].colorbar.title.text == "depth<br>(layers)"
    with pytest.raises(ValueError, match="one value per token"):
        text_heatmap(TEXTS, [1, 2], title="t", value_name="v")


def test_lens_heatmap_marks_the_oracle_exit():
    fig = lens_heatmap(worked_trace(), 0, TEXTS[0], top1_labels=[["a"] * 4] * 3)
    heat, marker = fig.data
    assert np.array(heat.z).shape == (4, 3)
    assert list(marker.y) == [2, 1, 3]
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_utilization_timeline_has_one_trace_per_activity():
    trace = worked_trace()
    fig = utilization_timeline(trace)
    names = [t.name for t in fig.data]
    assert names == ["prefill", "decode", IDLE]
    assert sum(len(t.x) for t in fig.data) == 6
    assert "83%" in fig.layout.title.text
    idle = fig.data[names.index(IDLE)]
    assert idle.marker.color == activity_color(IDLE) and list(idle.y) == [1]
    assert activity_color("loop 1") != activity_color("loop 2")


def test_update_function_recolors_the_exit_heatmap():
    trace = worked_trace()
    fig = exit_heatmap(trace, TEXTS, threshold=0.5, width=10)
    before = np.array(fig.data[0].z, dtype=float).copy()
    s = update_exit_heatmap(fig, trace, TextLayout.wrap(TEXTS, 10), 0.99)
    after = np.array(fig.data[0].z, dtype=float)
    assert s.layers_saved == 0.0
    assert not np.array_equal(np.nan_to_num(before), np.nan_to_num(after))
    assert np.nanmin(after) == 4  # everyone runs all four layers
    assert "0.99" in fig.layout.title.text
    update_exit_heatmap(fig, trace, TextLayout.wrap(TEXTS, 10), 0.5)
    hover = [str(h) for row in fig.data[0].text for h in row]
    assert any("' sat'" in h and "a different token" in h for h in hover)  # C exits wrong at tau=0.5


def test_dashboard_slider_updates_figure_and_summary():
    dash = ThresholdDashboard(worked_trace(), TEXTS, threshold=0.5, width=10)
    assert isinstance(dash.figure, go.FigureWidget)
    z_before, text_before = np.array(dash.figure.data[0].z, dtype=float).copy(), dash.summary.value
    assert "50.0% of layers saved" in text_before and "75.0% agreement" in text_before
    dash.slider.value = 0.95
    assert not np.array_equal(np.nan_to_num(z_before), np.nan_to_num(np.array(dash.figure.data[0].z, dtype=float)))
    assert dash.summary.value != text_before and "0.95" in dash.figure.layout.title.text
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "application/vnd.plotly.v1+json" in bundle


@pytest.mark.smollm2
def test_oracle_exit_is_consistent_on_smollm2(smollm2):
    import mor_lab
    model, tk = smollm2
    out = mor_lab.generate(model, tk, ["Name a color.", "What is 2+2?"], max_new_tokens=4, chat=True,
                           record_predictions=True)
    last = model.num_steps - 1
    oracle = oracle_exits(out.trace)
    for seq, tokens in enumerate(out.trace.tokens):
        assert len(tokens) == len(out.token_ids[seq])
        for token, step, emitted in zip(tokens, oracle.exit_step[seq], out.token_ids[seq]):
            assert len(token.top1) == len(token.confidence) == model.num_steps
            assert 0 <= step <= last
            assert token.top1[step] == token.top1[-1] == emitted  # greedy: the final top-1 is the token
            assert all(t != token.top1[-1] for t in token.top1[:step])
    assert 0.0 <= oracle.layers_saved < 1.0

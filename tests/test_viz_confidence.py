"""Confidence-measure analysis and notebook 01's figures, on synthetic inputs (no model download)."""
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mor_lab.early_exit.heads import ExitConfig, ExitHeads
from mor_lab.engine.trace import TokenTrace, Trace
from mor_lab.models.config import ModelConfig
from mor_lab.models.decoder import random_decoder
from mor_lab.viz.confidence import (LayerMeasures, TradeoffDashboard, auroc, calm_threshold_figure, depth_grid_figure,
                                    exit_curve, exit_curves_figure, exit_tradeoff, layer_confidence_figure,
                                    layer_measures, outputs_table, saved_vs_agreement_figure, tradeoff_summary)


def test_auroc_counts_pairs_and_ties():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.1) = 1, (0.3, 0.5) = 0, (0.3, 0.1) = 1 -> 2.5 / 4
    assert auroc([0.5, 0.3, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.625)
    assert np.isnan(auroc([0.1, 0.2], [True, True]))  # one class only: undefined
    assert auroc([0.9, np.nan, 0.1], [True, False, False]) == 1.0  # NaN scores are dropped


def test_exit_curve_exits_most_confident_first():
    frac, agree = exit_curve([0.2, 0.9, 0.5, 0.7], [False, True, False, True])
    np.testing.assert_allclose(frac, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(agree, [1.0, 1.0, 2 / 3, 0.5])
    with pytest.raises(ValueError, match="no scores"):
        exit_curve([np.nan], [True])


def test_exit_tradeoff_per_row_and_batch():
    score = np.array([0.9, 0.8, 0.1, 0.7])
    agrees = np.array([True, False, True, True])
    t = exit_tradeoff(score, agrees, [0.0, 0.5, 1.0], exit_layer=20, num_layers=30, batch_size=2)
    np.testing.assert_allclose(t.exited, [1.0, 0.75, 0.0])
    np.testing.assert_allclose(t.layers_saved, t.exited / 3)
    np.testing.assert_allclose(t.agreement, [0.75, 0.75, 1.0])  # token 1 exits wrong at 0 and 0.5
    assert t.batch_exited[0] == 1.0 and t.batch_exited[2] == 0.0
    assert t.batch_exited[1] == 0.5  # of two batches, only the one without token 2 (score 0.1) exits
    assert (t.batch_layers_saved <= t.layers_saved + 1e-12).all()
    assert (t.batch_agreement >= t.agreement - 1e-12).all()
    full = exit_tradeoff(score, agrees, [0.5], 20, 30, batch_size=1)  # batches of one = per row
    assert full.batch_exited[0] == full.exited[0] and full.batch_agreement[0] == full.agreement[0]
    assert t.at(0.45) == 1
    assert "75%" in tradeoff_summary(t, 1)
    with pytest.raises(ValueError, match="exit_layer"):
        exit_tradeoff(score, agrees, [0.5], 30, 30)
    with pytest.raises(ValueError, match="batch_size"):
        exit_tradeoff(score, agrees, [0.5], 20, 30, batch_size=5)


def synthetic_measures() -> LayerMeasures:
    rng = np.random.default_rng(0)
    agrees = rng.random((3, 60)) < np.array([[0.2], [0.5], [0.8]])
    scores = {m: np.where(agrees, 0.7, 0.3) + rng.normal(0, 0.2, agrees.shape)
              for m in ("softmax_max", "softmax_diff", "state")}
    scores["meta"] = np.full(agrees.shape, np.nan)
    scores["meta"][2] = np.where(agrees[2], 0.6, 0.4)
    return LayerMeasures([1, 2, 3], scores, agrees, [False, False, True])


def test_layer_measures_summaries():
    lm = synthetic_measures()
    assert lm.num_tokens == 60 and lm.row(3) == 2
    assert lm.available() == ["softmax_max", "softmax_diff", "state", "meta"]
    assert lm.available(1) == ["softmax_max", "softmax_diff", "state"]
    np.testing.assert_allclose(lm.agreement(), lm.agrees.mean(1))
    assert np.isnan(lm.mean("meta")[0]) and lm.mean("meta")[2] == pytest.approx(lm.scores["meta"][2].mean())
    assert np.isnan(lm.auroc("meta")[0]) and lm.auroc("meta")[2] == 1.0
    assert (lm.auroc("softmax_max") > 0.7).all()
    np.testing.assert_array_equal(lm.auroc("softmax"), lm.auroc("softmax_max"))  # the old alias still reads
    assert np.isnan(lm.auroc("softmax", min_count=1000)).all()  # too few tokens per class to say
    with pytest.raises(ValueError, match="no measurements"):
        lm.row(7)


def tiny_model():
    config = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64)
    return random_decoder(config, seed=0).eval()


def test_layer_measures_on_a_tiny_model():
    model = tiny_model()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, hidden = model(ids, return_hidden=True)
    lm = layer_measures(model, hidden)
    assert lm.layers == [1, 2, 3] and lm.num_tokens == 14 and lm.trained == [False] * 3
    assert lm.available() == ["softmax_max", "softmax_diff", "state"]  # no classifier, no meta
    assert ((lm.scores["softmax_diff"] >= 0) & (lm.scores["softmax_diff"] <= lm.scores["softmax_max"])).all()
    final = model.head(hidden[4]).argmax(-1).flatten().numpy()
    np.testing.assert_array_equal(lm.agrees[1], model.head(hidden[2]).argmax(-1).flatten().numpy() == final)
    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=[2]))
    exit2 = layer_measures(model, hidden, [2], heads)
    assert exit2.trained == [True] and exit2.available() == ["softmax_max", "softmax_diff", "state", "meta"]
    np.testing.assert_allclose(exit2.scores["meta"], 0.5)  # an untrained meta classifier says 0.5
    np.testing.assert_allclose(exit2.scores["softmax_max"], lm.scores["softmax_max"][1:2], rtol=1e-6)  # zero adapter
    with pytest.raises(ValueError, match="layers must lie"):
        layer_measures(model, hidden, [4])


def test_figures_build():
    lm = synthetic_measures()
    fig = layer_confidence_figure(lm, lm)
    assert isinstance(fig, go.Figure) and len(fig.data) > 6
    curves = exit_curves_figure(lm, 3)
    assert [d.name.split()[0] for d in curves.data] == ["oracle", "softmax_max", "softmax_diff", "state", "meta"]
    assert all(len(d.x) <= 200 for d in curves.data)
    fig = saved_vs_agreement_figure({"per token": ([0.1, 0.3], [0.9, 0.5], [0.9, 0.5]),
                                     "batch of 4": ([0.0, 0.1], [0.9, 0.5], [0.9, 0.5])}, {"oracle": (0.2, 1.0)})
    assert [d.line.dash for d in fig.data[:2]] == ["solid", "dash"]
    fig = calm_threshold_figure(0.5, 10, temperature=4.0, used="calm")
    paper, free = fig.data  # t = 1..10
    assert paper.y[0] == pytest.approx(0.45 + 0.1 * np.exp(-0.4))
    assert paper.y[-1] == pytest.approx(0.45 + 0.1 * np.exp(-4))
    assert free.y[0] == pytest.approx(0.45 + 0.05 * np.exp(-0.4))
    assert free.y[-1] == pytest.approx(0.45 + 0.05 * np.exp(-4))
    assert "used" in paper.name and paper.line.width > free.line.width


def test_outputs_table_marks_the_first_difference():
    html = outputs_table({"full": [["a", "b", "<c>"]], "exit": [["a", "x", "<c>"]]}, reference="full", row_names=["p"])
    assert html.count("<tr>") == 2 and "&lt;c&gt;" in html
    assert "<span style='color:#777'>a</span><span style='color:#D55E00'>x&lt;c&gt;</span>" in html
    assert "<span style='color:#777'>ab&lt;c&gt;</span>" in html  # the reference itself is all "same"


def test_tradeoff_dashboard_follows_the_slider():
    t = exit_tradeoff(np.linspace(0, 1, 40), np.arange(40) % 3 > 0, np.round(np.linspace(0, 1, 11), 2), 2, 4, 4)
    dash = TradeoffDashboard(t, threshold=0.3)
    assert dash.figure.layout.shapes[0].x0 == pytest.approx(0.3)
    dash.slider.value = 0.7
    assert dash.figure.layout.shapes[0].x0 == pytest.approx(0.7)
    assert dash.summary.value.startswith("threshold 0.70")
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle and "text/html" in bundle
    costed = TradeoffDashboard(t, threshold=0.0, break_even=0.4)  # every token exits: cheaper than full depth
    assert costed.figure.data[0].name == "tokens exiting, per row" and costed.figure.layout.shapes[0].y0 == 0.4
    assert "cheaper" in costed.summary.value
    costed.slider.value = 1.0
    assert "dearer" in costed.summary.value and costed.figure.layout.shapes[-1].x0 == pytest.approx(1.0)


def test_depth_grid_marks_held_tokens():
    def trace(depths):
        return Trace(num_steps=4, tokens=[[TokenTrace(0, list(range(d))) for d in seq] for seq in depths])

    fig = depth_grid_figure({"per row": trace([[4, 2, 4], [2]]), "batch": trace([[4, 4, 4], [4]])})
    first, second, held = fig.data
    assert list(first.z[0]) == [4, 2, 4] and first.z[1][1] is None  # a shorter sequence leaves a gap
    assert list(held.x) == [1, 0] and list(held.y) == [0, 1]  # tokens that exited per row, held by the batch

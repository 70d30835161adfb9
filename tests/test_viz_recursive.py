"""Figures and the scheduler dashboard of notebooks 03 and 04."""
import pytest
import torch

from mor_lab import Decoder
from mor_lab.engine.plan import LoopStructure
from mor_lab.models.config import ModelConfig
from mor_lab.recursive import STRATEGIES, SharingPlan
from mor_lab.viz.recursive import perplexity_figure, sharing_figure
from mor_lab.viz.scheduler import (DISTRIBUTIONS, SchedulerDashboard, expected_max_loops, loop_steps, static_step_loops,
                                   token_loops)


def test_sharing_figure_draws_every_step_at_its_physical_layer_colored_by_loop():
    plans = [SharingPlan.build(7, 2, s) for s in STRATEGIES]
    fig = sharing_figure(plans)
    assert len(fig.data) == len(plans)
    for heatmap, plan in zip(fig.data, plans):
        z = heatmap.z
        assert len(z) == plan.num_physical_layers and len(z[0]) == plan.num_steps
        for s in plan.steps:
            assert z[s.layer][s.step] == (0 if s.loop is None else s.loop + 1)
        assert sum(v is not None for row in z for v in row) == plan.num_steps  # one layer per step


def test_perplexity_figure_groups_series_and_marks_the_original():
    rows = [{"init": i, "strategy": s, "ppl": 10.0 + k} for k, (s, i) in
            enumerate([("cycle", "lower"), ("cycle", "upper"), ("sequence", "lower")])]
    fig = perplexity_figure(rows, x="init", group="strategy", baseline=9.0, title="t", x_title="init")
    assert [t.name for t in fig.data] == ["cycle", "sequence"]
    assert fig.layout.shapes[0].y0 == 9.0


def _tiny():
    structure = LoopStructure(prelude=1, block=1, loops=4, coda=1)
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                         num_kv_heads=1)
    torch.manual_seed(0)
    return Decoder(config, structure.plan()).eval(), structure


def test_scheduler_dashboard_reruns_both_schedulers_when_the_controls_move():
    model, structure = _tiny()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14]]
    board = SchedulerDashboard(model, prompts, max_new_tokens=3, slots=2)
    (static_ids, static_trace), (cdb_ids, cdb_trace) = board.runs.values()
    assert static_ids == cdb_ids  # same exit decisions: same tokens
    assert loop_steps(cdb_trace) < loop_steps(static_trace)  # refilled slots: fewer passes of the block
    def drawn():
        return [[(t.name, tuple(t.base), tuple(t.y)) for t in f.data] for f in board.figures.values()]

    before = drawn()
    board.distribution.value = "never exit early"
    (_, static_trace), (_, cdb_trace) = board.runs.values()
    assert loop_steps(cdb_trace) == loop_steps(static_trace) == 4 * (3 - 1) * 3  # nothing to gain
    assert drawn() != before
    board.step.value = 2
    assert all(tuple(f.layout.xaxis.range) == (-0.5, 2.5) for f in board.figures.values())
    assert set(DISTRIBUTIONS) >= {"never exit early"}


def test_rank_dashboard_follows_the_slider_with_the_measured_residual():
    import mor_lab
    from mor_lab.recursive import convert, parameter_counts, residual_by_rank
    from mor_lab.viz.recursive import RankDashboard

    model = mor_lab.random_decoder(num_layers=6, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, seed=1)
    conversion = convert(model, strategy="middle_cycle", num_recursions=2, init="average")
    curves = residual_by_rank(conversion.model, model, conversion.sharing)
    shared = parameter_counts(conversion.model)["layers"]
    dash = RankDashboard(curves, shared, rank=2)
    assert dash.slider.options[0] == 0 and dash.slider.options[-1] == curves.full_rank == 32
    before = dash.figure.layout.title.text
    dash.slider.value = 16
    assert dash.figure.layout.shapes[0].x0 == 16 and dash.figure.layout.title.text != before
    assert f"{curves.left(16):.0%}</b> of the weight difference" in dash.summary.value
    assert curves.left(16) < curves.left(2)
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle


def test_static_batching_pays_the_deepest_token_of_every_step():
    model, structure = _tiny()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14]]
    board = SchedulerDashboard(model, prompts, max_new_tokens=4, slots=2)
    (_, static_trace), (_, cdb_trace) = board.runs.values()
    depths = token_loops(static_trace, structure)
    assert depths == token_loops(cdb_trace, structure) and all(1 <= d <= 4 for seq in depths for d in seq)
    assert loop_steps(static_trace) == sum(static_step_loops(depths, 2))
    assert static_step_loops([[1, 3], [2, 1], [4]], 2) == [2, 3, 4]
    assert expected_max_loops([0.4, 0.3, 0.2, 0.1], 1) == pytest.approx(2.0)  # one row: the mean
    assert expected_max_loops([0.4, 0.3, 0.2, 0.1], 4) == pytest.approx(1 + (1 - .4 ** 4) + (1 - .7 ** 4) + (1 - .9 ** 4))
    assert expected_max_loops([0, 0, 0, 1], 8) == pytest.approx(4.0)

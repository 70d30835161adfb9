"""The cost model: calibration on a tiny model, prices, predictions and ideals of synthetic traces, the head
rule's batch, and the FLOPs accounting (the library's only one)."""
import pytest
import torch

import mor_lab
from mor_lab.engine.cost import CostModel, decode_flops, head_flops, kv_bytes_per_token, layer_flops, layer_params
from mor_lab.engine.trace import Pass, Trace


def synthetic(**over) -> CostModel:
    """A cost model with round numbers: a layer pass costs 1 ms at 1-8 rows, then +0.1 ms per row."""
    rows = [1, 8, 16, 32]
    base = dict(device="cpu", dtype="float32", threads=2, rows=rows, layer_s=[1e-3, 1e-3, 1.8e-3, 3.4e-3],
                head_s=[4e-3, 4e-3, 4e-3, 8e-3], test_s=[5e-3, 5e-3, 5e-3, 9e-3], propagate_s=[1e-4] * 4,
                key_s=1e-7, ref_keys=32, small_s=1e-5, overhead_s=2e-4, num_steps=10)
    base.update(over)
    return CostModel(**base)


def test_prices_interpolate_and_extrapolate_without_going_down():
    cost = synthetic()
    assert cost.layer(4) == pytest.approx(1e-3) and cost.layer(12) == pytest.approx(1.4e-3)
    assert cost.layer(64) == pytest.approx(3.4e-3 + 32 * 1e-4)  # the last slope, extended
    assert cost.layer(8, keys=8 * 32 + 1000) == pytest.approx(1e-3 + 1000 * 1e-7)  # keys beyond the reference
    assert cost.head(2) == pytest.approx(4e-3)


def test_prediction_sums_the_passes_and_the_ideal_repacks_them_into_full_ones():
    cost = synthetic()
    trace = Trace(num_steps=10, slots=8)
    trace.passes = [Pass("prefill", 4, 40, 400, 40)] + [Pass("layer", 2, 2, 64)] * 10 + [Pass("head", 2, 2)]
    trace.labelled = [None] * 3  # 3 engine steps + 1 head call of bookkeeping
    predicted = cost.layer(40, 400) + 10 * cost.layer(2) + cost.head(2) + 4 * cost.overhead_s
    assert cost.predict(trace) == pytest.approx(predicted)
    # ideal: 20 decode layer-tokens in passes of 8 rows (2.5 passes), 2 head rows (a quarter of a full head
    # call), the 40 prompt tokens at the best per-token rate measured (32 rows for 3.4 ms)
    prompt = 40 * 3.4e-3 / 32
    keys = max(0.0, 400 + 640 - (40 + 20) * 32) * cost.key_s  # fewer keys than the calibration's 32 each: 0
    # bookkeeping: the run's 4 events, shrunk as its 11 layer passes become 40/32 + 2.5 full ones
    ideal = prompt + 2.5 * cost.layer(8) + keys + 0.25 * cost.head(8) + cost.overhead_s * 4 * (40 / 32 + 2.5) / 11
    assert cost.ideal(trace) == pytest.approx(ideal)
    mixed = Trace(num_steps=10, slots=8)  # the same prompt tokens riding in a decode pass: the same ideal
    mixed.passes = [Pass("layer", 6, 42, 464, 40)] + [Pass("layer", 2, 2, 64)] * 9 + [Pass("head", 2, 2)]
    work = synthetic(overhead_s=0.0)  # the passes' work is the same; bookkeeping follows each run's events
    assert work.ideal(mixed) == pytest.approx(work.ideal(trace))
    assert cost.ideal(trace) < cost.predict(trace)  # under-full passes are what the ideal removes
    assert set(cost.breakdown(trace)) == {"prefill", "layer", "head", "bookkeeping"}


def test_ragged_passes_pay_their_gathered_cache_copies_and_prompt_chunks_their_measured_point():
    cost = synthetic(gather_s=1e-8, prefill_tokens=512, prefill_s=12e-3)
    assert cost.layer(8, gathered=1000) == pytest.approx(cost.layer(8) + 1e-5)
    assert cost.layer(272) == pytest.approx(3.4e-3 + (12e-3 - 3.4e-3) * (272 - 32) / (512 - 32))  # between the points
    assert cost.prompt_token_s() == pytest.approx(12e-3 / 512)
    trace = Trace(num_steps=10, slots=8)
    trace.passes = [Pass("layer", 8, 8, 256, 0, 800)] * 3 + [Pass("head", 8, 8)]
    trace.labelled = [None] * 3
    parts = cost.breakdown(trace)
    assert parts["gather"] == pytest.approx(3 * 800 * 1e-8) and parts["layer"] == pytest.approx(3 * cost.layer(8, 256))
    assert cost.ideal(trace) < cost.predict(trace) - parts["gather"] + 1e-12  # the ideal reads pages in place


def test_the_engine_records_which_passes_gather_the_cache():
    """Full depth over every row reads views; tokens at different loops (CDB) gather their pages."""
    from mor_lab.engine.policies import FixedLoops, LoopExit
    from mor_lab.engine.plan import LoopStructure
    model = mor_lab.random_decoder(num_layers=4, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2)
    model.plan = LoopStructure.middle_cycle(6, 2).plan()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3]]
    _, full = mor_lab.generate_ids(model, prompts, 4, eos_token_ids=[], slots=4)
    assert not any(p.gathered for p in full.passes if p.kind == "layer")
    _, cdb = mor_lab.generate_ids(model, prompts, 6, eos_token_ids=[], slots=2, mode="continuous",
                                  policy=LoopExit(FixedLoops([0.5, 0.5], seed=1)))
    assert any(p.gathered for p in cdb.passes if p.kind == "layer")
    assert all(p.gathered in (0, *range(p.rows, 10**6, p.rows)) for p in cdb.passes)  # rows x kv_len slots


def test_regime_and_the_head_batch_of_the_cost_rule():
    cost = synthetic()
    regime = cost.regime(8)
    assert regime["regime"] == "memory-bound" and regime["layer_pass_ratio_vs_1_row"] == 1.0
    assert {cost.regime(b)["regime"] for b in (1, 2, 4)} == {"memory-bound"}  # a flat curve at small batches
    linear = synthetic(layer_s=[1e-3, 8e-3, 16e-3, 32e-3])  # every row costs what one row alone costs
    assert linear.regime(16)["regime"] == "compute-bound"
    assert regime["head_in_layers"] == 4.0 and 0 < regime["head_share"] < 1
    assert cost.head_batch(0) == 1
    # a flat head: the fuller the better; 15 rows are within 10 % of 16's per-token cost (4 ms / 15 < 1.1 * 4 ms / 16)
    assert cost.head_batch(16) == 15
    flat = synthetic(head_s=[4e-3] * 4)
    assert flat.head_batch(40) < 40  # past 32 rows the 10 % rule stops waiting for more


def test_calibration_on_a_tiny_model_is_positive_monotone_and_predicts_a_run():
    model = mor_lab.random_decoder(num_layers=3, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2)
    cost = CostModel.calibrate(model, max_rows=8, reps=2)
    for prices in (cost.layer_s, cost.head_s, cost.test_s, cost.propagate_s):
        assert all(p > 0 for p in prices) and prices == sorted(prices)
    assert cost.rows[-1] >= 8 and cost.num_steps == 3 and cost.seconds > 0
    _, trace = mor_lab.generate_ids(model, [[1, 2, 3], [4, 5]], 6, eos_token_ids=[], cost=cost)
    assert cost.predict(trace) > 0 and trace.seconds > 0
    assert trace.pass_counts() == {"prefill": 3, "layer": 15, "head": 6}


def test_flops_and_bytes_accounting():
    c = mor_lab.ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                            num_kv_heads=1)  # head_dim 4
    assert layer_params(c) == 8 * 4 * 2 * (2 + 1) + 3 * 8 * 16
    assert layer_flops(c, context=10) == 2 * layer_params(c) + 4 * 2 * 4 * 10
    assert head_flops(c) == 2 * 100 * 8
    assert decode_flops(c, 2, 10, head_calls=2, skipped=1) == pytest.approx(
        2 * layer_flops(c, 10) + 2 * 2 * 8 * 4 * 1 + 2 * head_flops(c))
    assert kv_bytes_per_token(c, steps=2) == 2 * 2 * 1 * 4 * 4
    assert kv_bytes_per_token(c, steps=2, dtype=torch.bfloat16) == 2 * 2 * 1 * 4 * 2


def test_cost_figures_draw_what_the_cost_model_says():
    from mor_lab.viz.cost import pass_cost_figure, run_cost_figure, run_cost_table, token_cost_figure, token_costs
    cost = synthetic()
    fig = pass_cost_figure(cost, max_rows=16)
    assert fig.data[0].y[7] == pytest.approx(1.0) and fig.data[1].y[0] == pytest.approx(4.0)
    parts = token_costs(cost, 8, exit_test=True)
    assert parts == pytest.approx({"layers": 10 * 1e-3 / 8 * 1e3, "LM head": 4e-3 / 8 * 1e3, "exit test": 5e-3 / 8 * 1e3})
    assert len(token_cost_figure(cost, (1, 8), exit_test=True).data) == 3
    a, b = Trace(num_steps=10, slots=8), Trace(num_steps=10, slots=8)
    a.passes, a.seconds = [Pass("layer", 8, 8)] * 10 + [Pass("head", 8, 8)], 0.02
    b.passes, b.seconds = [Pass("layer", 4, 4)] * 10 + [Pass("head", 4, 4)], 0.02
    rows = {r["run"]: r for r in run_cost_table(cost, {"full": a, "half": b}, reference="full")}
    assert rows["half"]["ideal_speedup"] == pytest.approx(cost.ideal(a) / cost.ideal(b)) and rows["half"]["ideal_speedup"] > 1.9
    assert rows["half"]["speedup"] == 1.0 and rows["half"]["fraction_of_ideal"] < 0.55  # half-full passes: no gain
    fig = run_cost_figure(cost, {"full": a, "half": b})
    assert {t.name for t in fig.data} >= {"layer passes", "LM-head calls", "measured", "ideal (every pass full)"}


def test_a_memory_budget_rules_out_the_prepacked_copy(monkeypatch):
    """Binder's 2 GB (binder/start sets MOR_LAB_MEMORY_MB): no room for four times the weights, no copy."""
    from mor_lab.engine.cost import memory_allows_copy
    monkeypatch.setenv("MOR_LAB_MEMORY_MB", "100000")
    assert memory_allows_copy(2**20)  # 1 MB fits a 100 GB budget (and this machine)
    monkeypatch.setenv("MOR_LAB_MEMORY_MB", "2048")
    assert not memory_allows_copy(513 * 2**20)  # SmolLM2 in fp32 beside this process
    monkeypatch.setenv("MOR_LAB_MEMORY_MB", "2 GB")
    with pytest.raises(ValueError, match="MOR_LAB_MEMORY_MB"):
        memory_allows_copy(2**20)
    monkeypatch.delenv("MOR_LAB_MEMORY_MB")
    monkeypatch.setenv("MOR_LAB_PACKED_WEIGHTS", "0")
    assert not memory_allows_copy(1)

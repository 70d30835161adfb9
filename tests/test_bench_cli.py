"""Benchmark suites and the CLI on a tiny local Llama checkpoint (no tokenizer: random prompt ids)."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mor_lab.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_bench_generate_writes_side_by_side_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "generate.json"
    assert main(["bench", "generate", "--quick", "--model", str(tiny_checkpoint), "--batch-sizes", "1,3",
                 "--max-new-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["suite"] == "generate"
    rows = {(r["method"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(m, b) for m in ("hf", "mor_lab_exact", "mor_lab") for b in (1, 3)}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["roofline_fraction"]
        assert r["new_tokens"] == 4 * r["batch_size"]
    assert rows[("mor_lab_exact", 3)]["identical_to_hf"] is True  # HF's summation order: the same tokens
    assert rows[("mor_lab", 3)]["predicted_s"] > 0 and rows[("mor_lab", 3)]["speedup_vs_hf"] > 0
    assert report["roofline"]["matmul_gflops"] > 0 and report["roofline"]["bandwidth_gbs"] > 0


def test_cli_rejects_bad_batch_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--batch-sizes", "0,x"])
    assert "batch-sizes" in capsys.readouterr().err


def test_cli_generate_reports_bad_model_cleanly(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["generate", "hello", "--model", str(tmp_path)]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_bench_cdb_reports_every_method_with_loops_utilization_and_the_cost_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "cdb.json"
    assert main(["bench", "cdb", "--quick", "--model", str(tiny_checkpoint), "--batch-sizes", "4",
                 "--max-new-tokens", "5", "--shapes", "none", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"original", "recursive_full", "recursive_static_exit", "recursive_cdb", "recursive_cdb_cost",
                         "recursive_full_2x_slots", "recursive_static_exit_conf", "recursive_cdb_conf"}
    assert rows["recursive_cdb_cost"]["speedup_vs_full_same_kv_memory"] > 0
    assert report["structure"] == {"prelude": 1, "block": 1, "loops": 4, "coda": 1, "strategy": "MIDDLE_CYCLE",
                                   "init": "lower (not uptrained)"}
    assert rows["recursive_full"]["mean_loops"] == 4
    assert 1 <= rows["recursive_cdb"]["mean_loops"] < 4
    for name in ("recursive_cdb", "recursive_cdb_cost"):
        assert rows[name]["mean_loops"] == rows["recursive_static_exit"]["mean_loops"]  # same decisions
        assert rows[name]["same_tokens_as_static_exit"] is True
    assert 0 < rows["recursive_static_exit"]["utilization"] <= 1
    assert rows["recursive_cdb"]["utilization_queue_nonempty"] == 1.0  # refilled slots never idle
    for name, r in rows.items():
        if name != "original":
            assert r["predicted_s"] > 0 and r["ideal_speedup"] > 0 and "fraction_of_ideal" in r
            assert r["passes"]["layer"] > 0 and r["passes"]["head"] > 0
    assert rows["recursive_cdb_cost"]["passes"]["head"] < rows["recursive_cdb"]["passes"]["head"]
    assert report["cost_model"]["layer_ms"]["1"] > 0


def test_bench_cdb_shape_sweep_on_random_weights(tmp_path, monkeypatch):
    from mor_lab.bench import cdb
    from mor_lab.models.config import ModelConfig
    tiny = ModelConfig(vocab_size=8192, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=4,
                       num_kv_heads=2)
    monkeypatch.setattr(cdb, "SMOLLM2_SHAPE", tiny)
    monkeypatch.setattr(cdb, "SHAPES", {"a": tiny, "b": ModelConfig(**{**tiny.to_dict(), "vocab_size": 256})})
    report = cdb.run(quick=True, batch_sizes=(3,), max_new_tokens=3, random_weights=True, shapes=("a", "b"),
                     repeats=1, head_rule="every-step")
    assert {r["method"] for r in report["results"]} == {"recursive_full", "recursive_static_exit", "recursive_cdb",
                                                       "recursive_static_exit_conf", "recursive_cdb_conf"}
    shares = {r["shape"]: r["head_share"] for r in report["shape_sweep"]}
    assert shares["b"] < shares["a"]  # the smaller vocabulary gives the head a smaller share
    with pytest.raises(ValueError, match="unknown shape"):
        cdb.run(quick=True, batch_sizes=(2,), max_new_tokens=2, random_weights=True, shapes=("nope",), repeats=1)


@pytest.mark.smollm2
def test_bench_early_exit_rows_have_speed_quality_flops_and_corpus_perplexity(tmp_path):
    out = tmp_path / "early-exit.json"
    assert main(["bench", "early-exit", "--quick", "--batch-sizes", "2", "--max-new-tokens", "4",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"full", "static", "calm", "calm_per_row", "free", "free_adaptive"}
    full = rows["full"]
    assert full["agreement"] == 1.0 and full["mean_layers"] == report["num_layers"]
    for method, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["corpus_ppl"] > 1 and r["gflops_per_token"] > 0
        if method != "full":
            assert r["mean_layers"] <= full["mean_layers"] and 0 <= r["agreement"] <= 1
    assert rows["static"]["gflops_per_token"] < full["gflops_per_token"]  # 20 of 30 layers
    assert rows["static"]["corpus_ppl"] > full["corpus_ppl"]  # exiting early every token costs quality
    assert {"free", "calm"} <= set(report["pareto"])
    assert report["heads"] == "linear"  # SmolLM2's committed exit heads, trained on its own chat continuations


def test_bench_early_exit_names_an_exit_the_committed_heads_do_not_have(capsys):
    assert main(["bench", "early-exit", "--quick", "--shallow-layer", "18", "--heads", "linear"]) == 2
    assert "exit after [12, 16, 20, 24] layers, not 18: pass --shallow-layer 24 or --heads corpus" in capsys.readouterr().err

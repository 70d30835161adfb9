"""``mor-lab train``: named recipes at their quick size, the reproducing command in the log, resume, and
clear errors for bad input (unknown recipe or parameter, missing corpus, another config, too long a batch)."""
import json
import math
import shlex

import pytest

from mor_lab import ModelConfig
from mor_lab.cli import main
from mor_lab.mor import MoRConfig, MoRModel
from mor_lab.recursive import uptrain_table
from mor_lab.train.cli import parse_overrides
from mor_lab.train.recipes import (FAMILY_SIZES, RECIPES, as_decoder, family_config, get_recipe, reproduce_command,
                                   run_recipe)

SMALL = {"vanilla_steps": 6, "eval_tokens": 512, "log_every": 2, "checkpoint_every": 4, "sample_tokens": 4}


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Tokenizers and token ids are cached; keep the tests' out of the user's cache (shared per session)."""
    monkeypatch.setenv("MOR_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def sets(overrides):
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


def test_every_member_trains_at_its_quick_size_and_logs_the_command_that_reproduces_it(tmp_path, capsys):
    for member in ("vanilla", "mor-expert-3", "mor-token-3", "recursive-3"):
        out = tmp_path / member
        assert main(["train", member, "--size", "quick", "--seed", "1", "--out", str(out), "--no-progress",
                     *sets(SMALL)]) == 0
        summary = json.loads(capsys.readouterr().out)
        log = json.loads((out / "train.json").read_text())
        assert log["command"] == summary["command"] == reproduce_command(member, "quick", 1, out, SMALL)
        assert shlex.split(log["command"])[3:5] == ["train", member]
        held = log["result"]["heldout"]
        assert held["nats_per_token"] < held["uniform"] == pytest.approx(math.log(512))
        assert log["result"]["weights_dtype"] == "float16" and log["machine"]["precision"] == "fp32"
        files = {p.name for p in out.iterdir()}
        assert {"model.safetensors", "tokenizer.json", "heldout.safetensors", "resume"} <= files
        assert log["total_flops"] == pytest.approx(log["result"]["flops_budget"], rel=0.3)  # equal FLOPs
        assert len(log["result"]["samples"]) == 2
    loops = {m: json.loads((tmp_path / m / "train.json").read_text())["result"]["mean_loops"]
             for m in ("vanilla", "mor-expert-3", "recursive-3")}
    assert loops["vanilla"] == 1 and loops["recursive-3"] == 3 and 1 < loops["mor-expert-3"] < 3


def test_expert_choice_trains_its_decode_rule_at_the_reference_trainers_coefficient():
    """The BCE that makes ``logit > 0`` expert choice's causal rule: 0.01 for mor-expert-3 unless overridden."""
    params = FAMILY_SIZES["quick"]
    config = lambda router: family_config("mor-expert-3", {**params, "router": router}, 512)  # noqa: E731
    assert config({}).router.aux_loss == 0.01
    assert config({"aux_loss": 0.001}).router.aux_loss == 0.001  # --set router=... wins


def test_resume_continues_refuses_another_config_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    first = run_recipe("vanilla", "quick", out=out, overrides=SMALL, progress=False)
    again = run_recipe("vanilla", "quick", out=out, overrides=SMALL, resume=True, progress=False)
    assert again["heldout"] == first["heldout"] and again["steps"] == first["steps"]
    run = ["train", "vanilla", "--size", "quick", "--out", str(out)]
    assert main([*run, "--resume", *sets({**SMALL, "lr": 1e-3})]) == 2
    assert "another configuration" in (err := capsys.readouterr().err) and "lr is 0.003 in the checkpoint" in err
    assert main([*run, "--seed", "2", "--resume", *sets(SMALL)]) == 2
    assert "seed" in capsys.readouterr().err
    assert main([*run, *sets(SMALL)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert main(["train", "gpt5", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'gpt5'" in err and all(name in err for name in RECIPES)
    assert main(["train", "vanilla", "--size", "quick", "--out", str(tmp_path / "b"), "--set", "depth=3"]) == 2
    assert "no parameter 'depth'" in (err := capsys.readouterr().err) and "vanilla_steps" in err
    assert main(["train", "vanilla", "--size", "quick", "--out", str(tmp_path / "c"),
                 "--set", f"corpus={tmp_path / 'missing'}"]) == 2
    assert "unknown corpus" in capsys.readouterr().err
    assert main(["train", "vanilla", "--size", "quick", "--out", str(tmp_path / "d"), "--set", "seq_len=512"]) == 2
    assert "does not fit the model's max_position_embeddings 256" in capsys.readouterr().err
    assert main(["train", "vanilla", "--size", "quick", "--out", str(tmp_path / "e"), "--set", "max_chars=600"]) == 2
    assert "empty training or validation split; raise max_chars" in capsys.readouterr().err
    assert main(["train", "vanilla", "--size", "quick", "--out", str(tmp_path / "f"), "--set", "batch_size=4096"]) == 2
    assert "make no batch of 4096 x 64" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown size"):
        get_recipe("vanilla").params("medium")
    assert parse_overrides(["lr=2e-3", "corpus=pydoc", "exit_layers=[8, 12]"]) == {
        "lr": 2e-3, "corpus": "pydoc", "exit_layers": [8, 12]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lr"])


def test_uptraining_a_relaxed_recursive_student_of_a_trained_vanilla_model(tmp_path):
    teacher = tmp_path / "vanilla"
    run_recipe("vanilla", "quick", out=teacher, overrides=SMALL, progress=False)
    summary = run_recipe("uptrain-lab-3", "quick", out=tmp_path / "student", progress=False,
                         overrides={"teacher": str(teacher), "steps": 8, "eval_tokens": 512})
    log = json.loads((tmp_path / "student" / "train.json").read_text())
    assert log["command"] == summary["command"] and "--set teacher=" in log["command"]
    assert summary["heldout"]["kl"] < summary["before_uptraining"]["kl"]  # distillation moved it towards the teacher
    assert summary["plan"] == [0, 1, 1, 1, 2] and summary["params"]["student"] < summary["params"]["teacher"]
    run_recipe("uptrain-lab-3", "quick", out=tmp_path / "plain", progress=False,
               overrides={"teacher": str(teacher), "steps": 8, "eval_tokens": 512, "init": "average", "rank": 0})
    rows = uptrain_table([tmp_path / "student" / "train.json", tmp_path / "plain" / "train.json"])
    assert [r["nats_after"] for r in rows] == sorted(r["nats_after"] for r in rows)
    assert {(r["init"], r["rank"]) for r in rows} == {("stepwise", 4), ("average", 0)}
    lora, plain = (next(r for r in rows if r["rank"] == rank) for rank in (4, 0))
    assert lora["nats_after"] == summary["heldout"]["nats_per_token"]
    assert lora["params"] > plain["params"]  # the LoRA factors add parameters
    with pytest.raises(ValueError, match="did not finish"):
        uptrain_table([{"config": {"params": {}}, "command": "mor-lab train uptrain-lab-3"}])
    with pytest.raises(ValueError, match="the teacher must be a vanilla model"):
        as_decoder(MoRModel(MoRConfig(ModelConfig(num_layers=5), kind="expert")))


@pytest.mark.smollm2
def test_smollm2_exit_heads_recipe(tmp_path, monkeypatch):
    monkeypatch.delenv("MOR_LAB_CACHE")  # the converted SmolLM2 lives in the user's cache
    summary = run_recipe("exit-heads-smollm2", "quick", out=tmp_path, progress=False,
                         overrides={"train_tokens": 256, "eval_tokens": 128, "steps": 4, "batch_tokens": 64})
    assert set(summary["heldout"]) == {"8"} and 0 <= summary["heldout"]["8"]["agreement"] <= 1
    assert (tmp_path / "exit_heads.safetensors").exists()
    assert json.loads((tmp_path / "train.json").read_text())["command"] == summary["command"]

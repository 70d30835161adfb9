"""The lab's models by name (``load_pretrained("lab:...")``): a reload reproduces the logged held-out
loss; and the analysis behind the family's must-shows (a)-(e), on tiny checkpoints made here."""
import json
import math

import pytest
import torch

import mor_lab
from mor_lab.checkpoints import heldout_blocks, model_dir, parse_name
from mor_lab.models.hf import ModelLoadError
from mor_lab.mor import MoRModel
from mor_lab.mor.analysis import (classify_pieces, depth_ablation, equal_flops_table, family_logs, family_report,
                                  greedy_sample, heldout_report, nats_per_token, random_routing, recursions_by_class,
                                  routing_agreement)
from mor_lab.train.recipes import run_recipe

SMALL = {"vanilla_steps": 8, "eval_tokens": 512, "log_every": 4, "checkpoint_every": 0, "sample_tokens": 4}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A checkpoint folder laid out like mor_lab/checkpoints: two vanilla seeds, one of each MoR kind."""
    root = tmp_path_factory.mktemp("checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOR_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        for member, seed in (("vanilla", 0), ("vanilla", 1), ("mor-expert-3", 0), ("mor-token-3", 0)):
            run_recipe(member, "quick", seed=seed, out=root / member / f"seed{seed}", overrides=SMALL, progress=False)
    return root


@pytest.fixture
def lab(root, monkeypatch):
    monkeypatch.setenv("MOR_LAB_CHECKPOINTS", str(root))
    return root


def test_a_reload_by_name_reproduces_the_logged_heldout_loss(lab):
    logs = family_logs(lab)
    for name, member, seed in (("vanilla", "vanilla", 0), ("vanilla@seed1", "vanilla", 1),
                               ("mor-expert-3@0", "mor-expert-3", 0), ("mor-token-3", "mor-token-3", 0)):
        model, tokenizer = mor_lab.load_pretrained(f"lab:{name}")
        assert isinstance(model, MoRModel) and model.dtype == torch.float32 and tokenizer is not None
        logged = logs[member][seed]["result"]["heldout"]
        blocks = heldout_blocks(model_dir(name))
        assert nats_per_token(model, blocks) == pytest.approx(logged["nats_per_token"], abs=1e-5)
        if member != "vanilla":
            assert nats_per_token(model, blocks, causal=True) == pytest.approx(logged["nats_per_token_causal"],
                                                                               abs=1e-5)
        assert logged["nats_per_token"] < math.log(model.config.vocab_size) == pytest.approx(logged["uniform"])
    from safetensors import safe_open
    with safe_open(str(lab / "vanilla" / "seed0" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed_tokens.weight").dtype == torch.float16  # 16-bit on disk


def test_every_committed_checkpoint_reproduces_its_logged_heldout_loss(monkeypatch):
    """The models in mor_lab/checkpoints, not tiny ones made here: each reload scores its own held-out
    blocks as its training log says (1e-3 nats: far below the seed-to-seed spread, above summation order)."""
    from mor_lab.checkpoints import available, checkpoints_root, load_dir
    monkeypatch.delenv("MOR_LAB_CHECKPOINTS", raising=False)
    names = available()
    assert {parse_name(n)[0] for n in names} >= {"vanilla", "recursive-3", "mor-expert-3", "mor-token-3"}
    for name in names:
        directory = model_dir(name)
        logged = json.loads((directory / "train.json").read_text())["result"]["heldout"]
        model, blocks = load_dir(directory), heldout_blocks(directory)
        assert nats_per_token(model, blocks) == pytest.approx(logged["nats_per_token"], abs=1e-3), name
        assert directory.is_relative_to(checkpoints_root())


def test_committed_expert_choice_models_decode_as_they_trained(monkeypatch):
    """(e) on the committed models: at every recursion, each expert-choice seed's decode-time rule
    (``logit > 0``, causal) takes the training-time top-k's decision on >= 90 % of its held-out tokens."""
    from mor_lab.checkpoints import load_dir
    monkeypatch.delenv("MOR_LAB_CHECKPOINTS", raising=False)
    for seed in (0, 1):
        directory = model_dir(f"mor-expert-3@seed{seed}")
        agreement = routing_agreement(load_dir(directory), heldout_blocks(directory))
        assert agreement["meets_target"], (seed, agreement["per_recursion"])


def test_lab_names_that_do_not_exist_say_what_to_do(lab):
    with pytest.raises(ModelLoadError, match=r"train it: python -m mor_lab\.cli train vanilla --size full --seed 5"):
        mor_lab.load_pretrained("lab:vanilla@seed5")
    with pytest.raises(ModelLoadError, match="the lab's models are vanilla, recursive-3, mor-expert-3, mor-token-3"):
        mor_lab.load_pretrained("lab:gpt2")
    with pytest.raises(ValueError, match="bad lab model name"):
        parse_name("vanilla@seed one")
    assert parse_name("mor-token-3@seed2") == ("mor-token-3", 2) and parse_name("vanilla") == ("vanilla", 0)


def test_heldout_report_and_greedy_sample(lab):
    model, tokenizer = mor_lab.load_pretrained("lab:vanilla")
    prompt = "The default value of"
    text = greedy_sample(model, tokenizer, prompt, max_new_tokens=6)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated, _ = mor_lab.generate_ids(model, [ids], max_new_tokens=6)  # the engine's greedy decoding
    assert text == tokenizer.decode(list(generated[0]))
    expert, _ = mor_lab.load_pretrained("lab:mor-expert-3")
    report = heldout_report(expert, tokenizer, heldout_blocks(model_dir("mor-expert-3")), [prompt], 4)
    assert set(report) == {"nats_per_token", "nats_per_token_causal", "uniform", "tokens", "samples"}
    assert isinstance(report["samples"][prompt], str)


def test_equal_flops_table_has_the_seed_spread(lab):
    logs = family_logs(lab)
    assert set(logs) == {"vanilla", "mor-expert-3", "mor-token-3"} and len(logs["vanilla"]) == 2
    rows = {r["model"]: r for r in equal_flops_table(logs)}
    held = [log["result"]["heldout"]["nats_per_token"] for log in logs["vanilla"]]
    assert rows["vanilla"]["heldout"]["mean"] == pytest.approx(sum(held) / 2)
    assert rows["vanilla"]["heldout"]["std"] > 0 and rows["mor-expert-3"]["heldout"]["n"] == 1
    assert rows["mor-expert-3"]["steps"] > rows["vanilla"]["steps"]  # cheaper steps: more of them at equal FLOPs
    assert rows["mor-expert-3"]["train_flops"] == pytest.approx(rows["vanilla"]["train_flops"], rel=0.2)
    assert "heldout_causal" in rows["mor-expert-3"] and "heldout_causal" not in rows["vanilla"]


def test_depth_ablation_forces_depths_and_randomises_the_router(lab):
    for name in ("mor-expert-3", "mor-token-3"):
        model, _ = mor_lab.load_pretrained(f"lab:{name}")
        blocks = heldout_blocks(model_dir(name))
        result = depth_ablation(model, blocks, draws=2)
        assert result["learned"] == pytest.approx(nats_per_token(model, blocks), abs=1e-6)
        assert all(math.isfinite(result[k]) for k in ("forced_1", "forced_3", "random", "learned_causal"))
        assert len(result["random_draws"]) == 2 and result["forced_1"] != result["forced_3"]
    with pytest.raises(ValueError, match="vanilla model has no recursions"):
        depth_ablation(mor_lab.load_pretrained("lab:vanilla")[0], blocks)
    loops = torch.tensor([[1, 3, 2, 1, 3], [2, 2, 1, 3, 1]])
    shuffled = random_routing(loops, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled.sort(-1).values, loops.sort(-1).values)  # the same counts per row and recursion
    assert not torch.equal(shuffled, loops)


def test_recursions_by_class_and_routing_agreement(lab):
    model, tokenizer = mor_lab.load_pretrained("lab:mor-expert-3")
    blocks = heldout_blocks(model_dir("mor-expert-3"))
    by_class = recursions_by_class(model, tokenizer, blocks, min_count=3)
    assert sum(r["tokens"] for r in by_class["classes"]) == blocks.numel()
    for row in by_class["classes"]:
        assert 1 <= row["mean_loops"] <= 3 and sum(row["depth_share"]) == pytest.approx(1)
    means = [r["mean_loops"] for r in by_class["classes"]]
    assert means == sorted(means, reverse=True) and by_class["most"][0][1] >= by_class["fewest"][0][1]
    agreement = routing_agreement(model, blocks)
    assert list(agreement["per_recursion"]) == ["recursion 2", "recursion 3"] and agreement["tokens"] == blocks.numel()
    assert all(0 <= v <= 1 for v in agreement["per_recursion"].values())
    assert agreement["meets_target"] == all(v >= 0.9 for v in agreement["per_recursion"].values())
    with pytest.raises(ValueError, match="routed MoR model"):
        routing_agreement(mor_lab.load_pretrained("lab:vanilla")[0], blocks)


def test_family_report_covers_every_model(lab):
    report = family_report(lab, ["vanilla", "mor-token-3"], max_new_tokens=2, draws=1)
    assert set(report["models"]) == {"vanilla@seed0", "vanilla@seed1", "mor-token-3@seed0"}
    assert [r["model"] for r in report["equal_flops"]] == ["vanilla", "mor-token-3"]
    assert set(report["models"]["mor-token-3@seed0"]) == {"heldout", "depth", "by_class", "agreement"}
    assert set(report["models"]["vanilla@seed0"]) == {"heldout"}


def test_token_classes_of_code_and_prose():
    pieces = ["def", " f", "(", "x", "):", "\n", "    ", "return", " x", " +", " 12", "  ", "# one", "\n",
              "    s", " =", " 'a", " b'", "\n", "print", "(", "None", ")", " is", " all"]
    assert classify_pieces(pieces) == [
        "keyword", "identifier", "bracket", "identifier", "bracket", "newline", "indentation", "keyword",
        "identifier", "operator", "number", "space", "comment", "newline", "identifier", "operator", "string",
        "string", "newline", "builtin", "bracket", "keyword", "bracket", "keyword", "builtin"]
    assert classify_pieces(["\n    ", "if"]) == ["indentation", "keyword"]


def test_bench_mor_runs_the_lab_family_side_by_side(lab, tmp_path, monkeypatch):
    from mor_lab.bench.mor import lab_family
    report = lab_family((3,), 3, ("every-step", "cost"), 1, torch.device("cpu"), quick=True)
    assert report["models"] == ["vanilla", "mor-expert-3", "mor-token-3"]
    methods = [r["method"] for r in report["results"]]
    assert methods == ["vanilla"] + [f"{m}_{k}" for m in ("mor-expert-3", "mor-token-3")
                                     for k in ("static", "cdb", "cdb_cost")]
    for row in report["results"]:
        assert row["new_tokens"] == row["requests"] * 3 and {"predicted_s", "ideal_speedup"} <= set(row)
        if "_cdb" in row["method"]:  # the same routing decisions in every mode: the same tokens
            assert row["same_tokens_as_static"]
    monkeypatch.setenv("MOR_LAB_CHECKPOINTS", str(tmp_path))  # no checkpoints: an empty section that says why
    assert lab_family((3,), 3, ("every-step",), 1, torch.device("cpu"), quick=True)["results"] == []

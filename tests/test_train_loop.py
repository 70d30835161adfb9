"""The one training loop: exact resume, configuration checks, the JSON log, data streams, and the same
run on two CPU processes (accelerate launch, gloo) as on one."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mor_lab
from mor_lab.mor import MoRConfig, MoRModel
from mor_lab.train.loop import (Cycle, LoopConfig, OptimConfig, RowStream, TokenStream, TrainLog, fit, only_training,
                                shard, wsd)
from mor_lab.train.losses import next_token_targets

DIMS = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=5, num_heads=2,
                           num_kv_heads=1, max_position_embeddings=64)
TOKENS = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(1))


def model(kind="expert", seed=0):
    torch.manual_seed(seed)
    return MoRModel(MoRConfig(DIMS, kind=kind, num_recursions=3))


def lm_loss(module, ids, step):
    out = module(ids, next_token_targets(ids), step=step)
    return out.loss, {"lm_loss": out.lm_loss.detach(), "flops": 3.0 * ids.numel()}


def config(**kw):
    kw = {"steps": 8, "optim": OptimConfig(lr=1e-2), "checkpoint_every": 3, **kw}
    return LoopConfig(**kw)


def test_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    straight = model()
    log = fit(straight, list(straight.parameters()), TokenStream(TOKENS, 4, 16, seed=0), lm_loss, config(),
              out=tmp_path / "straight", progress=False)

    crashing = model()

    def crash_at_5(module, ids, step):
        if step == 5:
            raise KeyboardInterrupt
        return lm_loss(module, ids, step)

    with pytest.raises(KeyboardInterrupt):
        fit(crashing, list(crashing.parameters()), TokenStream(TOKENS, 4, 16, seed=0), crash_at_5, config(),
            out=tmp_path / "resumed", progress=False)
    resumed = model(seed=123)  # another init: the checkpoint restores every trained weight
    log2 = fit(resumed, list(resumed.parameters()), TokenStream(TOKENS, 4, 16, seed=0), lm_loss, config(),
               out=tmp_path / "resumed", resume=True, progress=False)
    assert log2.resumed_at == [3] and log2.steps_done == 8
    assert log2.loss == log.loss and log2.metrics["lm_loss"] == log.metrics["lm_loss"]
    assert log2.total_tokens == log.total_tokens and log2.total_flops == log.total_flops
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # A finished run resumes to itself without training.
    again = model(seed=7)
    log3 = fit(again, list(again.parameters()), TokenStream(TOKENS, 4, 16, seed=0), lm_loss, config(),
               out=tmp_path / "straight", resume=True, progress=False)
    assert log3.loss == log.loss and torch.equal(again.embed_tokens.weight, straight.embed_tokens.weight)


def test_resume_refuses_another_configuration_and_overwriting(tmp_path):
    m = model("vanilla")
    fit(m, list(m.parameters()), TokenStream(TOKENS, 4, 16), lm_loss, config(steps=3), out=tmp_path,
        run_config={"model": {"hidden_size": 32}}, progress=False)
    with pytest.raises(ValueError, match=r"loop\.optim\.lr is 0\.01 in the checkpoint, 0\.02 in this run"):
        fit(m, list(m.parameters()), TokenStream(TOKENS, 4, 16), lm_loss, config(steps=3, optim=OptimConfig(lr=2e-2)),
            out=tmp_path, resume=True, run_config={"model": {"hidden_size": 32}}, progress=False)
    with pytest.raises(ValueError, match=r"config\.model\.hidden_size is 32 in the checkpoint, 48"):
        fit(m, list(m.parameters()), TokenStream(TOKENS, 4, 16), lm_loss, config(steps=3), out=tmp_path,
            resume=True, run_config={"model": {"hidden_size": 48}}, progress=False)
    with pytest.raises(ValueError, match="holds a checkpoint of an earlier run"):
        fit(m, list(m.parameters()), TokenStream(TOKENS, 4, 16), lm_loss, config(steps=3), out=tmp_path,
            run_config={"model": {"hidden_size": 32}}, progress=False)


def test_the_log_records_curve_tokens_flops_machine_and_evals(tmp_path):
    m = model("token")
    evals = []

    def evaluate(module, final):
        evals.append(final)
        return {"val": 1.0 + final}

    log = fit(m, list(m.parameters()), TokenStream(TOKENS, 4, 16), lm_loss,
              config(steps=5, log_every=2, eval_every=2, checkpoint_every=0), evaluate=evaluate, out=tmp_path,
              command="python -m something", progress=False)
    assert log.step == [2, 4, 5] and log.tokens == [128, 256, 320] and log.flops[-1] == 3.0 * 320
    assert len(log.loss) == 3 and len(log.metrics["lm_loss"]) == 3 and all(s > 0 for s in log.seconds)
    assert evals == [False, False, True] and log.final_eval()["val"] == 2.0 and log.evals[0]["step"] == 2
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["command"] == "python -m something" and saved["steps_done"] == 5
    assert {"cpu", "torch", "threads", "precision", "autocast", "processes", "device"} <= set(saved["machine"])
    assert TrainLog.load(tmp_path / "log.json").loss == log.loss
    assert not (tmp_path / "resume").exists()  # checkpoint_every=0: no resumable state


def test_only_the_given_parameters_train_and_flags_are_restored():
    m = model("vanilla")
    m.layers[0].requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.layers[1].parameters())
    fit(m, params, TokenStream(TOKENS, 4, 16), lm_loss, config(steps=2, checkpoint_every=0), progress=False)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("layers.1.") for k in changed)
    assert not any(p.requires_grad for p in m.layers[0].parameters())  # its own flag, restored
    assert all(p.requires_grad for p in m.layers[2].parameters())
    with pytest.raises(ValueError, match="nothing to train"):
        fit(m, [], TokenStream(TOKENS, 4, 16), lm_loss, config(steps=1), progress=False)
    with pytest.raises(ValueError, match="not in it"):
        fit(m, [torch.nn.Parameter(torch.zeros(2))], TokenStream(TOKENS, 4, 16), lm_loss, config(steps=1),
            progress=False)
    with only_training(m):
        assert not any(p.requires_grad for p in m.parameters())


def test_bf16_autocast_runs_and_is_logged():
    m = model("expert")
    log = fit(m, list(m.parameters()), TokenStream(TOKENS, 2, 16), lm_loss,
              config(steps=2, checkpoint_every=0, precision="bf16"), progress=False)
    assert log.machine["autocast"] == "bfloat16" and log.machine["param_dtype"] == "float32"
    assert m.embed_tokens.weight.dtype == torch.float32 and all(torch.isfinite(torch.tensor(log.loss)))


def test_schedule_and_config_validation():
    optim = OptimConfig(warmup=0.2, decay=0.3, min_lr=0.1)
    lrs = [wsd(s, 10, optim) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:7] == [1.0] * 5 and lrs[-1] == pytest.approx(0.1)
    assert [wsd(s, 5, OptimConfig(warmup=0, decay=0)) for s in range(5)] == [1.0] * 5
    with pytest.raises(ValueError, match="OptimConfig.warmup"):
        OptimConfig(warmup=0.8, decay=0.5)
    with pytest.raises(ValueError, match="LoopConfig.precision"):
        LoopConfig(steps=1, precision="fp8")
    with pytest.raises(ValueError, match="multiple of log_every"):
        LoopConfig(steps=10, log_every=4, checkpoint_every=6)
    assert LoopConfig.from_dict(json.loads(json.dumps(config().to_dict()))) == config()


def test_streams_resume_from_their_position_and_reject_bad_input():
    stream = TokenStream(torch.arange(200), 2, 10, seed=3)  # 20 blocks: 10 batches an epoch
    first = [next(stream) for _ in range(13)]
    state = stream.state_dict()
    rest = [next(stream) for _ in range(9)]
    again = TokenStream(torch.arange(200), 2, 10, seed=3)
    again.load_state_dict(state)
    assert state == {"epoch": 1, "index": 3}
    assert all(torch.equal(a, b) for a, b in zip(rest, [next(again) for _ in range(9)]))
    assert not torch.equal(first[0], first[10])  # each epoch its own order
    with pytest.raises(ValueError, match="make no batch of 4 x 64"):
        TokenStream(torch.arange(200), 4, 64)
    rows = RowStream(10, 4, seed=0)
    drawn = [next(rows) for _ in range(5)]
    assert [len(r) for r in drawn] == [4, 4, 4, 4, 4] and rows.state_dict() == {"epoch": 2, "index": 1}
    assert len(set(torch.cat(drawn[:2]).tolist())) == 8
    blocks = Cycle([torch.zeros(2, 3), torch.ones(2, 3)])
    assert [int(next(blocks)[0, 0]) for _ in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="no token blocks"):
        next(Cycle(iter([])))
    assert torch.equal(shard(torch.arange(8).view(4, 2), 1, 2), torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(ValueError, match="does not split into 2 equal parts"):
        shard(torch.zeros(3, 4), 0, 2)


WORKER = """
import sys, torch
import mor_lab
from mor_lab.mor import MoRConfig, MoRModel
from mor_lab.mor.train import TrainConfig, train
from mor_lab.train.loop import make_accelerator
accelerator = make_accelerator()  # as the recipes call it: on a CPU-only machine, cpu=True forms the gloo group
torch.set_num_threads(1)
dims = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=5, num_heads=2,
                           num_kv_heads=1, max_position_embeddings=64)
torch.manual_seed(0)
model = MoRModel(MoRConfig(dims, kind="expert", num_recursions=3))
tokens = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(1))
result = train(model, tokens, TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2), name="ddp", progress=False,
               accelerator=accelerator)
if accelerator.is_main_process:
    torch.save({"losses": result.log.loss, "state": model.state_dict(), "machine": result.log.machine,
                "flops": result.log.total_flops}, sys.argv[1])
"""


def test_two_cpu_processes_train_like_one(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine: two processes over gloo,
    each training on half of every global batch of 4 sequences; DDP averages the gradients. Expert-choice
    top-k is per sequence, so the two-process run is the one-process run up to float summation order:
    losses within 1e-5 (relative), weights within 1e-4 after 6 AdamW steps at lr 1e-2 (measured: 1.5e-5)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    root = Path(mor_lab.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
              str(tmp_path / "two.pt")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, check=True, timeout=120)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert two["machine"]["processes"] == 2 and "MULTI_CPU" in two["machine"]["distributed"]
    assert one["machine"]["processes"] == 1
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["flops"] == pytest.approx(one["flops"], rel=1e-9)  # summed over processes: the global batch's
    for name, a in one["state"].items():
        assert torch.allclose(a, two["state"][name], atol=1e-4, rtol=0), name

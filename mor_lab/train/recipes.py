"""Named training recipes, each with a quick (CPU smoke, seconds) and a full size: ``mor-lab train NAME``.

- The lab's model family, trained from scratch on the offline corpus (the standard library's source
  and docstrings, the pydoc topics) with a byte-level BPE tokenizer trained on it, at *equal training
  FLOPs*: ``vanilla``, ``recursive-3`` (MIDDLE_CYCLE, N_r = 3, no router), ``mor-expert-3`` and
  ``mor-token-3`` (MoR with expert- / token-choice routers, N_r = 3). The budget is ``vanilla_steps``
  steps of the vanilla model; each member takes as many steps as that buys it
  (:meth:`MoRModel.train_flops_per_token` at its capacities).
- ``uptrain-lab-3``: a relaxed recursive (N_r = 3, SVD-initialised LoRA) version of ``lab:vanilla``,
  uptrained by distillation; ``uptrain-smollm2``: the same recipe on SmolLM2-135M.
- ``exit-heads-smollm2``: exit heads of SmolLM2 at several depths on a frozen backbone.

Each run writes, into ``--out``: the model (16-bit safetensors + config), the tokenizer, the held-out
blocks it was scored on, and ``train.json`` (the loop's log: the exact command that reproduces the
run, curve, FLOPs, tokens, seconds, machine; ``result``: held-out figures of the *stored* weights).
``resume/`` holds the resumable state (``--resume``). A size's parameters can be overridden with
``--set KEY=VALUE`` (recorded in the command).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

SIZES = ("quick", "full")


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    sizes: dict  # size -> parameters
    run: Callable  # run(recipe, params, seed=, out=, resume=, progress=, accelerator=, command=) -> dict

    def params(self, size: str, overrides: dict | None = None) -> dict:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
        params = json.loads(json.dumps(self.sizes[size]))
        for key, value in (overrides or {}).items():
            if key not in params:
                raise ValueError(f"recipe {self.name!r} has no parameter {key!r}; its parameters: "
                                 f"{', '.join(sorted(params))}")
            params[key] = value
        return params


# ---------------------------------------------------------------------------------------------------
# The model family

FAMILY_MEMBERS = {"vanilla": ("vanilla", 1), "recursive-3": ("recursive", 3), "mor-expert-3": ("expert", 3),
                  "mor-token-3": ("token", 3)}
FAMILY_SIZES = {
    "quick": dict(corpus="pydoc", max_chars=120_000, vocab_size=512, hidden_size=32, intermediate_size=96,
                  num_layers=5, num_heads=2, num_kv_heads=1, max_positions=256, seq_len=64, batch_size=8,
                  vanilla_steps=24, lr=3e-3, warmup=0.1, decay=0.2, min_lr=0.1, weight_decay=0.1,
                  eval_tokens=2048, eval_every=0, log_every=4, checkpoint_every=8, precision="fp32",
                  router={}, sample_tokens=16),
    # Sized by measured runs for ~10 minutes per member on an idle 2-core CPU (vanilla ~5.4k tokens/s, MoR
    # ~6.8k at the same FLOPs/s; fp32: bf16 autocast is 2.3-2.7x slower there). Batch 8 and lr 2e-3 won the
    # short sweeps; every member's checkpoint is 2.6-4.2 MB in fp16 (2 seeds x 4 members ~27 MB with logs).
    "full": dict(corpus="lab", max_chars=None, vocab_size=4096, hidden_size=128, intermediate_size=384,
                 num_layers=8, num_heads=4, num_kv_heads=2, max_positions=1024, seq_len=256, batch_size=8,
                 vanilla_steps=1600, lr=2e-3, warmup=0.05, decay=0.2, min_lr=0.1, weight_decay=0.1,
                 eval_tokens=16384, eval_every=250, log_every=10, checkpoint_every=100, precision="fp32",
                 router={}, sample_tokens=48),
}


def _accelerator(accelerator):
    from .loop import make_accelerator
    return accelerator or make_accelerator()


def family_config(member: str, params: dict, vocab_size: int, eos_token_id: int | None = None):
    from ..models.config import ModelConfig
    from ..mor.model import MoRConfig
    from ..mor.routers import RouterConfig
    kind, n_r = FAMILY_MEMBERS[member]
    dims = ModelConfig(vocab_size=vocab_size, hidden_size=params["hidden_size"],
                       intermediate_size=params["intermediate_size"], num_layers=params["num_layers"],
                       num_heads=params["num_heads"], num_kv_heads=params["num_kv_heads"],
                       max_position_embeddings=params["max_positions"], eos_token_id=eos_token_id)
    router = RouterConfig(**params["router"]) if kind in ("expert", "token") else RouterConfig()
    return MoRConfig(dims, kind=kind, num_recursions=n_r, router=router)


def _vanilla_step_flops(config, seq_len: int, batch_size: int) -> float:
    from ..mor.model import MoRConfig, MoRModel
    with torch.device("meta"):  # only the FLOPs formula is needed: no weights, no init
        vanilla = MoRModel(MoRConfig(config.model, kind="vanilla"))
    return vanilla.train_flops_per_token(seq_len) * seq_len * batch_size


def _heldout(validation: torch.Tensor, tokens: int, seq_len: int) -> torch.Tensor:
    """About ``tokens`` held-out tokens as ``[n, seq_len]`` blocks spread evenly over the validation split
    (its parts follow each other: prose first, then code), so the score reflects the whole corpus."""
    blocks = validation.numel() // seq_len
    n = min(tokens // seq_len, blocks)
    if n == 0:
        raise ValueError(f"the validation split has {validation.numel()} tokens: no held-out block of {seq_len}")
    index = torch.linspace(0, blocks - 1, n).round().long()
    return validation[: blocks * seq_len].view(blocks, seq_len)[index]


def save_heldout(directory: Path, blocks: torch.Tensor) -> None:
    from safetensors.torch import save_file
    dtype = torch.int16 if int(blocks.max()) < 2 ** 15 else torch.int32  # a few KB per checkpoint
    save_file({"ids": blocks.to(dtype).contiguous()}, str(directory / "heldout.safetensors"))


def run_family(recipe: Recipe, params: dict, *, seed: int, out: Path, resume: bool, progress: bool,
               accelerator=None, command: str | None = None) -> dict:
    from ..checkpoints import load_dir
    from ..mor.analysis import SAMPLE_PROMPTS, heldout_report
    from ..mor.model import MoRModel
    from ..mor.train import TrainConfig, train
    from .tokenizer import corpus_tokens
    accelerator = _accelerator(accelerator)
    data = corpus_tokens(params["corpus"], params["vocab_size"], params["max_chars"])
    config = family_config(recipe.name, params, len(data.tokenizer), data.tokenizer.eos_token_id)
    T, B = params["seq_len"], params["batch_size"]
    heldout = _heldout(data.validation, params["eval_tokens"], T)
    budget = params["vanilla_steps"] * _vanilla_step_flops(config, T, B)
    train_config = TrainConfig(flops=budget, batch_size=B, seq_len=T, lr=params["lr"], warmup=params["warmup"],
                               decay=params["decay"], min_lr=params["min_lr"], weight_decay=params["weight_decay"],
                               seed=seed, eval_every=params["eval_every"], eval_batches=math.ceil(len(heldout) / B),
                               precision=params["precision"], log_every=params["log_every"],
                               checkpoint_every=params["checkpoint_every"])
    torch.manual_seed(seed)
    model = MoRModel(config).to(accelerator.device)
    run = {"recipe": recipe.name, "params": params, "seed": seed, "data": data.info}
    result = train(model, data.train, train_config, heldout.flatten(), name=recipe.name, progress=progress,
                   checkpoint=out, resume=resume, accelerator=accelerator, command=command, run_config=run)
    summary = {}
    if accelerator.is_main_process:
        # The stored weights are 16-bit: the logged held-out loss is that of the stored weights.
        model.to(torch.float16).save(out)
        data.tokenizer.save_pretrained(str(out))
        save_heldout(out, heldout)
        stored = load_dir(out)
        report = heldout_report(stored, data.tokenizer, heldout, list(SAMPLE_PROMPTS), params["sample_tokens"])
        summary = {"heldout": {k: v for k, v in report.items() if k != "samples"}, "samples": report["samples"],
                   "heldout_fp32_weights": result.val_loss, "weights_dtype": "float16",
                   "params": sum(p.numel() for p in stored.parameters()),
                   "non_embedding_params": sum(p.numel() for n, p in stored.named_parameters()
                                               if "embed" not in n and "lm_head" not in n),
                   "mean_loops": result.mean_loops[-1] if result.mean_loops else None,
                   "train_flops": result.log.total_flops, "flops_budget": budget, "steps": result.steps,
                   "tokens": result.tokens, "minutes": result.log.total_seconds / 60,
                   "cpu_minutes": result.log.total_cpu_seconds / 60}
        scalars = {k: v for k, v in result.to_dict().items() if not isinstance(v, list)}  # curves: in the log
        result.log.result = {**scalars, **summary}
        result.log.save(out / "train.json")
    accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------------
# Uptraining a relaxed recursive model by distillation

UPTRAIN_SIZES = {
    "uptrain-lab-3": {
        "quick": dict(teacher="lab:vanilla", corpus="pydoc", max_chars=120_000, strategy="middle_cycle",
                      num_recursions=3, init="stepwise", rank=4, train_shared=True, steps=16, batch_size=4,
                      seq_len=64, lr=1e-3, warmup=0.1, decay=0.2, eval_tokens=1024, log_every=4,
                      checkpoint_every=8, precision="fp32"),
        # ~2 s a step at batch 16 x 256 on 2 cores (teacher + student, measured): 400 steps of 8 ~ 7 minutes.
        "full": dict(teacher="lab:vanilla", corpus="lab", max_chars=None, strategy="middle_cycle",
                     num_recursions=3, init="stepwise", rank=32, train_shared=True, steps=400, batch_size=8,
                     seq_len=256, lr=1e-3, warmup=0.05, decay=0.2, eval_tokens=16384, log_every=10,
                     checkpoint_every=100, precision="fp32"),
    },
    "uptrain-smollm2": {
        "quick": dict(teacher="smollm2", corpus="pydoc", max_chars=60_000, strategy="middle_cycle",
                      num_recursions=3, init="stepwise", rank=8, train_shared=False, steps=3, batch_size=1,
                      seq_len=64, lr=1e-3, warmup=0.0, decay=0.0, eval_tokens=128, log_every=1,
                      checkpoint_every=0, precision="fp32"),
        "full": dict(teacher="smollm2", corpus="pydoc", max_chars=None, strategy="middle_cycle",
                     num_recursions=3, init="stepwise", rank=64, train_shared=False, steps=300, batch_size=4,
                     seq_len=128, lr=1e-3, warmup=0.05, decay=0.2, eval_tokens=4096, log_every=5,
                     checkpoint_every=25, precision="fp32"),
    },
}


def as_decoder(model):
    """A vanilla ``MoRModel`` as the plain ``Decoder`` it is (what ``recursive.convert`` takes)."""
    from ..models.decoder import Decoder
    from ..mor.model import MoRModel
    if not isinstance(model, MoRModel):
        return model
    if model.kind != "vanilla":
        raise ValueError(f"the teacher must be a vanilla model, got a MoR model of kind {model.kind!r}")
    plain = Decoder(model.config).to(model.device, model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_teacher(name: str, device=None):
    """A teacher by name: ``lab:NAME``, a directory a family recipe wrote, or a pretrained model."""
    from ..checkpoints import load_dir
    from ..models.hf import load_pretrained, load_tokenizer
    path = Path(name)
    if path.is_dir() and (path / "mor_config.json").exists():
        model, tokenizer = load_dir(path, device=device), load_tokenizer(path)
    else:
        model, tokenizer = load_pretrained(None if name == "smollm2" else name, device=device)
    if tokenizer is None:
        raise ValueError(f"teacher {name!r} has no tokenizer")
    return as_decoder(model), tokenizer


@torch.no_grad()
def _decoder_nll(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    from ..mor.analysis import nats_per_token
    return nats_per_token(model, blocks.to(model.device), batch_size=batch_size)


def run_uptrain(recipe: Recipe, params: dict, *, seed: int, out: Path, resume: bool, progress: bool,
                accelerator=None, command: str | None = None) -> dict:
    from ..models.decoder import Decoder
    from ..recursive import RecursiveConfig, UptrainConfig, convert, distill_kl, relax, uptrain
    from .tokenizer import corpus_tokens
    accelerator = _accelerator(accelerator)
    teacher, tokenizer = load_teacher(params["teacher"], device=accelerator.device)
    data = corpus_tokens(params["corpus"], len(tokenizer), params["max_chars"], tokenizer=tokenizer)
    heldout = _heldout(data.validation, params["eval_tokens"], params["seq_len"]).to(accelerator.device)
    conversion = convert(teacher, RecursiveConfig(strategy=params["strategy"], num_recursions=params["num_recursions"],
                                                  init=params["init"], seed=seed))
    student = conversion.model
    if params["rank"]:
        relax(student, teacher, conversion.sharing, attn_rank=params["rank"], mlp_rank=params["rank"])
    held = list(heldout.split(8))
    before = {"kl": distill_kl(student, teacher, held), "nats_per_token": _decoder_nll(student, heldout)}
    config = UptrainConfig(steps=params["steps"], batch_size=params["batch_size"], seq_len=params["seq_len"],
                           lr=params["lr"], warmup=params["warmup"], decay=params["decay"],
                           train_shared=params["train_shared"], seed=seed, precision=params["precision"],
                           checkpoint_every=params["checkpoint_every"], log_every=params["log_every"])
    run = {"recipe": recipe.name, "params": params, "seed": seed, "data": data.info}
    result = uptrain(student, teacher, data.train, config, progress=progress, checkpoint=out, resume=resume,
                     accelerator=accelerator, command=command, run_config=run, log_name="train.json")
    summary = {}
    if accelerator.is_main_process:
        student.to(torch.float16).save(out)
        tokenizer.save_pretrained(str(out))
        save_heldout(out, heldout.cpu())
        stored = Decoder.load(out).float().to(accelerator.device).eval()
        summary = {"heldout": {"nats_per_token": _decoder_nll(stored, heldout), "kl": distill_kl(stored, teacher, held),
                               "teacher_nats_per_token": _decoder_nll(teacher, heldout),
                               "uniform": math.log(teacher.config.vocab_size), "tokens": int(heldout.numel())},
                   "before_uptraining": before, "weights_dtype": "float16", "plan": student.plan,
                   "params": {"teacher": conversion.params_before,
                              "student": sum(p.numel() for p in stored.parameters())},
                   "minutes": result.seconds / 60, "losses": result.losses}
        result.log.result = {k: v for k, v in summary.items() if k != "losses"}  # the curve is in the log
        result.log.save(out / "train.json")
    accelerator.wait_for_everyone()
    return {k: v for k, v in summary.items() if k != "losses"}


# ---------------------------------------------------------------------------------------------------
# Exit heads of SmolLM2

# data="chat": the heads train on SmolLM2's own greedy continuations of chat prompts built from the corpus
# (the distribution decoding sees) and are scored on its continuations of the benchmark's chat prompts
# (held out: no training prompt comes from them); data="corpus": raw corpus blocks, as before.
EXIT_SIZES = {
    "quick": dict(model="smollm2", corpus="pydoc", data="corpus", exit_layers=[8], adapter="linear",
                  train_tokens=1024, eval_tokens=256, block=128, train_prompts=4, eval_prompts=2, new_tokens=16,
                  steps=12, lr=1e-3, batch_tokens=128, checkpoint_every=0, precision="fp32"),
    "full": dict(model="smollm2", corpus="pydoc", data="chat", exit_layers=[12, 16, 20, 24], adapter="linear",
                 train_tokens=32768, eval_tokens=4096, block=128, train_prompts=256, eval_prompts=16, new_tokens=96,
                 steps=400, lr=1e-3, batch_tokens=256, checkpoint_every=100, precision="fp32"),
}
EXIT_DATA = ("corpus", "chat")


def corpus_chat_prompts(corpus, count: int, seed: int = 0) -> list[str]:
    """``count`` user messages asking about passages of ``corpus`` (one paragraph each, 80-400 characters),
    in a seeded order: chat prompts of the kind a user sends, built offline."""
    import random
    paragraphs = sorted({" ".join(p.split()) for p in corpus.split("\n\n")})
    paragraphs = [p for p in paragraphs if 80 <= len(p) <= 400 and p[0].isalpha()]
    if len(paragraphs) < count:
        raise ValueError(f"the corpus has {len(paragraphs)} usable paragraphs, fewer than {count} prompts")
    random.Random(seed).shuffle(paragraphs)
    return [f"Explain this passage from the Python documentation in simple words:\n\n{p}"
            for p in paragraphs[:count]]


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], new_tokens: int, batch: int = 64,
                         progress: bool = False) -> list[list[int]]:
    """Chat-templated ``prompts`` followed by the model's own greedy continuation (EOS off, as the
    benchmarks decode), one id list per prompt; cached on disk by model, prompts and length."""
    import hashlib
    from ..early_exit.recipes import model_fingerprint
    from ..engine.generate import encode_prompts, generate_ids
    from ..models.hf import cache_root
    prompt_ids = encode_prompts(tokenizer, prompts, chat=True)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), new_tokens, prompt_ids]).encode()).hexdigest()[:16]
    path = cache_root() / "exit_continuations" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    out, chunks = [], range(0, len(prompt_ids), batch)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="greedy continuations", unit="batch")
    for i in chunks:
        part = prompt_ids[i:i + batch]
        ids, _ = generate_ids(model, part, new_tokens, eos_token_ids=[], slots=len(part))
        out += [p + c for p, c in zip(part, ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def _chat_sequences(model, tokenizer, prompts: list[str], new_tokens: int, progress: bool = False):
    """(one ``[1, T]`` tensor per prompt: chat prompt + greedy continuation, first continuation position)."""
    sequences = greedy_continuations(model, tokenizer, prompts, new_tokens, progress=progress)
    return ([torch.tensor([s], device=model.device) for s in sequences], [len(s) - new_tokens for s in sequences])


def heldout_chat_sequences(model, tokenizer, params: dict, progress: bool = False):
    """The exit heads' held-out set (``data="chat"``): the model's continuations of the first
    ``eval_prompts`` of the benchmark's chat prompts, as :func:`_chat_sequences` returns them."""
    from ..bench.early_exit import CHAT_PROMPTS
    if params["eval_prompts"] > len(CHAT_PROMPTS):
        raise ValueError(f"eval_prompts must be <= {len(CHAT_PROMPTS)} (the benchmark's chat prompts)")
    return _chat_sequences(model, tokenizer, CHAT_PROMPTS[: params["eval_prompts"]], params["new_tokens"], progress)


def _exit_data(model, tokenizer, params: dict, seed: int, progress: bool):
    """(training sequences, held-out sequences, first scored position of each, or None: all): token blocks
    of the corpus, or prompt + greedy continuation where only the continuation trains and is scored."""
    from ..train.data import load_corpus, tokenize
    corpus, block = load_corpus(params["corpus"]), params["block"]
    if params["data"] not in EXIT_DATA:
        raise ValueError(f"unknown data {params['data']!r}; allowed: {', '.join(EXIT_DATA)}")
    if params["data"] == "chat":
        prompts = corpus_chat_prompts(corpus.train, params["train_prompts"], seed)
        train, train_from = _chat_sequences(model, tokenizer, prompts, params["new_tokens"], progress)
        test, test_from = heldout_chat_sequences(model, tokenizer, params, progress)
        return train, test, train_from, test_from
    train_ids = tokenize(tokenizer, corpus.train)[: params["train_tokens"]]
    if train_ids.numel() < block:
        raise ValueError(f"corpus {params['corpus']!r} gave {train_ids.numel()} training tokens: fewer than one "
                         f"block of {block}")
    train_blocks = train_ids[: train_ids.numel() // block * block].view(-1, block).to(model.device)
    heldout = _heldout(tokenize(tokenizer, corpus.validation), params["eval_tokens"], block).to(model.device)
    return list(train_blocks.split(8)), list(heldout.split(8)), None, None


def run_exit_heads(recipe: Recipe, params: dict, *, seed: int, out: Path, resume: bool, progress: bool,
                   accelerator=None, command: str | None = None) -> dict:
    from ..early_exit.heads import ExitConfig, ExitHeads, cache_exit_states, evaluate_exit_heads, train_exit_heads
    from ..models.hf import load_pretrained
    accelerator = _accelerator(accelerator)
    model, tokenizer = load_pretrained(None if params["model"] == "smollm2" else params["model"],
                                       device=accelerator.device)
    train, test, train_from, test_from = _exit_data(model, tokenizer, params, seed, progress)
    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=list(params["exit_layers"]), adapter=params["adapter"]),
                                seed=seed)
    train_cache = cache_exit_states(model, train, heads.exit_layers, progress, scored_from=train_from)
    test_cache = cache_exit_states(model, test, heads.exit_layers, scored_from=test_from)
    lens = evaluate_exit_heads(model, heads, test_cache)
    run = {"recipe": recipe.name, "params": params, "seed": seed}
    history = train_exit_heads(model, heads, train_cache, steps=params["steps"], lr=params["lr"],
                               batch_tokens=params["batch_tokens"], seed=seed, progress=progress, checkpoint=out,
                               resume=resume, checkpoint_every=params["checkpoint_every"],
                               precision=params["precision"], accelerator=accelerator, command=command,
                               run_config=run)
    summary = {}
    if accelerator.is_main_process:
        tuned = evaluate_exit_heads(model, heads, test_cache)
        summary = {"heldout": {str(k): dataclasses.asdict(m) for k, m in tuned.items()},
                   "init": {str(k): dataclasses.asdict(m) for k, m in lens.items()},
                   "train_tokens": train_cache.num_scored, "minutes": history.seconds / 60}
        history.log.result = summary
        history.log.save(out / "train.json")
    accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------------

RECIPES: dict[str, Recipe] = {
    **{name: Recipe(name, f"the lab's {kind} model (N_r = {n}) from scratch at equal training FLOPs", FAMILY_SIZES,
                    run_family) for name, (kind, n) in FAMILY_MEMBERS.items()},
    "uptrain-lab-3": Recipe("uptrain-lab-3", "relaxed recursive lab:vanilla (N_r = 3, LoRA), uptrained by "
                            "distillation", UPTRAIN_SIZES["uptrain-lab-3"], run_uptrain),
    "uptrain-smollm2": Recipe("uptrain-smollm2", "relaxed recursive SmolLM2-135M (N_r = 3, LoRA), uptrained by "
                              "distillation", UPTRAIN_SIZES["uptrain-smollm2"], run_uptrain),
    "exit-heads-smollm2": Recipe("exit-heads-smollm2", "SmolLM2 exit heads on a frozen backbone (FREE / CALM "
                                 "objective)", EXIT_SIZES, run_exit_heads),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def _override_text(value) -> str:
    """How ``--set`` spells ``value``: bare when it reads back as the same string, else JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def reproduce_command(name: str, size: str, seed: int, out: str | Path, overrides: dict | None = None,
                      processes: int = 1) -> str:
    """The shell command that reruns a recipe exactly (``--resume`` is not part of it: resuming ends
    where an uninterrupted run ends)."""
    import shlex
    head = (f"accelerate launch --multi_gpu --num_processes {processes} -m mor_lab.cli" if processes > 1
            else "python -m mor_lab.cli")
    parts = [head, "train", name, "--size", size, "--seed", str(seed), "--out", shlex.quote(str(out))]
    for key, value in (overrides or {}).items():
        parts += ["--set", shlex.quote(f"{key}={_override_text(value)}")]
    return " ".join(parts)


def run_recipe(name: str, size: str = "full", *, seed: int = 0, out: str | Path | None = None, resume: bool = False,
               overrides: dict | None = None, progress: bool = True, accelerator=None) -> dict:
    """Run recipe ``name`` at ``size``; returns its summary (held-out figures, minutes, ...)."""
    recipe = get_recipe(name)
    params = recipe.params(size, overrides)
    out = Path(out) if out is not None else Path("runs") / f"{name}-{size}-seed{seed}"
    accelerator = _accelerator(accelerator)
    command = reproduce_command(name, size, seed, out, overrides, accelerator.num_processes)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    summary = recipe.run(recipe, params, seed=seed, out=out, resume=resume, progress=progress,
                         accelerator=accelerator, command=command)
    return {"recipe": name, "size": size, "seed": seed, "out": str(out), "command": command, **summary}

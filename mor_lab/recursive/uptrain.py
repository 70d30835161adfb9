"""Uptraining: distil the original model into its recursive (relaxed) version.

The loss is ``KL(teacher || student)`` on next-token distributions over token blocks of a corpus
(offline by default), so no labels are needed and the student learns to behave like the model it
came from. Only the LoRA trains by default (cheap, minutes on a 2-core CPU for small budgets);
``train_shared=True`` also trains the shared layers and per-step norms, as the paper's uptraining
does. Embeddings and the LM head stay frozen. The same code runs on a GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..models.config import DictConfig
from ..models.decoder import Decoder
from ..train.loop import (PRECISIONS, Cycle, LoopConfig, OptimConfig, TokenStream, TrainLog, decoder_forward_flops,
                          fit)
from ..train.losses import kl_distill


@dataclass
class UptrainConfig(DictConfig):
    """A distillation run: how long, how big the batches, how fast, and what trains."""
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 1.0
    train_shared: bool = False  # also the physical layers and per-step norms (not just the LoRA)
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0  # the order of the token blocks
    warmup: float = 0.0  # fractions of the steps: linear warm-up, final decay (0, 0: a constant lr)
    decay: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 autocast
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: none)
    log_every: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UptrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"UptrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"UptrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"UptrainConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"UptrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.loop()  # validates the schedule

    def loop(self) -> LoopConfig:
        optim = OptimConfig(lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay, warmup=self.warmup,
                            decay=self.decay, max_grad_norm=self.max_grad_norm)
        return LoopConfig(steps=self.steps, optim=optim, seed=self.seed, precision=self.precision,
                          checkpoint_every=self.checkpoint_every, log_every=self.log_every)


@dataclass
class UptrainResult:
    losses: list[float] = field(default_factory=list)  # the KL of every step (of every logged point)
    seconds: float = 0.0
    checkpoint: str | None = None  # where the student was saved (Decoder.save), if anywhere
    log: TrainLog | None = None  # the loop's full log


def trainable_parameters(model: Decoder, train_shared: bool = False) -> list[torch.nn.Parameter]:
    """The LoRA factors of every step, plus (``train_shared``) the physical layers and per-step norms."""
    params = [p for d in model.step_deltas.values() for p in d.lora.parameters()]
    if train_shared:
        params += list(model.layers.parameters())
        params += [p for d in model.step_deltas.values() for p in d.norms.parameters()]
    return params


def _blocks(data, config: UptrainConfig):
    """A resumable stream of ``[B, T]`` blocks: token ids are cut into a seeded ``TokenStream``; a
    ``[B, T]`` block or an iterable of blocks is cycled."""
    if isinstance(data, torch.Tensor) and data.dim() <= 1:
        return TokenStream(data, config.batch_size, config.seq_len, seed=config.seed)
    return Cycle([data] if isinstance(data, torch.Tensor) else data, what="uptrain")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids.to(next(model.parameters()).device))
    return out.logits if hasattr(out, "logits") else out  # a MoRModel returns its output record


def uptrain(student: Decoder, teacher: Decoder, data: torch.Tensor | Iterable[torch.Tensor],
            config: UptrainConfig | None = None, *, progress: bool = True, checkpoint: str | Path | None = None,
            resume: bool = False, accelerator=None, command: str | None = None, run_config: dict | None = None,
            log_name: str = "uptrain.json", **overrides) -> UptrainResult:
    """Distil ``teacher`` into ``student`` with AdamW for ``config.steps`` steps; returns the loss history.

    ``data``: 1-D token ids (cut into ``batch_size x seq_len`` blocks, order seeded by ``config.seed``),
    a ``[B, T]`` block, or an iterable of ``[B, T]`` blocks (cycled). ``checkpoint``: a directory to
    save the student to (safetensors via ``Decoder.save``, plus ``log_name``: the loop's log), and
    the resumable state when ``config.checkpoint_every`` is set (``resume=True`` continues it).
    """
    config = dataclasses.replace(config, **overrides) if config else UptrainConfig(**overrides)
    params = trainable_parameters(student, config.train_shared)
    if not params:
        raise ValueError("nothing to train: the student has no LoRA (call relax first) and train_shared=False")
    teacher_was_training = teacher.training
    teacher.eval()

    def loss_fn(module, ids, step):
        with torch.no_grad():
            target = _logits(teacher, ids).to(ids.device)
        loss = kl_distill(_logits(module, ids), target, config.temperature)
        B, T = ids.shape
        flops = decoder_forward_flops(teacher, B, T) + 2 * decoder_forward_flops(student, B, T)
        return loss, {"flops": flops}

    run = {"uptrain": config.to_dict(), "student_plan": list(student.plan), **(run_config or {})}
    log = fit(student, params, _blocks(data, config), loss_fn, config.loop(), out=checkpoint, resume=resume,
              name="uptraining", run_config=run, command=command, log_name=log_name, progress=progress,
              accelerator=accelerator)
    teacher.train(teacher_was_training)
    result = UptrainResult(losses=list(log.loss), seconds=log.total_seconds, log=log)
    if checkpoint is not None:
        directory = Path(checkpoint)
        result.checkpoint = str(directory)
        log.result = {"losses": result.losses, "seconds": result.seconds}
        if accelerator is None or accelerator.is_main_process:
            student.save(directory)
            log.save(directory / log_name)
    return result


@torch.no_grad()
def distill_kl(student: Decoder, teacher: Decoder, blocks: torch.Tensor | Iterable[torch.Tensor],
               temperature: float = 1.0) -> float:
    """Mean ``KL(teacher || student)`` per token over ``blocks`` (one ``[B, T]`` block or several): the
    number uptraining lowers, for before/after comparisons on held-out text."""
    blocks = [blocks] if isinstance(blocks, torch.Tensor) else list(blocks)
    if not blocks:
        raise ValueError("distill_kl got no token blocks")
    total, tokens = 0.0, 0
    for ids in blocks:
        kl = kl_distill(_logits(student, ids), _logits(teacher, ids).to(student.device), temperature)
        total, tokens = total + kl.item() * ids.numel(), tokens + ids.numel()
    return total / tokens


def uptrain_table(logs: Iterable[str | Path | dict]) -> list[dict]:
    """One row per uptraining run (its ``train.json``, a path or the parsed log), sorted by held-out loss:
    initialization, LoRA rank, held-out nats/token and KL to the teacher before and after, the teacher's
    nats, parameters, steps, minutes and the command that reproduces it. The Relaxed Recursive
    Transformers comparison at a fixed budget: every run has the same steps, batch and data."""
    import json
    rows = []
    for log in logs:
        name = "a log" if isinstance(log, dict) else str(log)
        log = log if isinstance(log, dict) else json.loads(Path(log).read_text())
        params, result = log["config"]["params"], log.get("result")
        if not result:
            raise ValueError(f"{name} has no result: its run did not finish (continue it: {log['command']} --resume)")
        rows.append({"init": params["init"], "rank": params["rank"], "train_shared": params["train_shared"],
                     "nats_before": result["before_uptraining"]["nats_per_token"],
                     "nats_after": result["heldout"]["nats_per_token"],
                     "kl_before": result["before_uptraining"]["kl"], "kl_after": result["heldout"]["kl"],
                     "teacher_nats": result["heldout"]["teacher_nats_per_token"],
                     "params": result["params"]["student"], "teacher_params": result["params"]["teacher"],
                     "steps": log["steps_done"], "tokens": log["total_tokens"], "minutes": result["minutes"],
                     "command": log["command"]})
    return sorted(rows, key=lambda r: r["nats_after"])

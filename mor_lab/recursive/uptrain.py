"""Uptraining: distil the original model into its recursive (relaxed) version.

The loss is ``KL(teacher || student)`` on next-token distributions over token blocks of a corpus
(offline by default), so no labels are needed and the student learns to behave like the model it
came from. Only the LoRA trains by default (cheap, minutes on a 2-core CPU for small budgets);
``train_shared=True`` also trains the shared layers and per-step norms, as the paper's uptraining
does. Embeddings and the LM head stay frozen. The same code runs on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..models.config import DictConfig
from ..models.decoder import Decoder
from ..train.data import TokenBatches
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



@dataclass
class UptrainResult:
    losses: list[float] = field(default_factory=list)  # the KL of every step
    seconds: float = 0.0
    checkpoint: str | None = None  # where the student was saved (Decoder.save), if anywhere


def trainable_parameters(model: Decoder, train_shared: bool = False) -> list[torch.nn.Parameter]:
    """The LoRA factors of every step, plus (``train_shared``) the physical layers and per-step norms."""
    params = [p for d in model.step_deltas.values() for p in d.lora.parameters()]
    if train_shared:
        params += list(model.layers.parameters())
        params += [p for d in model.step_deltas.values() for p in d.norms.parameters()]
    return params


@contextlib.contextmanager
def _only_training(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Freeze everything but ``params`` for the duration, then restore each ``requires_grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _blocks(data, config: UptrainConfig) -> Iterator[torch.Tensor]:
    """``[B, T]`` blocks forever: token ids are cut into seeded ``TokenBatches``; an iterable of blocks is cycled."""
    if isinstance(data, torch.Tensor) and data.dim() <= 1:
        data = TokenBatches(data, config.batch_size, config.seq_len, seed=config.seed)
    while True:
        empty = True
        for block in ([data] if isinstance(data, torch.Tensor) else data):
            empty = False
            yield block
        if empty:
            raise ValueError("uptrain got no token blocks (an exhausted iterator?)")


def _logits(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(model.device))


def uptrain(student: Decoder, teacher: Decoder, data: torch.Tensor | Iterable[torch.Tensor],
            config: UptrainConfig | None = None, *, progress: bool = True, checkpoint: str | Path | None = None,
            **overrides) -> UptrainResult:
    """Distil ``teacher`` into ``student`` with AdamW for ``config.steps`` steps; returns the loss history.

    ``data``: 1-D token ids (cut into ``batch_size x seq_len`` blocks, order seeded by ``config.seed``),
    a ``[B, T]`` block, or an iterable of ``[B, T]`` blocks (cycled). ``checkpoint``: a directory to
    save the student to (safetensors via ``Decoder.save``, plus ``uptrain.json`` with config and losses).
    """
    config = dataclasses.replace(config, **overrides) if config else UptrainConfig(**overrides)
    params = trainable_parameters(student, config.train_shared)
    if not params:
        raise ValueError("nothing to train: the student has no LoRA (call relax first) and train_shared=False")
    blocks = _blocks(data, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result, start = UptrainResult(), time.perf_counter()
    teacher_was_training = teacher.training
    teacher.eval()

    from tqdm.auto import trange
    bar = trange(config.steps, desc="uptraining", disable=not progress)
    with _only_training(student, params):
        for _ in bar:
            ids = next(blocks)
            with torch.no_grad():
                target = _logits(teacher, ids).to(student.device)
            loss = kl_distill(_logits(student, ids), target, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            result.losses.append(loss.item())
            bar.set_postfix(kl=f"{result.losses[-1]:.4f}")
    teacher.train(teacher_was_training)
    result.seconds = time.perf_counter() - start
    if checkpoint is not None:
        directory = Path(checkpoint)
        student.save(directory)
        (directory / "uptrain.json").write_text(json.dumps(
            {"config": config.to_dict(), "losses": result.losses, "seconds": result.seconds}, indent=2))
        result.checkpoint = str(directory)
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

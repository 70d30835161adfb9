"""Training the MoR family from scratch, compared at equal training FLOPs.

A small byte-level BPE tokenizer trained on the offline corpus (``train_bpe``), the reference recipe
(AdamW (0.9, 0.95), weight decay 0.1, warmup-stable-decay learning rate), and FLOPs accounting from
the routing each step actually took (``MoRModel.forward_flops``; backward = 2 x forward). A budget
in FLOPs turns into a number of steps per model: a cheaper model (MoR skips loops for most tokens)
sees more tokens for the same compute, which is the paper's comparison. The same code trains
SmolLM-sized configs on a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..train.data import TokenBatches
from ..train.losses import next_token_targets
from .model import MoRConfig, MoRModel, decode_routing

SPECIAL_TOKEN = "<|endoftext|>"


def train_bpe(text: str, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``text`` (seconds for ~1 MB), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKEN)


@dataclass
class TrainConfig:
    """One training run: a FLOPs budget (or a number of steps), batches, and the optimiser recipe."""
    flops: float | None = None  # training FLOPs budget; steps = budget / FLOPs per step at the capacities
    steps: int | None = None  # used when no budget is given
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: float = 0.1  # fraction of steps: linear warm-up
    decay: float = 0.2  # fraction of steps: final linear decay (warmup-stable-decay)
    min_lr: float = 0.1  # lr at the end, as a fraction of lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    eval_batches: int = 4

    def __post_init__(self):
        if (self.flops is None) == (self.steps is None):
            raise ValueError("TrainConfig needs exactly one of flops (a budget) and steps")
        if self.flops is not None and not self.flops > 0:
            raise ValueError(f"TrainConfig.flops must be > 0, got {self.flops!r}")
        for name in ("batch_size", "seq_len") + (("steps",) if self.steps is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "decay", "min_lr"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.warmup + self.decay > 1:
            raise ValueError("TrainConfig.warmup + decay must be <= 1")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")

    def steps_for(self, model: MoRModel) -> int:
        if self.steps is not None:
            return self.steps
        per_step = model.train_flops_per_token(self.seq_len) * self.batch_size * self.seq_len
        return max(1, math.floor(self.flops / per_step))


def wsd(step: int, total: int, config: TrainConfig) -> float:
    """Warmup-stable-decay learning-rate multiplier at ``step`` of ``total``."""
    warm, decay = max(1, round(config.warmup * total)), round(config.decay * total)
    if step < warm:
        return (step + 1) / warm
    if step >= total - decay:
        return 1 - (1 - config.min_lr) * (step - (total - decay) + 1) / max(1, decay)
    return 1.0


@dataclass
class TrainResult:
    name: str
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)  # LM loss per step
    flops: list[float] = field(default_factory=list)  # cumulative training FLOPs after each step
    aux: list[dict] = field(default_factory=list)  # auxiliary losses per step
    mean_loops: list[float] = field(default_factory=list)  # routing per step
    val: list[tuple[float, float]] = field(default_factory=list)  # (FLOPs, validation loss)
    val_loss: float | None = None  # at the end, training-time routing (top-k for expert-choice)
    val_loss_causal: float | None = None  # at the end, decode-time (causal) routing
    seconds: float = 0.0
    checkpoint: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _blocks(tokens: torch.Tensor, config: TrainConfig):
    batches = TokenBatches(tokens, config.batch_size, config.seq_len, seed=config.seed)
    while True:
        yield from batches


def _optimizer(model: MoRModel, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)


@torch.no_grad()
def evaluate(model: MoRModel, tokens: torch.Tensor, batch_size: int = 8, seq_len: int = 128,
             max_batches: int | None = 4, causal: bool = False) -> float:
    """Mean next-token loss on ``tokens`` (non-overlapping blocks in order). ``causal``: route each token
    with the decode-time rule (what generation would do) instead of the training-time top-k."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = TokenBatches(tokens, batch_size, seq_len, shuffle=False, drop_last=False)
    for i, ids in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        ids = ids.to(model.device)
        loops = decode_routing(model, ids) if causal and model.structure is not None else None
        out = model(ids, next_token_targets(ids), loops=loops)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + float(out.lm_loss) * n, count + n
    model.train(was_training)
    return total / count


def train(model: MoRModel, train_tokens: torch.Tensor, config: TrainConfig, val_tokens: torch.Tensor | None = None,
          *, name: str = "model", progress: bool = True, checkpoint: str | Path | None = None) -> TrainResult:
    """Train ``model`` on ``train_tokens`` for ``config.steps_for(model)`` steps; loss and FLOPs per step."""
    total = config.steps_for(model)
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: wsd(s, total, config))
    blocks, result, start = _blocks(train_tokens, config), TrainResult(name), time.perf_counter()
    flops = 0.0
    model.train()
    from tqdm.auto import trange
    bar = trange(total, desc=name, disable=not progress)
    for step in bar:
        ids = next(blocks).to(model.device)
        out = model(ids, next_token_targets(ids), step=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        loops = out.routing.loops if out.routing is not None else None
        if model.kind == "token":
            model.router.update_bias(loops - 1)
        flops += 3 * model.forward_flops(loops, ids.shape[1], ids.shape[0])
        result.losses.append(out.lm_loss.item())
        result.flops.append(flops)
        result.aux.append({k: v.item() for k, v in out.aux.items()})
        result.mean_loops.append(float(loops.float().mean()) if loops is not None else 1.0)
        result.tokens += ids.numel()
        if val_tokens is not None and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
            result.val.append((flops, evaluate(model, val_tokens, config.batch_size, config.seq_len,
                                               config.eval_batches)))
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    result.steps, result.seconds = total, time.perf_counter() - start
    model.eval()
    if val_tokens is not None:
        result.val_loss = evaluate(model, val_tokens, config.batch_size, config.seq_len, config.eval_batches)
        result.val.append((flops, result.val_loss))
        if model.kind in ("expert", "token"):
            result.val_loss_causal = evaluate(model, val_tokens, config.batch_size, config.seq_len,
                                              config.eval_batches, causal=True)
    if checkpoint is not None:
        directory = Path(checkpoint)
        model.save(directory)
        (directory / "train.json").write_text(json.dumps({"config": dataclasses.asdict(config),
                                                          "result": result.to_dict()}, indent=2))
        result.checkpoint = str(directory)
    return result


def compare(configs: dict[str, MoRConfig], train_tokens: torch.Tensor, val_tokens: torch.Tensor | None,
            config: TrainConfig, *, progress: bool = True, seed: int = 0,
            checkpoint_dir: str | Path | None = None) -> dict[str, tuple[MoRModel, TrainResult]]:
    """Train each config from scratch on the same data with the same FLOPs budget (``config.flops``)."""
    out = {}
    for name, mor_config in configs.items():
        torch.manual_seed(seed)
        model = MoRModel(mor_config)
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / name
        out[name] = (model, train(model, train_tokens, config, val_tokens, name=name, progress=progress,
                                  checkpoint=ckpt))
    return out


def summary(results: dict[str, tuple[MoRModel, TrainResult]]) -> list[dict]:
    """One row per model: parameters, steps, tokens, FLOPs, final losses."""
    rows = []
    for name, (model, r) in results.items():
        rows.append({"model": name, "non_embedding_params": sum(p.numel() for n, p in model.named_parameters()
                                                                 if "embed" not in n and "lm_head" not in n),
                     "steps": r.steps, "tokens": r.tokens, "train_flops": f"{r.flops[-1]:.3g}",
                     "mean_loops": round(sum(r.mean_loops[-10:]) / len(r.mean_loops[-10:]), 3),
                     "final_train_loss": round(sum(r.losses[-10:]) / len(r.losses[-10:]), 4),
                     "val_loss": None if r.val_loss is None else round(r.val_loss, 4),
                     "val_loss_causal_routing": None if r.val_loss_causal is None else round(r.val_loss_causal, 4),
                     "seconds": round(r.seconds, 1)})
    return rows

"""Training the MoR family from scratch, compared at equal training FLOPs.

A small byte-level BPE tokenizer trained on the offline corpus (``train_bpe``), the reference recipe
(AdamW (0.9, 0.95), weight decay 0.1, warmup-stable-decay learning rate), and FLOPs accounting from
the routing each step actually took (``MoRModel.forward_flops``; backward = 2 x forward). A budget
in FLOPs turns into a number of steps per model: a cheaper model (MoR skips loops for most tokens)
sees more tokens for the same compute, which is the paper's comparison. The steps run in the lab's
one training loop (:func:`mor_lab.train.loop.fit`: checkpoints that resume, a JSON log, accelerate),
so the same code trains SmolLM-sized configs data-parallel on GPUs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..train.data import TokenBatches
from ..train.losses import next_token_targets
from ..train.loop import PRECISIONS, LoopConfig, OptimConfig, TokenStream, TrainLog, fit, wsd
from ..train.tokenizer import SPECIAL_TOKEN, train_bpe
from .model import MoRConfig, MoRModel, decode_routing

__all__ = ["SPECIAL_TOKEN", "TrainConfig", "TrainResult", "compare", "evaluate", "summary", "train", "train_bpe",
           "wsd"]


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
    precision: str = "fp32"  # fp32 | bf16 autocast (slower than fp32 on CPUs without bf16 matmul units)
    log_every: int = 1  # steps per logged point
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: none)

    def __post_init__(self):
        if (self.flops is None) == (self.steps is None):
            raise ValueError("TrainConfig needs exactly one of flops (a budget) and steps")
        if self.flops is not None and not self.flops > 0:
            raise ValueError(f"TrainConfig.flops must be > 0, got {self.flops!r}")
        for name in ("batch_size", "seq_len") + (("steps",) if self.steps is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.optim()  # validates lr, warmup, decay, min_lr, betas, weight_decay, max_grad_norm

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, warmup=self.warmup,
                           decay=self.decay, min_lr=self.min_lr, max_grad_norm=self.max_grad_norm)

    def steps_for(self, model: MoRModel) -> int:
        if self.steps is not None:
            return self.steps
        per_step = model.train_flops_per_token(self.seq_len) * self.batch_size * self.seq_len
        return max(1, math.floor(self.flops / per_step))

    def loop(self, model: MoRModel) -> LoopConfig:
        return LoopConfig(steps=self.steps_for(model), optim=self.optim(), seed=self.seed, precision=self.precision,
                          log_every=self.log_every, eval_every=self.eval_every,
                          checkpoint_every=self.checkpoint_every)


@dataclass
class TrainResult:
    name: str
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)  # LM loss per logged point (per step by default)
    flops: list[float] = field(default_factory=list)  # cumulative training FLOPs at each point
    aux: list[dict] = field(default_factory=list)  # auxiliary losses per point
    mean_loops: list[float] = field(default_factory=list)  # routing per point
    val: list[tuple[float, float]] = field(default_factory=list)  # (FLOPs, validation loss)
    val_loss: float | None = None  # at the end, training-time routing (top-k for expert-choice)
    val_loss_causal: float | None = None  # at the end, decode-time (causal) routing
    seconds: float = 0.0
    checkpoint: str | None = None
    log: TrainLog | None = None  # the loop's full log (machine, lr, tokens, seconds per point)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(dataclasses.replace(self, log=None))
        out.pop("log")
        return out

    @classmethod
    def from_log(cls, name: str, log: TrainLog) -> "TrainResult":
        aux_keys = [k for k in log.metrics if k.startswith("router_")]
        final = log.final_eval()
        return cls(name, steps=log.steps_done, tokens=log.total_tokens, losses=list(log.metrics.get("lm_loss", [])),
                   flops=list(log.flops), aux=[{k: log.metrics[k][i] for k in aux_keys} for i in range(len(log.step))],
                   mean_loops=list(log.metrics.get("mean_loops", [])),
                   val=[(e["flops"], e["val_loss"]) for e in log.evals if "val_loss" in e],
                   val_loss=final.get("val_loss"), val_loss_causal=final.get("val_loss_causal"),
                   seconds=log.total_seconds, log=log)


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


def check_fits(model: MoRModel, seq_len: int) -> None:
    """A batch must fit the model's positions: rotary tables and decode caches are sized by them."""
    limit = model.config.max_position_embeddings
    if seq_len > limit:
        raise ValueError(f"seq_len {seq_len} does not fit the model's max_position_embeddings {limit}: "
                         f"use a shorter seq_len or a model config with more positions")


def train(model: MoRModel, train_tokens: torch.Tensor, config: TrainConfig, val_tokens: torch.Tensor | None = None,
          *, name: str = "model", progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
          accelerator=None, command: str | None = None, run_config: dict | None = None) -> TrainResult:
    """Train ``model`` on ``train_tokens`` for ``config.steps_for(model)`` steps; loss and FLOPs per step.

    ``checkpoint``: a directory for the final model (``MoRModel.save``) and ``train.json`` (the loop's
    log, ``result``: this function's ``TrainResult``), and the resumable state when
    ``config.checkpoint_every`` is set (``resume=True`` continues it). Runs under ``accelerate``."""
    check_fits(model, config.seq_len)
    loop = config.loop(model)
    n_r = model.num_recursions

    def loss_fn(module, ids, step):
        if ids.shape[1] != config.seq_len:
            raise ValueError(f"a batch of length {ids.shape[1]} does not fit seq_len {config.seq_len}")
        out = module(ids, next_token_targets(ids), step=step)
        loops = out.routing.loops if out.routing is not None else None
        metrics = {"lm_loss": out.lm_loss.detach(), **{k: v.detach() for k, v in out.aux.items()},
                   "mean_loops": loops.float().mean() if loops is not None else torch.tensor(1.0),
                   "flops": 3 * model.forward_flops(loops, ids.shape[1], ids.shape[0])}
        if model.kind == "token":  # the global load, for loss-free balancing after the step
            metrics["depth_fraction"] = torch.bincount((loops - 1).reshape(-1), minlength=n_r).float() / loops.numel()
        return out.loss, metrics

    def after_step(module, step, metrics):
        if module.kind == "token":  # a depth tensor with the global batch's load (processes averaged)
            counts = (metrics["depth_fraction"].cpu() * config.batch_size * config.seq_len).round().long()
            module.router.update_bias(torch.repeat_interleave(torch.arange(n_r), counts).to(module.device))

    def run_eval(module, final):
        if val_tokens is None:
            return {}
        out = {"val_loss": evaluate(module, val_tokens, config.batch_size, config.seq_len, config.eval_batches)}
        if final and module.kind in ("expert", "token"):
            out["val_loss_causal"] = evaluate(module, val_tokens, config.batch_size, config.seq_len,
                                              config.eval_batches, causal=True)
        return out

    run = {"train": dataclasses.asdict(config), "model": model.mor.to_dict(), **(run_config or {})}
    log = fit(model, list(model.parameters()), TokenStream(train_tokens, config.batch_size, config.seq_len,
                                                           config.seed),
              loss_fn, loop, evaluate=run_eval, after_step=after_step, out=checkpoint, resume=resume, name=name,
              run_config=run, command=command, log_name="train.json", progress=progress, accelerator=accelerator)
    model.eval()
    result = TrainResult.from_log(name, log)
    if checkpoint is not None:
        directory = Path(checkpoint)
        if _is_main(accelerator):
            model.save(directory)
        result.checkpoint = str(directory)
        log.result = result.to_dict()
        if _is_main(accelerator):
            log.save(directory / "train.json")
    return result


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


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

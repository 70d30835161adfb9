"""The one training loop: MoR/vanilla pretraining, uptraining by distillation and exit heads all run here.

``fit(module, params, batches, loss_fn, config)`` trains ``params`` (the rest of ``module`` is frozen
for the duration) with AdamW, a warmup-stable-decay learning rate and gradient clipping, and gives a
progress bar (loss, tokens/s), a JSON log (loss curve, tokens, FLOPs, seconds, the machine) and
checkpoints that resume exactly: weights that train, buffers, optimiser moments, the schedule's step,
the data position and every process's RNG state, so a run stopped and resumed ends where an
uninterrupted run ends (tested bit for bit).

It runs under Hugging Face ``accelerate`` unchanged: ``Accelerator.prepare`` wraps the module and the
optimiser (DDP when launched with ``accelerate launch --num_processes N``; FSDP or DeepSpeed from
accelerate's config). The data is not a ``DataLoader``: every stream here yields the *global* batch
from a seeded, resumable position, and each process trains on its slice of it, so a run with N
processes sees exactly the batches of a one-process run (tested with two CPU processes over gloo) and
resuming needs no sampler state. A loss that is not a mean over the batch's rows differs between
the two (MoR token-choice's balancing loss is computed per process, as in most MoE code).
bf16 autocast is an option (``precision="bf16"``), not a default: on CPUs without bf16 matmul units
it is slower than fp32 (measured on a 2-core Ice Lake Xeon without AVX512-BF16: 2.0-2.7x).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..models.config import DictConfig
from .data import TokenBatches

PRECISIONS = ("fp32", "bf16")
RESUME_DIR = "resume"


# ---------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class OptimConfig(DictConfig):
    """AdamW and its learning-rate schedule. Defaults: the MoR reference recipe (AdamW (0.9, 0.95), wd 0.1,
    warmup-stable-decay). Weight decay applies to matrices only (not norms, biases, routers' 1-D params)."""
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.1  # fraction of the steps: linear warm-up
    decay: float = 0.2  # fraction of the steps: final linear decay to min_lr
    min_lr: float = 0.1  # the lr at the end, as a fraction of lr
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("warmup", "decay", "min_lr"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.warmup + self.decay > 1:
            raise ValueError(f"OptimConfig.warmup + decay must be <= 1, got {self.warmup} + {self.decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"OptimConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")


@dataclass
class LoopConfig(DictConfig):
    """How long to train, how, and how often to log, evaluate and checkpoint."""
    steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast; the weights and optimiser stay fp32)
    log_every: int = 1  # steps per point of the logged curve (the mean over those steps)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: none; else also one at the end)

    def __post_init__(self):
        if isinstance(self.optim, dict):
            self.optim = OptimConfig.from_dict(self.optim)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"LoopConfig.steps must be a positive integer, got {self.steps!r}")
        for name in ("log_every",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"LoopConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"LoopConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"LoopConfig.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"log_every ({self.log_every}), so a checkpoint never splits a logged point")


def wsd(step: int, total: int, config) -> float:
    """Warmup-stable-decay learning-rate multiplier at ``step`` (0-based) of ``total``; ``config`` has
    ``warmup``, ``decay`` (fractions of ``total``) and ``min_lr``. Constant 1 with warmup = decay = 0."""
    warm, decay = max(1, round(config.warmup * total)), round(config.decay * total)
    if step < warm:
        return (step + 1) / warm
    if step >= total - decay:
        return 1 - (1 - config.min_lr) * (step - (total - decay) + 1) / max(1, decay)
    return 1.0


# ---------------------------------------------------------------------------------------------------
# Freezing, and data streams that know their position

@contextlib.contextmanager
def only_training(module: torch.nn.Module, params: Iterable[torch.nn.Parameter] = ()):
    """Freeze every parameter of ``module`` but ``params`` for the duration, then restore each ``requires_grad``.

    ``only_training(backbone)`` freezes a backbone whose outputs feed trained heads (gradients still
    flow *through* it)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2 ** 63  # each epoch its own order, fixed by (seed, epoch) alone


class TokenStream:
    """``[batch_size, seq_len]`` blocks of a token stream, forever: epochs of a seeded order of the
    stream's non-overlapping blocks (:class:`~mor_lab.train.data.TokenBatches`), resumable from
    ``state_dict()`` (epoch, batch index)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if not isinstance(batch_size, int) or not isinstance(seq_len, int) or batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive integers, got {batch_size!r} and {seq_len!r}")
        if tokens.numel() < batch_size * seq_len:
            raise ValueError(f"{tokens.numel():,} tokens make no batch of {batch_size} x {seq_len}: use a longer "
                             f"corpus, a smaller batch size or a shorter sequence length")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.epoch, self.index, self._it = 0, 0, None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            epoch = TokenBatches(self.tokens, self.batch_size, self.seq_len, seed=_epoch_seed(self.seed, self.epoch))
            self._it = itertools.islice(iter(epoch), self.index, None)
        batch = next(self._it, None)
        if batch is None:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return next(self)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


class RowStream:
    """Batches of row indices into ``num_rows`` rows (e.g. cached hidden states), forever: epochs of a
    seeded permutation, ``batch`` rows at a time (all rows when there are fewer); resumable."""

    def __init__(self, num_rows: int, batch: int, seed: int = 0):
        if num_rows < 1 or batch < 1:
            raise ValueError(f"RowStream needs num_rows and batch >= 1, got {num_rows} and {batch}")
        self.num_rows, self.batch, self.seed = num_rows, batch, seed
        self.epoch, self.index, self._order = 0, 0, None

    def __iter__(self) -> "RowStream":
        return self

    def __next__(self) -> torch.Tensor:
        starts = range(0, max(1, self.num_rows - self.batch + 1), self.batch)
        if self.index >= len(starts):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.num_rows, generator=generator)
        start = starts[self.index]
        self.index += 1
        return self._order[start:start + self.batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class Cycle:
    """An iterable of batches (a list of ``[B, T]`` blocks, a ``TokenBatches``) cycled forever. Its
    position is the number of batches taken; resuming re-iterates and skips, so the iterable must give
    the same batches each pass."""

    def __init__(self, data: Iterable, what: str = "training"):
        self.data, self.what, self.taken, self._it = data, what, 0, None

    def __iter__(self) -> "Cycle":
        return self

    def __next__(self):
        for fresh in (False, True):
            if self._it is None:
                self._it, fresh = iter(self.data), True
            item = next(self._it, None)
            if item is not None:
                self.taken += 1
                return item
            self._it = None
            if fresh:
                break
        raise ValueError(f"{self.what} got no token blocks (an exhausted iterator?)")

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken, self._it = 0, None
        for _ in range(int(state["taken"])):
            next(self)


def shard(batch, rank: int, world: int):
    """This process's slice of a global batch (dim 0 cut in ``world`` equal parts; tuples, lists and
    dicts of tensors slice each). Unequal parts would weight processes unequally: they are an error."""
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world:
            raise ValueError(f"a global batch of {batch.shape[0]} rows does not split into {world} equal parts: "
                             f"use a batch size divisible by the number of processes")
        return batch.chunk(world)[rank]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, rank, world) for v in batch)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} across processes")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _numel(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return _numel(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return _numel(batch[0])
    return 0


# ---------------------------------------------------------------------------------------------------
# The log

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(accelerator=None, precision: str = "fp32") -> dict:
    """Where a run ran: what its speed figures depend on."""
    import accelerate
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "processes": accelerator.num_processes if accelerator is not None else 1,
            "distributed": str(accelerator.distributed_type) if accelerator is not None else "NO",
            "precision": precision, "autocast": "bfloat16" if precision == "bf16" else None,
            "param_dtype": "float32", "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    return info


@dataclass
class TrainLog(DictConfig):
    """What a run did: the curve (one point per ``log_every`` steps, metrics averaged over them; tokens,
    FLOPs and seconds cumulative), evaluations, the machine, and the caller's ``result``."""
    name: str = "train"
    command: str | None = None  # the shell command that reproduces the run
    config: dict = field(default_factory=dict)  # the caller's configuration (resuming checks it)
    loop: dict = field(default_factory=dict)  # the LoopConfig
    machine: dict = field(default_factory=dict)
    step: list[int] = field(default_factory=list)  # steps done at each point
    loss: list[float] = field(default_factory=list)  # the optimised loss
    lr: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metrics: dict[str, list] = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "flops", "final", **metrics}
    resumed_at: list[int] = field(default_factory=list)
    steps_done: int = 0
    total_tokens: int = 0
    total_flops: float = 0.0
    total_seconds: float = 0.0
    total_cpu_seconds: float = 0.0  # this process's CPU time (all threads): robust to a busy machine
    result: dict = field(default_factory=dict)

    def add_point(self, step: int, sums: dict[str, float]) -> None:
        """A point of the curve at ``step``: the mean of each metric summed since the last point
        (``loss`` and ``lr`` among them), and the cumulative counters."""
        n = step - (self.step[-1] if self.step else 0)
        mean = {k: v / n for k, v in sums.items()}
        self.step.append(step)
        self.loss.append(mean.pop("loss"))
        self.lr.append(mean.pop("lr"))
        self.tokens.append(self.total_tokens)
        self.flops.append(self.total_flops)
        self.seconds.append(round(self.total_seconds, 3))
        for k, v in mean.items():
            self.metrics.setdefault(k, []).append(v)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainLog":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def final_eval(self) -> dict:
        return next((e for e in reversed(self.evals) if e.get("final")), {})


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparing configurations."""
    return json.loads(json.dumps(value, default=str))


def _differences(saved, current, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(f"{name} is {'missing' if key not in saved else repr(saved[key])} in the checkpoint and "
                           f"{'missing' if key not in current else repr(current[key])} in this run")
            else:
                out += _differences(saved[key], current[key], name)
        return out
    return [] if saved == current else [f"{prefix} is {saved!r} in the checkpoint, {current!r} in this run"]


# ---------------------------------------------------------------------------------------------------
# Checkpoints

def _rng_state() -> dict:
    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": _jsonable(random.getstate())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def read_checkpoint_meta(out: str | Path) -> dict | None:
    """The ``meta.json`` of the resumable checkpoint in ``out`` (step, fingerprint), or None."""
    path = Path(out) / RESUME_DIR / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def _save_checkpoint(out: Path, accelerator, state: dict, meta: dict) -> None:
    """Write to ``resume.tmp`` then swap it in, so a crash mid-write keeps the previous checkpoint."""
    final, tmp, old = out / RESUME_DIR, out / f"{RESUME_DIR}.tmp", out / f"{RESUME_DIR}.old"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng{accelerator.process_index}.pt")
    if main:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(out: Path, rank: int) -> tuple[dict, dict | None]:
    directory = out / RESUME_DIR
    state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    rng_file = directory / f"rng{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.exists() else None
    return state, rng


# ---------------------------------------------------------------------------------------------------
# The loop

LossFn = Callable[[torch.nn.Module, object, int], tuple[torch.Tensor, dict]]


def make_accelerator(device=None):
    """An ``Accelerator`` for ``device`` (CPU when the model lives there or the machine has no accelerator;
    else accelerate's choice). Under ``accelerate launch`` it reads the launcher's settings (processes,
    backend, FSDP); on a CPU-only machine ``cpu=True`` is what makes the launched processes one gloo
    group (without it each would train alone)."""
    from accelerate import Accelerator
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    cpu = (device is not None and torch.device(device).type == "cpu") or not has_accelerator
    return Accelerator(cpu=cpu)


def _optimizer(params: list[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": g, "weight_decay": wd} for g, wd in ((decay, config.weight_decay), (rest, 0.0)) if g]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _reduce(values: dict[str, torch.Tensor], accelerator) -> dict[str, torch.Tensor]:
    """Mean over processes of each metric (``flops``: the sum), in one all-reduce."""
    if accelerator.num_processes == 1:
        return values
    keys = list(values)
    flat = [values[k].detach().float().reshape(-1).to(accelerator.device) for k in keys]
    sizes = [t.numel() for t in flat]
    total = accelerator.reduce(torch.cat(flat), reduction="mean")
    out = {k: t.reshape(values[k].shape) for k, t in zip(keys, total.split(sizes))}
    if "flops" in out:
        out["flops"] = out["flops"] * accelerator.num_processes
    return out


def fit(module: torch.nn.Module, params: Iterable[torch.nn.Parameter], batches: Iterator, loss_fn: LossFn,
        config: LoopConfig, *, evaluate: Callable[[torch.nn.Module, bool], dict] | None = None,
        after_step: Callable[[torch.nn.Module, int, dict], None] | None = None, out: str | Path | None = None,
        resume: bool = False, name: str = "train", run_config: dict | None = None, command: str | None = None,
        log_name: str = "log.json", progress: bool = True, accelerator=None) -> TrainLog:
    """Train ``params`` of ``module`` for ``config.steps`` steps; returns the :class:`TrainLog`.

    ``batches``: an iterator of *global* batches (``TokenStream``, ``RowStream``, ``Cycle``; anything
    with ``state_dict``/``load_state_dict`` resumes from its position, anything else by skipping).
    ``loss_fn(prepared_module, local_batch, step) -> (loss, metrics)``: metrics are numbers or tensors,
    averaged over processes (``flops``, this process's training FLOPs of the step, is summed).
    ``evaluate(module, final) -> dict`` runs every ``eval_every`` steps and at the end;
    ``after_step(module, step, metrics)`` after each optimiser step (e.g. a router's load balancing).
    ``out``: where the log (``log_name``) and resumable checkpoints (``resume/``) go; ``resume=True``
    continues the checkpoint there (refused, naming the difference, if it was written by another
    ``run_config``/``config``), ``resume=False`` refuses to overwrite one.
    """
    params = list(params)
    if not params:
        raise ValueError("nothing to train: no trainable parameters were given")
    owned = {id(p) for p in module.parameters()}
    if any(id(p) not in owned for p in params):
        raise ValueError("fit trains parameters of `module` only; some given parameters are not in it")
    names = [n for n, p in module.named_parameters() if id(p) in {id(q) for q in params}]
    accelerator = accelerator or make_accelerator(next(module.parameters()).device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(out) if out is not None else None
    log = TrainLog(name=name, command=command, config=_jsonable(run_config or {}), loop=_jsonable(config.to_dict()),
                   machine=machine_info(accelerator, config.precision))
    fingerprint = {"config": log.config, "loop": log.loop,
                   "params": {n: list(p.shape) for n, p in module.named_parameters() if n in set(names)}}
    meta = read_checkpoint_meta(out) if out is not None else None
    if meta is not None and not resume:
        raise ValueError(f"{out} holds a checkpoint of an earlier run (step {meta['step']}): resume it "
                         f"(resume=True, --resume) or train into another directory")
    if meta is not None:
        diffs = _differences(meta["fingerprint"], fingerprint)
        if diffs:
            raise ValueError(f"cannot resume {out / RESUME_DIR}: it was written by another configuration: "
                             + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""))
    total = config.steps
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if config.precision == "bf16" \
        else contextlib.nullcontext()

    was_training = module.training
    with only_training(module, params):
        prepared = accelerator.prepare(module)
        unwrapped = accelerator.unwrap_model(prepared)
        trainable = [p for p in prepared.parameters() if p.requires_grad]
        optimizer = accelerator.prepare(_optimizer(trainable, config.optim))
        start = 0
        if meta is not None:
            state, rng = _load_checkpoint(out, rank)
            with torch.no_grad():
                for n, p in unwrapped.named_parameters():
                    if n in state["params"]:
                        p.copy_(state["params"][n])
                for n, b in unwrapped.named_buffers():
                    if n in state["buffers"]:
                        b.copy_(state["buffers"][n])
            optimizer.load_state_dict(state["optimizer"])
            if hasattr(batches, "load_state_dict"):
                batches.load_state_dict(state["data"])
            else:
                for _ in range(state["step"]):
                    next(batches)
            _set_rng_state(rng if rng is not None else state["rng0"])
            log = TrainLog.from_dict(json.loads(state["log"]))
            log.machine = machine_info(accelerator, config.precision)  # this session's machine
            start = state["step"]
            if start < total:
                log.resumed_at.append(start)
        else:
            _seed_everything(config.seed)

        def checkpoint(step: int) -> None:
            state = {"step": step, "params": {n: p.detach().cpu() for n, p in unwrapped.named_parameters()
                                              if n in set(names)},
                     "buffers": {n: b.detach().cpu() for n, b in unwrapped.named_buffers()},
                     "optimizer": optimizer.state_dict(), "log": json.dumps(log.to_dict()),
                     "data": batches.state_dict() if hasattr(batches, "state_dict") else {"taken": step},
                     "rng0": _rng_state()}
            _save_checkpoint(out, accelerator, state, {"step": step, "fingerprint": fingerprint})

        def run_eval(step: int, final: bool) -> None:
            if evaluate is None:
                return
            metrics = {k: float(v) for k, v in evaluate(unwrapped, final).items()}
            log.evals.append({"step": step, "tokens": log.total_tokens, "flops": log.total_flops, "final": final,
                              **metrics})

        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=name, disable=not progress or not main)
        session_start, session_tokens, session_cpu = time.perf_counter(), 0, time.process_time()
        seconds_before, cpu_before = log.total_seconds, log.total_cpu_seconds
        window: dict[str, float] = {}
        prepared.train()
        for step in range(start, total):
            batch = next(batches)
            tokens = _numel(batch)
            local = _to_device(shard(batch, rank, world), accelerator.device)
            with autocast:
                loss, metrics = loss_fn(prepared, local, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {float(loss)} at step {step}: lower the learning rate "
                                         f"(now {config.optim.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
            lr = config.optim.lr * wsd(step, total, config.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            values = {"loss": loss.detach()}
            values.update({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()})
            reduced = _reduce(values, accelerator)
            if after_step is not None:
                after_step(unwrapped, step, reduced)
            # The log: cumulative counters every step, the curve every log_every steps.
            log.steps_done, log.total_tokens = step + 1, log.total_tokens + tokens
            log.total_flops += float(reduced.get("flops", 0.0))
            log.total_seconds = seconds_before + time.perf_counter() - session_start
            log.total_cpu_seconds = cpu_before + time.process_time() - session_cpu
            session_tokens += tokens
            for k, v in reduced.items():
                if k != "flops" and v.numel() == 1:
                    window[k] = window.get(k, 0.0) + float(v)
            window["lr"] = window.get("lr", 0.0) + lr
            if (step + 1) % config.log_every == 0 or step + 1 == total:
                log.add_point(step + 1, window)
                window = {}
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
                run_eval(step + 1, final=False)
            if out is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                    and step + 1 < total:
                checkpoint(step + 1)
                if main:
                    log.save(out / log_name)
            elapsed = time.perf_counter() - session_start
            bar.set_postfix(loss=f"{float(reduced['loss']):.3f}", tok_s=f"{session_tokens / max(elapsed, 1e-9):,.0f}")
            bar.update(1)
        bar.close()
        if start < total or not log.final_eval():
            run_eval(total, final=True)
        if out is not None and config.checkpoint_every and start < total:
            checkpoint(total)
        if out is not None and main:
            log.save(out / log_name)
    module.train(was_training)
    return log


def decoder_forward_flops(model, batch_size: int, seq_len: int) -> float:
    """Matmul + attention FLOPs of one full forward pass of a ``Decoder`` (every depth step, LoRA
    included, the LM head; embeddings free): the estimate uptraining and exit heads log."""
    c = model.config
    lora = {step: sum(p.numel() for p in d.lora.parameters()) for step, d in model.step_deltas.items()}
    layer = sum(p.numel() for n, p in model.layers[0].named_parameters() if "norm" not in n)
    tokens = batch_size * seq_len
    pairs = batch_size * seq_len * (seq_len + 1) / 2
    steps = len(model.plan)
    flops = tokens * 2 * c.hidden_size * c.vocab_size + steps * pairs * 4 * c.num_heads * c.head_dim
    return flops + tokens * 2 * (steps * layer + sum(lora.values()))


__all__ = ["Cycle", "LoopConfig", "OptimConfig", "PRECISIONS", "RowStream", "TokenStream", "TrainLog",
           "decoder_forward_flops", "fit", "machine_info", "make_accelerator", "only_training",
           "read_checkpoint_meta", "shard", "wsd"]

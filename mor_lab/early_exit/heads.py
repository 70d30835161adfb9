"""Exit heads: where a token may stop, and a light trained head to read its prediction out there.

An exit "after k layers" reads the hidden state after ``k`` depth steps (``hidden[k]`` in the
``Decoder(..., return_hidden=True)`` stack, whose index 0 is the embedding). Its logits are the
model's own final norm + LM head applied to ``adapter(hidden[k])``, as in FREE and CALM, which reuse
the head. The adapter is a residual linear map ``h + W h + b`` (optionally low rank), zero-initialised
so that an untrained exit head *is* the plain logit lens; training it against the full model is the
"tuned lens" idea (Belrose et al., 2023). The ``block`` adapter is one decoder layer initialised from
the model's last layer (untrained, the exit reads "the last layer applied at depth k"): it attends over
the earlier tokens' exit states, so it trains on whole sequences and, at decode time, keeps its own KV
page in the engine (``engine/policies/exits.py``). Each exit also owns a :class:`MetaClassifier` for the
``meta`` confidence measure.

FREE uses one shallow exit (``exit_layers=[L_S]``, see :func:`free_shallow_layers`); CALM may use many.
Training here is built for a 2-core CPU: the backbone stays frozen and runs once over the training
tokens (:func:`cache_exit_states`); the heads then train on the cached states
(:func:`train_exit_heads`), the teacher logits recomputed from the cached final state each step
(caching ``[tokens, vocab]`` logits would cost far more memory than the LM-head matmul costs time).
``full_finetune=True`` trains the whole model with the same objective, for GPUs.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..models.config import DictConfig, ModelConfig
from ..models.decoder import DecoderLayer
from ..train.loop import Cycle, LoopConfig, OptimConfig, RowStream, TrainLog, fit, make_accelerator, only_training
from ..train.losses import (FREE_KD_KINDS, IGNORE_INDEX, calm_loss, free_loss, kl_distill, meta_loss,
                            next_token_targets)
from .confidence import CANONICAL_MEASURES, MEASURE_ALIASES, MetaClassifier, canonical_measure, confidence

ADAPTERS = ("none", "linear", "block")
OBJECTIVES = ("free", "calm")

# FREE's reference code maps shallow layer j to a deep "teacher" layer with a hand-made table
# (num_layers -> shallow layers -> teacher layers); other depths use the same uniform rule.
REFERENCE_TEACHER_LAYERS = {
    24: {12: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23], 10: [2, 5, 7, 10, 12, 15, 17, 19, 21, 23],
         8: [2, 5, 8, 11, 14, 17, 20, 23], 6: [3, 7, 11, 15, 19, 23], 4: [5, 11, 17, 23]},
    12: {3: [3, 7, 11]},
}


def free_shallow_layers(num_layers: int, fraction: float = 0.25) -> int:
    """FREE's shallow exit depth: a quarter of the layers, rounded half up (6 of 24, 8 of 30)."""
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 to have a shallow exit, got {num_layers!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    return min(num_layers - 1, max(1, int(num_layers * fraction + 0.5)))


def free_layer_map(num_layers: int, shallow_layers: int) -> list[int]:
    """The deep teacher layer (0-based) each shallow layer ``j`` is distilled from: ``round((j+1)*L/L_S) - 1``.

    24 -> 6 gives [3, 7, 11, 15, 19, 23]; the reference's own table wins where it has an entry.
    """
    if not 0 < shallow_layers < num_layers:
        raise ValueError(f"shallow_layers must be in [1, num_layers) = [1, {num_layers}), got {shallow_layers!r}")
    if shallow_layers in REFERENCE_TEACHER_LAYERS.get(num_layers, {}):
        return list(REFERENCE_TEACHER_LAYERS[num_layers][shallow_layers])
    return [int((j + 1) * num_layers / shallow_layers + 0.5) - 1 for j in range(shallow_layers)]


@dataclass
class ExitConfig(DictConfig):
    """Where tokens may exit and how an exit reads out its prediction."""
    exit_layers: list[int]  # exit after this many depth steps, e.g. FREE's [L_S]; the full depth is implicit
    adapter: str = "linear"  # "none": the logit lens; "linear": residual h + W h + b, zero-initialised;
    # "block": a decoder layer initialised from the model's last layer (attends: needs sequences or the engine's KV)
    adapter_rank: int | None = None  # None: a full d x d map; r: h + up(down(h)) through r dimensions
    measure: str = "margin"  # the confidence measure an exit uses (FREE's default)

    def __post_init__(self):
        self.validate()
        self.exit_layers = sorted(self.exit_layers)

    def validate(self) -> None:
        layers = self.exit_layers
        if (not isinstance(layers, (list, tuple)) or not layers
                or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in layers)):
            raise ValueError(f"ExitConfig.exit_layers must be a non-empty list of depths >= 1, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"ExitConfig.exit_layers has duplicates: {layers!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"ExitConfig.adapter = {self.adapter!r} is not supported; allowed: {', '.join(ADAPTERS)}")
        if self.adapter_rank is not None:
            if not isinstance(self.adapter_rank, int) or self.adapter_rank < 1:
                raise ValueError(f"ExitConfig.adapter_rank must be None or a positive integer, got {self.adapter_rank!r}")
            if self.adapter != "linear":
                raise ValueError("ExitConfig.adapter_rank needs adapter='linear'")
        if self.measure not in CANONICAL_MEASURES + tuple(MEASURE_ALIASES):
            allowed = ", ".join(CANONICAL_MEASURES + tuple(MEASURE_ALIASES))
            raise ValueError(f"ExitConfig.measure = {self.measure!r} is not supported; allowed: {allowed}")



class ResidualAdapter(nn.Module):
    """``h + W h + b`` (or ``h + up(down(h))`` at low rank), zero-initialised: untrained, it returns ``h`` exactly."""

    def __init__(self, hidden_size: int, rank: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if rank is None:
            self.proj = out = nn.Linear(hidden_size, hidden_size)
        else:
            down, out = nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size)
            with torch.no_grad():  # like LoRA: random down, zero up, so the gradient reaches both
                down.weight.copy_(torch.randn(down.weight.shape, generator=generator) / hidden_size ** 0.5)
            self.proj = nn.Sequential(down, out)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        return h + self.proj(h.to(dtype)).to(h.dtype)


class ExitHeads(nn.Module):
    """One adapter and one meta classifier per exit of a (usually frozen) backbone.

    ``model_config``: the backbone's config, needed to build ``block`` adapters (one decoder layer each)."""

    def __init__(self, config: ExitConfig, hidden_size: int, seed: int = 0, model_config: ModelConfig | None = None):
        super().__init__()
        self.config, self.hidden_size, self.model_config = config, hidden_size, model_config
        generator = torch.Generator().manual_seed(seed)
        names = [str(k) for k in config.exit_layers]
        if config.adapter == "block":
            if model_config is None or model_config.hidden_size != hidden_size:
                raise ValueError("adapter='block' needs the model's config (model_config=model.config): "
                                 "use ExitHeads.for_model(model, config)")
            self.adapters = nn.ModuleDict({k: DecoderLayer(model_config) for k in names})
        else:
            self.adapters = nn.ModuleDict() if config.adapter == "none" else nn.ModuleDict(
                {k: ResidualAdapter(hidden_size, config.adapter_rank, generator) for k in names})
        self.meta = nn.ModuleDict({k: MetaClassifier(hidden_size) for k in names})

    @classmethod
    def for_model(cls, model, config: ExitConfig, seed: int = 0) -> "ExitHeads":
        """Heads for ``model``; every exit block starts as a copy of the layer of the model's last depth step."""
        heads = cls(config, model.config.hidden_size, seed, model.config)
        heads.check(model)
        last = model.layers[model.plan[-1]].state_dict()
        for block in heads.adapters.values() if heads.attends else ():
            block.load_state_dict(last)
        return heads.placed_for(model)

    def placed_for(self, model) -> "ExitHeads":
        """On the model's device; exit blocks also in its dtype (they run inside its layers), other adapters
        stay float32."""
        return self.to(model.device, model.dtype) if self.attends else self.to(model.device)

    @property
    def attends(self) -> bool:
        """The adapters are exit blocks: they read earlier tokens, so they run on sequences (or with KV)."""
        return self.config.adapter == "block"

    def block(self, exit_layer: int) -> DecoderLayer | None:
        """The exit block after ``exit_layer`` steps (None for other adapters)."""
        return self.adapters[self._key(exit_layer)] if self.attends else None

    @property
    def exit_layers(self) -> list[int]:
        return list(self.config.exit_layers)

    def check(self, model) -> None:
        """Raise if these heads do not fit ``model`` (width, or an exit at or beyond its full depth)."""
        if model.config.hidden_size != self.hidden_size:
            raise ValueError(f"exit heads are for hidden_size {self.hidden_size}, the model has "
                             f"{model.config.hidden_size}")
        too_deep = [k for k in self.exit_layers if k >= model.num_steps]
        if too_deep:
            raise ValueError(f"ExitConfig.exit_layers {too_deep} must be < the model's {model.num_steps} depth "
                             f"steps (the full depth is always the last exit)")

    def _key(self, exit_layer: int) -> str:
        if exit_layer not in self.config.exit_layers:
            raise ValueError(f"no exit after {exit_layer} layers; exits: {self.exit_layers}")
        return str(exit_layer)

    def adapt(self, hidden: torch.Tensor, exit_layer: int, model=None) -> torch.Tensor:
        """What the head reads at this exit. An exit block needs whole sequences ``[B, T, d]`` (causal, no
        cache, positions 0..T-1) and ``model`` for the rotary embedding; packed decode tokens run it
        through the engine instead (``ctx.side_layer``), which keeps its KV."""
        key = self._key(exit_layer)
        if key not in self.adapters:
            return hidden
        if not self.attends:
            return self.adapters[key](hidden)
        if hidden.dim() != 3 or model is None:
            raise ValueError("an exit block attends over earlier tokens: pass sequences [B, T, d] and the model "
                             "(decoding runs it through the engine's policies, with its own KV cache)")
        B, T = hidden.shape[:2]
        rope = model.rope(torch.arange(T, device=hidden.device).expand(B, T))
        return self.adapters[key](hidden, rope)

    def logits(self, model, hidden: torch.Tensor, exit_layer: int) -> torch.Tensor:
        """The exit's logits: ``model.head(adapter(hidden))``, the model's own final norm + LM head."""
        return model.head(self.adapt(hidden, exit_layer, model))

    def confidence(self, exit_layer: int, hidden: torch.Tensor, model=None, logits: torch.Tensor | None = None,
                   prev_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The configured measure at this exit; logits are computed from ``model`` when needed and not given."""
        measure = self.config.measure
        if canonical_measure(measure) in ("softmax_max", "softmax_diff") and logits is None:
            if model is None:
                raise ValueError(f"measure {measure!r} needs logits or a model to compute them")
            logits = self.logits(model, hidden, exit_layer)
        return confidence(measure, logits=logits, hidden=hidden, prev_hidden=prev_hidden,
                          classifier=self.meta[self._key(exit_layer)])

    # Checkpoints: safetensors + JSON; a reload is bit-identical.
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().clone() for k, v in self.state_dict().items()},  # fused views share storage
                  str(directory / "exit_heads.safetensors"))
        meta = {"config": self.config.to_dict(), "hidden_size": self.hidden_size,
                "model_config": None if self.model_config is None else self.model_config.to_dict()}
        (directory / "exit_heads.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device=None) -> "ExitHeads":
        from safetensors.torch import load_file
        directory = Path(directory)
        meta = json.loads((directory / "exit_heads.json").read_text())
        model_config = meta.get("model_config")
        heads = cls(ExitConfig.from_dict(meta["config"]), meta["hidden_size"],
                    model_config=None if model_config is None else ModelConfig.from_dict(model_config))
        heads.load_state_dict(load_file(str(directory / "exit_heads.safetensors")))
        return heads.to(device) if device else heads


# ---------------------------------------------------------------------------------------------------
# Training on a frozen backbone: cache once, then train the heads on the cache.

@dataclass
class ExitCache:
    """What training exit heads needs from a frozen backbone, one row per token, sequence after sequence."""
    exits: dict[int, torch.Tensor]  # exit layer -> [N, d] hidden state after that many depth steps
    final: torch.Tensor  # [N, d] the last depth step's hidden state (before the final norm)
    targets: torch.Tensor  # [N] the next token, IGNORE_INDEX at the end of each block
    lengths: list[int] = field(default_factory=list)  # tokens of each sequence (exit blocks run whole sequences)
    scored: torch.Tensor | None = None  # [N] bool: rows that train and are scored (a continuation); None: all

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [self.num_tokens]
        if self.scored is None:
            self.scored = torch.ones(self.num_tokens, dtype=torch.bool, device=self.final.device)

    @property
    def num_tokens(self) -> int:
        return self.final.shape[0]

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())

    def batch_rows(self, heads: "ExitHeads", batch: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """A batch of indices (scored rows; whole sequences for exit blocks) as (the scored rows it scores,
        the (start, length) spans the adapters must run: one per sequence for blocks, else none)."""
        if not heads.attends:
            return self.scored.nonzero().squeeze(1)[batch.to(self.scored.device)], []
        starts = torch.tensor([0] + self.lengths).cumsum(0).tolist()
        spans = [(starts[i], self.lengths[i]) for i in batch.tolist()]
        rows = torch.cat([torch.arange(a, a + n) for a, n in spans]).to(self.scored.device)
        return rows[self.scored[rows]], spans

    def num_batches_of(self, heads: "ExitHeads") -> int:
        """How many things a batch index ranges over: scored rows, or sequences for exit blocks."""
        return len(self.lengths) if heads.attends else self.num_scored


def cached_exit_logits(model, heads: "ExitHeads", cache: ExitCache, batch: torch.Tensor):
    """(rows, {exit: logits of those rows}) for a batch of ``cache``: one implementation for training and
    evaluation. Exit blocks run each sampled sequence whole, so every scored row sees its earlier tokens."""
    rows, spans = cache.batch_rows(heads, batch)
    device = model.device
    logits = {}
    for k in heads.exit_layers:
        states = cache.exits[k]
        if spans:
            adapted = torch.cat([heads.adapt(states[a:a + n].to(device)[None], k, model)[0] for a, n in spans])
            keep = cache.scored[torch.cat([torch.arange(a, a + n) for a, n in spans]).to(cache.scored.device)]
            logits[k] = model.head(adapted[keep.to(device)])
        else:
            logits[k] = heads.logits(model, states[rows].to(device), k)
    return rows, logits


def _blocks(tokens) -> Iterable[torch.Tensor]:
    """``[T]``, ``[B, T]`` or an iterable of ``[B, T]`` blocks (e.g. a TokenBatches epoch) -> ``[B, T]`` blocks."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() not in (1, 2):
            raise ValueError(f"token ids must be [T] or [B, T], got shape {tuple(tokens.shape)}")
        return [tokens.view(1, -1) if tokens.dim() == 1 else tokens]
    return tokens


@torch.no_grad()
def cache_exit_states(model, tokens, exit_layers: list[int], progress: bool = False,
                      scored_from: list[int] | None = None) -> ExitCache:
    """Run the frozen ``model`` once over ``tokens`` and keep the hidden states at ``exit_layers`` and the last.

    ``scored_from``: per sequence (every row of every block, in order), the first position that trains
    and is scored, e.g. a continuation's first token after its prompt (default: every position).
    ``no_grad`` rather than ``inference_mode``: the cached tensors later feed trainable adapters.
    """
    wanted = set(exit_layers)
    if any(k < 1 or k >= model.num_steps for k in wanted):
        raise ValueError(f"exit_layers {sorted(exit_layers)} must be in [1, {model.num_steps})")
    exits, finals, targets, lengths, scored = {k: [] for k in wanted}, [], [], [], []
    blocks = _blocks(tokens)
    if progress:
        from tqdm.auto import tqdm
        blocks = tqdm(blocks, desc="caching hidden states", unit="batch")
    for ids in blocks:
        ids = ids.to(model.device)
        B, T = ids.shape
        rope = model.rope(torch.arange(T, device=ids.device).expand(B, T))
        h = model.embed(ids)
        for step in range(model.num_steps):
            h = model.run_step(step, h, rope)
            if step + 1 in wanted:
                exits[step + 1].append(h.reshape(B * T, -1))
        finals.append(h.reshape(B * T, -1))
        targets.append(next_token_targets(ids).reshape(-1))
        first = [0] * B if scored_from is None else scored_from[len(lengths):len(lengths) + B]
        if len(first) != B:
            raise ValueError(f"scored_from has {len(scored_from)} entries, fewer than the sequences given")
        scored.append((torch.arange(T, device=ids.device)[None] >= torch.tensor(first, device=ids.device)[:, None])
                      .reshape(-1))
        lengths += [T] * B
    if not finals:
        raise ValueError("cache_exit_states got no token blocks")
    return ExitCache({k: torch.cat(v) for k, v in sorted(exits.items())}, torch.cat(finals), torch.cat(targets),
                     lengths, torch.cat(scored))


@dataclass
class TrainHistory:
    """Per-step losses of :func:`train_exit_heads` (for a loss curve)."""
    loss: list[float] = field(default_factory=list)  # the exits' objective (FREE or CALM)
    meta_loss: list[float] = field(default_factory=list)  # the meta classifiers' BCE (empty if not trained)
    seconds: float = 0.0
    log: TrainLog | None = None  # the training loop's full log


def exit_objective(objective: str, exit_logits: dict[int, torch.Tensor], deep_logits: torch.Tensor,
                   targets: torch.Tensor, num_layers: int, alpha: float = 0.5, kd: str = "kl",
                   temperature: float = 1.0, hidden=None, norm=None) -> torch.Tensor:
    """FREE's shallow-deep loss (one exit) or CALM's depth-weighted CE over all exits + the deep one.

    CALM's variant adds ``alpha`` times the mean KL from the deep logits to each exit's, as FREE does;
    ``alpha=0`` gives CALM's plain objective.
    """
    if objective == "free":
        if len(exit_logits) != 1:
            raise ValueError(f"objective 'free' has one shallow exit, got exits {sorted(exit_logits)}")
        (layer, logits), = exit_logits.items()
        from_map = kd in ("mse", "mse_dyna")
        return free_loss(logits, deep_logits, targets, shallow_layers=layer, num_layers=num_layers, alpha=alpha,
                         kd=kd, hidden=hidden, layer_map=free_layer_map(num_layers, layer) if from_map else None,
                         temperature=temperature, norm=norm).total
    if objective != "calm":
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if kd != "kl":
        raise ValueError("objective 'calm' distils with kd='kl' only")
    ce = calm_loss([*exit_logits.values(), deep_logits], targets, [*exit_logits, num_layers])
    kl = torch.stack([kl_distill(logits, deep_logits, temperature) for logits in exit_logits.values()]).mean()
    return ce + alpha * kl


class _ExitObjective(nn.Module):
    """What :func:`train_exit_heads` optimises, as one module, so that ``accelerate`` (DDP, FSDP) wraps
    exactly the parts that train: the heads, plus the backbone when it is fine-tuned. A frozen backbone
    is held outside the module tree (not wrapped, not checkpointed)."""

    def __init__(self, model, heads: ExitHeads, cache: ExitCache | None, objective: str, alpha: float, kd: str,
                 temperature: float, train_meta: bool, full_finetune: bool):
        super().__init__()
        self.heads = heads
        if full_finetune:
            self.model = model
        else:
            self.__dict__["model"] = model
        self.cache, self.objective, self.alpha, self.kd = cache, objective, alpha, kd
        self.temperature, self.train_meta, self.full_finetune = temperature, train_meta, full_finetune

    def forward(self, batch: torch.Tensor):
        model, heads = self.model, self.heads
        if self.full_finetune:  # batch: [B, T] token ids
            ids = batch.to(model.device)
            targets = next_token_targets(ids)
            deep_logits, hidden = model(ids, return_hidden=True)
            exit_hidden = {k: hidden[k] for k in heads.exit_layers}
            exit_logits = {k: heads.logits(model, h, k) for k, h in exit_hidden.items()}
        else:  # batch: indices of scored rows (of sequences, for exit blocks) into the cache
            cache, hidden = self.cache, None
            idx, exit_logits = cached_exit_logits(model, heads, cache, batch)
            targets = cache.targets[idx].to(model.device)
            with torch.no_grad():
                deep_logits = model.head(cache.final[idx].to(model.device))
            exit_hidden = {k: cache.exits[k][idx].to(model.device) for k in heads.exit_layers}
        loss = exit_objective(self.objective, exit_logits, deep_logits, targets, model.num_steps, self.alpha,
                              self.kd, self.temperature, hidden, norm=model.norm)  # FREE's code: the final norm
        metrics, total = {"objective": loss.detach()}, loss
        if self.train_meta:
            final_top1 = deep_logits.detach().argmax(-1)
            m_loss = torch.stack([meta_loss(heads.meta[str(k)].logit(exit_hidden[k].detach()),
                                            exit_logits[k].detach().argmax(-1) == final_top1)
                                  for k in heads.exit_layers]).mean()
            total = total + m_loss
            metrics["meta_loss"] = m_loss.detach()
        return total, metrics


def train_exit_heads(model, heads: ExitHeads, data, *, steps: int = 100, lr: float = 1e-3,
                     batch_tokens: int = 256, objective: str | None = None, alpha: float = 0.5, kd: str = "kl",
                     temperature: float = 1.0, train_meta: bool = True, weight_decay: float = 0.0, seed: int = 0,
                     progress: bool = True, full_finetune: bool = False,
                     checkpoint: str | Path | None = None, resume: bool = False, checkpoint_every: int = 0,
                     precision: str = "fp32", accelerator=None, command: str | None = None,
                     run_config: dict | None = None) -> TrainHistory:
    """Train ``heads`` (adapters + meta classifiers) with AdamW; returns the per-step losses.

    ``data``: an :class:`ExitCache`, or token ids (``[T]``, ``[B, T]`` or an iterable of ``[B, T]`` blocks,
    e.g. ``TokenBatches``) that are cached first. The backbone is frozen and each step samples
    ``batch_tokens`` cached tokens. ``objective``: "free" (one exit) or "calm"; ``None`` picks "free"
    for a single exit. ``kd="kl"`` (see :mod:`mor_lab.train.losses` for why, and ``"mse"``).

    ``full_finetune=True`` trains the whole model and the heads on ``data`` token blocks (one block
    per step, cycling), where ``kd="mse"`` is FREE's reference KD. Meta classifiers learn the label
    "this exit's top-1 equals the full model's top-1". ``checkpoint``: a directory to save the heads
    to (and the model, under ``model/``, when fine-tuned), with the loop's log (``train.json``) and,
    every ``checkpoint_every`` steps, a resumable state (``resume=True`` continues it). The steps run
    in :func:`mor_lab.train.loop.fit` (constant lr, no clipping: the heads' recipe).
    """
    heads.check(model)
    objective = objective or ("free" if len(heads.exit_layers) == 1 else "calm")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if kd not in FREE_KD_KINDS:
        raise ValueError(f"unknown kd {kd!r}; allowed: {', '.join(FREE_KD_KINDS)}")
    if kd != "kl" and not full_finetune:
        raise ValueError(f"kd={kd!r} needs full_finetune=True: with a frozen backbone the shallow hidden states "
                         "depend on nothing trainable, so use kd='kl'")
    if steps < 1 or batch_tokens < 1:
        raise ValueError(f"steps and batch_tokens must be >= 1, got {steps} and {batch_tokens}")
    heads.to(model.device)
    params = list(heads.adapters.parameters()) + (list(heads.meta.parameters()) if train_meta else [])
    if full_finetune:
        params += [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: adapter='none' with train_meta=False and a frozen backbone")

    if full_finetune:
        cache, batches, freeze = None, Cycle(_blocks(data), what="train_exit_heads"), contextlib.nullcontext()
    else:
        cache = data if isinstance(data, ExitCache) else cache_exit_states(model, data, heads.exit_layers, progress)
        missing = set(heads.exit_layers) - set(cache.exits)
        if missing:
            raise ValueError(f"the cache has no hidden states for exits {sorted(missing)}")
        per_batch = batch_tokens
        if heads.attends:  # whole sequences: about batch_tokens scored tokens a step
            per_batch = max(1, round(batch_tokens * len(cache.lengths) / max(1, cache.num_scored)))
        batches, freeze = RowStream(cache.num_batches_of(heads), per_batch, seed), only_training(model)
    trainer = _ExitObjective(model, heads, cache, objective, alpha, kd, temperature, train_meta, full_finetune)
    config = LoopConfig(steps=steps, seed=seed, precision=precision, checkpoint_every=checkpoint_every,
                        optim=OptimConfig(lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, warmup=0.0,
                                          decay=0.0, max_grad_norm=None))
    run = {"heads": heads.config.to_dict(), "objective": objective, "alpha": alpha, "kd": kd,
           "temperature": temperature, "train_meta": train_meta, "full_finetune": full_finetune,
           "batch_tokens": batch_tokens, "tokens": cache.num_scored if cache is not None else None,
           **(run_config or {})}
    with freeze:
        log = fit(trainer, params, batches, lambda module, batch, step: module(batch), config,
                  out=checkpoint, resume=resume, name="training exit heads", run_config=run, command=command,
                  log_name="train.json", progress=progress,
                  accelerator=accelerator or make_accelerator(model.device))
    history = TrainHistory(loss=list(log.metrics["objective"]), meta_loss=list(log.metrics.get("meta_loss", [])),
                           seconds=log.total_seconds, log=log)
    if checkpoint is not None and (accelerator is None or accelerator.is_main_process):
        heads.save(checkpoint)
        if full_finetune:
            model.save(Path(checkpoint) / "model")
    return history


@dataclass
class ExitMetrics:
    """How one exit does on a set of tokens."""
    agreement: float  # fraction of tokens whose exit top-1 equals the full model's top-1
    ce: float  # next-token cross-entropy at the exit
    kl: float  # KL(full model || exit), mean per token
    tokens: int


@torch.no_grad()
def evaluate_exit_heads(model, heads: ExitHeads, cache: ExitCache, batch_tokens: int = 512) -> dict[int, ExitMetrics]:
    """Agreement with the full model, CE and KL at every exit, over the scored tokens of ``cache``."""
    heads.check(model)
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in heads.exit_layers}
    scored = 0
    total = cache.num_batches_of(heads)
    step = max(1, batch_tokens * total // max(1, cache.num_scored))  # about batch_tokens scored rows at a time
    for i in range(0, total, step):
        rows, exit_logits = cached_exit_logits(model, heads, cache, torch.arange(i, min(total, i + step)))
        final = cache.final[rows].to(model.device)
        targets = cache.targets[rows].to(model.device)
        deep = model.head(final)
        n_scored = int((targets != IGNORE_INDEX).sum())
        scored += n_scored
        for k in heads.exit_layers:
            logits = exit_logits[k]
            agree = (logits.argmax(-1) == deep.argmax(-1)).sum()
            ce = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX,
                                                   reduction="sum")
            kl = kl_distill(logits, deep) * len(final)
            sums[k] += torch.stack([agree.double(), ce.double(), kl.double()]).cpu()
    n = cache.num_scored
    return {k: ExitMetrics(agreement=float(s[0] / n), ce=float(s[1] / max(1, scored)), kl=float(s[2] / n), tokens=n)
            for k, s in sums.items()}

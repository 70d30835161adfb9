"""Relaxation: a per-position LoRA on the projections of every looped step, SVD-initialised.

Step ``s`` of a recursive model runs the shared weights ``W_shared``; the original layer ``l`` it
stands in for had ``W_l``. The relaxation adds ``scale * B A`` with ``U S V^T = svd(R_l)``,
``R_l = W_l - W_shared``, ``A = V^T[:r]`` and ``B = U[:, :r] diag(S[:r])``: the best rank-r
correction, and exactly ``R_l`` at full rank ``r = min(out, in)`` and scale 1, where the relaxed
model computes what the original did (with per-position norms; biases, if a model has them, stay shared).

Against the reference code (raymin0223/mixture_of_recursions, ``model/relaxation/lora``; checked in
``tests/test_reference_relax.py``): the SVD initialisation is the same. Its configs set PEFT's
``alpha = 2 r`` (``alpha_pattern: 2.0``), a LoRA scale of 2, keeping ``B = U S``: its initial delta is
twice the truncated SVD, so even full rank overshoots the original. mor_lab's default scale is 1 (what
the full-rank exactness needs); ``lora_scale=2.0`` is the reference's. Its example config relaxes
``q_proj`` and ``v_proj`` only; mor_lab relaxes every projection by default (the paper relaxes each
weight matrix, and the full-rank exactness needs all of them); ``targets=("q_proj", "v_proj")`` is the
reference's choice.

Merging: the physical layers are shared, so folding one step's LoRA into them would change every
other step that runs them. :func:`merge` therefore *unrolls*: it returns an equivalent vanilla
Decoder with one dense layer per depth step (``W_shared + B_s A_s``, the step's own norms). That
removes the LoRA's extra matmuls at the price of the sharing (memory, and depth-wise batching).
:func:`unmerge` is the inverse: it fits each step's LoRA back to an unrolled model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass

import torch

from ..models.config import DictConfig
from ..models.decoder import Decoder, DecoderLayer, LoRA, StepDelta
from .convert import empty_like
from .sharing import SharingPlan

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass
class RelaxConfig(DictConfig):
    """LoRA ranks of the relaxation, separate for attention and MLP projections, the projections it
    relaxes, and the LoRA scale.

    Ranks: ``None``: full rank (``min(out, in)``, exact); ``0``: no LoRA there (those projections stay
    tied). A rank above ``min(out, in)`` is clamped to it. ``targets``: the projections that get a LoRA
    (the others stay tied). ``lora_scale``: the LoRA's output factor (PEFT's ``alpha / r``; the
    reference uses 2, see the module docstring).
    """
    attn_rank: int | None = 16
    mlp_rank: int | None = 16
    targets: tuple[str, ...] = PROJECTIONS
    lora_scale: float = 1.0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        for name in ("attn_rank", "mlp_rank"):
            rank = getattr(self, name)
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
                raise ValueError(f"RelaxConfig.{name} must be None (full rank) or an integer >= 0, got {rank!r}")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"RelaxConfig.targets must be distinct names among {PROJECTIONS}, got {self.targets}")
        scale = self.lora_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"RelaxConfig.lora_scale must be a number > 0, got {self.lora_scale!r}")

    def rank(self, projection: str) -> int | None:
        """The LoRA rank of ``projection`` (0 when it is not a target)."""
        if projection not in self.targets:
            return 0
        return self.attn_rank if projection in ATTENTION_PROJECTIONS else self.mlp_rank



def linear(layer: DecoderLayer, projection: str) -> torch.nn.Linear:
    return getattr(layer.self_attn if projection in ATTENTION_PROJECTIONS else layer.mlp, projection)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Small dense linear algebra (LAPACK's eigensolver above all) gains little from a second thread,
    and loses several times over when the cores are busy (SmolLM2's full relaxation on 2 shared
    cores: ~16 s on one thread, ~45 s on two)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eigenvectors of a symmetric matrix with the largest eigenvalues, largest first."""
    return torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :k]


@torch.no_grad()
def svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = V^T[:r]`` (``[r, in]``) and ``B = U[:, :r] diag(S[:r])`` (``[out, r]``) of ``svd(residual)``, float64.

    Why not ``torch.linalg.svd``: the eigendecomposition of the smaller Gram matrix gives the same
    factors several times faster on a CPU. With ``V`` from
    ``R^T R``, ``B = R V`` needs no division, so ``B A = R`` holds to float64 precision at full rank.
    When ``out < in`` the roles swap (``U`` from ``R R^T``, ``V S = R^T U``). A zero residual gives
    ``B = 0`` and ``A`` = the first rows of the identity (what an SVD returns), so the LoRA can still train.
    """
    out_features, in_features = residual.shape
    rank = min(rank, out_features, in_features)
    if not residual.any():
        return (torch.eye(rank, in_features, dtype=torch.float64, device=residual.device),
                torch.zeros(out_features, rank, dtype=torch.float64, device=residual.device))
    R = residual.detach().double()
    with _one_cpu_thread(R.device):
        if out_features >= in_features:
            V = _top_eigenvectors(R.T @ R, rank)  # right singular vectors, largest singular values first
            return V.T.contiguous(), R @ V
        U = _top_eigenvectors(R @ R.T, rank)  # left singular vectors
        VS = R.T @ U  # V diag(S)
        S = VS.norm(dim=0)
        A = (VS / torch.where(S > 0, S, torch.ones_like(S))).T.contiguous()
        return A, U * S


def svd_lora(residual: torch.Tensor, rank: int, dtype: torch.dtype | None = None, scale: float = 1.0,
             exact: bool = False) -> LoRA:
    """A LoRA of the rank-``rank`` truncated SVD of ``residual`` (``[out, in]``), ``A = V^T``, ``B = U S``,
    with output factor ``scale``: ``delta_weight()`` is ``scale`` times the truncated SVD (the reference's
    initialisation). ``exact``: ``B = U S / scale`` instead, so that ``delta_weight()`` is the truncated SVD."""
    A, B = svd_factors(residual, rank)
    lora = LoRA(residual.shape[1], residual.shape[0], A.shape[0], scale).to(device=residual.device,
                                                                           dtype=dtype or residual.dtype)
    with torch.no_grad():
        lora.A.copy_(A)
        lora.B.copy_(B / scale if exact else B)
    return lora


@torch.no_grad()
def _fit_steps(model: Decoder, targets: dict[int, DecoderLayer], config: RelaxConfig, exact: bool = False) -> None:
    """Give every step in ``targets`` a LoRA per projection fitted to ``target - shared`` (in place).
    ``exact``: the LoRA's delta is the fit whatever the scale (:func:`unmerge`); otherwise the reference's
    initialisation, ``scale`` times the fit (:func:`relax`)."""
    if model.config.attention_bias or model.config.mlp_bias:
        warnings.warn("the relaxation is LoRA on weights only: biases stay shared, so even full rank is not exact")
    for step, target in targets.items():
        shared = model.layers[model.plan[step]]
        lora = {}
        for name in PROJECTIONS:
            weight = linear(shared, name).weight
            rank = config.rank(name)
            rank = min(weight.shape) if rank is None else min(rank, *weight.shape)
            if rank > 0:
                lora[name] = svd_lora(linear(target, name).weight - weight, rank, weight.dtype, config.lora_scale,
                                      exact)
        delta = model.delta(step)
        if delta is None:
            model.step_deltas[str(step)] = StepDelta(lora)
        else:
            delta.lora = torch.nn.ModuleDict(lora)


def relax(model: Decoder, original: Decoder, sharing: SharingPlan, config: RelaxConfig | None = None,
          **overrides) -> Decoder:
    """Add the SVD-initialised per-position LoRA to every looped step of ``model`` (in place; returned).

    ``original`` is the vanilla model ``model`` was converted from; ``sharing`` says which original
    layer each step stands in for. Calling it again replaces the LoRA (e.g. with other ranks).
    """
    config = dataclasses.replace(config, **overrides) if config else RelaxConfig(**overrides)
    if model.plan != sharing.plan:
        raise ValueError(f"model.plan {model.plan} is not the sharing plan's {sharing.plan}")
    if original.config.num_layers != sharing.num_layers:
        raise ValueError(f"original has {original.config.num_layers} layers, the sharing plan is for "
                         f"{sharing.num_layers}")
    _fit_steps(model, {s.step: original.layers[s.original] for s in sharing.steps if s.loop is not None}, config)
    return model


@torch.no_grad()
def merge(model: Decoder) -> Decoder:
    """An equivalent vanilla Decoder with one dense layer per depth step: ``W_shared + B_s A_s`` and
    the step's own norms (see the module docstring for why merging means unrolling). ``model`` is unchanged."""
    merged = empty_like(model, model.num_steps)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("embed_tokens.", "norm.", "lm_head."))}
    merged.load_state_dict(state, strict=False)
    for step in range(model.num_steps):
        layer, delta = merged.layers[step], model.delta(step)
        layer.load_state_dict(model.layers[model.plan[step]].state_dict())
        if delta is None:
            continue
        for name, lora in delta.lora.items():
            weight = linear(layer, name).weight
            weight += lora.delta_weight().to(weight.dtype)
        for name, weight in delta.norms.items():
            getattr(layer, name).weight.copy_(weight)
    return merged.train(model.training)


@torch.no_grad()
def unmerge(merged: Decoder, recursive: Decoder, sharing: SharingPlan, config: RelaxConfig | None = None,
            **overrides) -> Decoder:
    """The inverse of :func:`merge`: a copy of ``recursive`` whose looped steps get LoRA fitted (truncated
    SVD) to ``merged``'s layer for that step, and that layer's norms where ``recursive`` keeps per-step norms.
    Exact at full rank: ``unmerge(merge(m), m, sharing, attn_rank=None, mlp_rank=None)`` computes what ``m`` does,
    whatever ``lora_scale`` (``B`` absorbs it)."""
    config = dataclasses.replace(config, **overrides) if config else RelaxConfig(**overrides)
    if merged.config.num_layers != recursive.num_steps:
        raise ValueError(f"merged has {merged.config.num_layers} layers, recursive has {recursive.num_steps} steps")
    model = copy.deepcopy(recursive)
    looped = [s.step for s in sharing.steps if s.loop is not None]
    _fit_steps(model, {step: merged.layers[step] for step in looped}, config, exact=True)
    for step in looped:
        for name, weight in model.delta(step).norms.items():
            weight.copy_(getattr(merged.layers[step], name).weight)
    return model


@torch.no_grad()
def relative_residuals(model: Decoder, original: Decoder, sharing: SharingPlan) -> dict[str, float]:
    """Per projection, ``||W_l - W_step|| / ||W_l||`` averaged over the looped steps (the step's weight
    includes its LoRA): how far the recursive model is from the original, weight-wise."""
    totals = {name: 0.0 for name in PROJECTIONS}
    looped = [s for s in sharing.steps if s.loop is not None]
    for s in looped:
        target, shared, delta = original.layers[s.original], model.layers[s.layer], model.delta(s.step)
        for name in PROJECTIONS:
            weight = linear(shared, name).weight.double()
            if delta is not None and name in delta.lora:
                weight = weight + delta.lora[name].delta_weight().double()
            w = linear(target, name).weight.double()
            totals[name] += float((w - weight).norm() / w.norm().clamp_min(1e-30))
    return {name: total / max(1, len(looped)) for name, total in totals.items()}




@dataclass
class RankCurves:
    """What the SVD relaxation leaves and costs at every LoRA rank (one rank for every projection)."""

    residual: dict[str, torch.Tensor]  # per projection: relative residual left at rank 0..min(out, in)
    params_per_rank: dict[str, int]  # per projection: LoRA parameters one more rank adds, all looped steps

    @property
    def full_rank(self) -> int:
        return max(len(c) for c in self.residual.values()) - 1

    def left(self, rank: int) -> float:
        """Mean over projections of the relative residual left at ``rank``."""
        return sum(float(c[min(rank, len(c) - 1)]) for c in self.residual.values()) / len(self.residual)

    def lora_parameters(self, rank: int) -> int:
        return sum(min(rank, len(self.residual[n]) - 1) * p for n, p in self.params_per_rank.items())


@torch.no_grad()
def residual_by_rank(model: Decoder, original: Decoder, sharing: SharingPlan) -> RankCurves:
    """Per projection, ``||W_l - W_shared - (best rank-r fit)|| / ||W_l||`` for every rank ``r = 0..full``,
    averaged over the looped steps: the curve that ``relative_residuals`` samples one rank at a time after
    ``relax``, computed once from the singular values of each residual (the truncated SVD is the best fit).

    The shared weights are the model's own, LoRA excluded: it is the residual the relaxation fits.
    """
    curves: dict[str, torch.Tensor] = {}
    per_rank: dict[str, int] = {}
    looped = [s for s in sharing.steps if s.loop is not None]
    for name in PROJECTIONS:
        total = None
        for s in looped:
            w = linear(original.layers[s.original], name).weight.double()
            r = w - linear(model.layers[s.layer], name).weight.double()
            with _one_cpu_thread(r.device):
                gram = r.T @ r if r.shape[0] >= r.shape[1] else r @ r.T
                energy = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # squared singular values, largest first
            tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # energy left after rank r
            curve = tail.sqrt() / w.norm().clamp_min(1e-30)
            total = curve if total is None else total + curve
        curves[name] = (total / max(1, len(looped))).float().cpu()
        per_rank[name] = len(looped) * sum(linear(model.layers[0], name).weight.shape)
    return RankCurves(curves, per_rank)

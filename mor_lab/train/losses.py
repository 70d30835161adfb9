"""Training objectives for exits: FREE's shallow-deep loss, CALM's weighted average, distillation.

Conventions: ``targets`` are next-token ids with ``-100`` where a position has none (see
:func:`next_token_targets`); logits may have any leading shape. Teachers are always detached: a
distillation term moves the student towards the teacher, never the other way.

FREE's KD term, two flavours (``free_loss(kd=...)``):

- ``"mse"`` (the reference code): MSE between each shallow layer's hidden state and a deep "teacher"
  layer's, over a fixed layer map (:func:`mor_lab.early_exit.heads.free_layer_map`). It trains the
  backbone's shallow layers, so it only means something when the backbone is fine-tuned.
- ``"kl"`` (the default of :func:`mor_lab.early_exit.heads.train_exit_heads`): KL from the deep
  model's next-token distribution to the shallow exit's. With a frozen backbone the shallow hidden
  states do not depend on anything trainable, so the MSE would be a constant; the KL instead trains
  the exit head towards exactly what early exit needs: predicting the full model's token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_KINDS = ("kl", "mse")


def next_token_targets(ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, T]`` ids -> the token each position predicts (``ids`` shifted left), ``ignore_index`` at the end."""
    targets = torch.full_like(ids, ignore_index)
    targets[..., :-1] = ids[..., 1:]
    return targets


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over positions with a target, in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(teacher || student)`` of the softened distributions, mean over tokens, times ``temperature**2``.

    The ``T**2`` keeps gradient sizes comparable across temperatures (Hinton et al., 2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_mse(hidden: torch.Tensor | Sequence[torch.Tensor], layer_map: Sequence[int]) -> torch.Tensor:
    """FREE's reference KD: shallow layer ``j``'s output vs teacher layer ``layer_map[j]``'s (detached), mean MSE.

    ``hidden`` is the stack of ``Decoder(..., return_hidden=True)``: index 0 is the embedding, so the
    output of (0-based) layer ``j`` is ``hidden[j + 1]``.
    """
    if len(layer_map) == 0:
        raise ValueError("layer_map is empty: give one teacher layer per shallow layer")
    if max(layer_map) >= len(hidden) - 1:
        raise ValueError(f"layer_map names layer {max(layer_map)} but hidden has only {len(hidden) - 1} layers")
    losses = [F.mse_loss(hidden[j + 1].float(), hidden[t + 1].detach().float()) for j, t in enumerate(layer_map)]
    return torch.stack(losses).mean()


@dataclass
class FreeLoss:
    """FREE's objective and its parts (the parts are for logging)."""
    total: torch.Tensor
    ce_shallow: torch.Tensor
    ce_deep: torch.Tensor
    kd: torch.Tensor


def free_loss(shallow_logits: torch.Tensor, deep_logits: torch.Tensor, targets: torch.Tensor, *,
              shallow_layers: int, num_layers: int, alpha: float = 0.5, kd: str = "kl",
              hidden: torch.Tensor | Sequence[torch.Tensor] | None = None, layer_map: Sequence[int] | None = None,
              temperature: float = 1.0) -> FreeLoss:
    """FREE's shallow-deep objective ``(L_S*CE_shallow + L*CE_deep)/(L_S + L) + alpha*KD``.

    Each exit's CE is weighted by its depth, as in CALM. ``kd="kl"``: KL from the deep logits to the
    shallow ones; ``kd="mse"``: :func:`hidden_mse` over ``layer_map`` (needs ``hidden``).
    """
    if not 0 < shallow_layers < num_layers:
        raise ValueError(f"shallow_layers must be in [1, num_layers) = [1, {num_layers}), got {shallow_layers!r}")
    if kd not in KD_KINDS:
        raise ValueError(f"unknown kd {kd!r}; allowed: {', '.join(KD_KINDS)}")
    ce_shallow, ce_deep = cross_entropy(shallow_logits, targets), cross_entropy(deep_logits, targets)
    ce = (shallow_layers * ce_shallow + num_layers * ce_deep) / (shallow_layers + num_layers)
    if kd == "kl":
        distill = kl_distill(shallow_logits, deep_logits, temperature)
    else:
        if hidden is None or layer_map is None:
            raise ValueError("kd='mse' needs hidden (the return_hidden stack) and layer_map")
        distill = hidden_mse(hidden, layer_map)
    return FreeLoss(ce + alpha * distill, ce_shallow, ce_deep, distill)


def calm_weights(exit_layers: Sequence[int]) -> torch.Tensor:
    """CALM's per-exit weights, proportional to depth: ``i / sum(i)`` (with every layer an exit: ``i = 1..L``)."""
    layers = torch.as_tensor(list(exit_layers), dtype=torch.float32)
    if layers.numel() == 0 or (layers <= 0).any():
        raise ValueError(f"exit_layers must be positive depths, got {list(exit_layers)!r}")
    return layers / layers.sum()


def calm_loss(exit_logits: Sequence[torch.Tensor], targets: torch.Tensor, exit_layers: Sequence[int]) -> torch.Tensor:
    """CALM's objective ``sum_i w_i * CE_i`` with ``w_i`` from :func:`calm_weights`: deeper exits weigh more.

    ``exit_logits[k]`` are the logits of the exit after ``exit_layers[k]`` layers (include the final layer).
    """
    if len(exit_logits) != len(exit_layers):
        raise ValueError(f"got {len(exit_logits)} exit logits for {len(exit_layers)} exit layers")
    weights = calm_weights(exit_layers)
    return sum(w * cross_entropy(logits, targets) for w, logits in zip(weights.tolist(), exit_logits))


def meta_loss(logits: torch.Tensor, labels: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """BCE for a :class:`~mor_lab.early_exit.confidence.MetaClassifier` (label 1: the exit's token is the final one).

    ``balanced=True`` is the FREE reference's logit adjustment: the label prior is added to the logit
    during training, so the classifier learns a prior-free score instead of a calibrated probability.
    """
    logits, labels = logits.float().reshape(-1), labels.float().reshape(-1)
    if balanced:
        positive = labels.mean().clamp(1e-4, 1 - 1e-4)
        logits = logits + torch.log(positive / (1 - positive))
    return F.binary_cross_entropy_with_logits(logits, labels)

"""Training objectives for exits: FREE's shallow-deep loss, CALM's weighted average, distillation.

Conventions: ``targets`` are next-token ids with ``-100`` where a position has none (see
:func:`next_token_targets`); logits may have any leading shape. Teachers are always detached: a
distillation term moves the student towards the teacher, never the other way.

FREE's KD term (``free_loss(kd=...)``):

- ``"mse"``, ``"mse_last"``, ``"mse_dyna"`` (the reference code's ``shallowdeep_kd_unif``, ``_kd_last``,
  ``_kd_dyna``, ``util/losses.py`` compute_layerwise_distillation_loss): MSE between shallow layers'
  hidden states and deep "teacher" layers' (detached): over a fixed layer map
  (:func:`mor_lab.early_exit.heads.free_layer_map`), the last shallow layer against the last layer,
  or each teacher against its closest shallow layer, aligned monotonically from the top. They train
  the backbone's shallow layers, so they only mean something when the backbone is fine-tuned.
  The reference compares the states *after the final norm* (what its exits read): pass
  ``norm=model.norm`` for that; ``transform`` is its optional ``layer_transformation`` (a Linear on
  the student states).
- ``"kl"`` (the default of :func:`mor_lab.early_exit.heads.train_exit_heads`): KL from the deep
  model's next-token distribution to the shallow exit's. With a frozen backbone the shallow hidden
  states do not depend on anything trainable, so the MSE would be a constant; the KL instead trains
  the exit head towards exactly what early exit needs: predicting the full model's token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
HIDDEN_KD_KINDS = ("mse", "mse_last", "mse_dyna")  # layer-wise hidden-state distillation
FREE_KD_KINDS = ("kl",) + HIDDEN_KD_KINDS  # what free_loss accepts


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


def _layer_state(hidden, layer: int, norm: Callable | None):
    """Output of (0-based) layer ``layer`` from a ``return_hidden`` stack (index 0 is the embedding), normed."""
    if not 0 <= layer < len(hidden) - 1:
        raise ValueError(f"layer {layer} is not in the hidden stack's {len(hidden) - 1} layers")
    h = hidden[layer + 1].float()
    return h if norm is None else norm(h).float()


def _student(state: torch.Tensor, transform: Callable | None) -> torch.Tensor:
    return state if transform is None else transform(state).float()


def hidden_mse(hidden: torch.Tensor | Sequence[torch.Tensor], layer_map: Sequence[int], *,
               norm: Callable | None = None, transform: Callable | None = None) -> torch.Tensor:
    """FREE's reference KD (``kd_unif``): shallow layer ``j``'s output vs teacher layer ``layer_map[j]``'s
    (detached), mean MSE.

    ``hidden`` is the stack of ``Decoder(..., return_hidden=True)``: index 0 is the embedding, so the
    output of (0-based) layer ``j`` is ``hidden[j + 1]``. ``norm``: applied to every state first (the
    reference uses the final norm); ``transform``: applied to the student states.
    """
    if len(layer_map) == 0:
        raise ValueError("layer_map is empty: give one teacher layer per shallow layer")
    if max(layer_map) >= len(hidden) - 1:
        raise ValueError(f"layer_map names layer {max(layer_map)} but hidden has only {len(hidden) - 1} layers")
    losses = [F.mse_loss(_student(_layer_state(hidden, j, norm), transform), _layer_state(hidden, t, norm).detach())
              for j, t in enumerate(layer_map)]
    return torch.stack(losses).mean()


def hidden_mse_last(hidden: torch.Tensor | Sequence[torch.Tensor], shallow_layers: int, *,
                    norm: Callable | None = None, transform: Callable | None = None) -> torch.Tensor:
    """FREE's ``kd_last``: the last shallow layer's output vs the last layer's (detached), MSE."""
    num_layers = len(hidden) - 1
    if not 0 < shallow_layers < num_layers:
        raise ValueError(f"shallow_layers must be in [1, {num_layers}), got {shallow_layers!r}")
    student = _student(_layer_state(hidden, shallow_layers - 1, norm), transform)
    return F.mse_loss(student, _layer_state(hidden, num_layers - 1, norm).detach())


def hidden_mse_dyna(hidden: torch.Tensor | Sequence[torch.Tensor], layer_map: Sequence[int], *,
                    norm: Callable | None = None, transform: Callable | None = None) -> torch.Tensor:
    """FREE's ``kd_dyna``: each teacher layer of ``layer_map`` against its closest shallow layer.

    The ``len(layer_map)`` shallow layers and the teachers form a table of MSEs; from the last teacher
    down, each takes the shallow layer of smallest MSE strictly below the previous teacher's choice (the
    previous choice again when none is left), and the loss is the mean MSE of those pairs. The alignment
    is not differentiated; the MSEs are.
    """
    if len(layer_map) == 0:
        raise ValueError("layer_map is empty: give the teacher layers")
    students = [_student(_layer_state(hidden, j, norm), transform) for j in range(len(layer_map))]
    teachers = [_layer_state(hidden, t, norm).detach() for t in layer_map]
    table = torch.stack([torch.stack([F.mse_loss(s, t) for s in students]) for t in teachers])
    alignment, limit = [], len(hidden) - 1  # the reference starts from len(all_hidden_states)
    for row in reversed(range(len(teachers))):
        order = table[row].detach().argsort(stable=True)
        below = order[order < limit]
        limit = int(below[0]) if len(below) else limit
        alignment.append(limit)
    alignment.reverse()
    return table[torch.arange(len(teachers)), torch.tensor(alignment)].mean()


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
              temperature: float = 1.0, norm: Callable | None = None, transform: Callable | None = None) -> FreeLoss:
    """FREE's shallow-deep objective ``(L_S*CE_shallow + L*CE_deep)/(L_S + L) + alpha*KD``.

    Each exit's CE is weighted by its depth, as in CALM. ``kd="kl"``: KL from the deep logits to the
    shallow ones; ``"mse"`` / ``"mse_dyna"``: :func:`hidden_mse` / :func:`hidden_mse_dyna` over
    ``layer_map``, ``"mse_last"``: :func:`hidden_mse_last` (all need ``hidden``; ``norm`` and ``transform``
    go to them).
    """
    if not 0 < shallow_layers < num_layers:
        raise ValueError(f"shallow_layers must be in [1, num_layers) = [1, {num_layers}), got {shallow_layers!r}")
    if kd not in FREE_KD_KINDS:
        raise ValueError(f"unknown kd {kd!r}; allowed: {', '.join(FREE_KD_KINDS)}")
    ce_shallow, ce_deep = cross_entropy(shallow_logits, targets), cross_entropy(deep_logits, targets)
    ce = (shallow_layers * ce_shallow + num_layers * ce_deep) / (shallow_layers + num_layers)
    if kd == "kl":
        distill = kl_distill(shallow_logits, deep_logits, temperature)
    else:
        if hidden is None or (layer_map is None and kd != "mse_last"):
            raise ValueError(f"kd={kd!r} needs hidden (the return_hidden stack)"
                             + ("" if kd == "mse_last" else " and layer_map"))
        if len(hidden) - 1 != num_layers:
            raise ValueError(f"hidden holds {len(hidden) - 1} layers, num_layers is {num_layers}")
        if kd == "mse_last":
            distill = hidden_mse_last(hidden, shallow_layers, norm=norm, transform=transform)
        else:
            fn = hidden_mse if kd == "mse" else hidden_mse_dyna
            distill = fn(hidden, layer_map, norm=norm, transform=transform)
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

"""How sure is a token at an exit point? CALM's four confidence measures, its exit rule and decaying threshold.

A token exits when its confidence passes a threshold. The measures (Schuster et al., CALM 2022):

- ``softmax_diff``: top-1 minus top-2 probability of the exit's logits. This is what the CALM paper
  calls the *softmax response* ("the difference between the top two values of Softmax(W h)"), what
  the authors' t5x code calls ``softmax_diff``, and what FREE's code calls ``softmax``; FREE's default.
  A token torn between two candidates has a small margin even when both are likely.
- ``softmax_max``: the top-1 probability (t5x's ``softmax_max``, the default of that code): cheaper,
  no top-2.
- ``state``: cosine similarity between the hidden states of two consecutive exit points (or depth
  steps): when a layer barely changes the state, later layers probably will not either. Needs no LM
  head, so it is the cheapest.
- ``meta``: a small trained classifier on the hidden state, :class:`MetaClassifier`, that predicts
  "exiting here gives the same token as the full model" (the label it is trained on).

Names: mor_lab called these ``softmax`` (top-1 probability) and ``margin`` (top-1 minus top-2). Both
still work, as aliases with their old meaning (:data:`MEASURE_ALIASES`: trained exit heads saved with
``measure="margin"`` load as they were); ``softmax`` is ambiguous (the paper's softmax response is the
margin), so new code should say ``softmax_max`` or ``softmax_diff``.

Every measure takes a batch of tokens (any leading shape, e.g. ``[N]`` or ``[B, T]``) and returns one
number per token, computed in float32; larger means more confident. :func:`exits` is the exit rule and
:func:`calm_threshold` the decaying threshold, both as in the reference code (see their docstrings).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CANONICAL_MEASURES = ("softmax_max", "softmax_diff", "state", "meta")
MEASURE_ALIASES = {"softmax": "softmax_max", "margin": "softmax_diff"}  # mor_lab's earlier names


def canonical_measure(measure: str) -> str:
    """The canonical name of a measure (``margin`` -> ``softmax_diff``, ``softmax`` -> ``softmax_max``)."""
    name = MEASURE_ALIASES.get(measure, measure)
    if name not in CANONICAL_MEASURES:
        allowed = ", ".join(CANONICAL_MEASURES + tuple(MEASURE_ALIASES))
        raise ValueError(f"unknown confidence measure {measure!r}; allowed: {allowed}")
    return name


class MetaClassifier(nn.Module):
    """CALM's "meta" measure: logistic regression on the RMS-normalised hidden state.

    Normalising first makes one classifier work at any depth, where hidden-state norms differ by
    orders of magnitude. Zero-initialised, so an untrained classifier says 0.5 everywhere.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.eps = eps
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The raw score (train it with a BCE-with-logits loss): ``[..., d] -> [...]``."""
        x = hidden.to(self.linear.weight.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.linear(x).squeeze(-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probability that exiting with this hidden state gives the full model's top-1 token."""
        return torch.sigmoid(self.logit(hidden))


def confidence(measure: str, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
               prev_hidden: torch.Tensor | None = None, classifier: MetaClassifier | None = None) -> torch.Tensor:
    """Confidence of every token under ``measure`` (a canonical name or an alias): ``[..., V]`` or ``[..., d]``
    -> ``[...]``.

    ``softmax_max`` and ``softmax_diff`` read ``logits``; ``state`` compares ``hidden`` with ``prev_hidden``
    (the previous exit point's state); ``meta`` runs ``classifier`` on ``hidden``.
    """
    name = canonical_measure(measure)
    needs = {"softmax_max": {"logits": logits}, "softmax_diff": {"logits": logits},
             "state": {"hidden": hidden, "prev_hidden": prev_hidden},
             "meta": {"hidden": hidden, "classifier": classifier}}[name]
    missing = [arg for arg, value in needs.items() if value is None]
    if missing:
        raise ValueError(f"confidence measure {measure!r} needs {' and '.join(missing)}")
    if name == "softmax_max":
        return logits.float().softmax(-1).amax(-1)
    if name == "softmax_diff":
        if logits.shape[-1] < 2:
            raise ValueError(f"the {measure!r} measure needs at least 2 classes in logits")
        top2 = logits.float().softmax(-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if name == "state":
        if hidden.shape != prev_hidden.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and prev_hidden {tuple(prev_hidden.shape)} "
                             f"must have the same shape")
        return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    return classifier(hidden).float()


def exits(confidence: torch.Tensor, threshold, *, inclusive: bool = False, layer: int | None = None,
          min_layer: int | None = None) -> torch.Tensor:
    """Which tokens exit: ``confidence > threshold`` (a number or one per token), as FREE's code decides
    (``get_skip_mask``: ``conf <= threshold`` keeps going), so ``threshold = 1`` never exits, even a token
    whose margin saturates to exactly 1.

    ``inclusive=True``: ``confidence >= threshold``, what CALM's own t5x code does (it loops while
    ``conf < threshold``). ``layer`` / ``min_layer``: no exit after fewer than ``min_layer`` layers (FREE's
    ``exit_min_layer``, CALM's ``min_exit``): with ``layer < min_layer`` nobody exits.
    """
    confidence = torch.as_tensor(confidence)
    threshold = torch.as_tensor(threshold, dtype=confidence.dtype, device=confidence.device)
    out = confidence >= threshold if inclusive else confidence > threshold
    if min_layer is not None:
        if layer is None:
            raise ValueError("exits(min_layer=...) needs layer: the number of layers the tokens have run")
        if layer < min_layer:
            out = torch.zeros_like(out)
    return out


def calm_threshold(tau: float, position: int, max_len: int, temperature: float = 4.0, form: str = "free") -> float:
    """CALM's decaying threshold at ``position``, clipped to [0, 1].

    ``form="free"`` (the default, what FREE's code computes): ``0.9*tau + 0.1*tau*exp(-temperature * position /
    max_len)``: it starts at ``tau`` and decays towards ``0.9 * tau``. ``form="calm"``: the CALM paper's
    equation, ``0.9*tau + 0.1*exp(-temperature * position / max_len)``: the added term does not scale with
    ``tau``, so the first tokens face a threshold above ``tau`` (``0.9 tau + 0.1``) and the last ones about
    ``0.9 tau``. For ``tau`` near 1 the two agree; for a low ``tau`` the paper's is much stricter early on.

    ``position`` is what FREE's code passes (``pos_time = past decoder length + 1``): the 1-based index of the
    token being generated among the generated tokens, so the first generated token has position 1.
    (T5's decoder holds only generated tokens; for a decoder-only model it is the count of tokens generated
    before this one, plus 1 — not the prompt position, not a 0-based engine step.) ``max_len`` is the
    maximum output length (the reference's ``max_answer_length``); ``temperature`` the reference's
    ``exit_position_temp`` (it has no default there; CALM's t5x code defaults to 4, though it never
    passes a position, so its decay stays at ``tau``). Early tokens steer the rest of the output, so they
    get a slightly stricter threshold.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be a positive number of tokens, got {max_len!r}")
    if position < 0:
        raise ValueError(f"position must be >= 0 (1 for the first generated token), got {position!r}")
    if form not in ("free", "calm"):
        raise ValueError(f"form must be 'free' (FREE's code) or 'calm' (the CALM paper's equation), got {form!r}")
    decay = math.exp(-temperature * position / max_len)
    value = 0.9 * tau + 0.1 * (tau if form == "free" else 1.0) * decay
    return min(1.0, max(0.0, value))

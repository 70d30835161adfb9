"""How sure is a token at an exit point? CALM's four confidence measures and its decaying threshold.

A token exits when its confidence reaches a threshold. The measures (Schuster et al., CALM 2022):

- ``softmax``: the top-1 probability of the exit's logits.
- ``margin``: top-1 minus top-2 probability; FREE's default. A token torn between two candidates
  has a small margin even when both are likely.
- ``state``: cosine similarity between the hidden states of two consecutive exit points (or depth
  steps): when a layer barely changes the state, later layers probably will not either. Needs no LM
  head, so it is the cheapest.
- ``meta``: a small trained classifier on the hidden state, :class:`MetaClassifier`, that predicts
  "exiting here gives the same token as the full model" (the label it is trained on).

Every measure takes a batch of tokens (any leading shape, e.g. ``[N]`` or ``[B, T]``) and returns one
number per token, computed in float32; larger means more confident.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MEASURES = ("softmax", "margin", "state", "meta")


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
    """Confidence of every token under ``measure`` (one of :data:`MEASURES`): ``[..., V]`` or ``[..., d]`` -> ``[...]``.

    ``softmax`` and ``margin`` read ``logits``; ``state`` compares ``hidden`` with ``prev_hidden`` (the
    previous exit point's state); ``meta`` runs ``classifier`` on ``hidden``.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; allowed: {', '.join(MEASURES)}")
    needs = {"softmax": {"logits": logits}, "margin": {"logits": logits},
             "state": {"hidden": hidden, "prev_hidden": prev_hidden},
             "meta": {"hidden": hidden, "classifier": classifier}}[measure]
    missing = [name for name, value in needs.items() if value is None]
    if missing:
        raise ValueError(f"confidence measure {measure!r} needs {' and '.join(missing)}")
    if measure == "softmax":
        return logits.float().softmax(-1).amax(-1)
    if measure == "margin":
        if logits.shape[-1] < 2:
            raise ValueError("the 'margin' measure needs at least 2 classes in logits")
        top2 = logits.float().softmax(-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if measure == "state":
        if hidden.shape != prev_hidden.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and prev_hidden {tuple(prev_hidden.shape)} "
                             f"must have the same shape")
        return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)
    return classifier(hidden).float()


def calm_threshold(tau: float, t: int, max_len: int, temperature: float = 4.0) -> float:
    """CALM's decaying threshold at decode step ``t``: ``0.9*tau + 0.1*tau*exp(-temperature*t/max_len)``.

    Early tokens steer the rest of the output, so they get a slightly stricter threshold; clipped to [0, 1].
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be a positive number of tokens, got {max_len!r}")
    if t < 0:
        raise ValueError(f"t must be a decode step >= 0, got {t!r}")
    value = 0.9 * tau + 0.1 * tau * math.exp(-temperature * t / max_len)
    return min(1.0, max(0.0, value))

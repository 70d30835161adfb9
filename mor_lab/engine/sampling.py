"""Next-token selection: greedy, or seeded sampling with temperature, top-k and top-p (HF semantics)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampler:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r} "
                             "(for deterministic output use do_sample=False)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 or None disables it), got {self.top_k!r}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {self.top_p!r}")
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, vocab]`` -> token ids ``[B]``."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - self.top_p
            remove[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self._rng(logits.device)).squeeze(-1)

    def _rng(self, device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

"""Rotary position embeddings for every rope type HF Llama configs use (default, linear, dynamic NTK,
llama3, YaRN): the inverse frequencies, the cos/sin module, and the rotation (a fused kernel on CUDA)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from .config import ModelConfig
from .fast_paths import FAST

def rope_inverse_frequencies(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale for every rope type HF Llama configs use."""
    rope, dim = config.rope, config.head_dim
    base = rope["rope_theta"]
    rope_type = rope.get("rope_type", "default")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope_type == "dynamic":  # NTK-aware: grow the base once the context exceeds the trained length
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = rope["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        return inv_freq / rope["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn(config, base, dim)
    return inv_freq, 1.0


def _yarn(config: ModelConfig, base: float, dim: int) -> tuple[torch.Tensor, float]:
    rope = config.rope
    old_len = rope.get("original_max_position_embeddings", config.max_position_embeddings)
    factor = rope.get("factor") or config.max_position_embeddings / old_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin for arbitrary positions: ``[B, T]`` for a plain forward, packed ``[N]`` for a ragged chunk."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.scale = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape ``positions.shape + (1, head_dim)``: they broadcast over heads.

        The engine's packed passes read them from a table of every position computed once (the same
        element-wise values: a lookup instead of ten small ops per pass)."""
        if FAST.enabled and positions.dim() == 1 and self.config.rope.get("rope_type") != "dynamic" and \
                self.config.max_position_embeddings <= 16384:  # a table of at most 16k positions
            table = getattr(self, "_table", None)
            if table is None or table[0].dtype != dtype or table[0].device != positions.device:
                every = torch.arange(self.config.max_position_embeddings, device=positions.device)
                self._table = table = self._compute(every, dtype, self.inv_freq)
            return table[0][positions], table[1][positions]
        inv_freq = self.inv_freq
        if self.config.rope.get("rope_type") == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inverse_frequencies(self.config, seq_len)[0].to(positions.device)
        return self._compute(positions, dtype, inv_freq)

    def _compute(self, positions, dtype, inv_freq):
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype).unsqueeze(-2), (emb.sin() * self.scale).to(dtype).unsqueeze(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (dispatched: a fused kernel on CUDA)."""
    return kernels.apply_rotary(x, cos, sin)

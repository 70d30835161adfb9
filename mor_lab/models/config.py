"""Model dimensions of a Llama-family decoder, validated, serialisable to JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class DictConfig:
    """``to_dict`` / ``from_dict`` for the config dataclasses (model, exits, recursion, training), so a
    checkpoint's JSON round-trips, and an unknown field is an error that names it and the allowed ones."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass
class ModelConfig(DictConfig):
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        rope_type = self.rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope['rope_type'] = {rope_type!r} is not supported; "
                             f"allowed: {', '.join(ROPE_TYPES)}")
        if "rope_theta" not in self.rope:
            raise ValueError("ModelConfig.rope needs 'rope_theta' (e.g. 10000.0)")
        if rope_type != "default" and "factor" not in self.rope and rope_type != "yarn":
            raise ValueError(f"ModelConfig.rope of type {rope_type!r} needs a 'factor'")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self, include_embeddings: bool = True) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        n = self.num_layers * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

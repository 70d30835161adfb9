"""A Llama-family decoder in plain PyTorch, readable top to bottom.

embed -> depth steps -> final norm -> LM head. ``Decoder.run_step(step, ...)`` runs one depth step on
any tokens, with or without a KV cache: every technique in mor_lab (early exit, recursion, routers)
is a different plan over these steps. ``Decoder.plan[s]`` names the physical layer step ``s`` uses;
the vanilla plan is ``[0, 1, ..., L-1]``.

The hot element-wise ops (RMSNorm and the residual add before it, SwiGLU, rotary), attention over the KV
cache and the per-row multi-LoRA projections of ``run_shared_layer`` go through ``mor_lab.kernels``:
Triton kernels on CUDA, the PyTorch references (the same math, written out) elsewhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .cache import Chunk, KVCache
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` overrides the layer's own (a depth step with per-position norms; ``[N, d]``: per token)."""
        return kernels.rms_norm(x, self.weight if weight is None else weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None):
        """``h = residual + x`` and its norm, fused: returns ``(norm(h), h)``."""
        return kernels.add_rms_norm(x, residual, self.weight if weight is None else weight, self.eps)


class LoRA(nn.Module):
    """A low-rank update of one projection: ``x -> scale * (x A^T) B^T`` (zero until trained or initialised)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` update this LoRA adds (for merging)."""
        return self.B @ self.A * self.scale


class StepDelta(nn.Module):
    """What one depth step adds to the shared layer it runs (recursive plans).

    ``lora``: low-rank updates of projections by name (``q_proj`` ... ``down_proj``), the relaxation
    of relaxed recursive transformers. ``norms``: the step's own norm weights (``input_layernorm``,
    ``post_attention_layernorm``) when norms are kept per position instead of tied.
    """

    def __init__(self, lora: dict[str, LoRA] | None = None, norms: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.lora = nn.ModuleDict(lora or {})
        self.norms = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in (norms or {}).items()})

    def project(self, name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        y = linear(x)
        return y + self.lora[name](x) if name in self.lora else y

    def norm_weight(self, name: str) -> torch.Tensor | None:
        return self.norms[name] if name in self.norms else None

    def spec(self) -> dict:
        """The structure (not the values), enough to rebuild an empty StepDelta before loading weights."""
        return {"lora": {k: [m.A.shape[0], m.A.shape[1], m.B.shape[0], m.scale] for k, m in self.lora.items()},
                "norms": {k: v.shape[0] for k, v in self.norms.items()}}

    @classmethod
    def from_spec(cls, spec: dict) -> "StepDelta":
        lora = {k: LoRA(i, o, r, scale) for k, (r, i, o, scale) in spec["lora"].items()}
        return cls(lora, {k: torch.ones(n) for k, n in spec["norms"].items()})


def project(linear: nn.Linear, name: str, x: torch.Tensor, delta: StepDelta | None) -> torch.Tensor:
    return linear(x) if delta is None else delta.project(name, linear, x)


def norm(layer_norm: RMSNorm, name: str, x: torch.Tensor, delta: StepDelta | None) -> torch.Tensor:
    return layer_norm(x) if delta is None else layer_norm(x, delta.norm_weight(name))


def add_norm(layer_norm: RMSNorm, name: str, x: torch.Tensor, residual: torch.Tensor, delta: StepDelta | None):
    return layer_norm.add_forward(x, residual, None if delta is None else delta.norm_weight(name))


class RowDeltas:
    """The step deltas of packed tokens at *different* depth steps, applied in one batch.

    Continuous depth-wise batching runs one shared layer over tokens of different loops; in a relaxed
    recursive model each loop has its own LoRA and maybe its own norm weights. Each projection becomes
    one multi-LoRA linear (``kernels.multi_lora_linear``: the shared weight read once, every token its
    own step's adapter; ranks zero-padded to the largest), each norm a per-token weight. Same interface as
    ``StepDelta`` (``project``, ``norm_weight``), so the layer code does not change.
    """

    def __init__(self, layer: nn.Module, deltas: list[StepDelta | None], token_delta: torch.Tensor):
        self.layer, self.deltas, self.token_delta = layer, deltas, token_delta  # token_delta: [N] index into deltas

    def project(self, name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        loras = [d.lora[name] if d is not None and name in d.lora else None for d in self.deltas]
        if all(lora is None for lora in loras):
            return linear(x)
        rank = max(lora.A.shape[0] for lora in loras if lora is not None)
        a = x.new_zeros(len(loras), rank, linear.in_features)
        b = x.new_zeros(len(loras), rank, linear.out_features)  # stored [n, r, out]: coalesced kernel loads
        scales = torch.zeros(len(loras), device=x.device)
        for i, lora in enumerate(loras):
            if lora is not None:
                a[i, :lora.A.shape[0]], b[i, :lora.B.shape[1]], scales[i] = lora.A, lora.B.T, lora.scale
        has = torch.tensor([lora is not None for lora in loras], device=x.device)
        ids = torch.where(has[self.token_delta], self.token_delta, -1)
        return kernels.multi_lora_linear(x, linear.weight, linear.bias, a, b.transpose(1, 2), ids, scales)

    def norm_weight(self, name: str) -> torch.Tensor | None:
        if not any(d is not None and name in d.norms for d in self.deltas):
            return None
        own = getattr(self.layer, name).weight
        table = torch.stack([d.norms[name] if d is not None and name in d.norms else own for d in self.deltas])
        return table[self.token_delta]


def _paged_attention(q: torch.Tensor, cache: KVCache, step: int | torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Ragged attention straight over the KV cache (the Triton path), packed ``[N, heads, head_dim]`` in and out.

    The cache ``[steps, batch, kv_heads, capacity, head_dim]`` is a paged pool of one page of ``capacity``
    positions per (step, row); token ``i`` reads page ``step * batch + rows[i]`` up to its own slot.
    """
    steps, batch = cache.k.shape[:2]
    pool_k, pool_v = (c.view(steps * batch, *c.shape[2:]) for c in (cache.k, cache.v))
    arange = torch.arange(batch, device=q.device)
    row_page = step * batch + arange  # works for an int step and for a per-row [B] step tensor
    if chunk.width == 1:  # decode: one query per row
        return kernels.paged_decode_attention(q, pool_k, pool_v, row_page[chunk.rows, None], chunk.slots + 1)
    counts = torch.bincount(chunk.rows, minlength=batch)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # packed tokens are row-major
    lengths = torch.where(counts > 0, chunk.slots[(starts[1:] - 1).clamp(min=0)] + 1, 0)
    return kernels.paged_chunk_attention(q, pool_k, pool_v, row_page[:, None], lengths, starts)


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
        """cos, sin of shape ``positions.shape + (1, head_dim)``: they broadcast over heads."""
        inv_freq = self.inv_freq
        if self.config.rope.get("rope_type") == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inverse_frequencies(self.config, seq_len)[0].to(positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype).unsqueeze(-2), (emb.sin() * self.scale).to(dtype).unsqueeze(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (dispatched: a fused kernel on CUDA)."""
    return kernels.apply_rotary(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def project(self, x, rope, delta: StepDelta | None = None):
        q = project(self.q_proj, "q_proj", x, delta).view(*x.shape[:-1], self.num_heads, self.head_dim)
        return (apply_rotary(q, *rope), *self.project_kv(x, rope, delta))

    def project_kv(self, x, rope, delta: StepDelta | None = None):
        """Keys (rotated) and values only: what a token leaves in the cache."""
        shape = x.shape[:-1]
        k = project(self.k_proj, "k_proj", x, delta).view(*shape, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, "v_proj", x, delta).view(*shape, self.num_kv_heads, self.head_dim)
        return apply_rotary(k, *rope), v

    def forward(self, x, rope, cache: KVCache | None = None, step: int = 0, chunk: Chunk | None = None,
                delta: StepDelta | None = None):
        """``x``: ``[B, T, d]`` (no cache, causal) or packed ``[N, d]`` tokens of ``chunk`` (with a cache)."""
        q, k, v = self.project(x, rope, delta)
        gqa = self.num_heads != self.num_kv_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=gqa).transpose(1, 2)
        else:
            cache.write(step, k, v, chunk)
            if kernels.use_triton(q):  # ragged: each row reads only its own keys, no mask, no padding
                return project(self.o_proj, "o_proj", _paged_attention(q, cache, step, chunk).reshape(
                    *x.shape[:-1], -1), delta)
            keys, values = cache.read(step, chunk)
            q = chunk.unpack(q).transpose(1, 2)  # [B, heads, width, head_dim]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=chunk.attn_mask, enable_gqa=gqa)
            out = chunk.pack(out.transpose(1, 2))
        return project(self.o_proj, "o_proj", out.reshape(*x.shape[:-1], -1), delta)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x, delta: StepDelta | None = None):
        gate, up = project(self.gate_proj, "gate_proj", x, delta), project(self.up_proj, "up_proj", x, delta)
        return project(self.down_proj, "down_proj", kernels.silu_mul(gate, up), delta)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, rope, cache=None, step=0, chunk=None, delta: StepDelta | None = None):
        a = self.self_attn(norm(self.input_layernorm, "input_layernorm", h, delta), rope, cache, step, chunk, delta)
        x, h = add_norm(self.post_attention_layernorm, "post_attention_layernorm", a, h, delta)  # h = h + a
        return h + self.mlp(x, delta)


class Decoder(nn.Module):
    """Physical layers plus a plan: ``plan[s]`` is the layer that depth step ``s`` runs."""

    def __init__(self, config: ModelConfig, plan: list[int] | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)
        self.plan = list(range(config.num_layers)) if plan is None else list(plan)
        self.step_deltas = nn.ModuleDict()  # str(step) -> StepDelta (recursive plans: LoRA, own norms)

    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # The four pieces every plan is made of.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, positions: torch.Tensor):
        return self.rotary(positions, self.dtype)

    def run_step(self, step: int, h: torch.Tensor, rope, cache: KVCache | None = None,
                 chunk: Chunk | None = None) -> torch.Tensor:
        """Depth step ``step`` on ``h``: ``[B, T, d]`` without a cache, or packed ``[N, d]`` addressed by ``chunk``."""
        return self.layers[self.plan[step]](h, rope, cache, step, chunk, self.delta(step))

    def run_shared_layer(self, layer: int, h: torch.Tensor, rope, cache: KVCache, chunk: Chunk,
                         steps: torch.Tensor) -> torch.Tensor:
        """Physical ``layer`` on rows that are at different depth steps (``steps``: ``[B]``, per cache row).

        Each row reads and writes the KV cache of its own step: tokens at different recursion loops
        share one batch through the shared weights (continuous depth-wise batching). Per-step deltas
        (LoRA relaxation, own norms) are applied per token: one multi-LoRA projection (``RowDeltas``).
        """
        delta = None
        if len(self.step_deltas):
            token_steps = steps[chunk.rows].tolist()
            present = sorted(set(token_steps))
            if any(str(s) in self.step_deltas for s in present):
                index = {s: i for i, s in enumerate(present)}
                delta = RowDeltas(self.layers[layer], [self.delta(s) for s in present],
                                  torch.tensor([index[s] for s in token_steps], device=h.device))
        return self.layers[layer](h, rope, cache, steps, chunk, delta)

    def delta(self, step: int) -> StepDelta | None:
        return self.step_deltas[str(step)] if str(step) in self.step_deltas else None

    def propagate_state(self, step: int | list[int], h: torch.Tensor, rope, cache: KVCache, chunk: Chunk) -> None:
        """CALM's state propagation: a token that exited before ``step`` still gets this step's KV,
        computed from its exited hidden state ``h``, so later tokens find a complete cache.

        A list of steps must run one physical layer with no per-step delta (the loops of a tied
        recursive block): their K/V are identical, so they are computed once and written to each."""
        steps = [step] if isinstance(step, int) else list(step)
        layer, delta = self.layers[self.plan[steps[0]]], self.delta(steps[0])
        if len(steps) > 1 and any(self.plan[s] != self.plan[steps[0]] or self.delta(s) is not None for s in steps):
            raise ValueError(f"steps {steps} do not share one layer without deltas; propagate them one by one")
        k, v = layer.self_attn.project_kv(norm(layer.input_layernorm, "input_layernorm", h, delta), rope, delta)
        for s in steps:
            cache.write(s, k, v, chunk)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head; also the 'logit lens' for any intermediate hidden state."""
        return self.lm_head(self.norm(h))

    def forward(self, input_ids: torch.Tensor, return_hidden: bool = False):
        """Full-depth causal forward pass without a cache: logits ``[B, T, vocab]``.

        With ``return_hidden`` also returns the hidden state after every depth step (``[steps+1, B, T, d]``,
        index 0 is the embedding) for logit-lens analyses.
        """
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = self.rope(positions)
        h = self.embed(input_ids)
        hidden = [h]
        for step in range(self.num_steps):
            h = self.run_step(step, h, rope)
            hidden.append(h)
        logits = self.head(h)
        return (logits, torch.stack(hidden)) if return_hidden else logits

    # Checkpoints: safetensors + JSON config; a reload is bit-identical.
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        deltas = {k: d.spec() for k, d in self.step_deltas.items()}
        self.save_weights(directory, {"plan": ",".join(map(str, self.plan)), "step_deltas": json.dumps(deltas)})
        self.config.save(directory / "mor_lab_config.json")

    def save_weights(self, directory: Path, metadata: dict | None = None) -> None:
        """``model.safetensors`` in ``directory`` (created); a tied LM head is stored once, as the embedding."""
        from safetensors.torch import save_file
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(directory / "model.safetensors"), metadata=metadata)

    @classmethod
    def load(cls, directory: str | Path, device=None) -> "Decoder":
        from safetensors import safe_open
        from safetensors.torch import load_file
        directory = Path(directory)
        config = ModelConfig.load(directory / "mor_lab_config.json")
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            metadata = f.metadata()
        model = cls(config, [int(s) for s in metadata["plan"].split(",")])
        for step, spec in json.loads(metadata.get("step_deltas", "{}")).items():
            model.step_deltas[step] = StepDelta.from_spec(spec)
        state = load_file(str(directory / "model.safetensors"), device=str(device or "cpu"))
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state)
        return model.to(device) if device else model


def random_decoder(config: ModelConfig | None = None, seed: int = 0, std: float = 0.02, **overrides) -> Decoder:
    """A randomly initialised decoder (tests, speed benchmarks); weights ~ N(0, std), 0.02 like Llama.

    A larger ``std`` gives peaked, varied next-token distributions: early-exit tests need both
    confident and unsure tokens."""
    config = config or ModelConfig(**overrides)
    generator = torch.Generator().manual_seed(seed)
    model = Decoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()

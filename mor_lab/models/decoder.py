"""A Llama-family decoder in plain PyTorch, readable top to bottom.

embed -> depth steps -> final norm -> LM head. ``Decoder.run_step(step, ...)`` runs one depth step on
any tokens, with or without a KV cache: every technique in mor_lab (early exit, recursion, routers)
is a different plan over these steps. ``Decoder.plan[s]`` names the physical layer step ``s`` uses;
the vanilla plan is ``[0, 1, ..., L-1]``.

``Decoder.run_layer(layer, ..., steps)`` runs one physical layer on packed tokens that may each be at a
different depth step (continuous depth-wise batching), each reading and writing its own step's cache.

The hot element-wise ops (RMSNorm and the residual add before it, SwiGLU, rotary), attention over the KV
cache and the per-token multi-LoRA projections of ``run_layer`` go through ``mor_lab.kernels``: Triton
kernels on CUDA, the PyTorch references (the same math, written out) elsewhere. Inside the engine,
``models.fast_paths`` picks the matmul layout measured fastest and fuses q/k/v and gate/up; rotary
position embeddings live in ``models.rotary``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .cache import Chunk, KVCache
from .config import ModelConfig
from .fast_paths import FAST, fused_weight, linear, tensor_version
from .rotary import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` overrides the layer's own (a depth step with per-position norms; ``[N, d]``: per token)."""
        w = self.weight if weight is None else weight
        if _fast_elementwise(x, w):  # one fused op instead of six (PyTorch's own RMSNorm, same math)
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return kernels.rms_norm(x, w, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None):
        """``h = residual + x`` and its norm, fused: returns ``(norm(h), h)``."""
        w = self.weight if weight is None else weight
        if _fast_elementwise(x, w):
            h = residual + x
            return F.rms_norm(h, (h.shape[-1],), w, self.eps), h
        return kernels.add_rms_norm(x, residual, w, self.eps)


def _joint_rotary(q: torch.Tensor, k: torch.Tensor) -> bool:
    """q and k are adjacent column blocks of one fused q/k/v output (packed ``[N, ...]``)."""
    return FAST.enabled and q.dim() == 2 and q.stride() == k.stride() and \
        k.data_ptr() == q.data_ptr() + q.shape[1] * q.element_size()


def _fast_elementwise(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The engine's fast path for element-wise ops: inference, fp32, one weight for all tokens, no kernel."""
    return FAST.enabled and x.dtype == torch.float32 and weight.dim() == 1 and not torch.is_grad_enabled() and \
        not kernels.use_triton(x)


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

    def project(self, name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, module.weight, module.bias)
        return y + self.lora[name](x) if name in self.lora else y

    def touches(self, names) -> bool:
        """Does this delta change any of these projections (then they cannot run fused)?"""
        return any(n in self.lora for n in names)

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


def project(module: nn.Linear, name: str, x: torch.Tensor, delta: StepDelta | None) -> torch.Tensor:
    return linear(x, module.weight, module.bias) if delta is None else delta.project(name, module, x)


def project_many(modules: list[nn.Linear], names: list[str], x: torch.Tensor, delta, fused=None) -> list[torch.Tensor]:
    """Several projections of the same input: one matmul over ``fused`` (their weights stacked, see
    :func:`fused_weight`) on the engine's fast path (inference, no LoRA on them), else one each."""
    if fused is not None and FAST.enabled and FAST.fused and x.dim() == 2 and not torch.is_grad_enabled() and (
            delta is None or not delta.touches(names)):
        weight = fused()
        if weight is not None:
            return list(linear(x, weight).split([m.weight.shape[0] for m in modules], dim=-1))
    return [project(m, n, x, delta) for m, n in zip(modules, names)]


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

    @classmethod
    def for_steps(cls, model: "Decoder", layer: int, steps: torch.Tensor) -> "RowDeltas | StepDelta | None":
        """The deltas of tokens at ``steps`` (``[N]``) of ``layer``: None when no step has one."""
        present = torch.unique(steps).tolist()
        deltas = [model.delta(s) for s in present]
        if all(d is None for d in deltas):
            return None
        if len(present) == 1:
            return deltas[0]
        index = torch.searchsorted(torch.tensor(present, device=steps.device), steps)
        return cls(model.layers[layer], deltas, index)

    def touches(self, names) -> bool:
        return any(d is not None and d.touches(names) for d in self.deltas)

    def project(self, name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        loras = [d.lora[name] if d is not None and name in d.lora else None for d in self.deltas]
        if all(lora is None for lora in loras):
            return linear(x, module.weight, module.bias)
        rank = max(lora.A.shape[0] for lora in loras if lora is not None)
        a = x.new_zeros(len(loras), rank, module.in_features)
        b = x.new_zeros(len(loras), rank, module.out_features)  # stored [n, r, out]: coalesced kernel loads
        scales = torch.zeros(len(loras), device=x.device)
        for i, lora in enumerate(loras):
            if lora is not None:
                a[i, :lora.A.shape[0]], b[i, :lora.B.shape[1]], scales[i] = lora.A, lora.B.T, lora.scale
        has = torch.tensor([lora is not None for lora in loras], device=x.device)
        ids = torch.where(has[self.token_delta], self.token_delta, -1)
        return kernels.multi_lora_linear(x, module.weight, module.bias, a, b.transpose(1, 2), ids, scales)

    def norm_weight(self, name: str) -> torch.Tensor | None:
        if not any(d is not None and name in d.norms for d in self.deltas):
            return None
        own = getattr(self.layer, name).weight
        table = torch.stack([d.norms[name] if d is not None and name in d.norms else own for d in self.deltas])
        return table[self.token_delta]


def _paged_attention(q: torch.Tensor, cache: KVCache, step: int | torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Ragged attention straight over the KV cache (the Triton path), packed ``[N, heads, head_dim]`` in and out.

    The cache ``[pages, rows, kv_heads, capacity, head_dim]`` is a paged pool of one page of ``capacity``
    positions per (page, row). A chunk whose rows hold contiguous slots goes to the chunk kernel; one
    token per row, or slots that are not contiguous (a shared step reads loop 0's page at the positions
    of the routed tokens), to the decode kernel, one query per token with its own page and length.
    """
    pages, rows = cache.k.shape[:2]
    pool_k, pool_v = (c.view(pages * rows, *c.shape[2:]) for c in (cache.k, cache.v))
    page = cache.pages(step)
    token_page = page * rows + chunk.rows  # an int page or one per token
    if isinstance(token_page, int):
        token_page = torch.full_like(chunk.rows, token_page)
    contiguous = isinstance(step, int) and cache._owns[step]
    if chunk.width == 1 or not contiguous:
        return kernels.paged_decode_attention(q, pool_k, pool_v, token_page[:, None], chunk.slots + 1)
    starts = torch.cat([chunk.first, chunk.first.new_tensor([chunk.num_tokens])])
    last = starts[1:] - 1
    return kernels.paged_chunk_attention(q, pool_k, pool_v, token_page[chunk.first][:, None], chunk.slots[last] + 1,
                                         starts, max_query_len=chunk.width)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row: ``q`` ``[n, heads, D]``, keys/values ``[n, kv_heads, kv_len, D]``, ``mask``
    ``[n, 1, 1, kv_len]`` -> ``[n, heads, D]``. Grouped-query heads share their KV head's keys."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[1]
    qg = q.view(n, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (dim ** -0.5)  # [n, kv_heads, group, kv_len]
    scores = scores.masked_fill(~mask.view(n, 1, 1, -1), float("-inf"))
    return torch.matmul(scores.softmax(-1), values).view(n, heads, dim)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def fused_qkv(self) -> torch.Tensor | None:
        return fused_weight([self.q_proj, self.k_proj, self.v_proj])

    def fused_kv(self) -> torch.Tensor | None:
        """The k/v rows of the fused q/k/v buffer: one view per buffer, kept (a prepacked copy is cached per
        tensor, so a fresh view every call would be repacked every call)."""
        qkv = self.fused_qkv()
        if qkv is None:
            return None
        cached = getattr(self, "_kv_view", None)
        if cached is None or cached[0] is not qkv:
            self._kv_view = cached = (qkv, qkv[self.q_proj.out_features:])
        return cached[1]

    def project(self, x, rope, delta: StepDelta | None = None):
        q, k, v = project_many([self.q_proj, self.k_proj, self.v_proj], ["q_proj", "k_proj", "v_proj"], x, delta,
                               self.fused_qkv)
        lead, heads = x.shape[:-1], self.num_heads
        if _joint_rotary(q, k) and not kernels.use_triton(x):  # q and k side by side: rotate both in one go
            qk = apply_rotary(q.as_strided((*lead, heads + self.num_kv_heads, self.head_dim),
                                           (q.stride(0), self.head_dim, 1)), *rope)
            return qk[:, :heads], qk[:, heads:], v.view(*lead, self.num_kv_heads, self.head_dim)
        q = q.view(*lead, heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v.view(*lead, self.num_kv_heads, self.head_dim)

    def project_kv(self, x, rope, delta: StepDelta | None = None):
        """Keys (rotated) and values only: what a token leaves in the cache."""
        k, v = project_many([self.k_proj, self.v_proj], ["k_proj", "v_proj"], x, delta, self.fused_kv)
        shape = x.shape[:-1]
        k = k.view(*shape, self.num_kv_heads, self.head_dim)
        return apply_rotary(k, *rope), v.view(*shape, self.num_kv_heads, self.head_dim)

    def forward(self, x, rope, cache: KVCache | None = None, step: int | torch.Tensor = 0,
                chunk: Chunk | None = None, delta: StepDelta | None = None):
        """``x``: ``[B, T, d]`` (no cache, causal) or packed ``[N, d]`` tokens of ``chunk`` (with a cache);
        ``step``: the depth step whose cache the tokens use (an int, or one per token)."""
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
            if chunk.width == 1 and FAST.enabled and FAST.decode_attention:
                out = decode_attention(q, keys, values, chunk.attn_mask)
            else:
                q = chunk.unpack(q).transpose(1, 2)  # [n, heads, width, head_dim]
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
        gate, up = project_many([self.gate_proj, self.up_proj], ["gate_proj", "up_proj"], x, delta,
                                lambda: fused_weight([self.gate_proj, self.up_proj]))
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

    def run_layer(self, layer: int, h: torch.Tensor, rope, cache: KVCache, chunk: Chunk,
                  steps: int | torch.Tensor) -> torch.Tensor:
        """Physical ``layer`` on packed tokens that may be at different depth steps (``steps``: an int, or
        one per token).

        Each token reads and writes the KV cache of its own step: tokens at different recursion loops
        share one batch through the shared weights (continuous depth-wise batching). Per-step deltas
        (LoRA relaxation, own norms) are applied per token: one multi-LoRA projection (``RowDeltas``).
        """
        if isinstance(steps, int):
            delta = self.delta(steps)
        else:
            delta = RowDeltas.for_steps(self, layer, steps) if len(self.step_deltas) else None
        return self.layers[layer](h, rope, cache, steps, chunk, delta)

    def delta(self, step: int) -> StepDelta | None:
        return self.step_deltas[str(step)] if str(step) in self.step_deltas else None

    def propagate(self, h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, skipped: torch.Tensor,
                  cache: KVCache) -> int:
        """CALM's state propagation: tokens that left early still get the KV of the steps they skipped,
        computed from their exited hidden state ``h`` (``[N, d]``, one token per cache row ``rows``), so
        later tokens find a complete cache. ``skipped``: ``[N, steps]`` bool.

        Batched per physical layer: the steps of one layer without per-step deltas (the loops of a tied
        recursive block) have identical K/V, so they are computed once, for every token that skipped any
        of them, and written to each. Returns the number of layers projected (for the cost model)."""
        if len(torch.unique(rows)) != len(rows):
            raise ValueError("propagate takes one token per cache row")
        rope = self.rope(positions)
        if FAST.enabled and not torch.is_grad_enabled() and not len(self.step_deltas) and \
                not kernels.use_triton(h):
            return self._propagate_stacked(h, rows, rope, skipped, cache)
        passes = 0
        for layer_index, group, delta in self._propagation_groups():
            need = skipped[:, group]  # [N, steps of this group]
            tokens = need.any(1).nonzero().squeeze(1)
            if len(tokens) == 0:
                continue
            layer = self.layers[layer_index]
            x = norm(layer.input_layernorm, "input_layernorm", h[tokens], delta)
            k, v = layer.self_attn.project_kv(x, (rope[0][tokens], rope[1][tokens]), delta)
            passes += 1
            if len(group) == 1:
                r = rows[tokens]
                cache.put(group[0], r, cache.length(group[0], r), k, v)
                continue
            which, j = need[tokens].nonzero(as_tuple=True)  # one (token, step) pair per K/V to write
            step = torch.tensor(group, device=rows.device)[j]
            r = rows[tokens][which]
            cache.put(step, r, cache.lengths[cache.page_of[step], r], k[which], v[which])  # one write for all
        return passes

    def _propagate_stacked(self, h, rows, rope, skipped, cache) -> int:
        """The engine's fast path of ``propagate`` (no step deltas): every layer's K/V of the exited states in
        one batched matmul over the layers' stacked K/V weights, one rotary call, one cache write. The
        same products as one projection per layer, in a handful of ops instead of a dozen per layer."""
        layers = sorted({self.plan[s] for s in skipped.any(0).nonzero().flatten().tolist()})
        if not layers:
            return 0
        norms, weights = self._stacked_kv(layers)  # [G, d], [G, d, 2 * kv_heads * head_dim]
        attn = self.layers[layers[0]].self_attn
        kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
        first = self.layers[layers[0]].input_layernorm
        x = F.rms_norm(h.float(), (h.shape[-1],), None, first.eps).to(h.dtype)  # the norm before its weight
        kv = torch.bmm(x[None] * norms[:, None, :], weights)  # [G, N, 2 * kv_heads * head_dim]
        k, v = kv.view(len(layers), len(h), 2, kv_heads, head_dim).unbind(2)
        k = apply_rotary(k, rope[0][None], rope[1][None])
        token, step = skipped.nonzero(as_tuple=True)  # one (token, step) pair per K/V to write
        index = torch.full((len(self.layers),), -1, dtype=torch.long, device=h.device)
        index[torch.tensor(layers, device=h.device)] = torch.arange(len(layers), device=h.device)
        g = index[torch.tensor(self.plan, device=h.device)[step]]
        r = rows[token]
        cache.put(step, r, cache.lengths[cache.page_of[step], r], k[g, token], v[g, token])
        return len(layers)

    def _stacked_kv(self, layers: list[int]):
        """The norm weights and K/V weights (transposed) of ``layers`` stacked, cached until they change."""
        params = [p for i in layers for p in (self.layers[i].input_layernorm.weight,
                                               self.layers[i].self_attn.k_proj.weight,
                                               self.layers[i].self_attn.v_proj.weight)]
        key = (tuple(layers), tuple(p.data_ptr() for p in params), tuple(tensor_version(p) for p in params))
        cached = getattr(self, "_kv_stack", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            norms = torch.stack([self.layers[i].input_layernorm.weight for i in layers]).detach()
            weights = torch.stack([torch.cat([self.layers[i].self_attn.k_proj.weight,
                                              self.layers[i].self_attn.v_proj.weight]).T for i in layers]).detach()
        self._kv_stack = (key, norms, weights.contiguous())
        return norms, self._kv_stack[2]

    def _propagation_groups(self) -> list[tuple[int, list[int], "StepDelta | None"]]:
        """(physical layer, the steps on it that share K/V, their delta): steps of one layer without deltas
        form one group; a step with its own delta is a group of its own. Cached per plan and deltas."""
        key = (tuple(self.plan), tuple(self.step_deltas.keys()))
        cached = getattr(self, "_groups_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        groups = []
        for layer_index in range(len(self.layers)):
            steps = [s for s in range(self.num_steps) if self.plan[s] == layer_index]
            tied = [s for s in steps if self.delta(s) is None]
            if tied:
                groups.append((layer_index, tied, None))
            groups += [(layer_index, [s], self.delta(s)) for s in steps if self.delta(s) is not None]
        self._groups_cache = (key, groups)
        return groups

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head; also the 'logit lens' for any intermediate hidden state."""
        x = self.norm(h)
        if FAST.enabled and x.dim() == 2 and not torch.is_grad_enabled():
            return linear(x, self.lm_head.weight, head=True)
        return self.lm_head(x)

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
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}  # fused views share storage
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

"""The MoR model family: vanilla, recursive, and Mixture-of-Recursions (expert- and token-choice).

Every member is a ``Decoder``: vanilla runs its L layers once; the recursive ones use MIDDLE_CYCLE
(first and last layer unique, a shared block of ``K = (L - 2) // N_r`` layers looped ``N_r`` times)
and differ only in who takes each loop: everyone (recursive), the top ``capacity_r`` of the sequence
(expert-choice) or the depth a router picked up front (token-choice).

Two paths, one model:

- ``forward(ids)``: the training pass over whole sequences ``[B, T]``. Each loop gathers the tokens
  that take it (causal order) and attends with a mask: **recursion-wise** caching lets a token at
  loop r see only earlier tokens that also reached loop r; **recursive KV sharing** lets it see loop
  0's keys/values of every earlier token (loop 0 writes, deeper loops only read).
- decoding: the one engine with the :class:`~mor_lab.engine.policies.RoutedDepth` policy, in static or
  continuous mode (continuous depth-wise batching). Decisions are causal: expert-choice uses
  ``router logit > threshold`` (0 <=> sigmoid > 0.5, what the auxiliary BCE loss trains), token-choice
  its top-1 depth. Recursion-wise caching and recursive KV sharing are ``KVCache`` layouts.

Given the same routing decisions (``loops``: recursions per token), both paths give the same logits
(tested), so what a router learned in training is what runs at decode time, up to the top-k vs
threshold difference that :func:`topk_agreement` measures.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.plan import LoopStructure
from ..models.config import DictConfig, ModelConfig
from ..models.decoder import Decoder
from ..train.losses import cross_entropy
from .routers import ExpertChoiceRouter, RouterConfig, TokenChoiceRouter, hierarchical_topk, topk_count

KINDS = ("vanilla", "recursive", "expert", "token")
KV_SCHEMES = ("recursion", "share")


@dataclass
class MoRConfig(DictConfig):
    """A member of the family. ``model.num_layers`` is the *vanilla* depth L the plan is cut from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    kind: str = "expert"  # vanilla | recursive | expert | token
    num_recursions: int = 3  # N_r (ignored by vanilla)
    kv_scheme: str = "recursion"  # recursion (recursion-wise caching) | share (recursive KV sharing)
    router: RouterConfig = field(default_factory=RouterConfig)
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.router, dict):
            self.router = RouterConfig(**self.router)
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MoRConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kv_scheme not in KV_SCHEMES:
            raise ValueError(f"MoRConfig.kv_scheme must be one of {KV_SCHEMES}, got {self.kv_scheme!r}")
        if not isinstance(self.num_recursions, int) or self.num_recursions < 1:
            raise ValueError(f"MoRConfig.num_recursions must be a positive integer, got {self.num_recursions!r}")
        if self.kind != "vanilla" and (self.model.num_layers - 2) // self.num_recursions < 1:
            raise ValueError(f"MoRConfig.num_recursions={self.num_recursions} leaves no shared layer: MIDDLE_CYCLE "
                             f"needs model.num_layers >= 2 + num_recursions, got {self.model.num_layers}")
        if not self.init_std > 0:
            raise ValueError(f"MoRConfig.init_std must be > 0, got {self.init_std!r}")
        if self.kind in ("expert", "token"):
            self.router.validate(self.kind, self.num_recursions)
        if self.kind == "expert" and self.kv_scheme == "share" and self.router.capacity and self.router.capacity[0] < 1:
            raise ValueError(f"RouterConfig.capacity[0] = {self.router.capacity[0]} < 1 needs kv_scheme='recursion': "
                             f"recursive KV sharing reads loop 0's keys of every token, so every token must run loop 0")

    @property
    def structure(self) -> LoopStructure | None:
        return None if self.kind == "vanilla" else LoopStructure.middle_cycle(self.model.num_layers,
                                                                              self.num_recursions)


@dataclass
class Routing:
    """What the routers decided in a training pass."""
    loops: torch.Tensor  # [B, T] recursions each token ran (1..N_r; 0..N_r when expert capacity[0] < 1)
    capacities: list[float] | None = None  # expert: the capacities used (warm-up included)
    router_logits: list[torch.Tensor] = field(default_factory=list)  # expert: [B, T] per recursion
    probs: torch.Tensor | None = None  # token: [B, T, N_r]


@dataclass
class MoROutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + every auxiliary loss
    lm_loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: Routing | None = None


def masked_layer(layer, h: torch.Tensor, rope, mask: torch.Tensor, kv=None):
    """A decoder layer on ``[B, m, d]`` with an explicit attention mask ``[B, 1, m, keys]``.

    ``kv``: keys/values to attend to instead of the layer's own (recursive KV sharing reads loop 0's).
    Returns the new hidden state and the keys/values this layer computed."""
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(h), rope)
    keys, values = (k, v) if kv is None else kv
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=attn.num_heads != attn.num_kv_heads)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(*h.shape[:-1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), (k, v)


class MoRModel(Decoder):
    """A member of the family (``MoRConfig.kind``): a ``Decoder`` with routers and a routed forward pass."""

    def __init__(self, config: MoRConfig):
        structure = config.structure
        physical = config.model if structure is None else dataclasses.replace(
            config.model, num_layers=structure.prelude + structure.block + structure.coda)
        super().__init__(physical, None if structure is None else structure.plan())
        self.mor, self.structure = config, structure
        d, n = config.model.hidden_size, config.num_recursions
        self.router = (ExpertChoiceRouter(config.router, d, n) if config.kind == "expert" else
                       TokenChoiceRouter(config.router, d, n) if config.kind == "token" else None)
        self._init_weights(config.init_std)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        for name, p in self.named_parameters():
            if name.startswith("router."):
                continue
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std)

    @property
    def kind(self) -> str:
        return self.mor.kind

    @property
    def num_recursions(self) -> int:
        return 1 if self.structure is None else self.structure.loops

    # ---------------------------------------------------------------------------------------------
    # Training: whole sequences, masks.
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, step: int | None = None,
                loops: torch.Tensor | None = None) -> MoROutput:
        """Logits for ``[B, T]`` ids; with ``targets`` also the loss. ``step``: the 0-based training step (the
        expert capacity warm-up, token-choice's balancing warm-up; None outside training). ``loops`` (``[B, T]``,
        recursions per token) forces the routing decisions instead of the routers'."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = self.rope(positions)
        h = self.embed(input_ids)
        routing, aux = None, {}
        if self.structure is None:
            for s in range(self.num_steps):
                h = self.run_step(s, h, rope)
        else:
            for s in range(self.structure.prelude):
                h = self.run_step(s, h, rope)
            h, routing, aux = self._loops(h, positions, step, loops)
            for s in self.structure.coda_steps():
                h = self.run_step(s, h, rope)
        logits = self.head(h)
        out = MoROutput(logits, aux=aux, routing=routing)
        if targets is not None:
            out.lm_loss = cross_entropy(logits, targets)
            out.loss = out.lm_loss + sum(aux.values())
        return out

    def _loops(self, h, positions, step, loops):
        st, kind, n = self.structure, self.kind, self.structure.loops
        B, T, d = h.shape
        lowest = 0 if kind == "expert" and self.router.config.capacity[0] < 1 else 1  # loop 0 routed too
        if loops is not None and (int(loops.min()) < lowest or int(loops.max()) > n):
            raise ValueError(f"loops must be in {lowest}..{n} (recursions per token), "
                             f"got {int(loops.min())}..{int(loops.max())}")
        x, aux, routing = h, {}, Routing(loops=None)
        if kind == "token":
            forced = self.router.warmup_depth(step, (B, T), h.device) if loops is None else loops - 1
            logits, probs, depth, gate = self.router.route(h, forced)
            loops, routing.probs = depth + 1, probs
            aux.update(self.router.losses(logits, probs, depth))
        elif kind == "recursive" and loops is None:
            loops = torch.full((B, T), n, device=h.device)
        if kind == "expert":
            routing.capacities = self.router.capacities(step)
        candidates, record = torch.ones(B, T, dtype=torch.bool, device=h.device), ([], [], [], [])
        shared = [None] * st.block
        share = self.mor.kv_scheme == "share"
        for r in range(n):
            if kind == "expert":
                logits = self.router.logits(r, h)
                sel = loops > r if loops is not None else hierarchical_topk(
                    logits, candidates, topk_count(routing.capacities[r], T))
                for lst, value in zip(record, (h, logits, candidates, sel)):
                    lst.append(value)
            else:
                sel = loops > r
            count = sel.sum(-1)
            m = int(count.max())
            if m == 0:  # token-choice: no token of the batch goes this deep (nor deeper)
                break
            idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[:, :m]  # selected first, causal order
            valid = torch.arange(m, device=h.device) < count[:, None]
            gather = idx[..., None].expand(-1, -1, d)
            h_in, pos = h.gather(1, gather), positions.gather(1, idx)
            rope = self.rope(pos)
            if share and r > 0:  # every earlier token's loop-0 keys
                mask = positions[:, None, :] <= pos[:, :, None]
            else:  # recursion-wise: earlier tokens that reached this loop (and itself, so padding stays finite)
                mask = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]
                mask |= torch.eye(m, dtype=torch.bool, device=h.device)
            out = h_in
            for j in range(st.block):
                out, kv = masked_layer(self.layers[st.shared_layer(self, j)], out, rope, mask[:, None],
                                       shared[j] if share and r > 0 else None)
                if r == 0:
                    shared[j] = kv  # with sharing loop 0 runs every token (capacity[0] = 1): m == T, idx == arange(T)
            if kind == "expert":
                out = h_in + self.router.gate(logits.gather(1, idx))[..., None] * out
            h = h.scatter(1, gather, torch.where(valid[..., None], out, h_in))
            candidates = sel
        if kind == "expert":
            if loops is None:
                loops = torch.stack(record[3]).sum(0)
            routing.router_logits = record[1]
            aux.update(self.router.losses(*record))
        if kind == "token":
            h = x + gate[..., None] * h
        routing.loops = loops
        return h, routing, aux

    # ---------------------------------------------------------------------------------------------
    # FLOPs and memory.
    def layer_flops(self) -> int:
        """Matmul FLOPs of one layer per token (2 x parameters; the accounting of ``engine.cost``)."""
        from ..engine.cost import layer_params
        return 2 * layer_params(self.config)

    def forward_flops(self, loops: torch.Tensor | None, seq_len: int, batch_size: int = 1) -> float:
        """FLOPs of one forward pass over ``batch_size x seq_len`` tokens with these routing decisions
        (matmuls, attention scores and values, routers, LM head; embeddings are free)."""
        c = self.config
        attn_pair = 4 * c.num_heads * c.head_dim  # QK^T and AV, per (query, key) pair and layer
        full_pairs = batch_size * seq_len * (seq_len + 1) / 2
        tokens = batch_size * seq_len
        from ..engine.cost import head_flops
        flops = tokens * head_flops(c)
        st = self.structure
        if st is None:
            return flops + self.num_steps * (tokens * self.layer_flops() + full_pairs * attn_pair)
        flops += (st.prelude + st.coda) * (tokens * self.layer_flops() + full_pairs * attn_pair)
        if loops is None:
            loops = torch.full((batch_size, seq_len), st.loops)
        positions = torch.arange(seq_len, device=loops.device) + 1
        for r in range(st.loops):
            sel = loops > r
            count = sel.sum(-1).double()
            pairs = (count * (count + 1) / 2).sum() if self.mor.kv_scheme == "recursion" or r == 0 else \
                (sel * positions).sum().double()
            flops += st.block * (float(count.sum()) * self.layer_flops() + float(pairs) * attn_pair)
        if self.router is not None:
            flops += tokens * self.router.flops_per_token()
        return flops

    def expected_loops(self, seq_len: int) -> torch.Tensor:
        """A ``[1, T]`` loops pattern with the capacities' distribution (for FLOPs planning)."""
        n = self.num_recursions
        if self.kind not in ("expert", "token"):
            return torch.full((1, seq_len), n)
        caps = self.router.config.capacity if self.kind == "expert" else [(n - r) / n for r in range(n)]
        counts = [topk_count(c, seq_len) for c in caps]
        loops = torch.zeros(1, seq_len, dtype=torch.long)
        for k in counts:
            loops[0, :k] += 1  # which tokens does not matter for counting
        return loops

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at the capacities' routing."""
        return 3 * self.forward_flops(self.expected_loops(seq_len), seq_len) / seq_len

    def kv_entries_per_token(self, mean_loops: float | None = None) -> float:
        """Layer-steps of K/V a token keeps: vanilla L; recursion-wise P + K * loops + C; sharing P + K + C."""
        st = self.structure
        if st is None:
            return float(self.num_steps)
        if self.mor.kv_scheme == "share":
            return float(st.prelude + st.block + st.coda)
        loops = st.loops if mean_loops is None else mean_loops
        return st.prelude + st.coda + st.block * loops

    def kv_bytes_per_token(self, mean_loops: float | None = None) -> float:
        c = self.config
        return self.kv_entries_per_token(mean_loops) * 2 * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def mean_layers(self, loops_mean: float) -> float:
        st = self.structure
        return float(self.num_steps) if st is None else st.prelude + st.coda + st.block * loops_mean

    # ---------------------------------------------------------------------------------------------
    # Checkpoints: safetensors + JSON config; a reload is bit-identical.
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.save_weights(directory)
        (directory / "mor_config.json").write_text(json.dumps(self.mor.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device=None) -> "MoRModel":
        from safetensors.torch import load_file
        directory = Path(directory)
        model = cls(MoRConfig.from_dict(json.loads((directory / "mor_config.json").read_text())))
        state = load_file(str(directory / "model.safetensors"))
        model.to(state["embed_tokens.weight"].dtype)
        if model.config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state)
        return model.to(device) if device else model


# -------------------------------------------------------------------------------------------------
# Decode-time routing on given text, and its agreement with training-time top-k.
@torch.inference_mode()
def decode_routing(model: MoRModel, input_ids: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` recursions per token when the text is decoded (causal decisions, through the engine's
    routed policy; a packed prefill decides every token exactly as token-by-token decoding would).
    ``forced``: ``[B, T]`` decisions to decode with instead of the routers' (a check of the plumbing)."""
    from ..engine.generate import generate_ids
    from ..engine.policies import RoutedDepth
    B, T = input_ids.shape
    if model.structure is None:
        return torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    policy = RoutedDepth(forced=forced, record=True)
    generate_ids(model, input_ids.tolist(), 1, policy=policy, eos_token_ids=[])
    return policy.loops_per_token(B, T).to(input_ids.device)


@torch.inference_mode()
def topk_agreement(model: MoRModel, input_ids: torch.Tensor, forced: torch.Tensor | None = None) -> dict:
    """How often decode-time routing (threshold / token-choice top-1, causal) matches the training-time
    decisions (top-k over the whole sequence) on the same text: per recursion, and whole depths.
    ``forced``: decode with these decisions instead (agreement 1 when they are the training ones)."""
    train = model(input_ids).routing.loops
    decode = decode_routing(model, input_ids, forced)
    first = 0 if _routes_loop_zero(model) else 1  # loop 0 is everyone's unless its capacity is below 1
    per_loop = [float(((train > r) == (decode > r)).float().mean()) for r in range(first, model.num_recursions)]
    return {"per_loop": per_loop, "loops": list(range(first, model.num_recursions)),
            "depth": float((train == decode).float().mean()),
            "train_mean_loops": float(train.float().mean()), "decode_mean_loops": float(decode.float().mean()),
            "train_loops": train, "decode_loops": decode}


@torch.no_grad()
def calibrate_thresholds(model: MoRModel, input_ids: torch.Tensor) -> list[float]:
    """Set each expert-choice decode threshold to the top-k boundary of the training pass on this text.

    The logit between the last selected and the first unselected candidate (median over rows) lets the
    causal decode rule ``logit > threshold`` send about the capacity's fraction of tokens on, without
    the auxiliary loss (random-weight speed benchmarks; a trained router with the aux loss keeps 0)."""
    if model.kind != "expert":
        raise ValueError(f"calibrate_thresholds needs an expert-choice model, got kind={model.kind!r}")
    routing = model(input_ids).routing
    thresholds = [0.0]
    first = 0 if _routes_loop_zero(model) else 1
    if first == 0:
        thresholds = []
    for r in range(first, model.num_recursions):
        logits, loops = routing.router_logits[r].float(), routing.loops
        selected = logits.masked_fill(loops <= r, float("inf")).min(-1).values
        rest = logits.masked_fill((loops != r), float("-inf")).max(-1).values
        thresholds.append(float(((selected + rest.clamp(max=selected)) / 2).median()))
    model.router.threshold.copy_(torch.tensor(thresholds))
    return thresholds


def _routes_loop_zero(model: MoRModel) -> bool:
    return model.kind == "expert" and model.router.config.capacity[0] < 1

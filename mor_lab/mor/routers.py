"""Routers of Mixture-of-Recursions: which tokens take another pass through the shared block.

Expert-choice (the paper's best): at recursion ``r`` a router scores every token still in play and
the top ``capacity_r`` fraction of the *whole sequence* goes on (hierarchical: only tokens selected
at ``r-1`` are candidates; selected indices stay in causal order). Top-k over a sequence looks at the
future, so decoding cannot use it: an auxiliary BCE loss teaches the raw logit to say "I would be in
the top-k" (``logit > 0`` <=> ``sigmoid > 0.5``), or a separate auxiliary router learns the same on
detached inputs. Token-choice: one router with ``N_r`` outputs, applied once, gives each token its
depth (top-1); a balancing loss or a loss-free bias keeps the depths from collapsing.

The math follows the reference code (raymin0223/mixture_of_recursions, ``model/mor_model/*_router.py``),
checked formula by formula in ``tests/test_reference_mor.py``. Its options are here too: router
temperature (the router reads ``h / temperature``), a random-router baseline (``U(0, 1)`` scores, same
capacities, nothing learned), raw-logit expert scores and un-gated combination, the token-choice
balancing warm-up, capacity lists that do not start at 1. Where mor_lab differs it says so at the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("linear", "mlp")
EXPERT_SCORES = ("sigmoid", "tanh", "raw")
TOKEN_SCORES = ("softmax", "sigmoid")


@dataclass
class RouterConfig:
    """One router; ``None`` fields take the paper's defaults for the routing kind (expert or token)."""

    arch: str = "linear"  # Linear(d, out, bias=False), or "mlp": Linear(d, 2d) - GELU - Linear(2d, out)
    score: str | None = None  # expert: sigmoid | tanh | raw (the logit itself, no alpha; default sigmoid);
    #                           token: softmax | sigmoid (default softmax)
    alpha: float | None = None  # gate scale: 0.1 (expert, token sigmoid), 1.0 (token softmax)
    capacity: list[float] | None = None  # expert: fraction of the sequence per recursion, non-increasing (loop 0
    #                                      may be < 1: it is routed too); None: (N_r - r) / N_r
    warmup_steps: int = 0  # expert: cosine capacity warm-up from 1 to capacity over this many steps
    aux_loss: float = 0.01  # expert: BCE(logit, "was in the top-k") coefficient: causal decoding. 0.01 is the
    #                        reference trainer's fallback coeff; its released configs' 0.001 left the lab's 2k-step
    #                        models' decode rule (logit > 0) agreeing with the top-k on only 72-85 % of tokens
    aux_router: bool = False  # expert: a separate router on detached inputs decides at decode time. mor_lab
    #                           scales its BCE by aux_loss too; the reference trains it alone (coefficient 1, its
    #                           own optimiser): with Adam only the weight decay and the clipping see the scale
    z_loss: float = 0.0  # router z-loss coefficient (mean logsumexp(logits)^2), e.g. 1e-3 / 1e-5
    balance_loss: float = 0.1  # token: sum_i P_i f_i coefficient (0 with loss_free)
    loss_free: bool = False  # token: balance with a non-trained bias instead of a loss
    bias_update: float = 0.001  # token: loss-free bias step u
    balance_warmup_steps: int = 0  # token: while step + 1 < this, every token takes the deepest recursion and
    #                                the loss-free bias restarts from 0 (the reference's bal_warmup_step)
    temperature: float = 1.0  # the router reads h / temperature (the reference's mor.temp; not the aux router)
    random: bool = False  # baseline: U(0, 1) scores instead of a learned router (same capacities, nothing trained)
    gated: bool = True  # False: the score does not scale the update: h + Block(h) (expert), x + h_last (token)
    init_std: float = 0.02

    def resolved(self, kind: str, num_recursions: int) -> "RouterConfig":
        """A copy with the kind's defaults filled in, validated."""
        expert = kind == "expert"
        score = self.score or ("sigmoid" if expert else "softmax")
        alpha = (0.1 if expert or score == "sigmoid" else 1.0) if self.alpha is None else self.alpha
        out = dataclasses.replace(self, score=score, alpha=alpha,
                                  capacity=list(self.capacity or default_capacity(num_recursions)))
        out.validate(kind, num_recursions)
        return out

    def validate(self, kind: str, num_recursions: int) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"RouterConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        scores = EXPERT_SCORES if kind == "expert" else TOKEN_SCORES
        if self.score is not None and self.score not in scores:
            raise ValueError(f"RouterConfig.score for {kind}-choice must be one of {scores}, got {self.score!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"RouterConfig.alpha must be > 0, got {self.alpha!r}")
        if self.capacity is not None:
            cap = list(self.capacity)
            if len(cap) != num_recursions:
                raise ValueError(f"RouterConfig.capacity needs one value per recursion ({num_recursions}), got {cap}")
            if any(not 0 < c <= 1 for c in cap) or any(b > a for a, b in zip(cap, cap[1:])):
                raise ValueError(f"RouterConfig.capacity must be non-increasing values in (0, 1], got {cap}")
        for name in ("warmup_steps", "balance_warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"RouterConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if kind == "expert" and self.balance_warmup_steps:
            raise ValueError("RouterConfig.balance_warmup_steps is token-choice's warm-up; expert-choice warms up "
                             "its capacities with warmup_steps")
        for name in ("aux_loss", "z_loss", "balance_loss", "bias_update"):
            if getattr(self, name) < 0:
                raise ValueError(f"RouterConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"RouterConfig.temperature must be > 0, got {self.temperature!r}")
        if self.random and self.aux_router:
            raise ValueError("RouterConfig.random has nothing to learn: an aux_router would learn random decisions; "
                             "set aux_router=False")
        if not self.init_std > 0:
            raise ValueError(f"RouterConfig.init_std must be > 0, got {self.init_std!r}")


def default_capacity(num_recursions: int) -> list[float]:
    """``(N_r - r) / N_r`` for r = 0 .. N_r - 1: e.g. 1, 2/3, 1/3."""
    return [(num_recursions - r) / num_recursions for r in range(num_recursions)]


def capacity_schedule(capacity: list[float], step: int | None = None, warmup_steps: int = 0) -> list[float]:
    """Capacities at training ``step`` (0-based) with the cosine warm-up:
    ``cap + (1 - cap) * 0.5 (1 + cos(pi min(1, (step + 1) / W)))``.

    The reference counts steps from 1 (it increments its counter before use), so the first step is
    already ``1/W`` into the warm-up and step ``W - 1`` reaches the target capacities."""
    if not warmup_steps or step is None:
        return list(capacity)
    w = 0.5 * (1 + math.cos(math.pi * min(1.0, (step + 1) / warmup_steps)))
    return [c + (1 - c) * w for c in capacity]


def topk_count(capacity: float, seq_len: int) -> int:
    """Tokens selected at a recursion: ``max(1, int(capacity * seq_len))`` over the full length, as in the
    reference, floating point included (``0.7 * 90 = 62.99999999999999``: 62 tokens)."""
    return max(1, int(capacity * seq_len))


def hierarchical_topk(logits: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, T]`` bool: the ``k`` highest ``logits`` per row among ``candidates`` (selected at r-1).

    Index order is irrelevant for a mask; gathering the mask's ``True`` positions (``nonzero``,
    ``argsort`` stable) keeps causal order."""
    if k > int(candidates.sum(-1).min()):
        raise ValueError(f"top-{k} needs at least {k} candidates per row: capacities must not increase")
    masked = logits.detach().float().masked_fill(~candidates, float("-inf"))
    idx = masked.topk(k, dim=-1).indices.sort(-1).values  # re-sorted: causal order
    return torch.zeros_like(candidates).scatter(-1, idx, True)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: ``mean(logsumexp(logits)^2)`` over the last dim (a single logit: ``mean(logit^2)``)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _net(d: int, out: int, arch: str, std: float) -> nn.Module:
    net = nn.Linear(d, out, bias=False) if arch == "linear" else nn.Sequential(
        nn.Linear(d, 2 * d, bias=False), nn.GELU(), nn.Linear(2 * d, out, bias=False))
    for p in net.parameters():
        nn.init.normal_(p, std=std)
    return net


class ExpertChoiceRouter(nn.Module):
    """One scorer per recursion; score ``sigmoid(logit) * alpha`` (or tanh, or the raw logit) gates the block's
    output. ``random``: no scorer, ``U(0, 1)`` scores drawn afresh at every call."""

    def __init__(self, config: RouterConfig, hidden_size: int, num_recursions: int):
        super().__init__()
        self.config = config.resolved("expert", num_recursions)
        self.num_recursions = num_recursions
        c = self.config
        self.nets = None if c.random else nn.ModuleList(_net(hidden_size, 1, c.arch, c.init_std)
                                                        for _ in range(num_recursions))
        self.aux_nets = nn.ModuleList(_net(hidden_size, 1, c.arch, c.init_std)
                                      for _ in range(num_recursions)) if c.aux_router else None
        # Decode-time rule: go on when the decision logit exceeds this (0 <=> sigmoid > 0.5).
        self.register_buffer("threshold", torch.zeros(num_recursions))

    def capacities(self, step: int | None = None) -> list[float]:
        return capacity_schedule(self.config.capacity, step, self.config.warmup_steps)

    def logits(self, loop: int | torch.Tensor, h: torch.Tensor, aux: bool = False) -> torch.Tensor:
        """Router logits of ``h`` (``[..., d]`` -> ``[...]``) at recursion ``loop`` (an int, or one per token).

        The router reads ``h / temperature``; the aux router reads ``h`` detached (as in the reference).
        A random router returns ``U(0, 1)`` draws."""
        if self.config.random and not aux:
            return torch.rand(h.shape[:-1], dtype=h.dtype, device=h.device)
        nets = self.aux_nets if aux else self.nets
        x = h.detach() if aux else h / self.config.temperature
        if isinstance(loop, int):
            return nets[loop](x).squeeze(-1)
        every = torch.cat([net(x) for net in nets], dim=-1)  # [N, N_r]: cheap, d -> 1 each
        return every.gather(-1, loop.clamp(max=self.num_recursions - 1)[:, None]).squeeze(-1)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """The factor of the block's output, ``h + g * Block(h)``: ``score(logit) * alpha``, the raw logit
        (``score="raw"``), ``u * alpha`` (random), or 1 when un-gated."""
        c = self.config
        if not c.gated:
            return torch.ones_like(logits)
        if c.random:
            return logits * c.alpha
        if c.score == "raw":
            return logits
        squash = torch.sigmoid if c.score == "sigmoid" else torch.tanh
        return squash(logits) * c.alpha

    def _threshold(self, loop: int | torch.Tensor) -> torch.Tensor:
        """Decision threshold per recursion: the buffer; a random router goes on from loop r with probability
        ``capacity[r] / capacity[r - 1]`` (``capacity[-1] = 1``), i.e. when ``u > 1 - that``."""
        if self.config.random:
            cap = [1.0] + list(self.config.capacity)
            table = torch.tensor([1 - cap[r + 1] / cap[r] for r in range(self.num_recursions)],
                                 dtype=self.threshold.dtype, device=self.threshold.device)
        else:
            table = self.threshold
        return table[loop] if isinstance(loop, int) else table[loop.clamp(max=self.num_recursions - 1)]

    def decide(self, loop: int | torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Decode time (causal): does each token take recursion ``loop``? (aux router when configured)."""
        return self.logits(loop, h, aux=self.aux_nets is not None) > self._threshold(loop)

    def decide_and_gate(self, loop: int | torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode time, one call: (does each token take recursion ``loop``, its gate there).

        Loop 0 is taken by every token while ``capacity[0] == 1``; otherwise the causal rule decides
        (``logit > threshold``, aux router when configured). The gate comes from the main router (for a
        random router, from the same draw that decided, as top-k does in training)."""
        logits = self.logits(loop, h)
        decision = self.logits(loop, h, aux=True) if self.aux_nets is not None else logits
        go = decision > self._threshold(loop)
        if self.config.capacity[0] >= 1:
            go = go | (torch.as_tensor(loop, device=go.device) == 0)
        return go, self.gate(logits)

    def losses(self, h_per_loop, logits_per_loop, candidates, selected) -> dict[str, torch.Tensor]:
        """Auxiliary BCE (causal decoding) and z-loss over the candidate tokens of every recursion."""
        c, out = self.config, {}
        if c.random:
            return out
        if c.aux_loss:
            bce = 0.0
            for r, (h, logits, cand, sel) in enumerate(zip(h_per_loop, logits_per_loop, candidates, selected)):
                z = self.logits(r, h, aux=True) if self.aux_nets is not None else logits
                bce = bce + F.binary_cross_entropy_with_logits(z[cand].float(), sel[cand].float())
            out["router_bce"] = c.aux_loss * bce
        if c.z_loss:
            out["router_z"] = c.z_loss * sum(z_loss(logits[cand][:, None])
                                             for logits, cand in zip(logits_per_loop, candidates))
        return out

    def flops_per_token(self) -> int:
        """Matmul FLOPs of every recursion's router (and aux router) on one token."""
        nets = [n for group in (self.nets, self.aux_nets) if group is not None for n in group]
        return 2 * sum(p.numel() for n in nets for p in n.parameters())


class TokenChoiceRouter(nn.Module):
    """One scorer with ``N_r`` outputs applied once: each token's depth is its top-1 output."""

    def __init__(self, config: RouterConfig, hidden_size: int, num_recursions: int):
        super().__init__()
        self.config = config.resolved("token", num_recursions)
        self.num_recursions = num_recursions
        self.net = None if self.config.random else _net(hidden_size, num_recursions, self.config.arch,
                                                        self.config.init_std)
        self.register_buffer("bias", torch.zeros(num_recursions))  # loss-free balancing: not trained

    def route(self, h: torch.Tensor, depth: torch.Tensor | None = None):
        """``h [..., d]`` -> (logits, probs, depth index 0..N_r-1, gate = prob of that depth * alpha).

        The choice is ``argmax(probs * alpha + bias)`` (the loss-free bias moves choices, never the gate);
        a random router's probs are ``U(0, 1)`` draws. ``depth`` forces the decisions (the gate still
        comes from the router); un-gated, the gate is 1."""
        c = self.config
        if c.random:
            logits = torch.rand(*h.shape[:-1], self.num_recursions, dtype=torch.float32, device=h.device)
            probs = logits
        else:
            logits = self.net(h / c.temperature)
            probs = logits.float().softmax(-1) if c.score == "softmax" else torch.sigmoid(logits.float())
        scores = probs * c.alpha  # the reference's router_probs
        if depth is None:
            depth = (scores.detach() + (0 if c.random else self.bias)).argmax(-1)
        gate = scores.gather(-1, depth[..., None]).squeeze(-1) if c.gated else torch.ones(depth.shape,
                                                                                            device=h.device)
        return logits, probs, depth, gate.to(h.dtype)

    def warmup_depth(self, step: int | None, shape, device) -> torch.Tensor | None:
        """The balancing warm-up at training ``step`` (0-based): every token's depth is the deepest one and the
        loss-free bias restarts from 0, as the reference does while its 1-based step is below the warm-up.
        None outside the warm-up (or without a step)."""
        if step is None or not step + 1 < self.config.balance_warmup_steps:
            return None
        with torch.no_grad():
            self.bias.zero_()
        return torch.full(shape, self.num_recursions - 1, dtype=torch.long, device=device)

    def losses(self, logits: torch.Tensor, probs: torch.Tensor, depth: torch.Tensor) -> dict[str, torch.Tensor]:
        """Balancing loss ``sum_i P_i f_i`` (``P_i`` mean of ``probs * alpha``, ``f_i = N_r *`` fraction routed to
        i). The reference also divides by ``num_items_in_batch / (B T)``, its gradient-accumulation bookkeeping
        (1 for one unpadded batch). A random router has nothing to learn: no losses."""
        c, n, out = self.config, self.num_recursions, {}
        if c.random:
            return out
        if c.balance_loss and not c.loss_free:
            p = probs.reshape(-1, n) * c.alpha
            f = n * F.one_hot(depth.reshape(-1), n).float().mean(0)
            out["router_balance"] = c.balance_loss * (p.mean(0) * f).sum()
        if c.z_loss:
            out["router_z"] = c.z_loss * z_loss(logits.reshape(-1, n))
        return out

    @torch.no_grad()
    def update_bias(self, depth: torch.Tensor) -> None:
        """Loss-free balancing: ``bias_i += u * sign(mean_load - load_i)`` after a training step."""
        if self.config.loss_free:
            load = torch.bincount(depth.reshape(-1), minlength=self.num_recursions).float()
            self.bias += self.config.bias_update * torch.sign(load.mean() - load)

    def flops_per_token(self) -> int:
        """Matmul FLOPs of the router on one token."""
        return 0 if self.net is None else 2 * sum(p.numel() for p in self.net.parameters())

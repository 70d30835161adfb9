"""Mixture-of-Recursions against the public reference code, formula by formula.

Each test transcribes a few lines of raymin0223/mixture_of_recursions (commit 82c97f2; the routing code
is the same from 17f305c on) next to a call of mor_lab's function, on small inputs. Files cited:
``model/mor_model/expert_choice_router.py`` and ``token_choice_router.py`` (``MoRLlamaDecoderLayer.forward``),
``model/mor_model/util.py`` (the routers), ``util/trainer_pt.py`` (the loss-free bias update),
``util/config.py`` (capacity lists).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mor_lab
from mor_lab.mor import MoRConfig, MoRModel, RouterConfig, capacity_schedule, default_capacity, topk_count
from mor_lab.mor.routers import ExpertChoiceRouter, TokenChoiceRouter

DIMS = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4,
                           num_kv_heads=2)


def model_of(kind="expert", n=3, std=0.3, **router):
    return MoRModel(MoRConfig(DIMS, kind=kind, num_recursions=n, router=RouterConfig(init_std=1.0, **router),
                              init_std=std)).double().train()


# --- expert-choice: capacities --------------------------------------------------------------------------
def reference_capacities(capacity_factor: float, cap_warmup_step: int, calls: int) -> list[float]:
    """expert_choice_router.py, MoRLlamaDecoderLayer.forward: the step counter is incremented *before* use."""
    training_step, out = 0, []
    for _ in range(calls):
        training_step += 1
        if cap_warmup_step > 0:
            step_ratio = min(1.0, training_step / cap_warmup_step)
            decay_factor = 0.5 * (1.0 + math.cos(math.pi * step_ratio))
        else:
            decay_factor = 0.0
        out.append(capacity_factor + (1.0 - capacity_factor) * decay_factor)
    return out


@pytest.mark.parametrize("warmup", [0, 1, 4, 7])
def test_capacity_warmup_counts_steps_like_the_reference(warmup):
    capacity = default_capacity(3)
    expected = [reference_capacities(c, warmup, 10) for c in capacity]
    for step in range(10):  # mor_lab's step: 0-based index of the training step
        assert capacity_schedule(capacity, step, warmup) == [e[step] for e in expected]
    model = model_of(warmup_steps=warmup)
    ids = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(0))
    for step in range(6):
        routing = model(ids, step=step).routing
        assert routing.capacities == [e[step] for e in expected]
        assert ((routing.loops > 1).sum(-1) == max(1, int(expected[1][step] * 18))).all()


def test_topk_count_is_the_references_int():
    # expert_choice_router.py: top_k = max(1, int(capacity_factor * seq_len)); no epsilon
    cases = [(0.7, 90), (5 / 6, 18), (2 / 3, 12), (1 / 3, 30), (0.29, 100), (0.01, 10)]
    cases += [(c, T) for T in (18, 33, 90) for c in reference_capacities(2 / 3, 7, 10)]
    for capacity, T in cases:
        assert topk_count(capacity, T) == max(1, int(capacity * T)), (capacity, T)
    assert topk_count(0.7, 90) == 62  # 0.7 * 90 = 62.99999999999999 in floating point


def test_capacity_lists_need_not_start_at_one():
    # util/config.py only checks a descending list; every recursion (loop 0 too) takes top-k of the sequence
    capacity = [0.75, 0.5, 0.25]
    model = model_of(capacity=capacity)
    T = 12
    ids = torch.randint(0, 64, (3, T), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    for r, c in enumerate(capacity):
        assert ((out.routing.loops > r).sum(-1) == max(1, int(c * T))).all()
    assert (out.routing.loops == 0).any()  # some tokens skip the shared block entirely
    logits0 = out.routing.router_logits[0]
    for b in range(3):  # loop 0 is routed: the selected tokens are its top-k
        assert logits0[b][out.routing.loops[b] > 0].min() >= logits0[b][out.routing.loops[b] == 0].max()


# --- routers: MLP, temperature, scores, gating, random ----------------------------------------------------
class ReferenceMLPRouter(nn.Module):
    """util.py, MLPRouter (WideMLPRouter is the same): Linear(d, 2d) - GELU - Linear(2d, out), no biases."""

    def __init__(self, hidden_size, out_dim=1):
        super().__init__()
        self.router = nn.Sequential(nn.Linear(hidden_size, hidden_size * 2, bias=False), nn.GELU(),
                                    nn.Linear(hidden_size * 2, out_dim, bias=False))

    def forward(self, x):
        return self.router(x)


def test_mlp_router_is_d_to_2d_to_out():
    torch.manual_seed(0)
    for router, out_dim in ((ExpertChoiceRouter(RouterConfig(arch="mlp"), 8, 3), 1),
                            (TokenChoiceRouter(RouterConfig(arch="mlp"), 8, 3), 3)):
        net = router.nets[1] if isinstance(router, ExpertChoiceRouter) else router.net
        reference = ReferenceMLPRouter(8, out_dim)
        reference.load_state_dict({f"router.{k}": v for k, v in net.state_dict().items()})
        h = torch.randn(5, 8)
        torch.testing.assert_close(net(h), reference(h), rtol=0, atol=0)


def test_temperature_divides_the_router_input_not_the_aux_router():
    # both router files: self.mor_router(x / self.cfg.mor.temp); the aux router: self.mlp_router(x.detach())
    torch.manual_seed(1)
    h = torch.randn(6, 8)
    for arch in ("linear", "mlp"):
        expert = ExpertChoiceRouter(RouterConfig(arch=arch, temperature=2.5, aux_router=True), 8, 3)
        torch.testing.assert_close(expert.logits(1, h), expert.nets[1](h / 2.5).squeeze(-1), rtol=0, atol=0)
        torch.testing.assert_close(expert.logits(1, h, aux=True), expert.aux_nets[1](h).squeeze(-1), rtol=0, atol=0)
        token = TokenChoiceRouter(RouterConfig(arch=arch, temperature=2.5), 8, 3)
        torch.testing.assert_close(token.route(h)[0], token.net(h / 2.5), rtol=0, atol=0)


def test_expert_scores_and_gating_modes():
    """STEP 1 (router_func sigmoid / tanh / None) and STEP 5 (gating weighted or not) of expert_choice_router.py."""
    z = torch.linspace(-3, 3, 13)
    block, x = torch.randn(13, 4), torch.randn(13, 4)

    def reference(router_func, alpha, gating):
        if router_func is None:
            router_probs = z
        else:
            router_probs = (torch.sigmoid(z) if router_func == "sigmoid" else torch.tanh(z)) * alpha
        _src = block * router_probs[:, None] if gating == "weighted" else block
        return x + _src  # scatter_add onto total_x, every token selected here

    for score, func in (("sigmoid", "sigmoid"), ("tanh", "tanh"), ("raw", None)):
        for gated in (True, False):
            router = ExpertChoiceRouter(RouterConfig(score=score, alpha=0.3, gated=gated), 4, 2)
            ours = x + router.gate(z)[:, None] * block
            torch.testing.assert_close(ours, reference(func, 0.3, "weighted" if gated else "none"))


def test_random_router_baseline_keeps_the_capacities():
    # both router files, cfg.mor.rand_router: no router module, scores torch.rand(...) * alpha
    model = model_of(random=True)
    assert sum(p.numel() for p in model.router.parameters()) == 0
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    out = model(ids, targets=ids)
    assert out.aux == {}  # nothing to learn: no BCE, no z-loss
    for r, c in enumerate(default_capacity(3)):
        u = out.routing.router_logits[r]
        assert ((u >= 0) & (u < 1)).all()
        assert ((out.routing.loops > r).sum(-1) == max(1, int(c * 12))).all()
    u = torch.rand(50)
    torch.testing.assert_close(model.router.gate(u), u * 0.1)  # router_probs = rand * alpha
    # decode time: a token at loop r goes on with probability capacity[r] / capacity[r - 1]
    torch.manual_seed(4)
    go, gate = model.router.decide_and_gate(2, torch.zeros(20000, 32, dtype=torch.float64))
    assert float(go.double().mean()) == pytest.approx(0.5, abs=0.02)
    assert (gate[go] > 0.05).all() and (gate[~go] <= 0.05).all()  # the upper half of U(0,1) x 0.1 goes on
    go0, _ = model.router.decide_and_gate(0, torch.zeros(100, 32, dtype=torch.float64))
    assert go0.all()  # capacity[0] = 1: everyone runs loop 0
    token = TokenChoiceRouter(RouterConfig(random=True, alpha=0.5), 8, 3)
    logits, probs, depth, gate = token.route(torch.zeros(40, 8))
    assert torch.equal(depth, (probs * 0.5).argmax(-1))
    torch.testing.assert_close(gate, probs.gather(-1, depth[:, None]).squeeze(-1) * 0.5)
    assert token.losses(logits, probs, depth) == {}


def test_decide_and_gate_is_the_decode_rule_with_the_gate():
    router = ExpertChoiceRouter(RouterConfig(temperature=2.0, gated=False, capacity=[0.5, 0.5, 0.25]), 8, 3)
    h = torch.randn(30, 8)
    for loop in range(3):
        go, gate = router.decide_and_gate(loop, h)
        assert torch.equal(go, router.logits(loop, h) > 0)  # capacity[0] < 1: loop 0 is routed too
        assert torch.equal(gate, torch.ones(30))
    full = ExpertChoiceRouter(RouterConfig(), 8, 3)
    go, gate = full.decide_and_gate(torch.tensor([0, 1, 2] * 10), h)
    assert go[0::3].all()  # capacity[0] = 1
    torch.testing.assert_close(gate, full.gate(full.logits(torch.tensor([0, 1, 2] * 10), h)))


# --- token-choice: balancing ----------------------------------------------------------------------------
def reference_token_choice(logits, router_func, alpha, bias=None):
    """token_choice_router.py: router_probs = softmax (or sigmoid) * alpha [+ router_bias]; top-1;
    weights = gather(_router_probs) (no bias); balancing P_i = mean(router_probs), f_i = N_r * ratio_i."""
    bs, seq_len, n = logits.shape
    if router_func == "sigmoid":
        router_probs = _router_probs = torch.sigmoid(logits) * alpha
    else:
        router_probs = _router_probs = F.softmax(logits, dim=-1) * alpha
    if bias is not None:
        router_probs = _router_probs + bias
    _, top_expert_indices = torch.topk(router_probs, 1, dim=-1, sorted=False)
    weights = torch.gather(_router_probs, dim=-1, index=top_expert_indices).squeeze(-1)
    top_expert_indices = top_expert_indices.squeeze(-1)
    P_i = torch.sum(_router_probs, dim=(0, 1)) / (bs * seq_len)
    balancing_ratio = torch.bincount(top_expert_indices.view(-1), minlength=n) / (bs * seq_len)
    f_i = n * balancing_ratio
    num_items_in_batch = bs * seq_len  # the reference divides by num_items / bs / seq_len: 1 here
    balancing_loss = sum(P_i * f_i) / (num_items_in_batch / bs / seq_len)
    return top_expert_indices, weights, balancing_loss


@pytest.mark.parametrize("score,alpha", [("softmax", 1.0), ("softmax", 0.5), ("sigmoid", 0.1), ("sigmoid", 0.7)])
def test_token_choice_balancing_loss_value_and_gradient(score, alpha):
    torch.manual_seed(5)
    router = TokenChoiceRouter(RouterConfig(score=score, alpha=alpha, init_std=1.0), 8, 3)
    h = torch.randn(2, 12, 8)
    logits, probs, depth, gate = router.route(h)
    ours = router.losses(logits, probs, depth)["router_balance"] / router.config.balance_loss
    (grad_ours,) = torch.autograd.grad(ours, router.net.weight)
    ref_depth, ref_gate, ref_loss = reference_token_choice(router.net(h), score, alpha)
    (grad_ref,) = torch.autograd.grad(ref_loss, router.net.weight)
    assert torch.equal(depth, ref_depth)
    torch.testing.assert_close(gate, ref_gate)
    torch.testing.assert_close(ours, ref_loss)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_loss_free_choice_adds_the_bias_to_alpha_scaled_scores():
    torch.manual_seed(6)
    router = TokenChoiceRouter(RouterConfig(alpha=0.1, loss_free=True, init_std=0.2), 8, 3)
    router.bias.copy_(torch.tensor([0.03, 0.0, -0.03]))
    h = torch.randn(2, 12, 8)
    _, probs, depth, gate = router.route(h)
    ref_depth, ref_gate, _ = reference_token_choice(router.net(h), "softmax", 0.1, router.bias)
    assert (ref_depth != (probs + router.bias).argmax(-1)).any()  # the inputs tell the two rules apart
    assert torch.equal(depth, ref_depth)
    torch.testing.assert_close(gate, ref_gate)


def test_loss_free_bias_update_is_the_trainers():
    # util/trainer_pt.py: eps_i = mean(ratio) - ratio; router_bias += u * sign(eps_i)
    router = TokenChoiceRouter(RouterConfig(loss_free=True, bias_update=0.01), 8, 3)
    depth = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    ratio = torch.bincount(depth, minlength=3) / depth.numel()
    expected = 0.01 * torch.sign(ratio.mean().expand(3) - ratio)
    router.update_bias(depth)
    torch.testing.assert_close(router.bias, expected)


def test_token_choice_sigmoid_defaults_to_alpha_point_one():
    # token_choice_router.py: self.cfg.mor.token.get("alpha", 0.1) for sigmoid, get("alpha", 1.0) for softmax
    assert TokenChoiceRouter(RouterConfig(score="sigmoid"), 8, 3).config.alpha == 0.1
    assert TokenChoiceRouter(RouterConfig(), 8, 3).config.alpha == 1.0


def reference_balancing_warmup(bal_warmup_step: int, calls: int) -> list[bool]:
    """token_choice_router.py: training_step += 1; warm-up while training_step < bal_warmup_step."""
    training_step, out = 0, []
    for _ in range(calls):
        training_step += 1
        out.append(training_step < bal_warmup_step)
    return out


def test_balancing_warmup_sends_every_token_to_the_last_recursion():
    model = model_of("token", loss_free=True, balance_warmup_steps=4)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(7))
    free_choice = model(ids).routing.loops
    assert (free_choice != 3).any()
    bias = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    for step, warm in enumerate(reference_balancing_warmup(4, 6)):
        model.router.bias.copy_(bias)
        out = model(ids, targets=ids, step=step)
        if warm:
            assert (out.routing.loops == 3).all() and not model.router.bias.any()  # router_bias *= 0.0
            # weights = gather(_router_probs) at the last depth; the balancing loss still runs
            assert "router_balance" not in out.aux
        else:
            assert torch.equal(model.router.bias, bias)
    loss_model = model_of("token", balance_warmup_steps=2)
    out = loss_model(ids, targets=ids, step=0)
    assert (out.routing.loops == 3).all() and "router_balance" in out.aux
    probs = out.routing.probs
    f = torch.tensor([0.0, 0.0, 3.0])
    torch.testing.assert_close(out.aux["router_balance"], 0.1 * ((probs.reshape(-1, 3) * 1.0).mean(0) * f).sum())

"""Mixture-of-Recursions: routers, losses, both KV schemes (training masks vs a naive reference vs decoding
through the engine), checkpoints, FLOPs, the bench CLI. Routed decoding's scheduling: test_engine_mor.py."""
import json
import math

import pytest
import torch

import mor_lab
from mor_lab.engine.policies import RoutedDepth
from mor_lab.mor import (MoRConfig, MoRModel, RouterConfig, capacity_schedule, default_capacity, hierarchical_topk,
                         topk_count)
from mor_lab.mor.routers import ExpertChoiceRouter, TokenChoiceRouter

DIMS = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4,
                           num_kv_heads=2)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21], [22, 23, 24]]
ROUTED = [(k, s) for k in ("expert", "token") for s in ("recursion", "share")]


def make(kind="expert", scheme="recursion", n=3, std=0.3, **router):
    router = RouterConfig(**{"init_std": 1.0, **router})
    return MoRModel(MoRConfig(DIMS, kind=kind, num_recursions=n, kv_scheme=scheme, router=router,
                              init_std=std)).double().eval()


# --- routers -----------------------------------------------------------------------------------------
def test_capacity_schedule_and_warmup():
    assert default_capacity(3) == [1, 2 / 3, 1 / 3]
    assert [topk_count(c, 12) for c in default_capacity(3)] == [12, 8, 4]
    assert topk_count(0.01, 10) == 1
    # steps are 0-based; the first is already 1/W into the warm-up (the reference counts from 1)
    assert capacity_schedule([1, 0.5], step=0, warmup_steps=10) == pytest.approx(
        [1, 0.5 + 0.25 * (1 + math.cos(math.pi / 10))])
    assert capacity_schedule([1, 0.5], step=4, warmup_steps=10) == pytest.approx([1, 0.75])
    assert capacity_schedule([1, 0.5], step=9, warmup_steps=10) == [1, 0.5]
    assert capacity_schedule([1, 0.5], step=50, warmup_steps=10) == [1, 0.5]
    assert capacity_schedule([1, 0.5], step=None, warmup_steps=10) == [1, 0.5]  # evaluation: the targets


def test_hierarchical_topk_keeps_capacity_hierarchy_and_causal_order():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g)
    candidates = torch.rand(4, 20, generator=g) < 0.6
    candidates[:, :8] = True
    sel = hierarchical_topk(logits, candidates, 5)
    assert (sel.sum(-1) == 5).all() and not (sel & ~candidates).any()
    for b in range(4):
        chosen = logits[b][sel[b]].min()
        assert (logits[b][candidates[b] & ~sel[b]] <= chosen).all()  # the best candidates
    with pytest.raises(ValueError, match="candidates"):
        hierarchical_topk(logits, candidates & (torch.arange(20) < 3), 5)


@pytest.mark.parametrize("seq_len", [12, 13])
def test_expert_choice_forward_respects_capacities_and_hierarchy(seq_len):
    model = make("expert", n=3)
    ids = torch.randint(0, 64, (3, seq_len), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    loops = out.routing.loops
    for r, cap in enumerate(default_capacity(3)):
        assert ((loops > r).sum(-1) == topk_count(cap, seq_len)).all()  # top-k over the full length
    # hierarchical: the tokens at loop 2 are the best of the loop-1 tokens by the loop-2 router
    logits2 = out.routing.router_logits[2]
    for b in range(3):
        assert logits2[b][loops[b] == 3].min() >= logits2[b][loops[b] == 2].max()
    # no warm-up: the step changes nothing
    assert torch.equal(model(ids, step=0).routing.loops, loops)
    # warm-up over 40 steps: early steps send (almost) every token everywhere, then the capacities take over
    warm = make("expert", n=3, warmup_steps=40)
    early = warm(ids, step=0).routing
    assert early.capacities[1] > 0.99 and ((early.loops > 1).sum(-1) == topk_count(early.capacities[1], seq_len)).all()
    assert (early.loops > 1).float().mean() > 0.9
    assert torch.equal(warm(ids, step=39).routing.loops, warm(ids).routing.loops)  # the targets from step W - 1


def test_expert_losses_bce_z_and_aux_router():
    model = make("expert", z_loss=1e-3, aux_loss=0.001)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    out = model(ids, targets=ids)
    logits, loops = out.routing.router_logits, out.routing.loops
    manual = sum(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[r][loops >= r].float(), (loops > r)[loops >= r].float()) for r in range(3))
    assert out.aux["router_bce"].item() == pytest.approx(0.001 * manual.item(), rel=1e-6)
    manual_z = sum(logits[r][loops >= r].square().mean() for r in range(3))
    assert float(out.aux["router_z"]) == pytest.approx(1e-3 * float(manual_z), rel=1e-6)
    assert float(out.loss) == pytest.approx(float(out.lm_loss + out.aux["router_bce"] + out.aux["router_z"]))
    # a separate aux router learns on detached inputs: its loss moves nothing but itself
    aux = make("expert", aux_router=True)
    out = aux(ids, targets=ids)
    out.aux["router_bce"].backward()
    assert all(p.grad is None or not p.grad.any() for n, p in aux.named_parameters() if "aux_nets" not in n)
    assert any(p.grad is not None and p.grad.any() for n, p in aux.named_parameters() if "aux_nets" in n)


def test_token_choice_balance_loss_and_loss_free_bias():
    router = TokenChoiceRouter(RouterConfig(), 8, 3)
    h = torch.randn(50, 8)
    logits, probs, depth, gate = router.route(h)
    assert torch.allclose(probs.sum(-1), torch.ones(50))
    assert torch.allclose(gate, probs.gather(-1, depth[:, None]).squeeze(-1))  # alpha = 1
    f = 3 * torch.bincount(depth, minlength=3).float() / 50
    assert float(router.losses(logits, probs, depth)["router_balance"]) == pytest.approx(
        0.1 * float((probs.mean(0) * f).sum()), rel=1e-5)
    free = TokenChoiceRouter(RouterConfig(loss_free=True), 8, 3)
    assert "router_balance" not in free.losses(logits, probs, depth)
    free.update_bias(torch.tensor([0, 0, 0, 0, 1, 2]))
    assert free.bias.tolist() == pytest.approx([-0.001, 0.001, 0.001])  # overloaded depth pushed down
    sig = TokenChoiceRouter(RouterConfig(score="sigmoid", alpha=0.5), 8, 3)
    _, probs, depth, gate = sig.route(h)
    assert torch.allclose(gate, torch.sigmoid(sig.net(h)).gather(-1, depth[:, None]).squeeze(-1) * 0.5)


def test_expert_router_scores_and_decode_rule():
    router = ExpertChoiceRouter(RouterConfig(score="tanh", alpha=0.5), 8, 2)
    z = torch.linspace(-3, 3, 7)
    assert torch.allclose(router.gate(z), torch.tanh(z) * 0.5)
    h = torch.randn(30, 8)
    assert torch.equal(router.decide(1, h), router.logits(1, h) > 0)  # sigmoid(logit) > 0.5
    loops = torch.randint(0, 2, (30,))
    per_token = router.logits(loops, h)
    assert torch.allclose(per_token, torch.where(loops == 0, router.logits(0, h), router.logits(1, h)))


@pytest.mark.parametrize("field,value,match", [
    ("kind", "moe", "MoRConfig.kind"), ("kv_scheme", "paged", "MoRConfig.kv_scheme"),
    ("num_recursions", 0, "MoRConfig.num_recursions"), ("num_recursions", 7, "MoRConfig.num_recursions"),
    ("router", RouterConfig(arch="conv"), "RouterConfig.arch"),
    ("router", RouterConfig(capacity=[1, 0.2, 0.5]), "RouterConfig.capacity"),
    ("router", RouterConfig(temperature=0), "RouterConfig.temperature"),
    ("router", RouterConfig(random=True, aux_router=True), "RouterConfig.random"),
    ("router", RouterConfig(balance_warmup_steps=5), "RouterConfig.balance_warmup_steps"),
    ("router", RouterConfig(score="softmax"), "RouterConfig.score"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoRConfig(DIMS, **{field: value})


def test_capacity_below_one_at_loop_zero_needs_recursion_wise_caching():
    MoRConfig(DIMS, router=RouterConfig(capacity=[0.9, 0.5, 0.2]))  # recursion-wise: fine
    with pytest.raises(ValueError, match=r"RouterConfig.capacity\[0\].*kv_scheme='recursion'"):
        MoRConfig(DIMS, kv_scheme="share", router=RouterConfig(capacity=[0.9, 0.5, 0.2]))


# --- KV schemes: training masks == naive reference == decoding cache -----------------------------------
def naive_mor(model, ids, loops):
    """Token by token with python lists of keys/values per depth step; attention written out by hand.

    Recursion-wise: step s keeps the keys of the tokens that ran s. Sharing: loop r > 0 reads loop 0's."""
    st, c = model.structure, model.config
    share = model.mor.kv_scheme == "share"
    store: dict[int, list] = {}
    out = []

    def layer(step, h, rope, read_step, write):
        L = model.layers[model.plan[step]]
        q, k, v = L.self_attn.project(L.input_layernorm(h), rope)
        if write:
            store.setdefault(step, []).append((k[0], v[0]))
        keys = torch.stack([kk for kk, _ in store[read_step]]).repeat_interleave(c.num_heads // c.num_kv_heads, 1)
        values = torch.stack([vv for _, vv in store[read_step]]).repeat_interleave(c.num_heads // c.num_kv_heads, 1)
        weights = (torch.einsum("hd,nhd->hn", q[0], keys) / math.sqrt(c.head_dim)).softmax(-1)
        h = h + L.self_attn.o_proj(torch.einsum("hn,nhd->hd", weights, values).reshape(1, -1))
        return h + L.mlp(L.post_attention_layernorm(h))

    for t in range(len(ids)):
        rope = model.rope(torch.tensor([t]))
        h = model.embed(ids[t:t + 1])
        for s in range(st.prelude):
            h = layer(s, h, rope, s, True)
        x = h
        for r in range(int(loops[t])):
            gate = model.router.gate(model.router.logits(r, h)) if model.kind == "expert" else None
            h_in = h
            for j, s in enumerate(st.loop_steps(r)):
                h = layer(s, h, rope, st.loop_steps(0)[j] if share else s, r == 0 or not share)
            if gate is not None:
                h = h_in + gate[:, None] * h
        if model.kind == "token":
            h = x + model.router.route(x, loops[t:t + 1] - 1)[3][:, None] * h
        for s in st.coda_steps():
            h = layer(s, h, rope, s, True)
        out.append(model.head(h)[0])
    return torch.stack(out)


def engine_logprobs(model, ids, prefill: int, loops) -> torch.Tensor:
    """Decode ``ids`` through the engine with the decisions ``loops`` forced: prefill ``prefill`` tokens in
    one packed pass, then teacher-force the rest; ``[B, T - prefill]`` logprobs of each next token."""
    prompts, rest = ids[:, :prefill].tolist(), ids[:, prefill:].tolist()
    _, trace = mor_lab.generate_ids(model, prompts, forced=rest, policy=RoutedDepth(forced=loops), exact=True)
    return torch.tensor([[t.logprob for t in seq] for seq in trace.tokens], dtype=torch.float64)


def assert_decodes_like_training(model, ids, logits, loops, prefill: int):
    logp = logits.log_softmax(-1)[:, prefill - 1:-1].gather(-1, ids[:, prefill:, None]).squeeze(-1)
    assert torch.allclose(engine_logprobs(model, ids, prefill, loops), logp, atol=1e-9)


@pytest.mark.parametrize("kind,scheme", ROUTED + [("recursive", "recursion"), ("recursive", "share")])
@torch.no_grad()
def test_masks_match_naive_reference_and_the_decoding_cache(kind, scheme):
    model = make(kind, scheme)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(3))
    out = model(ids)
    loops = out.routing.loops
    if kind != "recursive":
        assert len(set(loops.flatten().tolist())) == 3  # really mixed depths
    for b in range(3):
        assert torch.allclose(out.logits[b], naive_mor(model, ids[b], loops[b]), atol=1e-10)
    for prefill in (1, 6):
        assert_decodes_like_training(model, ids, out.logits, loops, prefill)
    # forcing the decisions in training reproduces them exactly
    assert torch.allclose(model(ids, loops=loops).logits, out.logits, atol=1e-12)


@pytest.mark.parametrize("kind,router", [("expert", {"gated": False}), ("expert", {"score": "raw", "init_std": 0.1}),
                                         ("expert", {"temperature": 3.0, "arch": "mlp"}), ("token", {"gated": False}),
                                         ("token", {"temperature": 0.5, "score": "sigmoid"})])
@torch.no_grad()
def test_router_options_match_the_naive_reference_and_the_decoding_cache(kind, router):
    model = make(kind, "recursion", **router)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(4))
    out = model(ids)
    for b in range(3):
        assert torch.allclose(out.logits[b], naive_mor(model, ids[b], out.routing.loops[b]), atol=1e-10)
    assert_decodes_like_training(model, ids, out.logits, out.routing.loops, 4)


@torch.no_grad()
def test_capacity_below_one_at_loop_zero_matches_the_naive_reference():
    """Loop 0 routed too: unselected tokens go from the prelude straight to the coda, in training and when
    the engine decodes with the same decisions."""
    model = make("expert", capacity=[0.7, 0.5, 0.25])
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    loops = out.routing.loops
    assert set(loops.flatten().tolist()) == {0, 1, 2, 3}
    for b in range(3):
        assert torch.allclose(out.logits[b], naive_mor(model, ids[b], loops[b]), atol=1e-10)
    assert torch.allclose(model(ids, loops=loops).logits, out.logits, atol=1e-12)
    assert_decodes_like_training(model, ids, out.logits, loops, 3)
    with pytest.raises(ValueError, match=r"loops must be in 0\.\.3"):
        model(ids, loops=loops + 2)


def test_loops_nobody_takes_are_skipped():
    model = make("token")
    ids = torch.randint(0, 64, (2, 6))
    shallow = torch.ones(2, 6, dtype=torch.long)
    out = model(ids, loops=shallow)
    assert torch.equal(out.routing.loops, shallow) and torch.isfinite(out.logits).all()


def test_vanilla_member_is_a_plain_decoder():
    model = MoRModel(MoRConfig(DIMS, kind="vanilla")).double().eval()
    ids = torch.randint(0, 64, (2, 7))
    plain = mor_lab.Decoder(model.config)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(ids).logits, plain.double()(ids))
    assert model.num_steps == 8 and model.structure is None


# --- checkpoints, FLOPs, training ----------------------------------------------------------------------
def test_checkpoint_reloads_bit_identically(tmp_path):
    model = make("token", "share", loss_free=True)
    model.router.bias += torch.tensor([0.1, -0.2, 0.0], dtype=model.router.bias.dtype)
    model.save(tmp_path / "ckpt")
    again = MoRModel.load(tmp_path / "ckpt")
    assert again.mor == model.mor
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((tmp_path / "ckpt" / "mor_config.json").read_text())["kind"] == "token"


def test_flops_accounting():
    dims = mor_lab.ModelConfig(**{**DIMS.to_dict(), "num_layers": 11})
    vanilla, rec, mor = (MoRModel(MoRConfig(dims, kind=k, num_recursions=3))
                         for k in ("vanilla", "recursive", "expert"))
    T = 30
    per_layer = vanilla.layer_flops() * T + 4 * dims.num_heads * dims.head_dim * T * (T + 1) / 2
    head = 2 * dims.hidden_size * dims.vocab_size * T
    assert vanilla.forward_flops(None, T) == pytest.approx(11 * per_layer + head)
    assert rec.forward_flops(None, T) == pytest.approx(11 * per_layer + head)  # 1 + 3 x 3 + 1 steps
    expected = mor.forward_flops(mor.expected_loops(T), T)
    # loops run on 30, 20, 10 tokens (3 shared layers each); attention among the tokens of each loop
    attn = 4 * dims.num_heads * dims.head_dim
    loops = sum(3 * (n * vanilla.layer_flops() + n * (n + 1) / 2 * attn) for n in (30, 20, 10))
    router = T * 3 * 2 * dims.hidden_size  # one Linear(d, 1) per recursion, on every token
    assert expected == pytest.approx(2 * per_layer + loops + head + router)
    assert expected < rec.forward_flops(None, T)
    assert mor.train_flops_per_token(T) == pytest.approx(3 * expected / T)
    mlp = MoRModel(MoRConfig(dims, kind="expert", num_recursions=3, router=RouterConfig(arch="mlp")))
    d = dims.hidden_size
    assert mlp.forward_flops(mor.expected_loops(T), T) - expected == pytest.approx(T * 3 * 2 * (2 * d * d + 2 * d - d))


# --- benchmark ------------------------------------------------------------------------------------------
def test_bench_mor_cli_quick_on_a_tiny_shape(tmp_path, monkeypatch):
    from mor_lab import cli
    from mor_lab.bench import mor as bench
    monkeypatch.setattr(bench, "SMOLLM2_SHAPE", mor_lab.ModelConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=30, num_heads=4, num_kv_heads=2))
    path = tmp_path / "mor.json"
    assert cli.main(["bench", "mor", "--quick", "--json", str(path), "--batch-sizes", "2,3",
                     "--max-new-tokens", "3"]) == 0
    report = json.loads(path.read_text())
    assert report["suite"] == "mor" and report["quick"]
    methods = {(r["method"], r["batch_size"]) for r in report["results"]}
    assert methods == {(m, b) for b in (2, 3) for m in
                       ["vanilla"] + [f"mor{n}_{k}" for n in (2, 3, 4) for k in ("cdb", "cdb_cost", "static")]}
    for row in report["results"]:
        assert {"method", "batch_size", "tokens_per_s", "mean_layers", "kv_cache_mb"} <= set(row)
        assert row["tokens_per_s"] > 0 and row["new_tokens"] == row["requests"] * report["max_new_tokens"]
    vanilla = next(r for r in report["results"] if r["method"] == "vanilla")
    assert vanilla["mean_layers"] == 30
    assert all(1 <= r["mean_loops"] <= int(r["method"][3]) for r in report["results"] if r["method"] != "vanilla")
    for row in report["kv_memory"]["rows"][1:]:
        assert row["loop_kv_vs_all_loops"] == pytest.approx(row["formula"], abs=0.05)
    assert [r["method"] for r in report["equal_memory"]["results"]] == ["vanilla", "mor2_cdb", "mor3_cdb", "mor4_cdb"]


def test_equal_flops_training_and_checkpoint(tmp_path):
    from mor_lab.mor.train import TrainConfig, compare, summary, wsd
    config = TrainConfig(steps=10, batch_size=2, seq_len=16)
    assert wsd(0, 10, config) == 1.0 and wsd(9, 10, config) == pytest.approx(config.min_lr)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(flops=1e9, steps=3)
    tokens = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    dims = mor_lab.ModelConfig(**{**DIMS.to_dict(), "num_layers": 5})
    configs = {k: MoRConfig(dims, kind=k, num_recursions=3) for k in ("vanilla", "expert", "token")}
    vanilla_step = MoRModel(configs["vanilla"]).train_flops_per_token(16) * 32
    budget = TrainConfig(flops=4.5 * vanilla_step, batch_size=2, seq_len=16, eval_batches=1)
    results = compare(configs, tokens[:1500], tokens[1500:], budget, progress=False, checkpoint_dir=tmp_path)
    assert results["vanilla"][1].steps == 4 and results["expert"][1].steps > 4  # cheaper steps: more of them
    for name, (model, r) in results.items():
        assert r.flops[-1] == pytest.approx(budget.flops, rel=0.35) and all(math.isfinite(x) for x in r.losses)
        assert r.val_loss is not None and (r.val_loss_causal is not None) == (name != "vanilla")
        assert json.loads((tmp_path / name / "train.json").read_text())["result"]["steps"] == r.steps
    assert [row["model"] for row in summary(results)] == list(configs)


def test_viz_figures_and_capacity_dashboard():
    from mor_lab.viz.mor import (CapacityDashboard, capacity_figure, depth_over_text, loss_curves, router_histograms,
                                 routed_view)
    model = make("expert").float()
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids)
    assert len(router_histograms(model, out.routing).data) == 6
    token = make("token").float()
    assert len(router_histograms(token, token(ids).routing).data) == 3
    assert len(capacity_figure([1, 2 / 3, 1 / 3], warmup_steps=20).data) == 3
    texts = [[f"t{i}" for i in range(12)]] * 2
    assert depth_over_text(texts, out.routing.loops.tolist(), 3).data[0].zmax == 3
    few, _ = routed_view(model, ids, capacity_scale=0.1)
    many, _ = routed_view(model, ids, capacity_scale=1.5)
    assert few.float().mean() < out.routing.loops.float().mean() < many.float().mean()
    board = CapacityDashboard(model, ids, texts)
    loops, loss = board.update(0.5, 0.05)
    assert model.router.config.alpha == 0.1 and math.isfinite(loss)  # settings restored after the update
    assert "loss" in board.summary.value
    with pytest.raises(ValueError, match="expert"):
        CapacityDashboard(token, ids, texts)


def test_router_settings_scale_recursions_after_the_first_and_keep_its_own_capacity():
    from mor_lab.viz.mor import router_settings
    model = make("expert", capacity=[0.8, 0.5, 0.25]).float()
    with router_settings(model, capacity_scale=2.0, alpha=0.3) as config:
        assert config.capacity == [0.8, 1.0, 0.5] and config.alpha == 0.3  # recursion 0 keeps 0.8, not 1
    assert model.router.config.capacity == [0.8, 0.5, 0.25]  # restored

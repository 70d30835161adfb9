"""Mixture-of-Recursions on the one engine: routed decoding equals the training pass (both KV schemes),
static batching equals continuous depth-wise batching and each sequence alone, the KV layouts hold
what the formulas say, and decode-time routing agrees with itself when forced."""
import pytest
import torch

import mor_lab
from mor_lab.engine.policies import RoutedDepth
from mor_lab.engine.scheduler import Scheduler
from mor_lab.mor import MoRConfig, MoRModel, RouterConfig, decode_routing, topk_agreement

DIMS = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4,
                           num_kv_heads=2)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21], [22, 23, 24]]
ROUTED = [(k, s) for k in ("expert", "token") for s in ("recursion", "share")]


def make(kind="expert", scheme="recursion", n=3, std=0.3, **router):
    router = RouterConfig(init_std=1.0, **router)
    return MoRModel(MoRConfig(DIMS, kind=kind, num_recursions=n, kv_scheme=scheme, router=router,
                              init_std=std)).double().eval()


@pytest.mark.parametrize("kind,scheme", ROUTED + [("recursive", "recursion"), ("recursive", "share")])
@pytest.mark.parametrize("prefill", [1, 6])
@torch.no_grad()
def test_decoding_through_the_engine_equals_the_training_pass(kind, scheme, prefill):
    model = make(kind, scheme)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(3))
    out = model(ids)
    loops = out.routing.loops
    if kind != "recursive":
        assert len(set(loops.flatten().tolist())) == 3  # really mixed depths
    logp = out.logits.log_softmax(-1)
    prompts, rest = ids[:, :prefill].tolist(), ids[:, prefill:].tolist()
    _, trace = mor_lab.generate_ids(model, prompts, forced=rest, policy=RoutedDepth(forced=loops), exact=True)
    for b in range(3):
        for i, t in enumerate(trace.tokens[b]):
            position = prefill - 1 + i
            assert abs(t.logprob - float(logp[b, position, ids[b, position + 1]])) < 1e-9
            assert len(t.steps) == 2 + 2 * int(loops[b, position])  # prelude + loops x K + coda


@pytest.mark.parametrize("n", [2, 3, 4])
@torch.no_grad()
def test_kv_layouts_hold_what_the_formulas_say(n):
    dims = mor_lab.ModelConfig(**{**DIMS.to_dict(), "num_layers": 2 + 2 * n})
    T = 12 * n
    for scheme, formula in (("recursion", (n + 1) / (2 * n)), ("share", 1 / n)):
        model = MoRModel(MoRConfig(dims, kind="expert", num_recursions=n, kv_scheme=scheme)).double().eval()
        ids = torch.randint(0, 64, (2, T))
        loops = model(ids).routing.loops
        engine = Scheduler(model, RoutedDepth(forced=loops), eos_token_ids=[])
        engine.run(ids.tolist(), 1)
        st, cache = model.structure, engine.cache
        loop_steps = [s for r in range(st.loops) for s in st.loop_steps(r)]
        pages = sorted({cache.pages(s) for s in loop_steps})
        held = int(cache.lengths[pages].sum())  # tokens really written into the loops' pages
        assert held / (2 * T * st.loops * st.block) == pytest.approx(formula, abs=1 / T)
        allocated = len(pages) / len(loop_steps)  # sharing allocates loop 0's pages only
        assert allocated == pytest.approx(1.0 if scheme == "recursion" else 1 / n)
        entries = model.kv_entries_per_token(float(loops.float().mean())) - st.prelude - st.coda
        assert entries / (st.loops * st.block) == pytest.approx(formula, abs=1 / T)


@pytest.mark.parametrize("kind,scheme", ROUTED + [("recursive", "recursion")])
def test_cdb_with_routed_depth_equals_static_and_each_sequence_alone(kind, scheme):
    model = make(kind, scheme)
    static, static_trace = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=RoutedDepth())
    for slots in (1, 3, 8):
        cdb, trace = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=RoutedDepth(), slots=slots,
                                          mode="continuous")
        assert cdb == static
    for i, prompt in enumerate(PROMPTS):
        alone, _ = mor_lab.generate_ids(model, [prompt], 6, eos_token_ids=[], policy=RoutedDepth(),
                                        mode="continuous")
        assert alone[0] == static[i]
    depths = {len(t.steps) for seq in trace.tokens for t in seq[1:]}
    assert depths == ({8} if kind == "recursive" else {4, 6, 8})
    assert depths == {len(t.steps) for seq in static_trace.tokens for t in seq[1:]}


def test_routed_decoding_with_eos_static_and_continuous():
    model = make("token", "recursion")
    free_run, _ = mor_lab.generate_ids(model, PROMPTS, 8, eos_token_ids=[], policy=RoutedDepth())
    eos = free_run[0][2]
    with_eos, _ = mor_lab.generate_ids(model, PROMPTS, 8, eos_token_ids=[eos], policy=RoutedDepth())
    cdb, _ = mor_lab.generate_ids(model, PROMPTS, 8, eos_token_ids=[eos], policy=RoutedDepth(), slots=3,
                                  mode="continuous", head_rule="cost")
    for got, via_cdb, ref in zip(with_eos, cdb, free_run):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert got == ref[:cut] == via_cdb


@torch.no_grad()
def test_topk_agreement_and_decode_routing():
    model = make("expert")
    ids = torch.randint(0, 64, (2, 15))
    agreement = topk_agreement(model, ids)
    assert len(agreement["per_loop"]) == 2 and all(0 <= a <= 1 for a in agreement["per_loop"])
    assert 1 <= agreement["decode_mean_loops"] <= 3
    forced = topk_agreement(model, ids, forced=agreement["train_loops"])
    assert forced["depth"] == 1.0  # with the training decisions forced, decoding agrees everywhere
    routed = decode_routing(model, ids)
    assert routed.shape == ids.shape and torch.equal(routed, agreement["decode_loops"])


@torch.no_grad()
def test_capacity_below_one_routes_loop_zero_at_decode_time_too():
    from mor_lab.mor import calibrate_thresholds
    model = make("expert", capacity=[0.7, 0.5, 0.25])
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(6))
    calibrate_thresholds(model, ids)  # decode thresholds at the top-k boundaries, loop 0's included
    agreement = topk_agreement(model, ids)
    assert agreement["loops"] == [0, 1, 2] and min(agreement["per_loop"]) > 0.5
    routed = decode_routing(model, ids)
    assert int(routed.min()) == 0  # some tokens skip the shared block entirely
    out, trace = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=RoutedDepth())
    cdb, _ = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=RoutedDepth(), slots=3,
                                  mode="continuous")
    assert cdb == out


def test_routed_policy_needs_a_mor_model():
    with pytest.raises(ValueError, match="needs a MoRModel"):
        mor_lab.generate_ids(mor_lab.random_decoder(num_layers=3), [[1, 2]], 2, policy=RoutedDepth())

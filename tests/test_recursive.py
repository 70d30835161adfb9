"""Relaxed recursive transformers: sharing strategies, initializations, SVD relaxation, merge, uptraining.

Expected ties and sources are computed here straight from the formulas of ALGORITHMS.md section 2
(and the reference's ``round(linspace(...))`` subsampling), independently of mor_lab.recursive.sharing.
"""
import time

import numpy as np
import pytest
import torch

import mor_lab
from mor_lab.recursive import (INITIALIZATIONS, STRATEGIES, RecursiveConfig, RelaxConfig, SharingPlan, UptrainConfig,
                               convert, count_parameters, distill_kl, init_sources, merge, parameter_counts,
                               relative_residuals, relax, residual_by_rank, select_layers, svd_factors, unmerge, uptrain)

CASES = [(4, 2), (6, 2), (6, 3), (7, 2), (7, 3), (8, 3), (9, 2), (10, 4), (12, 5), (30, 2), (30, 3), (30, 4)]
FULL = dict(attn_rank=None, mlp_rank=None)


# ---------------------------------------------------------------------------------------------------
# Expected layouts, from the formulas

def expected_layout(L, N, strategy):
    """(K, kept original layers in step order, groups: shared layer i -> tied original layers)."""
    middle = strategy.startswith("middle")
    K = ((L - 2) if middle else L) // N
    lo, hi = (1, L - 2) if middle else (0, L - 1)
    inner = [int(x) for x in np.rint(np.linspace(lo, hi, K * N))]  # np.rint rounds halves to even, like round()
    kept = [0] + inner + [L - 1] if middle else inner
    if strategy.endswith("cycle"):
        groups = [[inner[i + r * K] for r in range(N)] for i in range(K)]
    else:
        groups = [inner[i * N:(i + 1) * N] for i in range(K)]
    return K, kept, groups


def expected_sources(L, N, strategy, init):
    """Original layers each shared layer starts from (random excluded: it has no fixed answer)."""
    K, kept, groups = expected_layout(L, N, strategy)
    n = len(kept)
    lo, hi = (1, n - 2) if strategy.startswith("middle") else (0, n - 1)
    positions = {"stepwise": [int(x) for x in np.rint(np.linspace(lo, hi, K))],
                 "lower": list(range(lo, lo + K)),
                 "upper": list(range(hi - K + 1, hi + 1))}
    if init == "average":
        return [tuple(g) for g in groups]
    return [(kept[p],) for p in positions[init]]


def tiny(num_layers=6, seed=0, **overrides):
    """A random model with varied norm weights, so that tied and per-position norms differ."""
    config = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=num_layers,
                                 num_heads=4, num_kv_heads=2, max_position_embeddings=64, **overrides)
    model = mor_lab.random_decoder(config, seed=seed, std=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
    return model


def ids(batch=2, length=12, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Sharing plans

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("L,N", CASES)
def test_strategy_ties_the_layers_the_formulas_say(L, N, strategy):
    if strategy.startswith("middle") and L - 2 < N:
        pytest.skip("too few middle layers")
    K, kept, groups = expected_layout(L, N, strategy)
    plan = SharingPlan.build(L, N, strategy)
    assert plan.base_depth == K and plan.num_steps == len(kept) and plan.kept_layers == tuple(kept)
    assert [list(plan.groups()[j]) for j in plan.shared_layers] == groups
    assert plan.dropped_layers == tuple(sorted(set(range(L)) - set(kept)))
    assert (not plan.dropped_layers) == (K * N == (L - 2 if strategy.startswith("middle") else L))
    # Loops: each loop runs every shared layer once; cycle repeats the block, sequence repeats each layer.
    for r in range(N):
        assert sorted(plan.plan[s] for s in plan.loop_steps(r)) == list(plan.shared_layers)
    looped = [s.layer for s in plan.steps if s.loop is not None]
    block = list(plan.shared_layers)
    assert looped == (block * N if strategy.endswith("cycle") else [j for j in block for _ in range(N)])
    if strategy.startswith("middle"):
        first, last = plan.steps[0], plan.steps[-1]
        assert (first.loop, first.original, last.loop, last.original) == (None, 0, None, L - 1)
        assert plan.unique_layers == (0, K + 1) and plan.num_physical_layers == K + 2
    else:
        assert plan.unique_layers == () and plan.num_physical_layers == K
    m = plan.matrix()
    assert m.shape == (plan.num_steps, plan.num_physical_layers) and m.sum(1).eq(1).all()
    assert m.argmax(1).tolist() == plan.plan


def test_a_few_layouts_by_hand():
    assert SharingPlan.build(6, 3, "cycle").groups() == {0: (0, 2, 4), 1: (1, 3, 5)}
    assert SharingPlan.build(6, 3, "sequence").groups() == {0: (0, 1, 2), 1: (3, 4, 5)}
    assert SharingPlan.build(8, 3, "middle_cycle").groups() == {0: (0,), 1: (1, 3, 5), 2: (2, 4, 6), 3: (7,)}
    plan = SharingPlan.build(7, 2, "middle_sequence")  # linspace(1, 5, 4) = 1, 2.33, 3.67, 5: layer 3 is dropped
    assert plan.groups() == {0: (0,), 1: (1, 2), 2: (4, 5), 3: (6,)} and plan.dropped_layers == (3,)
    assert plan.plan == [0, 1, 1, 2, 2, 3]
    text = str(plan)
    assert "middle_sequence" in text and "dropped" in text and len(text.splitlines()) == 2 + 6 + 1


@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("L,N", [(6, 2), (7, 2), (8, 3), (10, 4), (30, 2), (30, 4)])
def test_init_sources_follow_the_formulas(L, N, strategy, init):
    plan = SharingPlan.build(L, N, strategy)
    sources = init_sources(plan, init)
    shared = [sources[j] for j in plan.shared_layers]
    assert shared == expected_sources(L, N, strategy, init)
    if strategy.startswith("middle"):
        assert sources[0] == (0,) and sources[-1] == (L - 1,)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_init_is_a_seeded_sorted_choice(strategy):
    plan = SharingPlan.build(30, 3, strategy)
    draws = {init_sources(plan, "random", seed) for seed in range(5)}
    assert len(draws) > 1 and init_sources(plan, "random", 3) == init_sources(plan, "random", 3)
    lo, hi = (1, 28) if strategy.startswith("middle") else (0, 29)
    for sources in draws:
        chosen = [s[0] for s in (sources[1:-1] if strategy.startswith("middle") else sources)]
        assert chosen == sorted(set(chosen)) and len(chosen) == plan.base_depth
        assert all(lo <= c <= hi and c in plan.kept_layers for c in chosen)


def test_bad_names_and_sizes_are_value_errors():
    with pytest.raises(ValueError, match="allowed: cycle, sequence, middle_cycle, middle_sequence"):
        RecursiveConfig(strategy="loop")
    with pytest.raises(ValueError, match="allowed: stepwise, average, lower, upper, random"):
        RecursiveConfig(init="first")
    with pytest.raises(ValueError, match="allowed: cycle, sequence"):
        SharingPlan.build(6, 2, "spiral")
    with pytest.raises(ValueError, match="allowed: stepwise"):
        init_sources(SharingPlan.build(6, 2), "median")
    with pytest.raises(ValueError, match="num_recursions"):
        RecursiveConfig(num_recursions=0)
    with pytest.raises(ValueError, match="num_recursions=5"):
        SharingPlan.build(6, 5, "middle_cycle")
    with pytest.raises(ValueError, match="num_layers >= 3"):
        SharingPlan.build(2, 1, "middle_cycle")
    with pytest.raises(ValueError, match="RelaxConfig.attn_rank"):
        RelaxConfig(attn_rank=-1)
    with pytest.raises(ValueError, match="UptrainConfig.steps"):
        UptrainConfig(steps=0)
    model = tiny()
    recursive = convert(model, num_recursions=2).model
    with pytest.raises(ValueError, match="vanilla"):
        convert(recursive)
    assert RecursiveConfig(strategy="CYCLE", init="Lower").strategy == "cycle"


# ---------------------------------------------------------------------------------------------------
# Conversion

@pytest.mark.parametrize("init", INITIALIZATIONS)
@pytest.mark.parametrize("strategy,L,N", [("cycle", 6, 3), ("sequence", 7, 2), ("middle_cycle", 8, 3),
                                          ("middle_sequence", 9, 2)])
@pytest.mark.parametrize("tie_norms", [False, True])
def test_convert_starts_each_shared_layer_from_its_sources(strategy, L, N, init, tie_norms):
    model = tiny(L)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conversion = convert(model, strategy=strategy, num_recursions=N, init=init, tie_norms=tie_norms, seed=1)
    recursive, plan = conversion.model, conversion.sharing
    assert recursive.plan == plan.plan and recursive.config.num_layers == plan.num_physical_layers
    assert conversion.sources == init_sources(plan, init, seed=1)
    for j, source in enumerate(conversion.sources):
        for name, value in recursive.layers[j].state_dict().items():
            expected = torch.stack([model.layers[i].state_dict()[name] for i in source]).mean(0)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    for s in plan.steps:
        delta = recursive.delta(s.step)
        if tie_norms or s.loop is None:
            assert delta is None
        else:
            for name in ("input_layernorm", "post_attention_layernorm"):
                assert torch.equal(delta.norms[name], getattr(model.layers[s.original], name).weight)
    assert torch.equal(recursive.embed_tokens.weight, model.embed_tokens.weight)
    assert recursive.lm_head.weight is recursive.embed_tokens.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert conversion.params_before == count_parameters(model)
    assert conversion.params_after == count_parameters(recursive) < conversion.params_before
    assert str(plan) in str(conversion)


# ---------------------------------------------------------------------------------------------------
# Relaxation

@pytest.mark.parametrize("shape", [(20, 7), (7, 20), (9, 9)])
@pytest.mark.parametrize("rank", [3, 100])
def test_svd_factors_are_the_truncated_svd(shape, rank):
    R = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A, B = svd_factors(R, rank)
    r = min(rank, *shape)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    torch.testing.assert_close(B @ A, (U[:, :r] * S[:r]) @ Vh[:r], rtol=0, atol=1e-12)
    torch.testing.assert_close(B.norm(dim=0), S[:r], rtol=0, atol=1e-12)  # B = U S: column norms are S
    torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=A.dtype), rtol=0, atol=1e-12)  # A = V^T
    A0, B0 = svd_factors(torch.zeros(*shape), rank)
    assert torch.equal(A0, torch.eye(r, shape[1], dtype=A0.dtype)) and not B0.any()  # still trainable


@pytest.mark.parametrize("strategy,L,N,init", [("cycle", 6, 2, "stepwise"), ("sequence", 6, 3, "average"),
                                               ("middle_cycle", 8, 2, "random"), ("middle_sequence", 8, 3, "lower"),
                                               ("cycle", 7, 3, "upper"), ("middle_cycle", 9, 2, "average"),
                                               ("middle_sequence", 9, 3, "stepwise"), ("sequence", 7, 2, "random")])
def test_full_rank_relaxation_reproduces_the_original(strategy, L, N, init):
    """With per-position norms and full-rank LoRA every step computes its original layer exactly.
    When L does not divide, the reference drops layers: the match is with the subsampled model."""
    model = tiny(L)
    conversion = convert(model, strategy=strategy, num_recursions=N, init=init)
    relaxed = relax(conversion.model, model, conversion.sharing, **FULL)
    x = ids()
    with torch.no_grad():
        target = select_layers(model, list(conversion.sharing.kept_layers))(x)
        if not conversion.sharing.dropped_layers:
            assert torch.equal(target, model(x))
        torch.testing.assert_close(relaxed(x), target, rtol=0, atol=1e-5)


def test_tied_norms_are_not_undone_by_full_rank_lora():
    model = tiny(6)
    conversion = convert(model, strategy="cycle", num_recursions=2, init="average", tie_norms=True)
    relaxed = relax(conversion.model, model, conversion.sharing, **FULL)
    x = ids()
    with torch.no_grad():
        assert (relaxed(x) - model(x)).abs().max() > 1e-3  # LoRA acts on weights, not on the norms before them


def test_lower_rank_lands_in_between():
    model = tiny(8)
    conversion = convert(model, strategy="middle_cycle", num_recursions=3, init="average")
    x = ids(length=16)
    errors, residuals = [], []
    with torch.no_grad():
        target = model(x)
        for rank in (0, 2, 8, 16, None):
            relax(conversion.model, model, conversion.sharing, attn_rank=rank, mlp_rank=rank)
            errors.append((conversion.model(x) - target).abs().mean().item())
            residuals.append(sum(relative_residuals(conversion.model, model, conversion.sharing).values()))
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors), errors
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 1e-6, residuals
    assert errors[-1] < 1e-5
    counts = parameter_counts(conversion.model)
    assert counts["lora"] > 0 and counts["total"] == count_parameters(conversion.model)


def test_residual_by_rank_is_what_relax_leaves_at_each_rank():
    model = tiny(8)
    conversion = convert(model, strategy="middle_cycle", num_recursions=3, init="average")
    curves = residual_by_rank(conversion.model, model, conversion.sharing)
    full = min(model.layers[0].self_attn.q_proj.weight.shape)
    assert curves.residual["q_proj"].shape == (full + 1,) and curves.left(curves.full_rank) < 1e-6
    for name, curve in curves.residual.items():
        assert torch.all(curve[1:] <= curve[:-1] + 1e-7), name  # more rank never leaves more
    for rank in (0, 2, 5, None):
        relax(conversion.model, model, conversion.sharing, attn_rank=rank, mlp_rank=rank)
        rank = curves.full_rank if rank is None else rank
        measured = relative_residuals(conversion.model, model, conversion.sharing)
        for name, value in measured.items():
            curve = curves.residual[name]
            assert abs(curve[min(rank, len(curve) - 1)].item() - value) < 1e-5, (name, rank)
        assert curves.lora_parameters(rank) == parameter_counts(conversion.model)["lora"]


def test_attention_and_mlp_ranks_are_separate():
    model = tiny(6)
    conversion = convert(model, strategy="cycle", num_recursions=2)
    relax(conversion.model, model, conversion.sharing, attn_rank=3, mlp_rank=0)
    for s in conversion.sharing.steps:
        lora = conversion.model.delta(s.step).lora
        assert sorted(lora) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert all(m.A.shape[0] == 3 for m in lora.values())


def test_merge_unrolls_and_unmerge_inverts():
    model = tiny(7)
    conversion = convert(model, strategy="middle_sequence", num_recursions=2, init="stepwise")
    relaxed = relax(conversion.model, model, conversion.sharing, attn_rank=4, mlp_rank=4)
    merged = merge(relaxed)
    assert merged.plan == list(range(relaxed.num_steps)) and len(merged.step_deltas) == 0
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), relaxed(x), rtol=0, atol=1e-5)
        back = unmerge(merged, relaxed, conversion.sharing, **FULL)  # full rank: exactly the merged model
        torch.testing.assert_close(back(x), merged(x), rtol=0, atol=1e-5)
        low = unmerge(merged, relaxed, conversion.sharing, attn_rank=4, mlp_rank=4)  # the same rank-4 deltas
        torch.testing.assert_close(low(x), relaxed(x), rtol=0, atol=1e-5)
        scaled = unmerge(merged, relaxed, conversion.sharing, **FULL, lora_scale=2.0)  # B absorbs the scale
        assert all(m.scale == 2.0 for s in conversion.sharing.steps if s.loop is not None
                   for m in scaled.delta(s.step).lora.values())
        torch.testing.assert_close(scaled(x), merged(x), rtol=0, atol=1e-5)
    full = merge(relax(conversion.model, model, conversion.sharing, **FULL))
    for s in conversion.sharing.steps:  # full rank: the unrolled layers are the original layers
        for name, value in full.layers[s.step].state_dict().items():
            torch.testing.assert_close(value, model.layers[s.original].state_dict()[name], rtol=0, atol=1e-6)


def test_save_load_is_bit_identical(tmp_path):
    model = tiny(9)
    conversion = convert(model, strategy="middle_cycle", num_recursions=3, init="random", seed=3)
    relaxed = relax(conversion.model, model, conversion.sharing, attn_rank=3, mlp_rank=5)
    relaxed.save(tmp_path)
    loaded = mor_lab.Decoder.load(tmp_path)
    assert loaded.plan == relaxed.plan
    state, loaded_state = relaxed.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), relaxed(x))


def test_recursive_model_decodes_with_the_engine():
    """The engine's cached decoding of a relaxed recursive model picks the full forward pass's tokens."""
    model = tiny(8)
    conversion = convert(model, strategy="middle_cycle", num_recursions=3)
    relaxed = relax(conversion.model, model, conversion.sharing, attn_rank=2, mlp_rank=2)
    prompt = ids(batch=1, length=5)[0].tolist()
    generated, _ = mor_lab.generate_ids(relaxed, [prompt], max_new_tokens=4)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            tokens.append(int(relaxed(torch.tensor([tokens]))[0, -1].argmax()))
    assert list(generated[0]) == tokens[len(prompt):]


# ---------------------------------------------------------------------------------------------------
# Uptraining

def test_uptraining_lowers_the_kl_and_is_seeded(tmp_path):
    teacher = tiny(6)
    stream = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))
    held_out = ids(batch=4, length=16, seed=99)
    config = UptrainConfig(steps=8, batch_size=4, seq_len=16, lr=1e-2, seed=0)
    runs = []
    for checkpoint in (tmp_path / "a", None):
        conversion = convert(teacher, strategy="middle_cycle", num_recursions=2, init="stepwise")
        student = relax(conversion.model, teacher, conversion.sharing, attn_rank=2, mlp_rank=2)
        before = distill_kl(student, teacher, held_out)
        result = uptrain(student, teacher, stream, config, progress=False, checkpoint=checkpoint)
        runs.append(result.losses)
        after = distill_kl(student, teacher, held_out)
        assert len(result.losses) == 8 and after < 0.9 * before, (before, after)
        assert all(p.requires_grad for p in student.parameters())  # requires_grad flags restored after training
    assert runs[0] == runs[1]
    loaded = mor_lab.Decoder.load(tmp_path / "a")
    assert (tmp_path / "a" / "uptrain.json").exists()
    with torch.no_grad():
        assert distill_kl(loaded, teacher, held_out) == pytest.approx(after, rel=1e-4)


def test_uptrain_needs_something_to_train():
    teacher = tiny(6)
    student = convert(teacher, strategy="cycle", num_recursions=2, tie_norms=True).model
    with pytest.raises(ValueError, match="nothing to train"):
        uptrain(student, teacher, torch.arange(200) % 64, steps=1, progress=False)
    result = uptrain(student, teacher, torch.arange(200) % 64, steps=2, seq_len=8, train_shared=True, progress=False)
    assert len(result.losses) == 2


# ---------------------------------------------------------------------------------------------------
# SmolLM2

@pytest.mark.smollm2
def test_full_rank_relaxation_of_smollm2_reproduces_its_logits(smollm2):
    """MIDDLE_CYCLE with 2 loops, fp32: 14 shared layers + prelude + coda, full-rank LoRA on the 14 steps
    whose original layer is not the shared one (``init="lower"``: the other 14 are the sources themselves)."""
    model, tokenizer = smollm2
    text = mor_lab.train.load_corpus("pydoc", max_chars=20_000).validation
    x = mor_lab.train.tokenize(tokenizer, text)[:64][None]
    start = time.perf_counter()
    conversion = convert(model, strategy="middle_cycle", num_recursions=2, init="lower")
    relaxed = relax(conversion.model, model, conversion.sharing, **FULL)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        diff = (relaxed(x) - model(x)).abs().max().item()
    print(f"SmolLM2 middle_cycle x2, full rank: max |logit diff| = {diff:.2e}; convert + relax {seconds:.1f} s")
    assert conversion.model.config.num_layers == 16 and conversion.sharing.num_steps == 30
    assert diff <= 1e-4

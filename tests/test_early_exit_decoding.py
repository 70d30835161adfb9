"""Batched early-exit decoding on the one engine: exactness at 'never exit', batch invariance (static and
continuous mode), FREE's KV cache, state propagation."""
import pytest
import torch

import mor_lab
from mor_lab.early_exit.threshold import AdaptiveThreshold
from mor_lab.engine.policies import CalmExit, FreeDecoding, StaticExit
from mor_lab.engine.scheduler import Scheduler

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
NEVER = 2.0  # confidences are <= 1: no token ever exits early


@pytest.fixture(scope="module")
def model():
    return mor_lab.random_decoder(num_layers=6, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
                                  seed=3, std=0.4)  # peaked distributions: some tokens confident, some not


def policies(threshold):
    return [StaticExit(6) if threshold == NEVER else StaticExit(2),
            CalmExit(threshold, [2, 4], measure="margin"),
            CalmExit(threshold, [2, 4], measure="margin", per_row=True),
            CalmExit(threshold, [2, 3, 4, 5], measure="softmax", per_row=True),
            FreeDecoding(2, threshold),
            FreeDecoding(2, AdaptiveThreshold())]


def run(model, prompts, policy, n=12, **engine):
    return mor_lab.generate_ids(model, prompts, n, eos_token_ids=[], policy=policy, **engine)


@pytest.mark.parametrize("index", range(5))
def test_never_exit_equals_full_model_batched_and_alone(model, index):
    full, _ = run(model, PROMPTS, None)
    got, trace = run(model, PROMPTS, policies(NEVER)[index])
    assert got == full
    assert trace.mean_steps_per_token() == 6
    for prompt, expected in zip(PROMPTS, full):
        assert run(model, [prompt], policies(NEVER)[index])[0][0] == expected


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("index", [2, 3, 4])
def test_per_row_policies_do_not_depend_on_the_batch(model, threshold, index):
    batched, trace = run(model, PROMPTS, policies(threshold)[index])
    assert 2 < trace.mean_steps_per_token() < 6  # some tokens exit early, some do not
    alone = [run(model, [p], policies(threshold)[index])[0][0] for p in PROMPTS]
    assert batched == alone
    continuous, _ = run(model, PROMPTS + PROMPTS[:2], policies(threshold)[index], slots=2, mode="continuous")
    assert continuous[:len(PROMPTS)] == batched  # a freed slot takes the next request: same tokens


@pytest.mark.parametrize("index", range(6))
def test_record_predictions_works_for_every_policy(model, index):
    ids, trace = run(model, PROMPTS[:2], policies(0.3)[index], n=5, record_predictions=True)
    for seq, out in zip(trace.tokens, ids):
        for t, token in zip(seq, out):
            assert len(t.top1) == len(t.steps) == len(t.confidence) > 0  # the lens after every step it ran
            assert all(0 < c <= 1 for c in t.confidence)
            if t.steps[-1] == model.num_steps - 1 and not t.deferred:
                assert t.top1[-1] == token  # after the last layer the lens is the emitted greedy token


def test_free_defers_confident_tokens_and_records_it(model):
    out, trace = run(model, PROMPTS, FreeDecoding(2, 0.0))  # every decode-step token is confident
    tokens = [t for seq in trace.tokens for t in seq[1:]]  # the first token comes from the full prefill
    assert all(t.deferred and t.steps == [0, 1] for t in tokens)
    assert {s.kind for s in trace.engine_steps} == {"prefill", "shallow"}


def test_calm_batch_semantics_waits_for_the_slowest_row(model):
    _, batch_trace = run(model, PROMPTS, CalmExit(0.1, [2, 4], measure="margin"))
    _, row_trace = run(model, PROMPTS, CalmExit(0.1, [2, 4], measure="margin", per_row=True))
    assert batch_trace.mean_steps_per_token() > row_trace.mean_steps_per_token()
    for step in batch_trace.engine_steps[1:]:  # in batch semantics a row never idles inside a step
        assert "idle" not in step.activity and "wait" not in step.activity
    assert any("wait" in step.activity for step in row_trace.engine_steps)  # per row: exited rows wait


class Scripted(FreeDecoding):
    """FREE with a scripted confidence pattern: the tokens of index ``deep_at`` (0 = the first generated
    token) are not confident, every other one is."""

    def __init__(self, shallow_layer, deep_at):
        super().__init__(shallow_layer, 0.0)
        self.deep_at = set(deep_at)

    def decide(self, tokens, h, ctx):
        self.fixed = NEVER if int(ctx.index.max()) in self.deep_at else -1.0
        return super().decide(tokens, h, ctx)


def test_parallel_deep_pass_fills_the_exact_deep_kv_of_deferred_tokens(model):
    """After FREE's deep pass, the deep-layer cache equals the full model's for every deferred token."""
    prompts, n_new = [[1, 2, 3], [4, 5, 6, 7, 8]], 9
    engine = Scheduler(model, Scripted(2, deep_at={4, 8}), eos_token_ids=[])  # tokens 1-3 and 5-7 deferred
    ids, trace = engine.run(prompts, n_new)
    assert sum(t.deferred for t in trace.tokens[0]) == 6
    for row, prompt in enumerate(prompts):
        seq = prompt + ids[row][:8]  # tokens fed back; the deep pass computing token 8 caught up tokens 4..7
        full = Scheduler(model, eos_token_ids=[])
        full.run([seq], 1)
        for step in range(2, model.num_steps):  # the deep steps
            page = engine.cache.pages(step)
            got_k, got_v = engine.cache.k[page][row, :, :len(seq)], engine.cache.v[page][row, :, :len(seq)]
            want_k, want_v = full.cache.k[page][0, :, :len(seq)], full.cache.v[page][0, :, :len(seq)]
            assert torch.allclose(got_k, want_k, atol=1e-4), (row, step)  # float32, batched vs alone: summation order
            assert torch.allclose(got_v, want_v, atol=1e-4), (row, step)


def test_static_and_calm_fill_skipped_kv_by_state_propagation(model):
    """Skipped steps get K/V computed from the exited hidden state, never left as zeros."""
    engine = Scheduler(model, StaticExit(2), eos_token_ids=[])
    ids, _ = engine.run([[1, 2, 3]], 2)  # token 0 from the full prefill, then token 0 is fed at position 3
    with torch.no_grad():
        _, hidden = model(torch.tensor([[1, 2, 3, ids[0][0]]]), return_hidden=True)
        h = hidden[2][0, 3:4]  # its state after 2 steps
        rope = model.rope(torch.tensor([3]))
        for step in range(2, 6):
            layer = model.layers[step]
            k, v = layer.self_attn.project_kv(layer.input_layernorm(h), rope)
            page = engine.cache.pages(step)
            assert torch.allclose(engine.cache.k[page][0, :, 3], k[0], atol=1e-5)
            assert torch.allclose(engine.cache.v[page][0, :, 3], v[0], atol=1e-5)


def test_invalid_exit_configuration_is_rejected(model):
    with pytest.raises(ValueError, match="shallow_layer"):
        run(model, PROMPTS, FreeDecoding(6, 0.5))
    with pytest.raises(ValueError, match="exit_layers"):
        run(model, PROMPTS, CalmExit(0.5, [0, 3]))
    with pytest.raises(ValueError, match="measure"):
        CalmExit(0.5, [2], measure="entropy")


def test_without_state_propagation_the_cache_has_holes_and_outputs_change(model):
    full, _ = run(model, PROMPTS, None)
    fixed, _ = run(model, PROMPTS, CalmExit(0.1, [2, 4], measure="margin", per_row=True))
    holes, _ = run(model, PROMPTS, CalmExit(0.1, [2, 4], measure="margin", per_row=True, propagate_state=False))
    assert holes != fixed  # later tokens read zeros where skipped layers' KV should be


@pytest.fixture(scope="module")
def meta_heads(model):
    """Exit heads whose meta classifiers score hidden states randomly (some tokens confident, some not)."""
    from mor_lab.early_exit.heads import ExitConfig, ExitHeads

    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=[2, 4], measure="meta"))
    torch.manual_seed(0)
    with torch.no_grad():
        for classifier in heads.meta.values():
            classifier.linear.weight.normal_(0, 1.0)
    return heads.eval()


@pytest.mark.parametrize("make", [lambda h, t: FreeDecoding(2, t, h, measure="meta"),
                                  lambda h, t: CalmExit(t, [2, 4], measure="meta", per_row=True, heads=h)])
def test_meta_measure_skips_the_exit_head_yet_decodes_exactly(model, meta_heads, make):
    """With a hidden-state measure the exit's LM head runs only for tokens that leave; outputs stay exact:
    'never exit' equals the full model, and any threshold gives the same tokens batched as alone."""
    full, _ = run(model, PROMPTS, None)
    assert run(model, PROMPTS, make(meta_heads, NEVER))[0] == full
    batched, trace = run(model, PROMPTS, make(meta_heads, 0.5))
    assert 2 < trace.mean_steps_per_token() < 6
    assert batched == [run(model, [p], make(meta_heads, 0.5))[0][0] for p in PROMPTS]

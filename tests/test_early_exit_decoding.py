"""Batched early-exit decoding: exactness at 'never exit', batch invariance, and FREE's KV cache."""
import copy

import pytest
import torch

import mor_lab
from mor_lab.early_exit.decoding import CalmExit, StaticExit
from mor_lab.early_exit.free import FreeDecoding
from mor_lab.early_exit.threshold import AdaptiveThreshold
from mor_lab.engine.policy import run_steps
from mor_lab.models.cache import Chunk, KVCache

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


def run(model, prompts, policy, n=12):
    return mor_lab.generate_ids(model, prompts, n, eos_token_ids=[], policy=policy)


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
        assert "idle" not in step.activity


class Scripted(FreeDecoding):
    """FREE with a scripted confidence pattern: decode steps in ``deep_at`` are not confident."""

    def __init__(self, shallow_layer, deep_at):
        super().__init__(shallow_layer, 0.0)
        self.deep_at, self.t = set(deep_at), 0

    @property
    def threshold(self):
        return NEVER if self.t in self.deep_at else -1.0

    def decode(self, x, lengths, cache, t, record=False):
        self.t = t
        return super().decode(x, lengths, cache, t, record)


def test_parallel_deep_pass_fills_the_exact_deep_kv_of_deferred_tokens(model):
    """After FREE's deep pass, the deep-layer cache equals the full model's for every deferred token."""
    prompts, n_new = [[1, 2, 3], [4, 5, 6, 7, 8]], 9
    policy = Scripted(2, deep_at={3, 7})  # tokens of steps 0-2 and 4-6 are deferred, then caught up
    ids, trace = run(model, prompts, policy, n_new)
    assert sum(t.deferred for t in trace.tokens[0]) == 6
    # Replay the same decisions with a cache we can inspect.
    lengths = torch.tensor([len(p) for p in prompts])
    cache = KVCache.for_model(model, 2, 32)
    chunk = Chunk.prefill(lengths)
    flat = torch.tensor([t for p in prompts for t in p])
    with torch.no_grad():
        run_steps(model, model.embed(flat), range(model.num_steps), cache, chunk)
        replay = Scripted(2, deep_at={3, 7})
        replay.begin(model, 2)
        for t in range(8):  # tokens 0..7 are fed back; the pass at step 7 catches up tokens 4..7
            x = model.embed(torch.tensor([ids[0][t], ids[1][t]]))
            replay.decode(x, lengths, cache, t)
            lengths = lengths + 1
        for row, prompt in enumerate(prompts):
            seq = prompt + ids[row][:8]
            reference = KVCache.for_model(model, 1, 32)
            run_steps(model, model.embed(torch.tensor(seq)), range(model.num_steps), reference,
                      Chunk.prefill(torch.tensor([len(seq)])))
            for step in range(2, model.num_steps):  # the deep steps
                got, want = cache.k[step][row, :, :len(seq)], reference.k[step][0, :, :len(seq)]
                assert torch.allclose(got, want, atol=1e-5), (row, step)
                assert torch.allclose(cache.v[step][row, :, :len(seq)], reference.v[step][0, :, :len(seq)],
                                      atol=1e-5)


def test_static_and_calm_fill_skipped_kv_by_state_propagation(model):
    """Skipped steps get K/V computed from the exited hidden state, never left as zeros."""
    lengths = torch.tensor([3])
    cache = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        run_steps(model, model.embed(torch.tensor([1, 2, 3])), range(6), cache, Chunk.prefill(lengths))
        before = copy.deepcopy(cache)
        policy = StaticExit(2)
        policy.begin(model, 1)
        policy.decode(model.embed(torch.tensor([4])), lengths, cache, 0)
        chunk = Chunk.decode(lengths)
        h, _ = run_steps(model, model.embed(torch.tensor([4])), range(2), before, chunk)
    for step in range(2, 6):
        layer = model.layers[step]
        k = layer.self_attn.project(layer.input_layernorm(h), model.rope(chunk.positions))[1]
        assert torch.allclose(cache.k[step][0, :, 3], k[0], atol=1e-5)


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

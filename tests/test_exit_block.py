"""The one-layer exit block: training on cached sequences, its init, and decoding with its own KV page."""
import pytest
import torch

import mor_lab
from mor_lab.early_exit.heads import (ExitConfig, ExitHeads, cache_exit_states, evaluate_exit_heads,
                                      train_exit_heads)
from mor_lab.early_exit.threshold import AdaptiveThreshold
from mor_lab.engine.policies import CalmExit, FreeDecoding, StaticExit

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def model():
    return mor_lab.random_decoder(num_layers=6, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
                                  seed=3, std=0.4)  # peaked distributions: some tokens confident, some not


def block_heads(model, exits, seed=0):
    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=exits, adapter="block"), seed=seed)
    with torch.no_grad():  # a block unlike the last layer, so a wrong KV page shows in the tokens
        for p in heads.adapters.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return heads.eval()


def tokens(shape, seed=0):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def test_block_at_init_is_the_last_layer_applied_at_the_exit(model):
    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=[2, 4], adapter="block"))
    ids = tokens((2, 10))
    _, hidden = model(ids, return_hidden=True)
    rope = model.rope(torch.arange(10).expand(2, 10))
    for e in (2, 4):
        expected = model.head(model.layers[-1](hidden[e], rope))
        torch.testing.assert_close(heads.logits(model, hidden[e], e), expected)
    with pytest.raises(ValueError, match="sequences"):
        heads.adapt(hidden[2].reshape(-1, 32), 2, model)  # packed tokens have no earlier tokens to attend to


def test_training_the_block_lowers_the_loss_and_beats_init(model, tmp_path):
    heads = ExitHeads.for_model(model, ExitConfig(exit_layers=[2], adapter="block"))
    ids = tokens((8, 24), seed=1)
    cache = cache_exit_states(model, ids, [2], scored_from=[4] * 8)  # a prompt of 4, then the scored part
    assert cache.num_scored == 8 * 20 and cache.lengths == [24] * 8
    before = evaluate_exit_heads(model, heads, cache)[2]
    history = train_exit_heads(model, heads, cache, steps=30, lr=3e-3, batch_tokens=60, progress=False,
                               checkpoint=tmp_path)
    after = evaluate_exit_heads(model, heads, cache)[2]
    assert sum(history.loss[-5:]) < sum(history.loss[:5])
    assert after.kl < before.kl and after.tokens == before.tokens == 160
    reloaded = ExitHeads.load(tmp_path)
    assert reloaded.attends and evaluate_exit_heads(model, reloaded, cache)[2] == after


def run(model, prompts, policy, n=10, **engine):
    return mor_lab.generate_ids(model, prompts, n, eos_token_ids=[], policy=policy, **engine)


@torch.inference_mode()
def reference(model, heads, prompt, exit_layer, n=10):
    """Greedy decoding by hand at a static exit, without a cache: the first token from the full model on
    the prompt (prefill runs every layer); each later one from the block run over the whole sequence's
    exit states (the layers before the exit run for every token, so those states are exact)."""
    seq = list(prompt) + [int(model(torch.tensor([prompt]))[0, -1].argmax())]
    for _ in range(n - 1):
        ids = torch.tensor([seq])
        rope = model.rope(torch.arange(len(seq))[None])
        h = model.embed(ids)
        for s in range(exit_layer):
            h = model.run_step(s, h, rope)
        seq.append(int(heads.logits(model, h, exit_layer)[0, -1].argmax()))
    return seq[len(prompt):]


def policies(heads):
    return [StaticExit(2, heads), CalmExit(0.3, [2, 4], measure="margin", per_row=True, heads=heads),
            CalmExit(0.3, [2, 4], measure="meta", per_row=True, heads=heads), FreeDecoding(2, 0.3, heads),
            FreeDecoding(2, AdaptiveThreshold(), heads)]


def test_static_exit_with_a_block_equals_the_block_on_the_whole_sequence(model):
    heads = block_heads(model, [2])
    got, trace = run(model, PROMPTS, StaticExit(2, heads))
    assert got == [reference(model, heads, p, 2) for p in PROMPTS]
    assert sum(p.kind == "layer" for p in trace.passes) > 2 * 10  # the block's passes: its own KV page


@pytest.mark.parametrize("index", range(5))
def test_block_decoding_does_not_depend_on_slots_or_mode(model, index):
    heads = block_heads(model, [2, 4] if index in (1, 2) else [2])
    batched, trace = run(model, PROMPTS, policies(heads)[index])
    alone = [run(model, [p], policies(heads)[index])[0][0] for p in PROMPTS]
    assert batched == alone
    continuous, _ = run(model, PROMPTS + PROMPTS[:2], policies(heads)[index], slots=2, mode="continuous")
    assert continuous[:len(PROMPTS)] == alone
    if index in (1, 3):
        assert 2 < trace.mean_steps_per_token() < 6  # some tokens exit, some do not


def test_the_block_changes_what_the_exit_emits(model):
    plain, _ = run(model, PROMPTS, StaticExit(2))
    block, _ = run(model, PROMPTS, StaticExit(2, block_heads(model, [2])))
    assert plain != block


@pytest.mark.parametrize("index", range(5))
def test_record_predictions_with_a_block(model, index):
    heads = block_heads(model, [2, 4] if index in (1, 2) else [2])
    ids, trace = run(model, PROMPTS[:2], policies(heads)[index], n=5, record_predictions=True)
    plain, _ = run(model, PROMPTS[:2], policies(heads)[index], n=5)
    assert ids == plain
    for seq, out in zip(trace.tokens, ids):
        for t, token in zip(seq, out):
            assert len(t.top1) == len(t.steps) == len(t.confidence) > 0
            if t.steps[-1] == model.num_steps - 1 and not t.deferred:
                assert t.top1[-1] == token

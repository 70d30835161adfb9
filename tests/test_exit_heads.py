"""Confidence measures, exit heads, FREE/CALM losses and exit-head training (tiny models; once on SmolLM2)."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import mor_lab
import mor_lab.train
from mor_lab.early_exit.confidence import CANONICAL_MEASURES, MEASURE_ALIASES, MetaClassifier, calm_threshold, confidence
from mor_lab.early_exit.heads import (ExitConfig, ExitHeads, cache_exit_states, evaluate_exit_heads, exit_objective,
                                      free_layer_map, free_shallow_layers, train_exit_heads)
from mor_lab.train.losses import (calm_loss, calm_weights, free_loss, hidden_mse, kl_distill, meta_loss,
                                  next_token_targets)


def tiny_model(seed=0):
    """A random 4-layer decoder whose (tied) embeddings are scaled up: with N(0, 0.02) weights every
    distribution is nearly uniform and an exit head has nothing to learn."""
    model = mor_lab.random_decoder(mor_lab.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                       num_layers=4, num_heads=4, num_kv_heads=2), seed=seed)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(10)
    return model


def random_tokens(shape, vocab=97, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- confidence measures ---------------------------------------------------------------------------

def test_softmax_and_margin_on_hand_made_logits():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]]).clamp_min(1e-30).log()
    torch.testing.assert_close(confidence("softmax", logits=logits), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(confidence("margin", logits=logits), torch.tensor([0.2, 0.0]))
    # any leading shape: [B, T, V] -> [B, T]
    assert confidence("margin", logits=logits.view(1, 2, 4)).shape == (1, 2)


def test_state_is_cosine_of_consecutive_hidden_states():
    hidden = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    prev = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    torch.testing.assert_close(confidence("state", hidden=hidden, prev_hidden=prev),
                               torch.tensor([0.0, 1.0, -1.0, 24 / 25]))


def test_meta_is_logistic_regression_on_the_normalised_state():
    clf = MetaClassifier(2)
    assert confidence("meta", hidden=torch.randn(3, 2), classifier=clf).tolist() == [0.5] * 3  # zero-initialised
    with torch.no_grad():
        clf.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
        clf.linear.bias.fill_(0.5)
    hidden = torch.tensor([[3.0, 4.0], [30.0, 40.0]])  # same direction: the norm does not matter
    rms = math.sqrt((9 + 16) / 2)
    expected = 1 / (1 + math.exp(-(3 / rms + 0.5)))
    torch.testing.assert_close(confidence("meta", hidden=hidden, classifier=clf), torch.tensor([expected] * 2))


def test_confidence_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown confidence measure 'entropy'.*margin"):
        confidence("entropy", logits=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="'margin' needs logits"):
        confidence("margin", hidden=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="needs hidden and prev_hidden"):
        confidence("state")
    with pytest.raises(ValueError, match="needs classifier"):
        confidence("meta", hidden=torch.zeros(1, 3))
    assert CANONICAL_MEASURES == ("softmax_max", "softmax_diff", "state", "meta")
    assert MEASURE_ALIASES == {"softmax": "softmax_max", "margin": "softmax_diff"}  # saved heads say "margin"
    with pytest.raises(ValueError, match="ExitConfig.measure = 'entropy'.*softmax_diff"):
        ExitConfig(exit_layers=[2], measure="entropy")


def test_calm_threshold_decays_to_ninety_percent():
    assert calm_threshold(0.8, 0, 100) == pytest.approx(0.8)
    assert calm_threshold(0.8, 100, 100) == pytest.approx(0.72 + 0.08 * math.exp(-4))
    assert calm_threshold(0.8, 25, 100, temperature=2.0) == pytest.approx(0.72 + 0.08 * math.exp(-0.5))
    assert calm_threshold(1.5, 0, 10) == 1.0 and calm_threshold(-0.2, 3, 10) == 0.0
    with pytest.raises(ValueError, match="max_len"):
        calm_threshold(0.9, 0, 0)


# --- exit heads ------------------------------------------------------------------------------------

def test_free_layer_helpers():
    assert free_shallow_layers(24) == 6 and free_shallow_layers(30) == 8 and free_shallow_layers(2) == 1
    assert free_layer_map(24, 6) == [3, 7, 11, 15, 19, 23]
    assert free_layer_map(24, 8) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert free_layer_map(12, 3) == [3, 7, 11]
    assert free_layer_map(30, 8) == [3, 7, 10, 14, 18, 22, 25, 29]  # the uniform rule off the table
    with pytest.raises(ValueError, match="shallow_layers"):
        free_layer_map(24, 24)


def test_exit_config_validation_names_the_field():
    assert ExitConfig([3, 1]).exit_layers == [1, 3]
    for kwargs, field in [({"exit_layers": []}, "exit_layers"), ({"exit_layers": [0]}, "exit_layers"),
                          ({"exit_layers": [2, 2]}, "exit_layers"), ({"exit_layers": [1], "adapter": "mlp"}, "adapter"),
                          ({"exit_layers": [1], "adapter_rank": 0}, "adapter_rank"),
                          ({"exit_layers": [1], "measure": "entropy"}, "measure")]:
        with pytest.raises(ValueError, match=f"ExitConfig.{field}"):
            ExitConfig(**kwargs)
    with pytest.raises(ValueError, match="exit_layers"):
        ExitHeads.for_model(tiny_model(), ExitConfig([4]))  # the full depth is not an exit


@pytest.mark.parametrize("rank", [None, 4])
def test_untrained_adapter_is_exactly_the_logit_lens(rank):
    model = tiny_model()
    _, hidden = model(random_tokens((2, 7)), return_hidden=True)
    heads = ExitHeads.for_model(model, ExitConfig([1, 2], adapter_rank=rank))
    for k in (1, 2):
        assert torch.equal(heads.logits(model, hidden[k], k), model.head(hidden[k]))
    plain = ExitHeads.for_model(model, ExitConfig([2], adapter="none"))
    assert torch.equal(plain.logits(model, hidden[2], 2), model.head(hidden[2]))
    margin = heads.confidence(2, hidden[2], model=model)
    torch.testing.assert_close(margin, confidence("margin", logits=model.head(hidden[2])))


def test_cache_holds_the_exit_and_final_states():
    model, ids = tiny_model(), random_tokens((2, 5))
    _, hidden = model(ids, return_hidden=True)
    cache = cache_exit_states(model, ids, [1, 3])
    assert torch.equal(cache.exits[3], hidden[3].reshape(10, -1))
    assert torch.equal(cache.final, hidden[-1].reshape(10, -1))
    assert cache.targets.view(2, 5)[:, -1].tolist() == [-100, -100]
    assert torch.equal(cache.targets.view(2, 5)[:, :-1], ids[:, 1:])


# --- losses ----------------------------------------------------------------------------------------

def test_free_loss_matches_the_formula_by_hand():
    shallow = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    deep = torch.tensor([[[0.0, 0.0, 3.0], [1.0, 1.0, 0.0]]])
    targets = torch.tensor([[2, -100]])  # the second position has no target

    def ce(row, t):
        return math.log(sum(math.exp(v) for v in row)) - row[t]

    def kl(p_logits, q_logits):  # KL(p || q)
        p, q = F.softmax(torch.tensor(p_logits), -1).tolist(), F.softmax(torch.tensor(q_logits), -1).tolist()
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    ce_s, ce_d = ce([2.0, 0.0, 0.0], 2), ce([0.0, 0.0, 3.0], 2)
    kd = (kl([0.0, 0.0, 3.0], [2.0, 0.0, 0.0]) + kl([1.0, 1.0, 0.0], [0.0, 1.0, 0.0])) / 2
    out = free_loss(shallow, deep, targets, shallow_layers=6, num_layers=24, alpha=0.5)
    assert out.ce_shallow.item() == pytest.approx(ce_s, rel=1e-5)
    assert out.kd.item() == pytest.approx(kd, rel=1e-5)
    assert out.total.item() == pytest.approx((6 * ce_s + 24 * ce_d) / 30 + 0.5 * kd, rel=1e-5)

    # The reference KD: MSE of shallow layer j's output vs teacher layer map[j]'s (hidden[0] = embeddings).
    hidden = torch.arange(5 * 2, dtype=torch.float32).view(5, 1, 1, 2)  # 4 layers
    mse = hidden_mse(hidden, [1, 3])  # layer 0 <- 1, layer 1 <- 3
    assert mse.item() == pytest.approx(((2 - 4) ** 2 + (4 - 8) ** 2) / 2 / 1)
    out = free_loss(shallow, deep, targets, shallow_layers=2, num_layers=4, kd="mse", hidden=hidden,
                    layer_map=[1, 3])
    assert out.total.item() == pytest.approx((2 * ce_s + 4 * ce_d) / 6 + 0.5 * mse.item(), rel=1e-5)
    with pytest.raises(ValueError, match="kd='mse' needs hidden"):
        free_loss(shallow, deep, targets, shallow_layers=2, num_layers=4, kd="mse")


def test_calm_weights_grow_with_depth():
    torch.testing.assert_close(calm_weights([1, 2, 3]), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    torch.testing.assert_close(calm_weights([2, 4]), torch.tensor([1 / 3, 2 / 3]))
    logits = [torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    targets = torch.tensor([[0, 4, 2]])
    by_hand = sum(i * F.cross_entropy(l[0], targets[0]) for i, l in zip([1, 2, 3], logits)) / 6
    torch.testing.assert_close(calm_loss(logits, targets, [1, 2, 3]), by_hand)


def test_kl_distill_and_targets():
    x = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    assert kl_distill(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distill(x, x * 2, temperature=2.0).item() > 0
    assert next_token_targets(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


def test_meta_classifier_separates_a_separable_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    labels = x[:, 3] > 0.2  # a half-space through (nearly) the origin: separable after normalisation
    clf = MetaClassifier(16)
    opt = torch.optim.AdamW(clf.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        loss = meta_loss(clf.logit(x), labels)
        loss.backward()
        opt.step()
    accuracy = ((clf(x) > 0.5) == labels).float().mean().item()
    assert accuracy > 0.95 and loss.item() < 0.3


# --- training --------------------------------------------------------------------------------------

@torch.no_grad()
def objective(model, heads, cache):
    """FREE's objective over every cached token."""
    exits = {k: heads.logits(model, cache.exits[k], k) for k in heads.exit_layers}
    return exit_objective("free", exits, model.head(cache.final), cache.targets, model.num_steps).item()


def train_tiny(steps=12, **kwargs):
    model = tiny_model()
    heads = ExitHeads.for_model(model, ExitConfig([1]), seed=0)
    counting = (random_tokens((4, 1)) + torch.arange(16)) % 97  # the next token is predictable: +1
    cache = cache_exit_states(model, counting, heads.exit_layers)
    before = evaluate_exit_heads(model, heads, cache)[1]
    history = train_exit_heads(model, heads, cache, steps=steps, lr=1e-2, batch_tokens=32, progress=False, **kwargs)
    return model, heads, cache, before, history


def test_training_a_tiny_exit_head_lowers_its_loss_deterministically():
    model, heads, cache, before, history = train_tiny()
    after = evaluate_exit_heads(model, heads, cache)[1]
    assert objective(model, heads, cache) < 0.95 * objective(model, ExitHeads.for_model(model, heads.config), cache)
    assert after.ce < before.ce
    assert sum(history.loss[-3:]) < sum(history.loss[:3])
    assert sum(history.meta_loss[-3:]) < sum(history.meta_loss[:3])
    assert all(p.requires_grad for p in model.parameters())  # the backbone is unfrozen again
    _, heads2, _, _, history2 = train_tiny()
    assert history.loss == history2.loss and history.meta_loss == history2.meta_loss
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), heads2.state_dict().values()))


def test_save_and_load_are_bit_identical(tmp_path):
    model, heads, cache, _, _ = train_tiny(steps=3, checkpoint=tmp_path / "heads")
    loaded = ExitHeads.load(tmp_path / "heads")
    assert loaded.config == heads.config
    assert heads.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(heads.state_dict()[k], loaded.state_dict()[k]) for k in heads.state_dict())
    h = cache.exits[1]
    assert torch.equal(loaded.logits(model, h, 1), heads.logits(model, h, 1))


def test_calm_objective_and_training_errors():
    model = tiny_model()
    heads = ExitHeads.for_model(model, ExitConfig([1, 2], adapter_rank=4))
    history = train_exit_heads(model, heads, random_tokens((2, 8)), steps=2, batch_tokens=8, progress=False)
    assert len(history.loss) == 2  # two exits: CALM's weighted objective
    with pytest.raises(ValueError, match="full_finetune"):
        train_exit_heads(model, heads, random_tokens((2, 8)), steps=1, kd="mse", progress=False)
    with pytest.raises(ValueError, match="unknown kd 'l2'; allowed: kl, mse, mse_last, mse_dyna"):
        train_exit_heads(model, heads, random_tokens((2, 8)), steps=1, kd="l2", progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        train_exit_heads(model, ExitHeads.for_model(model, ExitConfig([1], adapter="none")), random_tokens((2, 8)),
                         steps=1, train_meta=False, progress=False)


@pytest.mark.parametrize("kd", ["kl", "mse", "mse_last", "mse_dyna"])  # every FREE KD kind, final norm applied
def test_full_finetune_trains_the_whole_model(kd):
    model = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    heads = ExitHeads.for_model(model, ExitConfig([2]))
    blocks = [random_tokens((2, 12), seed=s) for s in range(2)]
    history = train_exit_heads(model, heads, blocks, steps=8, lr=3e-3, kd=kd, full_finetune=True, progress=False)
    assert len(history.loss) == 8 and history.loss[-1] < history.loss[0]
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, original["layers.0.mlp.up_proj.weight"])


# --- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_shallow_adapter_agrees_with_the_deep_model_at_least_as_well_as_the_lens(smollm2):
    model, tok = smollm2
    corpus = mor_lab.train.load_corpus("pydoc", max_chars=20_000)
    train_ids = mor_lab.train.tokenize(tok, corpus.train)[:384].view(3, 128)
    held_out = mor_lab.train.tokenize(tok, corpus.validation)[:256].view(2, 128)
    start = time.perf_counter()
    heads = ExitHeads.for_model(model, ExitConfig([8]))
    train_cache = cache_exit_states(model, train_ids, [8])
    test_cache = cache_exit_states(model, held_out, [8])
    lens = evaluate_exit_heads(model, heads, test_cache)[8]  # untrained adapter == logit lens
    history = train_exit_heads(model, heads, train_cache, steps=24, lr=1e-3, batch_tokens=64, progress=False)
    tuned = evaluate_exit_heads(model, heads, test_cache)[8]
    print(f"\nlayer-8 vs full top-1 agreement on {lens.tokens} held-out tokens: logit lens {lens.agreement:.3f}, "
          f"trained adapter {tuned.agreement:.3f}; KL {lens.kl:.2f} -> {tuned.kl:.2f}; "
          f"loss {history.loss[0]:.2f} -> {history.loss[-1]:.2f}; {time.perf_counter() - start:.0f} s")
    assert tuned.agreement >= lens.agreement
    assert tuned.kl < lens.kl


@pytest.mark.smollm2
@pytest.mark.parametrize("adapter", ["linear", "block"])
def test_committed_exit_heads_reproduce_their_logged_heldout_agreement(smollm2, adapter):
    """The heads in mor_lab/checkpoints/exit-heads-smollm2, reloaded from 16 bits, score the held-out chat
    continuations as their training log says: agreement within 2 points (a continuation may differ by a
    token on another build), cross-entropy within 0.05 nats."""
    import json

    from mor_lab.early_exit.recipes import committed_exit_heads, committed_heads_dir
    from mor_lab.train.recipes import heldout_chat_sequences
    model, tok = smollm2
    log = json.loads((committed_heads_dir(adapter) / "train.json").read_text())
    heads = committed_exit_heads(model, adapter)
    sequences, scored_from = heldout_chat_sequences(model, tok, log["config"]["params"])
    scores = evaluate_exit_heads(model, heads, cache_exit_states(model, sequences, heads.exit_layers,
                                                                 scored_from=scored_from))
    for layer, metrics in scores.items():
        logged = log["result"]["heldout"][str(layer)]
        assert metrics.agreement == pytest.approx(logged["agreement"], abs=0.02), layer
        assert metrics.ce == pytest.approx(logged["ce"], abs=0.05), layer


def test_committed_exit_heads_refuse_another_backbone():
    from mor_lab.early_exit.recipes import committed_exit_heads
    from mor_lab.models.config import ModelConfig
    from mor_lab.models.decoder import Decoder
    model = Decoder(ModelConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_layers=2, num_heads=9,
                                num_kv_heads=3))
    with pytest.raises(ValueError, match="trained on SmolLM2-135M-Instruct .*not on this model"):
        committed_exit_heads(model, "linear")
    with pytest.raises(ValueError, match="no committed exit heads of type 'lens'"):
        committed_exit_heads(model, "lens")

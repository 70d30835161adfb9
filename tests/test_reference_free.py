"""FREE and CALM against their public reference code, formula by formula.

FREE: raymin0223/fast_robust_early_exit (``util/bmm.py`` BetaMixture1D, ``util/skip_conf.py`` get_skip_mask,
``util/losses.py`` compute_layerwise_distillation_loss, ``models/deploying_t5.py`` the decoder loop).
CALM: the authors' code in google-research/t5x (``t5x/contrib/calm/models.py``, get_pred_confidence).
Each test transcribes the reference lines next to a call of mor_lab's function, on small inputs.
"""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mor_lab.early_exit.threshold import AdaptiveThreshold, BetaMixture, ThresholdConfig
from mor_lab.train import losses

conf = importlib.import_module("mor_lab.early_exit.confidence")  # the package re-exports a function of that name


# --- util/bmm.py, transcribed (scipy.stats.beta.pdf written out with lgamma) -----------------------------
def beta_pdf(x, a, b):
    return np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


def weighted_mean(x, w):
    return np.sum(w * x) / np.sum(w)


def fit_beta_weighted(x, w):
    x_bar = weighted_mean(x, w)
    s2 = weighted_mean((x - x_bar) ** 2, w)
    alpha = x_bar * ((x_bar * (1 - x_bar)) / s2 - 1)
    beta = alpha * (1 - x_bar) / x_bar
    return alpha, beta


class ReferenceBMM:
    """BetaMixture1D with its defaults (max_iters=1, alphas [1, 2], betas [2, 1], weights [0.5, 0.5])."""

    def __init__(self):
        self.alphas, self.betas = np.array([1.0, 2.0]), np.array([2.0, 1.0])
        self.weight = np.array([0.5, 0.5])
        self.lam, self.lam_r, self.eps_nan, self.zeta, self.lookup_resolution = 0.95, 0.8, 1e-4, 0.4, 10

    def likelihood(self, x, y):
        return beta_pdf(x, self.alphas[y], self.betas[y])

    def weighted_likelihood(self, x, y):
        return self.weight[y] * self.likelihood(x, y)

    def responsibilities(self, x, y=None):
        if y is None:
            r = np.array([self.weighted_likelihood(x, i) for i in range(2)])
        else:
            r = self.lam_r * np.array([self.weighted_likelihood(x, i) for i in range(2)])
            r = (1 - self.lam_r) * np.eye(2)[y].T  # (the reference overwrites the line above)
        r[r <= self.eps_nan] = self.eps_nan
        r /= (r.sum(axis=0) + 1e-12)
        return r

    def fit(self, x, y=None):
        x = np.copy(x)
        eps = 1e-4
        x[x >= 1 - eps] = 1 - eps
        x[x <= eps] = eps
        r = self.responsibilities(x, y)
        if y is not None:
            self.alphas[0], self.betas[0] = fit_beta_weighted(x, r[0])
            self.alphas[1], self.betas[1] = fit_beta_weighted(x, r[1])
        else:
            for i in range(2):
                new_alpha, new_beta = fit_beta_weighted(x, r[i])
                self.alphas[i] = self.lam * self.alphas[i] + (1 - self.lam) * new_alpha
                self.betas[i] = self.lam * self.betas[i] + (1 - self.lam) * new_beta
            new_weight = r.sum(axis=1)
            new_weight /= (new_weight.sum() + 1e-12)
            self.weight = self.lam * self.weight + (1 - self.lam) * new_weight.reshape(-1)
        return self

    def predict_proba(self, xmin=0.0, xmax=1.0):
        x = np.linspace(xmin, xmax, self.lookup_resolution)
        mean = self.alphas / (self.alphas + self.betas)
        i = mean.argmax()
        pred = self.likelihood(x, i) / (self.likelihood(x, i) + self.likelihood(x, 1 - i)) > self.zeta
        idx = min(max(0, self.lookup_resolution - sum(pred)), self.lookup_resolution - 1)
        return x[idx]


def samples(seed, n_wrong, n_right):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wrong = torch.distributions.Beta(2.0, 5.0).sample((n_wrong,))
        right = torch.distributions.Beta(6.0, 1.5).sample((n_right,))
    c = torch.cat([wrong, right]).double()
    y = torch.cat([torch.zeros(n_wrong, dtype=torch.long), torch.ones(n_right, dtype=torch.long)])
    perm = torch.randperm(len(c), generator=g)
    return c[perm], y[perm]


@pytest.mark.parametrize("n_wrong,n_right", [(300, 15), (20, 400), (60, 60)])
def test_supervised_fit_keeps_the_references_floor_on_the_other_class(n_wrong, n_right):
    c, y = samples(1, n_wrong, n_right)
    ref = ReferenceBMM().fit(c.numpy(), y.numpy())
    ours = BetaMixture().fit(c, y.bool())
    assert ours.a == pytest.approx(list(ref.alphas), rel=1e-9)
    assert ours.b == pytest.approx(list(ref.betas), rel=1e-9)
    # mor_lab's own-points-only fit is the documented option responsibility_floor=0
    own = BetaMixture().fit(c, y.bool(), responsibility_floor=0.0)
    plain = [fit_beta_weighted(np.clip(c.numpy(), 1e-4, 1 - 1e-4), (y.numpy() == k).astype(float)) for k in (0, 1)]
    assert own.a == pytest.approx([p[0] for p in plain], rel=1e-9)


def test_supervised_threshold_with_equal_priors_is_the_references():
    c, y = samples(2, 120, 200)
    ctl = AdaptiveThreshold(ThresholdConfig(label_prior=False))
    ref = ReferenceBMM()
    for chunk in range(4):  # the reference refits on every pair seen so far (stack_conf_all)
        new = slice(80 * chunk, 80 * (chunk + 1))
        ctl.observe(c[new], y[new].bool())
        ours = ctl.refit()
        ref.fit(c[:80 * (chunk + 1)].numpy(), y[:80 * (chunk + 1)].numpy())
        assert ours == pytest.approx(ref.predict_proba(0.3, 0.9), abs=1e-12)


def test_unsupervised_em_is_the_references():
    c, _ = samples(3, 150, 250)
    ctl = AdaptiveThreshold(ThresholdConfig(unsupervised=True, label_prior=False, budget=None))
    ref = ReferenceBMM()
    for chunk in range(5):
        ctl.observe(c[80 * chunk:80 * (chunk + 1)])  # no labels needed
        ours = ctl.refit()
        ref.fit(c[:80 * (chunk + 1)].numpy())
        assert ctl.mixture.a == pytest.approx(list(ref.alphas), rel=1e-9)
        assert ctl.mixture.b == pytest.approx(list(ref.betas), rel=1e-9)
        assert ctl.mixture.weights == pytest.approx(list(ref.weight), rel=1e-9)
        assert ours == pytest.approx(ref.predict_proba(0.3, 0.9), abs=1e-12)
    assert ctl.num_refits == 5


# --- util/skip_conf.py and t5x's CALM: measures, the exit rule, the threshold decay ------------------------
def test_measure_names_follow_calm():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(4))
    probs = torch.softmax(logits, dim=-1)
    top_2 = torch.topk(probs, dim=-1, k=2)[0]
    skip_conf_softmax = (top_2[..., 0] - top_2[..., 1]).squeeze()  # FREE's "softmax" = top-1 minus top-2
    t5x_softmax_diff = probs.sort(-1, descending=True).values  # t5x: sorted_probs[0] - sorted_probs[1]
    t5x_softmax_diff = t5x_softmax_diff[..., 0] - t5x_softmax_diff[..., 1]
    t5x_softmax_max = probs.max(-1).values  # t5x: nn.softmax(logits).max(-1)
    torch.testing.assert_close(conf.confidence("softmax_diff", logits=logits), skip_conf_softmax)
    torch.testing.assert_close(conf.confidence("softmax_diff", logits=logits), t5x_softmax_diff)
    torch.testing.assert_close(conf.confidence("softmax_max", logits=logits), t5x_softmax_max)
    # mor_lab's earlier names keep working, with their old meaning
    torch.testing.assert_close(conf.confidence("margin", logits=logits), skip_conf_softmax)
    torch.testing.assert_close(conf.confidence("softmax", logits=logits), t5x_softmax_max)
    assert conf.canonical_measure("margin") == "softmax_diff" and conf.canonical_measure("softmax") == "softmax_max"


def test_exit_rule_is_strictly_greater():
    # get_skip_mask: mask = torch.where(conf <= threshold, 0., 1.).bool()  (True: exit)
    c = torch.tensor([0.2, 0.7, 0.70001, 1.0, 1.0])
    for threshold in (0.7, 1.0, 0.0):
        reference = torch.where(c <= threshold, 0., 1.).bool()
        assert torch.equal(conf.exits(c, threshold), reference)
    assert not conf.exits(torch.tensor([1.0]), 1.0).any()  # tau = 1: never exit, even at a saturated margin
    # CALM's own t5x code loops while conf < threshold: it exits at equality (the inclusive option)
    assert torch.equal(conf.exits(c, 0.7, inclusive=True), c >= 0.7)


def test_exit_min_layer_blocks_earlier_exits():
    # deploying_t5.py: `if self.exit_min_layer is not None and i < self.exit_min_layer:` no confidence check
    # before layer i runs (i layers done), so no exit after fewer than exit_min_layer layers
    c = torch.tensor([0.95, 0.1])
    for layer in range(1, 6):
        expected = torch.tensor([layer >= 3, False])
        assert torch.equal(conf.exits(c, 0.5, layer=layer, min_layer=3), expected)
    assert torch.equal(conf.exits(c, 0.5, layer=1), torch.tensor([True, False]))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_threshold_decay_reads_the_tokens_position(temperature):
    # skip_conf.py: correct_by_pos(i) = tau * exp(-T * i / N) / 10 + 9 * tau / 10, with
    # pos_time = past_key_values[i][0].shape[2] + 1: the k-th generated token (k = 1, 2, ...) has pos_time k
    tau, N = 0.8, 20
    for k in range(1, N + 1):
        past_len = k - 1
        pos_time = past_len + 1
        reference = tau * np.exp(-temperature * pos_time / N) / 10 + 9 * tau / 10
        assert conf.calm_threshold(tau, position=k, max_len=N, temperature=temperature) == pytest.approx(
            reference, rel=1e-12)


# --- util/losses.py: the layer-wise distillation variants --------------------------------------------------
TEACHER_LAYERS = {8: {2: [3, 7], 4: [1, 3, 5, 7]}}  # the shape of the reference's table (24: {6: [3, 7, ...]})


def reference_kd(kind, all_hidden_states, shallow_exit_layer, num_layers, layer_transformation=None):
    """compute_layerwise_distillation_loss; all_hidden_states[k] is layer k's output after the final norm
    (modeling_t5.py appends dropout(final_layer_norm(h)) and the loss gets decoder_outputs[2][1:])."""
    mse_loss = torch.nn.MSELoss(reduction="mean")
    teacher_layer_output = [all_hidden_states[i].detach() for i in range(len(all_hidden_states))]
    student_layer_output = [all_hidden_states[i] for i in range(shallow_exit_layer)]
    transform = layer_transformation or (lambda s: s)
    if kind == "last":
        return mse_loss(teacher_layer_output[-1], transform(student_layer_output[-1]))
    specified_teacher_layers = TEACHER_LAYERS[num_layers][shallow_exit_layer]
    specified_student_layer_reps = [transform(s) for s in student_layer_output]
    specified_teacher_layer_reps = [teacher_layer_output[i] for i in specified_teacher_layers]
    if kind == "unif":
        layer_kd_loss = 0.
        for t_layer_o, s_layer_o in zip(specified_teacher_layer_reps, specified_student_layer_reps):
            layer_kd_loss += mse_loss(t_layer_o, s_layer_o)
        return layer_kd_loss / len(specified_teacher_layer_reps)
    l = []
    for t_layer_o in specified_teacher_layer_reps:
        for i, s_layer_o in enumerate(specified_student_layer_reps):
            l.append(mse_loss(t_layer_o, s_layer_o))
    layerwise_loss = torch.stack(l).reshape(len(specified_teacher_layer_reps), len(student_layer_output))
    last_aligned_layer = len(all_hidden_states)
    alignment = []
    for search_index in range(len(specified_teacher_layers) - 1, -1, -1):
        indexes = layerwise_loss[search_index].sort()[1]
        align = indexes[indexes < last_aligned_layer]
        align = align[0] if len(align) > 0 else last_aligned_layer
        alignment.append(align)
        last_aligned_layer = align
    alignment.reverse()
    alignment = torch.tensor(alignment)
    layerwise = torch.arange(len(specified_teacher_layers))
    return layerwise_loss[layerwise, alignment].mean()


@pytest.mark.parametrize("shallow", [2, 4])
@pytest.mark.parametrize("transformed", [False, True])
def test_layerwise_distillation_variants(shallow, transformed):
    torch.manual_seed(8)
    L, d = 8, 6
    stack = [torch.randn(2, 5, d, requires_grad=True) for _ in range(L + 1)]  # mor_lab's return_hidden stack
    norm = torch.nn.RMSNorm(d, elementwise_affine=False)
    transform = torch.nn.Linear(d, d) if transformed else None
    layer_map = TEACHER_LAYERS[L][shallow]
    cases = {"unif": losses.hidden_mse(stack, layer_map, norm=norm, transform=transform),
             "last": losses.hidden_mse_last(stack, shallow, norm=norm, transform=transform),
             "dyna": losses.hidden_mse_dyna(stack, layer_map, norm=norm, transform=transform)}
    for kind, ours in cases.items():
        normed = [norm(h) for h in stack[1:]]  # the reference's all_hidden_states
        reference = reference_kd(kind, normed, shallow, L, transform)
        torch.testing.assert_close(ours, reference)
        grads = torch.autograd.grad(ours, stack, allow_unused=True)
        ref_grads = torch.autograd.grad(reference, stack, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            g = torch.zeros(2, 5, d) if g is None else g
            torch.testing.assert_close(g, torch.zeros(2, 5, d) if r is None else r)


def test_free_loss_takes_every_distillation_variant():
    torch.manual_seed(9)
    L, d, V = 8, 6, 11
    stack = [torch.randn(2, 5, d) for _ in range(L + 1)]
    norm = torch.nn.RMSNorm(d, elementwise_affine=False)
    shallow_logits, deep_logits = torch.randn(2, 5, V), torch.randn(2, 5, V)
    targets = torch.randint(0, V, (2, 5))
    ce = (2 * F.cross_entropy(shallow_logits.reshape(-1, V), targets.reshape(-1))
          + 8 * F.cross_entropy(deep_logits.reshape(-1, V), targets.reshape(-1))) / 10
    expected = {"mse": losses.hidden_mse(stack, [3, 7], norm=norm),
                "mse_last": losses.hidden_mse_last(stack, 2, norm=norm),
                "mse_dyna": losses.hidden_mse_dyna(stack, [3, 7], norm=norm)}
    for kd, distill in expected.items():
        out = losses.free_loss(shallow_logits, deep_logits, targets, shallow_layers=2, num_layers=L, alpha=0.5,
                               kd=kd, hidden=stack, layer_map=[3, 7], norm=norm)
        torch.testing.assert_close(out.total, ce + 0.5 * distill)


def test_calm_threshold_paper_form_adds_an_unscaled_term():
    """The CALM paper's decaying threshold, clip(9/10 * tau + 1/10 * exp(-T t / N)), beside FREE's code's
    0.9 tau + 0.1 tau exp(-T t / N): equal at tau = 1, the paper's stricter for small tau early on."""
    import math

    from mor_lab.early_exit.confidence import calm_threshold
    for tau, t in ((1.0, 3), (0.3, 1), (0.5, 40)):
        paper = min(1.0, 0.9 * tau + 0.1 * math.exp(-4.0 * t / 48))
        code = 0.9 * tau + 0.1 * tau * math.exp(-4.0 * t / 48)
        assert calm_threshold(tau, t, 48, form="calm") == pytest.approx(paper)
        assert calm_threshold(tau, t, 48) == pytest.approx(code)
    assert calm_threshold(0.3, 1, 48, form="calm") > 0.3 > calm_threshold(0.3, 1, 48)
    with pytest.raises(ValueError, match="form must be"):
        calm_threshold(0.5, 1, 48, form="other")

"""FREE's adaptive threshold: moment fits, the supervised Beta mixture, the grid rule, the controller."""
import math

import pytest
import torch

from mor_lab.early_exit.threshold import (AdaptiveThreshold, BetaMixture, ThresholdConfig, beta_log_pdf,
                                          fit_beta_moments, grid_threshold)

GRID = [0.3 + 0.6 * i / 9 for i in range(10)]  # linspace(0.3, 0.9, 10), written out by hand


def beta_samples(a, b, n, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b))).sample((n,))


def plain_posterior(c, a, b, w):
    """pi_1 Beta(c; a1, b1) / sum_k pi_k Beta(c; ak, bk), straight from the formula in plain Python."""
    def pdf(x, al, be):
        return math.gamma(al + be) / (math.gamma(al) * math.gamma(be)) * x ** (al - 1) * (1 - x) ** (be - 1)
    num = w[1] * pdf(c, a[1], b[1])
    return num / (w[0] * pdf(c, a[0], b[0]) + num)


def plain_rule(posteriors, zeta):
    """Walk down from the top of the grid while the posterior stays above zeta."""
    best = None
    for g, p in reversed(list(zip(GRID, posteriors))):
        if p <= zeta:
            break
        best = g
    return best


@pytest.mark.parametrize("a,b", [(2.0, 5.0), (6.0, 1.5)])
def test_moment_fit_recovers_known_beta(a, b):
    fa, fb = fit_beta_moments(beta_samples(a, b, 20000, seed=0))
    assert fa == pytest.approx(a, rel=0.05) and fb == pytest.approx(b, rel=0.05)


def test_weighted_moments_equal_repeated_samples():
    x = torch.tensor([0.1, 0.4, 0.5, 0.8])
    w = torch.tensor([1.0, 3.0, 2.0, 1.0])
    repeated = torch.repeat_interleave(x, w.long())
    assert fit_beta_moments(x, w) == pytest.approx(fit_beta_moments(repeated), rel=1e-9)


def test_zero_variance_gives_nan():
    a, b = fit_beta_moments([0.5, 0.5, 0.5])
    assert math.isnan(a) and math.isnan(b)


def test_beta_log_pdf_matches_formula():
    for c in (0.1, 0.5, 0.93):
        expected = math.log(math.gamma(7.5) / (math.gamma(6) * math.gamma(1.5)) * c ** 5 * (1 - c) ** 0.5)
        assert float(beta_log_pdf(c, 6.0, 1.5)) == pytest.approx(expected, rel=1e-9)


def test_mixture_fit_recovers_components_and_weights():
    wrong, right = beta_samples(2, 5, 6000, seed=1), beta_samples(6, 1.5, 14000, seed=2)
    conf = torch.cat([wrong, right])
    labels = torch.cat([torch.zeros(6000, dtype=torch.bool), torch.ones(14000, dtype=torch.bool)])
    perm = torch.randperm(20000, generator=torch.Generator().manual_seed(3))  # order must not matter
    mix = BetaMixture().fit(conf[perm], labels[perm])
    assert mix.a == pytest.approx([2, 6], rel=0.05) and mix.b == pytest.approx([5, 1.5], rel=0.05)
    assert mix.weights == pytest.approx([0.3, 0.7], abs=1e-9)


def test_degenerate_component_keeps_previous_parameters():
    # own points only: one "wrong" point (too few) and "right" points of zero variance keep the initial Betas
    mix = BetaMixture().fit([0.2, 0.7, 0.7, 0.7], [0, 1, 1, 1], responsibility_floor=0.0)
    assert (mix.a, mix.b) == ([1.0, 2.0], [2.0, 1.0])
    assert mix.weights == pytest.approx([0.25, 0.75])
    # the healthy component still moves when the other one is degenerate
    mix.fit([0.2, 0.6, 0.7, 0.9], [0, 1, 1, 1], responsibility_floor=0.0)
    assert mix.a[0] == 1.0 and mix.b[0] == 2.0 and mix.a[1] != 2.0
    # with the reference's floor the "wrong" point weighs 1e-4 / 0.2 among the "right" ones: no longer zero
    # variance, a very peaked Beta at 0.7 (mean 0.2 * 1e-4 / 0.2 away from it); the lone point still too few
    floored = BetaMixture().fit([0.2, 0.7, 0.7, 0.7], [0, 1, 1, 1])
    assert (floored.a[0], floored.b[0]) == (1.0, 2.0) and floored.a[1] > 1000
    assert floored.a[1] / (floored.a[1] + floored.b[1]) == pytest.approx(0.7 - 0.5 * 1e-4 / (3 * 0.2 + 1e-4), rel=1e-9)


def test_posterior_matches_formula_and_rule_worked_example():
    # wrong ~ Beta(2, 6), right ~ Beta(5, 2), equal weights: the notebook's worked example
    a, b, w = [2.0, 5.0], [6.0, 2.0], [0.5, 0.5]
    mix = BetaMixture(a=list(a), b=list(b), weights=list(w))
    expected_post = [plain_posterior(c, a, b, w) for c in GRID]
    assert mix.posterior(GRID).tolist() == pytest.approx(expected_post, rel=1e-9)
    expected = plain_rule(expected_post, 0.4)
    assert expected == pytest.approx(0.5)  # posterior 0.360 at 0.433, 0.588 at 0.5
    assert grid_threshold(mix.posterior(GRID), GRID, 0.4) == pytest.approx(expected)
    # the mixture weights matter: more "right" labels lower the threshold
    skewed = BetaMixture(a=list(a), b=list(b), weights=[0.3, 0.7])
    post = [plain_posterior(c, a, b, [0.3, 0.7]) for c in GRID]
    assert grid_threshold(skewed.posterior(GRID), GRID, 0.4) == pytest.approx(plain_rule(post, 0.4))
    assert plain_rule(post, 0.4) == pytest.approx(GRID[2])  # 0.433


def test_rule_needs_every_larger_grid_point():
    # wrong ~ Beta(5, 5) sits in the middle, right ~ Beta(1, 1) is flat: the posterior is above zeta at
    # 0.3, dips below it in the middle, and comes back above from 0.7 on (it crosses zeta twice)
    a, b, w = [5.0, 1.0], [5.0, 1.0], [0.5, 0.5]
    post = [plain_posterior(c, a, b, w) for c in GRID]
    above = [p > 0.4 for p in post]
    assert above == [True, False, False, False, False, False, True, True, True, True]
    mix = BetaMixture(a=list(a), b=list(b), weights=list(w))
    got = grid_threshold(mix.posterior(GRID), GRID, 0.4)
    assert got == pytest.approx(plain_rule(post, 0.4)) == pytest.approx(0.7)
    assert got != pytest.approx(GRID[above.index(True)])  # not simply the first point above zeta
    assert got != pytest.approx(GRID[10 - sum(above)])  # nor the reference code's grid[size - count]


def test_rule_none_when_top_of_grid_fails():
    assert grid_threshold([0.9, 0.9, 0.3], [0.3, 0.6, 0.9], 0.4) is None
    assert grid_threshold([0.5, 0.5, 0.5], [0.3, 0.6, 0.9], 0.4) == pytest.approx(0.3)


def test_controller_refits_and_reports_state():
    ctl = AdaptiveThreshold()
    assert ctl.threshold == 0.9 and ctl.refit() == 0.9 and ctl.num_refits == 0  # no pairs: no refit
    for s in range(3):  # three samples, pairs arriving in chunks as the deep layers catch up
        ctl.refit()
        ctl.observe(beta_samples(2, 6, 40, seed=10 + s), torch.zeros(40, dtype=torch.bool))
        ctl.observe(beta_samples(5, 2, 60, seed=20 + s).reshape(6, 10), torch.ones(6, 10, dtype=torch.bool))
    thr = ctl.refit()
    st = ctl.state()
    assert st["num_pairs"] == 300 and st["num_refits"] == 3 and len(st["history"]) == 4
    assert st["weights"] == pytest.approx([0.4, 0.6])
    post = [plain_posterior(c, st["a"], st["b"], st["weights"]) for c in GRID]
    assert thr == st["threshold"] == pytest.approx(plain_rule(post, 0.4))
    assert 0.3 < thr < 0.9
    assert ctl.exits(torch.tensor([thr - 0.01, thr, thr + 0.01])).tolist() == [False, False, True]

    curves = ctl.curves(num=11)
    assert curves["confidence"].shape == curves["posterior"].shape == (11,)
    total = curves["wrong"] + curves["right"]
    assert curves["posterior"] == pytest.approx(curves["right"] / total, rel=1e-9)
    assert curves["grid"].tolist() == pytest.approx(GRID)


def test_controller_keeps_threshold_when_nothing_qualifies():
    # "right" points cluster at 0.5, "wrong" ones spread out: at 0.9 the posterior is ~0
    ctl = AdaptiveThreshold(ThresholdConfig(initial_threshold=0.75))
    ctl.observe(beta_samples(20, 20, 50, seed=4), [1] * 50)
    ctl.observe(beta_samples(1.2, 1.2, 50, seed=5), [0] * 50)
    assert ctl.refit() == 0.75 and ctl.state()["history"] == [0.75, 0.75]


def test_budget_stops_refitting():
    ctl = AdaptiveThreshold(ThresholdConfig(budget=2))
    ctl.observe(beta_samples(2, 6, 30, seed=6), [0] * 30)
    ctl.observe(beta_samples(5, 2, 30, seed=7), [1] * 30)
    ctl.refit()
    ctl.refit()
    frozen = ctl.state()
    assert frozen["num_refits"] == 2 and frozen["frozen"]
    ctl.observe(beta_samples(20, 20, 200, seed=8), [1] * 200)  # would move everything if refitted
    assert ctl.refit() == frozen["threshold"]
    assert ctl.state()["num_refits"] == 2 and ctl.state()["a"] == frozen["a"]
    assert ctl.state()["num_pairs"] == 260  # pairs are still recorded

    unlimited = AdaptiveThreshold(ThresholdConfig(budget=None))
    unlimited.observe([0.2, 0.3, 0.8, 0.9], [0, 0, 1, 1])
    for _ in range(5):
        unlimited.refit()
    assert unlimited.num_refits == 5 and not unlimited.frozen


def test_label_prior_false_uses_equal_weights():
    mix = BetaMixture(a=[2.0, 5.0], b=[6.0, 2.0], weights=[0.9, 0.1])
    equal = BetaMixture(a=[2.0, 5.0], b=[6.0, 2.0], weights=[0.5, 0.5])
    assert mix.posterior(GRID, label_prior=False).tolist() == pytest.approx(equal.posterior(GRID).tolist())


def test_observe_rejects_mismatched_or_nan():
    ctl = AdaptiveThreshold()
    with pytest.raises(ValueError, match="labels"):
        ctl.observe([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="unsupervised=True"):
        ctl.observe([0.1, 0.2])
    with pytest.raises(ValueError, match="confidences"):
        ctl.observe([0.1, float("nan")], [1, 0])


@pytest.mark.parametrize("field,value", [
    ("grid_low", -0.1), ("grid_high", 1.5), ("grid_low", 0.95), ("grid_size", 1), ("grid_size", 2.5),
    ("zeta", 0.0), ("zeta", 1.0), ("budget", -1), ("budget", 1.5), ("initial_threshold", 2.0),
    ("min_points", 1), ("label_prior", "yes"), ("responsibility_floor", -1e-4), ("responsibility_floor", 0.5),
    ("unsupervised", 1), ("em_momentum", 1.5), ("em_iters", 0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ThresholdConfig(**{field: value})


def test_unsupervised_controller_names_right_by_the_larger_mean():
    mix = BetaMixture(a=[5.0, 2.0], b=[2.0, 6.0], weights=[0.5, 0.5])  # component 0 sits high
    assert mix.larger_mean() == 0
    assert mix.posterior(GRID, right=0).tolist() == pytest.approx((1 - mix.posterior(GRID)).tolist(), rel=1e-9)
    ctl = AdaptiveThreshold(ThresholdConfig(unsupervised=True))
    ctl.mixture = mix
    assert ctl.right_component == 0
    curves = ctl.curves(num=5)
    assert curves["right"] == pytest.approx(mix.densities(curves["confidence"])[0].numpy())
    # EM on confidences alone moves parameters and weights, and spends the budget like the supervised fit
    ctl.observe(beta_samples(6, 1.5, 200, seed=30))
    before = (list(ctl.mixture.a), list(ctl.mixture.weights))
    ctl.refit()
    assert ctl.num_refits == 1 and (ctl.mixture.a, ctl.mixture.weights) != before
    assert sum(ctl.mixture.weights) == pytest.approx(1.0)

"""FREE's adaptive exit threshold: a Beta mixture over shallow-exit confidences (Bae et al., EMNLP 2023).

FREE's synchronized parallel decoding gives, for every token the shallow exit emitted, a pair
``(confidence, label)``: the shallow confidence (FREE's default is the top-1 minus top-2 margin) and
whether the shallow argmax equalled the deep argmax, known once the deep layers catch up. Those
pairs calibrate the exit threshold while decoding runs, with no held-out set.

The model is a two-component Beta mixture over confidences in [0, 1]:

- component 0 = "the shallow exit was wrong" (label 0), initialised as Beta(1, 2): mass near 0;
- component 1 = "the shallow exit was right" (label 1), initialised as Beta(2, 1): mass near 1.

Fitting is *supervised*: the label says which component a point belongs to, so each Beta is fitted
by weighted moments (``a = m (m (1 - m) / v - 1)``, ``b = a (1 - m) / m``, inputs clipped to
[1e-4, 1 - 1e-4]) and the mixture weights are the label frequencies. As in the reference code
(``BetaMixture1D.responsibilities``), a point weighs 0.2 in its own class and is floored at 1e-4 in
the other one before the weights are normalised, so each class keeps a 1e-4 / 0.2 share of the other
class's points (``responsibility_floor=0`` fits each class on its own points only, mor_lab's earlier
fit; they differ when one class is rare: 19% in (a, b) for 15 "right" points among 315). The reference's *unsupervised*
EM is an option (``ThresholdConfig.unsupervised``): responsibilities from the current mixture, the
same floor, and a momentum of 0.95 on the parameters and weights; the "right" component is then the
one with the larger mean, since no label names it. The posterior of "right" at a
confidence ``c`` is ``pi_1 Beta(c; a1, b1) / sum_k pi_k Beta(c; a_k, b_k)``. The new threshold is the
smallest point of ``linspace(0.3, 0.9, 10)`` whose posterior exceeds ``zeta = 0.4`` *and* so does
every larger grid point: above the threshold, exiting is always more likely right than ``zeta``.

Choices, stated once (where the facts sheet leaves room, or where the reference code differs):

- Degenerate fits keep the old values: a component with fewer than ``min_points`` points of its own
  label, zero variance, or a non-finite / non-positive moment estimate keeps its previous (a, b)
  (the reference would fit a label never seen on the other class's points, or produce NaN). The
  weights are still the label frequencies, so a label never seen gets weight 0.
- No grid point qualifies (the posterior stays below ``zeta`` near 0.9): keep the previous threshold.
  (The reference code then jumps to 0.9; keeping is the same on the first refit and steadier later.)
- The reference code reads the threshold as ``grid[size - count]`` where ``count`` is how many grid
  points exceed ``zeta``. That equals the rule above when the qualifying points form a suffix of the
  grid (the usual case); when the posterior crosses ``zeta`` twice it does not, and we follow the rule.
- The reference code's posterior ignores the mixture weights (equal priors) and picks the component
  with the larger mean as "right". We weight by label frequency (``label_prior=True``; set False for
  equal priors) and, when supervised, always use component 1, because the labels say which component
  is which (unsupervised: the larger mean, as the reference).
- ``refit()`` with no pairs yet does nothing and does not spend the budget (as in the reference,
  which refits only when it has data); each real refit spends one unit of ``budget``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-4  # confidences are clipped to [EPS, 1 - EPS]: a Beta density can be infinite at 0 or 1
OWN_RESPONSIBILITY = 1 - 0.8  # the reference's (1 - lam_r): a point's weight in its own class, before the floor


@dataclass
class ThresholdConfig:
    """Knobs of FREE's adaptive threshold; the defaults are the reference code's."""

    grid_low: float = 0.3  # smallest threshold the rule may pick
    grid_high: float = 0.9  # largest threshold the rule may pick
    grid_size: int = 10  # grid points in linspace(grid_low, grid_high, grid_size)
    zeta: float = 0.4  # posterior of "shallow was right" a threshold must exceed
    budget: int | None = 300  # refits before the threshold freezes (None: never freeze)
    initial_threshold: float = 0.9  # threshold before any refit
    min_points: int = 2  # a component needs this many points to be refitted (a variance needs 2)
    label_prior: bool = True  # weight the posterior by the mixture weights (False: equal, as the reference)
    responsibility_floor: float = 1e-4  # a point's floored weight in the other class (0: own points only)
    unsupervised: bool = False  # fit by EM on the confidences alone (the reference's fit_unsupervised)
    em_momentum: float = 0.95  # unsupervised: new = momentum * old + (1 - momentum) * fitted (the reference's lam)
    em_iters: int = 1  # unsupervised: EM iterations per refit (the reference's max_iters)

    def __post_init__(self):
        def unit(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

        unit("grid_low")
        unit("grid_high")
        if self.grid_low >= self.grid_high:
            raise ValueError(f"grid_low must be < grid_high, got grid_low={self.grid_low!r}, "
                             f"grid_high={self.grid_high!r}")
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) or self.grid_size < 2:
            raise ValueError(f"grid_size must be an integer >= 2, got {self.grid_size!r}")
        if isinstance(self.zeta, bool) or not isinstance(self.zeta, (int, float)) or not 0 < self.zeta < 1:
            raise ValueError(f"zeta must be a number in (0, 1), got {self.zeta!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 0):
            raise ValueError(f"budget must be an integer >= 0 or None (never freeze), got {self.budget!r}")
        unit("initial_threshold")
        if isinstance(self.min_points, bool) or not isinstance(self.min_points, int) or self.min_points < 2:
            raise ValueError(f"min_points must be an integer >= 2, got {self.min_points!r}")
        for name in ("label_prior", "unsupervised"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (isinstance(self.responsibility_floor, bool) or not isinstance(self.responsibility_floor, (int, float))
                or not 0 <= self.responsibility_floor < OWN_RESPONSIBILITY):
            raise ValueError(f"responsibility_floor must be a number in [0, {OWN_RESPONSIBILITY:g}), "
                             f"got {self.responsibility_floor!r}")
        unit("em_momentum")
        if isinstance(self.em_iters, bool) or not isinstance(self.em_iters, int) or self.em_iters < 1:
            raise ValueError(f"em_iters must be an integer >= 1, got {self.em_iters!r}")

    def grid(self) -> torch.Tensor:
        """The candidate thresholds, float64."""
        return torch.linspace(self.grid_low, self.grid_high, self.grid_size, dtype=torch.float64)


def _as_1d(x, dtype=torch.float64) -> torch.Tensor:
    """Any tensor, array or list -> a flat CPU tensor (pairs come from anywhere: GPU, numpy, lists)."""
    return torch.as_tensor(x, dtype=dtype, device="cpu").detach().reshape(-1)  # lists go straight to float64


def fit_beta_moments(x, weights=None) -> tuple[float, float]:
    """Method-of-moments Beta(a, b) for samples in [0, 1], optionally weighted.

    Returns NaN for a and b when the (weighted) variance is zero, so callers can spot a degenerate fit
    (zero up to rounding: identical samples can leave a variance of ~1e-33 that would give a ~1e30).
    """
    x = _as_1d(x).clamp(EPS, 1 - EPS)
    w = torch.ones_like(x) if weights is None else _as_1d(weights)
    if w.shape != x.shape:
        raise ValueError(f"weights must have one entry per sample, got {w.numel()} for {x.numel()} samples")
    m = (w * x).sum() / w.sum()
    v = (w * (x - m) ** 2).sum() / w.sum()
    if not v > 1e-12 * m * (1 - m):
        return math.nan, math.nan
    a = m * (m * (1 - m) / v - 1)
    return float(a), float(a * (1 - m) / m)


def beta_log_pdf(c, a: float, b: float) -> torch.Tensor:
    """log Beta(c; a, b), float64, with c clipped to [EPS, 1 - EPS]."""
    c = _as_1d(c).clamp(EPS, 1 - EPS)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return log_norm + (a - 1) * torch.log(c) + (b - 1) * torch.log1p(-c)


@dataclass
class BetaMixture:
    """Two Betas over confidences: component 0 = shallow was wrong, component 1 = shallow was right."""

    a: list[float] = field(default_factory=lambda: [1.0, 2.0])
    b: list[float] = field(default_factory=lambda: [2.0, 1.0])
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])

    def fit(self, confidences, labels, min_points: int = 2, responsibility_floor: float = 1e-4) -> BetaMixture:
        """Supervised refit in place: each component by weighted moments, weights by label counts.

        A point weighs ``OWN_RESPONSIBILITY`` in its own class and ``responsibility_floor`` in the other (the
        reference's floored responsibilities; 0: own points only). A component with fewer than ``min_points``
        points of its label, or a degenerate moment estimate, keeps its previous (a, b).
        """
        c, y = _as_1d(confidences), _as_1d(labels, torch.bool)
        if c.shape != y.shape:
            raise ValueError(f"labels must have one entry per confidence, got {y.numel()} for {c.numel()}")
        if c.numel() == 0:
            return self
        for k, mask in enumerate((~y, y)):
            if int(mask.sum()) < min_points:
                continue
            weights = torch.full(c.shape, float(responsibility_floor), dtype=torch.float64)
            weights[mask] = OWN_RESPONSIBILITY
            self._update(k, *fit_beta_moments(c, weights))
        right = float(y.double().mean())
        self.weights = [1 - right, right]
        return self

    def fit_unsupervised(self, confidences, iters: int = 1, momentum: float = 0.95,
                         responsibility_floor: float = 1e-4) -> BetaMixture:
        """The reference's EM (``BetaMixture1D.fit_unsupervised``), in place: responsibilities
        ``pi_k Beta(c; a_k, b_k)`` floored at ``responsibility_floor`` and normalised per point, then weighted
        moments, each new value mixed in as ``momentum * old + (1 - momentum) * new`` (weights too)."""
        c = _as_1d(confidences).clamp(EPS, 1 - EPS)
        if c.numel() == 0:
            return self
        for _ in range(iters):
            r = self.densities(c)
            r = torch.where(r <= responsibility_floor, responsibility_floor, r)
            r = r / (r.sum(0) + 1e-12)
            for k in range(2):
                a, b = fit_beta_moments(c, r[k])
                if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0:
                    self.a[k] = momentum * self.a[k] + (1 - momentum) * a
                    self.b[k] = momentum * self.b[k] + (1 - momentum) * b
            new = r.sum(1)
            new = new / (new.sum() + 1e-12)
            self.weights = [momentum * w + (1 - momentum) * float(n) for w, n in zip(self.weights, new)]
        return self

    def _update(self, k: int, a: float, b: float) -> None:
        if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0:
            self.a[k], self.b[k] = a, b

    def larger_mean(self) -> int:
        """The component with the larger mean ``a / (a + b)``: "right" when no label says which is which."""
        return int(self.a[1] / (self.a[1] + self.b[1]) > self.a[0] / (self.a[0] + self.b[0]))

    def log_densities(self, c, label_prior: bool = True) -> torch.Tensor:
        """``[2, n]`` log of pi_k Beta(c; a_k, b_k) (pi = 1/2 each when ``label_prior`` is False)."""
        weights = self.weights if label_prior else [0.5, 0.5]
        log_pi = [math.log(w) if w > 0 else -math.inf for w in weights]  # an unseen label: density 0
        return torch.stack([log_pi[k] + beta_log_pdf(c, self.a[k], self.b[k]) for k in range(2)])

    def densities(self, c, label_prior: bool = True) -> torch.Tensor:
        """``[2, n]`` weighted component densities pi_k Beta(c; a_k, b_k)."""
        return self.log_densities(c, label_prior).exp()

    def posterior(self, c, label_prior: bool = True, right: int = 1) -> torch.Tensor:
        """P(shallow was right | confidence c), computed in log space so tails do not underflow.
        ``right``: the component that stands for "right" (1 when supervised)."""
        log_d = self.log_densities(c, label_prior)
        return (log_d[right] - torch.logsumexp(log_d, dim=0)).exp()


def grid_threshold(posterior, grid, zeta: float) -> float | None:
    """Smallest grid point whose posterior exceeds ``zeta`` together with every larger one; None if none."""
    above = _as_1d(posterior) > zeta
    grid = _as_1d(grid)
    if not bool(above[-1]):
        return None
    below = torch.nonzero(~above).reshape(-1)
    start = int(below[-1]) + 1 if below.numel() else 0  # the qualifying suffix begins after the last miss
    return float(grid[start])


class AdaptiveThreshold:
    """Online controller: ``observe`` pairs as decoding yields them, ``refit`` at each new sample.

    Exit at the shallow layer when ``confidence > controller.threshold``.
    """

    def __init__(self, config: ThresholdConfig | None = None):
        self.config = config or ThresholdConfig()
        self.mixture = BetaMixture()
        self.threshold = float(self.config.initial_threshold)
        self.num_refits = 0
        self.history = [self.threshold]  # the initial threshold, then one entry per refit
        self._confidences: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @property
    def num_pairs(self) -> int:
        return sum(c.numel() for c in self._confidences)

    @property
    def frozen(self) -> bool:
        """True once the refit budget is spent: the threshold no longer moves."""
        return self.config.budget is not None and self.num_refits >= self.config.budget

    def observe(self, confidences, labels=None) -> None:
        """Store (shallow confidence, shallow argmax == deep argmax) pairs; any shapes, flattened.
        ``labels`` may be None when the fit is unsupervised (they are not used then)."""
        c = _as_1d(confidences)
        if labels is None:
            if not self.config.unsupervised:
                raise ValueError("observe needs labels (shallow argmax == deep argmax) for the supervised fit; "
                                 "set ThresholdConfig(unsupervised=True) to fit confidences alone")
            y = torch.zeros(c.shape, dtype=torch.bool)
        else:
            y = _as_1d(labels, torch.bool)
        if c.shape != y.shape:
            raise ValueError(f"labels must have one entry per confidence, got {y.numel()} for {c.numel()}")
        if c.numel() and not bool(torch.isfinite(c).all()):
            raise ValueError("confidences must be finite numbers in [0, 1]; got NaN or inf")
        self._confidences.append(c)
        self._labels.append(y)

    @property
    def right_component(self) -> int:
        """The mixture component that stands for "shallow was right"."""
        return self.mixture.larger_mean() if self.config.unsupervised else 1

    def refit(self) -> float:
        """Refit the mixture on every pair seen so far and update the threshold (call at each new sample)."""
        if self.frozen or self.num_pairs == 0:
            return self.threshold
        cfg = self.config
        if cfg.unsupervised:
            self.mixture.fit_unsupervised(torch.cat(self._confidences), cfg.em_iters, cfg.em_momentum,
                                          cfg.responsibility_floor)
        else:
            self.mixture.fit(torch.cat(self._confidences), torch.cat(self._labels), cfg.min_points,
                             cfg.responsibility_floor)
        grid = cfg.grid()
        new = grid_threshold(self.mixture.posterior(grid, cfg.label_prior, self.right_component), grid, cfg.zeta)
        if new is not None:
            self.threshold = new
        self.num_refits += 1
        self.history.append(self.threshold)
        return self.threshold

    def exits(self, confidences) -> torch.Tensor:
        """Boolean mask: which tokens exit at the shallow layer under the current threshold."""
        return torch.as_tensor(confidences) > self.threshold

    def state(self) -> dict:
        """Plain-Python snapshot for printing and plotting."""
        return {
            "threshold": self.threshold,
            "a": list(map(float, self.mixture.a)),
            "b": list(map(float, self.mixture.b)),
            "weights": list(map(float, self.mixture.weights)),
            "num_pairs": self.num_pairs,
            "num_refits": self.num_refits,
            "frozen": self.frozen,
            "history": list(self.history),
        }

    def curves(self, num: int = 101) -> dict:
        """The fitted picture on ``linspace(0, 1, num)``: weighted densities, posterior, and the grid rule."""
        c = torch.linspace(0, 1, num, dtype=torch.float64)
        grid = self.config.grid()
        dens = self.mixture.densities(c, self.config.label_prior)
        right, prior = self.right_component, self.config.label_prior
        return {
            "confidence": c.numpy(),
            "wrong": dens[1 - right].numpy(),  # pi_wrong Beta(c; a, b) of the "wrong" component
            "right": dens[right].numpy(),  # pi_right Beta(c; a, b) of the "right" component
            "posterior": self.mixture.posterior(c, prior, right).numpy(),
            "grid": grid.numpy(),
            "grid_posterior": self.mixture.posterior(grid, prior, right).numpy(),
            "zeta": self.config.zeta,
            "threshold": self.threshold,
        }

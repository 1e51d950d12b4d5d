"""The paired tests behind the gate: known answers, the restricted MLE, bounds and coverage."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from aggregator.gate_stats import (
    BalancedAccuracyChange,
    PairedCounts,
    lower_bound,
    p_value_above,
    p_value_below,
    restricted_mle,
    score_statistic,
    upper_bound,
)


def table(n: int, b: int, c: int) -> PairedCounts:
    return PairedCounts(n=n, both=n - b - c, candidate_only=b, published_only=c)


def test_at_zero_difference_the_score_statistic_is_mcnemars() -> None:
    for n, b, c in [(100, 10, 2), (40, 3, 7), (500, 31, 30), (12, 0, 5)]:
        assert score_statistic(table(n, b, c), 0.0) == pytest.approx((b - c) / math.sqrt(b + c))


def test_known_one_sided_p_values() -> None:
    # McNemar z = 8 / sqrt(12) = 2.3094: upper tail 0.010460.
    assert p_value_above(table(100, 10, 2), 0.0) == pytest.approx(0.010460, abs=2e-6)
    assert p_value_below(table(100, 10, 2), 0.0) == pytest.approx(1 - 0.010460, abs=2e-6)
    # No discordant pair and a 5-point margin: z = sqrt(n * 0.05 / 0.95); n = 100 -> 2.2942.
    assert score_statistic(table(100, 0, 0), -0.05) == pytest.approx(math.sqrt(100 * 0.05 / 0.95))
    assert p_value_above(table(100, 0, 0), -0.05) == pytest.approx(0.010889, abs=2e-6)


@pytest.mark.parametrize(
    ("n", "b", "c", "delta0"),
    [(60, 5, 9, -0.05), (200, 20, 10, -0.1), (30, 0, 4, -0.02), (80, 7, 3, 0.03)],
)
def test_restricted_mle_maximises_the_likelihood_under_h0(
    n: int, b: int, c: int, delta0: float
) -> None:
    # P(candidate right, published wrong) = p + delta0 under H0; the other cells share the rest.
    def neg_log_lik(p: float) -> float:
        rest = 1 - 2 * p - delta0
        return -(b * math.log(p + delta0) + c * math.log(p) + (n - b - c) * math.log(rest))

    lo = max(0.0, -delta0) + 1e-12
    hi = (1 - delta0) / 2 - 1e-12
    best = minimize_scalar(neg_log_lik, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    assert restricted_mle(table(n, b, c), delta0) == pytest.approx(best.x, abs=1e-7)


def test_the_confidence_bounds_invert_the_test() -> None:
    t = table(150, 12, 21)
    low, high = lower_bound(t, 0.05), upper_bound(t, 0.05)
    assert low < t.difference < high
    assert p_value_above(t, low) == pytest.approx(0.05, abs=1e-9)
    assert p_value_below(t, high) == pytest.approx(0.05, abs=1e-9)


def test_statistic_decreases_in_delta0() -> None:
    t = table(70, 6, 4)
    values = [score_statistic(t, d) for d in np.linspace(-0.9, 0.9, 37)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_one_sided_bound_covers_the_true_difference_at_the_stated_rate() -> None:
    # 4,000 simulated paired tables with a true 3-point drop: the 95% upper bound must be
    # below the truth in about 5% of them (score intervals are close to nominal).
    rng = np.random.default_rng(7)
    p10, p01, n = 0.05, 0.08, 120
    misses = 0
    trials = 4000
    for _ in range(trials):
        cells = rng.multinomial(n, [p10, p01, 1 - p10 - p01])
        if upper_bound(table(n, int(cells[0]), int(cells[1])), 0.05) < p10 - p01:
            misses += 1
    assert 0.03 < misses / trials < 0.07


def test_counts_from_predictions() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    cand = np.array([0, 0, 1, 2, 1, 0])
    pub = np.array([0, 1, 0, 2, 0, 0])
    t = PairedCounts.of(labels, cand, pub, 0)
    assert (t.n, t.both, t.candidate_only, t.published_only) == (4, 1, 1, 1)
    assert t.candidate_sensitivity == 0.5 == t.published_sensitivity


def test_inconsistent_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        PairedCounts(n=5, both=3, candidate_only=2, published_only=1)
    with pytest.raises(ValueError, match="no examples"):
        score_statistic(PairedCounts(0, 0, 0, 0), 0.0)


def test_balanced_accuracy_change_is_the_mean_of_independent_class_changes() -> None:
    tables = [table(100, 10, 5), table(50, 2, 6), PairedCounts(0, 0, 0, 0)]
    ba = BalancedAccuracyChange.of(tables)
    assert ba.classes == 2
    assert ba.difference == pytest.approx((0.05 - 0.08) / 2)
    var = (0.15 - 0.05**2) / 100 + (0.16 - 0.08**2) / 50
    assert ba.standard_error == pytest.approx(math.sqrt(var) / 2)
    z = ba.difference / ba.standard_error
    assert ba.p_value_below(0.0) == pytest.approx(0.5 * math.erfc(-z / math.sqrt(2)))
    assert ba.lower_bound(0.05) < ba.difference < ba.upper_bound(0.05)

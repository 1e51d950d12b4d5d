"""Paired tests of a change in sensitivity between two models scored on the same cases.

Both models classify the same examples of one class, so the evidence is paired: of the
``n`` examples, ``both`` are right under both models, ``candidate_only`` only under the
candidate, ``published_only`` only under the published model. The change in sensitivity
is ``Δ = (candidate_only - published_only) / n``; the concordant pairs carry no
information about its sign, which is why a paired test needs far fewer cases than
comparing two point estimates (the old gate's rule).

The test of ``H0: Δ = Δ0`` is the score test for paired proportions of Tango (1998,
*Statistics in Medicine* 17:891–908), the statistic recommended for non-inferiority of
paired binary outcomes: with ``b = candidate_only``, ``c = published_only``,

    Z(Δ0) = (b - c - nΔ0) / sqrt(n (2 p̃ + Δ0 - Δ0²))

where ``p̃`` is the maximum-likelihood estimate of P(published right, candidate wrong)
under ``H0`` (a root of a quadratic, derived in the module's tests). At ``Δ0 = 0`` it is
McNemar's statistic ``(b - c) / sqrt(b + c)``. ``Z`` decreases in ``Δ0``, so one-sided
confidence bounds come from inverting it by bisection.

The overall balanced accuracy is the mean of the per-class sensitivities; classes are
disjoint sets of examples, so its change is a mean of independent paired differences and
gets a Wald test with the sum of the per-class variances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.stats import norm

_BISECTION_STEPS = 60  # halves [-1, 1] to below 1e-17


@dataclass(frozen=True)
class PairedCounts:
    """The 2x2 table of two models' correctness on the ``n`` examples of one class."""

    n: int
    both: int
    candidate_only: int
    published_only: int

    def __post_init__(self) -> None:
        parts = (self.both, self.candidate_only, self.published_only)
        if min(parts) < 0 or sum(parts) > self.n:
            raise ValueError(f"inconsistent paired counts {self}")

    @classmethod
    def of(
        cls, labels: np.ndarray, candidate: np.ndarray, published: np.ndarray, label: int
    ) -> PairedCounts:
        """Counts for the examples whose true label is ``label`` (predicted labels in)."""
        mask = np.asarray(labels) == label
        cand_right = np.asarray(candidate)[mask] == label
        pub_right = np.asarray(published)[mask] == label
        return cls(
            n=int(mask.sum()),
            both=int((cand_right & pub_right).sum()),
            candidate_only=int((cand_right & ~pub_right).sum()),
            published_only=int((~cand_right & pub_right).sum()),
        )

    def __add__(self, other: PairedCounts) -> PairedCounts:
        """Pooled counts of two disjoint sets of cases."""
        return PairedCounts(
            self.n + other.n,
            self.both + other.both,
            self.candidate_only + other.candidate_only,
            self.published_only + other.published_only,
        )

    @property
    def candidate_sensitivity(self) -> float:
        return (self.both + self.candidate_only) / self.n

    @property
    def published_sensitivity(self) -> float:
        return (self.both + self.published_only) / self.n

    @property
    def difference(self) -> float:
        """Δ̂ = candidate sensitivity - published sensitivity."""
        return (self.candidate_only - self.published_only) / self.n

    def variance(self) -> float:
        """Unrestricted estimate of Var(Δ̂) (for the balanced-accuracy Wald test)."""
        discordant = (self.candidate_only + self.published_only) / self.n
        return max(0.0, discordant - self.difference**2) / self.n

    # The :class:`Change` interface, by Tango's score test (the functions below).
    def p_value_above(self, delta0: float) -> float:
        return p_value_above(self, delta0)

    def p_value_below(self, delta0: float) -> float:
        return p_value_below(self, delta0)

    def lower_bound(self, alpha: float) -> float:
        return lower_bound(self, alpha)

    def upper_bound(self, alpha: float) -> float:
        return upper_bound(self, alpha)


class Change(Protocol):
    """An estimated change with one-sided tests and bounds: what the gate's rules use."""

    @property
    def difference(self) -> float: ...

    def p_value_above(self, delta0: float) -> float: ...

    def p_value_below(self, delta0: float) -> float: ...

    def lower_bound(self, alpha: float) -> float: ...

    def upper_bound(self, alpha: float) -> float: ...


def restricted_mle(counts: PairedCounts, delta0: float) -> float:
    """MLE of P(published right, candidate wrong) under ``Δ = delta0`` (Tango 1998)."""
    n, b, c = counts.n, counts.candidate_only, counts.published_only
    linear = b + c - delta0 * (2 * n - b + c)
    disc = linear * linear + 8.0 * n * c * delta0 * (1.0 - delta0)
    return (linear + math.sqrt(max(0.0, disc))) / (4.0 * n)


def score_statistic(counts: PairedCounts, delta0: float) -> float:
    """Tango's score statistic for ``H0: Δ = delta0``; large when Δ̂ > delta0."""
    if counts.n <= 0:
        raise ValueError("no examples of the class")
    if not -1.0 <= delta0 <= 1.0:
        raise ValueError(f"delta0 must be in [-1, 1], got {delta0!r}")
    n, b, c = counts.n, counts.candidate_only, counts.published_only
    numerator = b - c - n * delta0
    p = restricted_mle(counts, delta0)
    variance = n * (2.0 * p + delta0 - delta0 * delta0)
    if variance <= 1e-12:
        # Δ0 is at the edge of what the data allow (e.g. no discordant pair and Δ0 = 0).
        return 0.0 if abs(numerator) < 1e-9 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def p_value_above(counts: PairedCounts, delta0: float) -> float:
    """One-sided p-value for ``H1: Δ > delta0`` (small: evidence the change exceeds it)."""
    return float(norm.sf(score_statistic(counts, delta0)))


def p_value_below(counts: PairedCounts, delta0: float) -> float:
    """One-sided p-value for ``H1: Δ < delta0`` (small: evidence the change is below it)."""
    return float(norm.cdf(score_statistic(counts, delta0)))


def lower_bound(counts: PairedCounts, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound of Δ (score-test inversion)."""
    return _invert(counts, float(norm.isf(alpha)))


def upper_bound(counts: PairedCounts, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound of Δ (score-test inversion)."""
    return _invert(counts, -float(norm.isf(alpha)))


def _invert(counts: PairedCounts, z: float) -> float:
    """The Δ0 in [-1, 1] where the statistic crosses ``z`` (it decreases in Δ0)."""
    lo, hi = -1.0, 1.0
    if score_statistic(counts, lo) <= z:
        return lo
    if score_statistic(counts, hi) >= z:
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2.0
        if score_statistic(counts, mid) > z:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class BalancedAccuracyChange:
    """Change in balanced accuracy over the classes present, with its standard error."""

    difference: float
    standard_error: float
    classes: int

    @classmethod
    def of(cls, tables: Sequence[PairedCounts]) -> BalancedAccuracyChange:
        present = [t for t in tables if t.n > 0]
        if not present:
            raise ValueError("no class has examples")
        k = len(present)
        diff = sum(t.difference for t in present) / k
        se = math.sqrt(sum(t.variance() for t in present)) / k
        return cls(diff, se, k)

    def _z(self, delta0: float) -> float:
        gap = self.difference - delta0
        if self.standard_error <= 0:
            return 0.0 if abs(gap) < 1e-12 else math.copysign(math.inf, gap)
        return gap / self.standard_error

    def p_value_above(self, delta0: float) -> float:
        return float(norm.sf(self._z(delta0)))

    def p_value_below(self, delta0: float) -> float:
        return float(norm.cdf(self._z(delta0)))

    def lower_bound(self, alpha: float) -> float:
        return max(-1.0, self.difference - float(norm.isf(alpha)) * self.standard_error)

    def upper_bound(self, alpha: float) -> float:
        return min(1.0, self.difference + float(norm.isf(alpha)) * self.standard_error)

"""The validation gate: should a candidate checkpoint replace the published one?

Pure function of two metric dictionaries (as produced by ``EvalMetrics.to_dict()``) and
the gate settings, so the rule can be read and tested on its own. A candidate is rejected
when the sensitivity on any high-risk class falls more than ``tolerance`` below the
published checkpoint's, or when its balanced accuracy is below an absolute floor.

A published model no better than chance is no baseline: its sensitivities are whatever a
near-random network happens to output (the untrained initial model, or an early round,
may call every lesion melanoma, i.e. sensitivity 1.0), so comparing against it would
freeze the federation on a useless model. Against such a model — the initial one, or one
whose balanced accuracy is within ``chance_margin`` of 1/k for the k classes in the
held-out set — only the absolute floor applies.

Three rules compare the candidate with the published model (``GateSettings.rule``):

* ``"harm"`` (default): reject only on statistical evidence of harm. For each high-risk
  class present, and for the balanced accuracy, a one-sided paired test of
  ``H0: Δ >= -margin`` (``aggregator.gate_stats``: Tango's score test on the cases both
  models classified); the candidate is rejected when any test rejects at ``alpha`` split
  over the tests (Bonferroni). An honest round that does not lower a sensitivity by more
  than the margin is rejected with probability at most ``alpha`` — the error rate the
  rule states — whatever the size of the held-out set; a real drop is caught with a
  power that grows with the number of high-risk cases.
* ``"noninferiority"``: the burden of proof on the candidate: accepted only when every
  test shows ``Δ > -margin`` at ``alpha`` (Bonferroni). Stricter, and with a few dozen
  cases per class it rejects even a candidate identical to the published model (its
  one-sided bound cannot clear a 5-point margin), so it needs a large held-out set.
* ``"tolerance"``: the v1 rule, kept for comparison: reject when a point estimate of a
  high-risk sensitivity falls more than ``tolerance`` below the published model's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.gate_stats import BalancedAccuracyChange, Change, PairedCounts

RULES = ("harm", "noninferiority", "tolerance")


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    high_risk: Sequence[str] = ("mel", "bcc", "akiec")
    # Allowed absolute drop in sensitivity for each high-risk class (0.05 = 5 points).
    tolerance: float = 0.05
    min_balanced_accuracy: float = 0.0
    # A published model whose balanced accuracy is at most 1/k + this is "chance level".
    chance_margin: float = 0.05
    rule: str = "harm"
    # The paired rules: the sensitivity (and balanced-accuracy) drop that is tolerated,
    # and the significance level shared by all the tests of one decision.
    margin: float = 0.0
    alpha: float = 0.05


@dataclass(frozen=True)
class PairedEvidence:
    """Per class, the 2x2 table of both models' correctness on the same cases.

    Counts, not predictions, so evidence from several sources (the aggregator's held-out
    set, count sums from elsewhere) pools by adding tables.
    """

    tables: Mapping[str, PairedCounts]

    @classmethod
    def from_predictions(
        cls,
        labels: np.ndarray,
        candidate: np.ndarray,
        published: np.ndarray,
        classes: Sequence[str],
    ) -> PairedEvidence:
        """Tables from both models' predicted labels (class indices into ``classes``)."""
        labels = np.asarray(labels)
        return cls(
            {
                name: PairedCounts.of(labels, candidate, published, index)
                for index, name in enumerate(classes)
            }
        )

    def __add__(self, other: PairedEvidence) -> PairedEvidence:
        names = list(self.tables) + [n for n in other.tables if n not in self.tables]
        empty = PairedCounts(0, 0, 0, 0)
        return PairedEvidence(
            {n: self.tables.get(n, empty) + other.tables.get(n, empty) for n in names}
        )


@dataclass(frozen=True)
class GateDecision:
    accept: bool
    reason: str
    # Per-check numbers for the ledger: {"mel": {"candidate": .., "published": ..}, ...}
    checks: dict[str, Any] = field(default_factory=dict)
    rule: str = ""

    @property
    def verdict(self) -> str:
        return "accept" if self.accept else "reject"


def _sensitivity(metrics: Mapping[str, Any], cls: str) -> float | None:
    sens = metrics.get("sensitivity")
    if not isinstance(sens, Mapping):
        return None
    value = sens.get(cls)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _chance_level(metrics: Mapping[str, Any], settings: GateSettings) -> bool:
    sens = metrics.get("sensitivity")
    bal = metrics.get("balanced_accuracy")
    if not isinstance(sens, Mapping) or not sens or not isinstance(bal, int | float):
        return False
    return float(bal) <= 1.0 / len(sens) + settings.chance_margin


def compares(
    published: Mapping[str, Any] | None, settings: GateSettings, *, published_is_initial: bool
) -> bool:
    """Whether a candidate is compared with ``published`` at all (else only the floor)."""
    return not (published is None or published_is_initial or _chance_level(published, settings))


def decide(
    candidate: Mapping[str, Any] | None,
    published: Mapping[str, Any] | None,
    settings: GateSettings,
    *,
    published_is_initial: bool = False,
    evidence: PairedEvidence | None = None,
) -> GateDecision:
    """Accept or reject ``candidate`` against ``published`` (both metric dicts).

    The paired rules also need ``evidence``: both models' paired correctness counts on
    the held-out cases the metrics were computed on.
    """
    if not settings.enabled:
        return GateDecision(True, "gate disabled", rule="off")
    if candidate is None:
        return GateDecision(True, "no held-out set configured", rule="off")
    checks: dict[str, Any] = {}
    failures: list[str] = []
    bal = candidate.get("balanced_accuracy")
    if isinstance(bal, int | float):
        checks["balanced_accuracy"] = {
            "candidate": float(bal),
            "floor": settings.min_balanced_accuracy,
        }
        if bal < settings.min_balanced_accuracy:
            failures.append(
                f"balanced accuracy {bal:.3f} is below the floor "
                f"{settings.min_balanced_accuracy:.3f}"
            )
    trivial = not compares(published, settings, published_is_initial=published_is_initial)
    if not trivial and published is not None:
        if settings.rule == "tolerance":
            failures += _tolerance_rule(candidate, published, settings, checks)
        else:
            if evidence is None:
                raise ValueError(f"the {settings.rule!r} rule needs paired evidence")
            failures += _paired_rule(evidence, settings, checks)
    if failures:
        return GateDecision(False, "; ".join(failures), checks, settings.rule)
    if trivial:
        return GateDecision(
            True,
            "the published model is at chance level (or the initial "
            "one): only the absolute floor applies",
            checks,
            settings.rule,
        )
    if settings.rule == "tolerance":
        reason = "no high-risk sensitivity dropped beyond tolerance"
    elif settings.rule == "harm":
        reason = (
            f"no evidence of a drop beyond {settings.margin:.3f} "
            f"(each test at {_per_test_alpha(checks, settings):.4g})"
        )
    else:
        reason = (
            f"non-inferior within {settings.margin:.3f} on every test "
            f"(each at {_per_test_alpha(checks, settings):.4g})"
        )
    return GateDecision(True, reason, checks, settings.rule)


def _tolerance_rule(
    candidate: Mapping[str, Any],
    published: Mapping[str, Any],
    settings: GateSettings,
    checks: dict[str, Any],
) -> list[str]:
    failures = []
    for cls in settings.high_risk:
        new = _sensitivity(candidate, cls)
        old = _sensitivity(published, cls)
        if new is None or old is None:
            # The class is absent from the held-out set: nothing to compare.
            continue
        checks[cls] = {"candidate": new, "published": old}
        if new < old - settings.tolerance:
            failures.append(
                f"{cls} sensitivity fell from {old:.3f} to {new:.3f} "
                f"(tolerance {settings.tolerance:.3f})"
            )
    return failures


def _per_test_alpha(checks: Mapping[str, Any], settings: GateSettings) -> float:
    tests = sum(1 for c in checks.values() if isinstance(c, Mapping) and "p_value" in c)
    return settings.alpha / max(1, tests)


def _paired_rule(
    evidence: PairedEvidence, settings: GateSettings, checks: dict[str, Any]
) -> list[str]:
    tables = evidence.tables
    tested = [c for c in settings.high_risk if c in tables and tables[c].n > 0]
    alpha = settings.alpha / (len(tested) + 1)  # + the balanced accuracy
    failures = []
    for cls in tested:
        t = tables[cls]
        checks[cls] = {
            "candidate": t.candidate_sensitivity,
            "published": t.published_sensitivity,
            "n": t.n,
            "candidate_only": t.candidate_only,
            "published_only": t.published_only,
            **_test(t, alpha, settings),
        }
        if checks[cls]["failed"]:
            failures.append(_failure(cls + " sensitivity", checks[cls], settings))
    ba = BalancedAccuracyChange.of(list(tables.values()))
    result = checks.setdefault("balanced_accuracy", {})
    result.update({"standard_error": ba.standard_error, **_test(ba, alpha, settings)})
    if result["failed"]:
        failures.append(_failure("balanced accuracy", result, settings))
    return failures


def _test(change: Change, alpha: float, settings: GateSettings) -> dict[str, Any]:
    """One test of the rule: does ``change`` show harm (or fail to show non-inferiority)?"""
    floor = -settings.margin
    if settings.rule == "harm":
        p = change.p_value_below(floor)
        failed = p < alpha
    else:
        p = change.p_value_above(floor)
        failed = not p < alpha
    return {
        "difference": change.difference,
        "lower": change.lower_bound(alpha),
        "upper": change.upper_bound(alpha),
        "p_value": p,
        "alpha": alpha,
        "margin": settings.margin,
        "failed": failed,
    }


def _failure(what: str, test: Mapping[str, Any], settings: GateSettings) -> str:
    alpha, p = test["alpha"], test["p_value"]
    level = f"{100 * (1 - alpha):.1f}%"
    floor = 0.0 - settings.margin  # not -margin: that prints "-0.000" for a zero margin
    if settings.rule == "harm":
        return (
            f"{what} fell by {-test['difference']:.3f} ({level} upper bound of the change "
            f"{test['upper']:+.3f} < {floor:+.3f}; p = {p:.2g} < {alpha:.3g})"
        )
    return (
        f"{what} not shown non-inferior: change {test['difference']:+.3f}, {level} lower "
        f"bound {test['lower']:+.3f} <= {floor:+.3f} (p = {p:.2g}, needs < {alpha:.3g})"
    )

"""Evaluation a clinician reads: per-class sensitivity and specificity with 95 % intervals,
one-vs-rest AUROC, calibration, the confusion matrix, and the same by subgroup.

Pure: NumPy, scikit-learn and SciPy (a scikit-learn dependency), no PyTorch, so it runs
on saved probabilities. Conventions:

* The predicted class is the arg-max of the probabilities (ties go to the lower class
  index), as in :mod:`common.evaluation`. For class c, a *case* is an example whose true
  class is c; every other example is a *negative* for c.
* sensitivity = TP / cases, specificity = TN / negatives. Each is a :class:`Proportion`:
  k of n, with a 95 % Wilson score interval (SciPy's
  ``binomtest(k, n).proportion_ci(method="wilson")``, no continuity correction).
* AUROC of class c is one-vs-rest on the probability of c (scikit-learn's
  ``roc_auc_score``; ties count 1/2), with its positives and negatives and a 95 % interval
  from the Hanley–McNeil (1982) standard error, clipped to [0, 1] (that interval shrinks
  to a point at an AUROC of exactly 0 or 1, and is rough for a handful of cases).
* A figure that cannot be measured (a class without cases, no negatives, a subgroup
  without both) is None, never 0 or NaN, so ``to_dict()`` is strict JSON.
* Balanced accuracy is the mean sensitivity over the classes with at least one case;
  macro AUROC the mean AUROC over the classes that have one.
* Calibration is top-label: confidence = the largest probability, outcome = the
  prediction is right. 15 equal-width bins, bin b covering (b/15, (b+1)/15] (a confidence
  of 0 in the first), exactly as :func:`common.evaluation.expected_calibration_error`;
  ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b|. Empty bins are not listed.
* Subgroups come from case metadata (:func:`record_groups`: sex, age band, body site). A
  case whose value is not recorded counts under ``unknown``; an attribute recorded for no
  case is left out. Every subgroup row states its n and its n per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.datasets import HIGH_RISK, Record, class_names

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
ECE_BINS = 15
UNKNOWN = "unknown"
# Upper bounds (exclusive) of the age bands, in years; the last band is open.
AGE_BANDS: tuple[tuple[float, str], ...] = (
    (30, "<30"),
    (45, "30-44"),
    (60, "45-59"),
    (75, "60-74"),
    (math.inf, "75+"),
)
# Subgroup attributes in report order: JSON key -> heading.
SUBGROUP_TITLES: dict[str, str] = {"sex": "sex", "age_band": "age band", "body_site": "body site"}


@dataclass(frozen=True)
class Proportion:
    """k of n cases, with a 95 % Wilson score interval."""

    k: int
    n: int
    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "estimate": self.estimate, "ci95": [self.low, self.high]}


def wilson(k: int, n: int, confidence: float = 0.95) -> Proportion | None:
    """``k`` of ``n`` with its Wilson score interval; None when ``n`` is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(k, n, k / n, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Auroc:
    """One-vs-rest AUROC with its 95 % Hanley–McNeil interval and the counts behind it."""

    value: float
    low: float
    high: float
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "ci95": [self.low, self.high],
            "positives": self.positives,
            "negatives": self.negatives,
        }


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUROC (Hanley & McNeil, Radiology 1982, eq. 2)."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    a2 = auc**2
    numerator = auc * (1 - auc) + (positives - 1) * (q1 - a2) + (negatives - 1) * (q2 - a2)
    return math.sqrt(max(numerator / (positives * negatives), 0.0))


def auroc(positive: np.ndarray, scores: np.ndarray) -> Auroc | None:
    """AUROC of ``scores`` for the boolean ``positive``; None without both kinds of case."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    from sklearn.metrics import roc_auc_score

    value = float(roc_auc_score(positive, scores))
    half = Z95 * hanley_mcneil_se(value, n_pos, n_neg)
    return Auroc(value, max(0.0, value - half), min(1.0, value + half), n_pos, n_neg)


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    high_risk: bool
    cases: int  # examples of this class
    predicted: int  # examples predicted as this class
    sensitivity: Proportion | None
    specificity: Proportion | None
    auroc: Auroc | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.name,
            "high_risk": self.high_risk,
            "cases": self.cases,
            "predicted": self.predicted,
            "sensitivity": _opt(self.sensitivity),
            "specificity": _opt(self.specificity),
            "auroc": _opt(self.auroc),
        }


@dataclass(frozen=True)
class ReliabilityBin:
    low: float  # the bin covers (low, high]
    high: float
    count: int
    confidence: float  # mean top-label probability in the bin
    accuracy: float  # share of the bin's predictions that are right

    def to_dict(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "count": self.count,
            "confidence": self.confidence,
            "accuracy": self.accuracy,
        }


@dataclass(frozen=True)
class Calibration:
    ece: float
    bins: int
    reliability: tuple[ReliabilityBin, ...]  # non-empty bins, lowest confidence first

    def to_dict(self) -> dict[str, Any]:
        return {
            "ece": self.ece,
            "bins": self.bins,
            "reliability": [b.to_dict() for b in self.reliability],
        }


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """Top-label reliability bins and ECE (see the module docstring)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    idx = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
            ece += sel.mean() * abs(acc - conf)
            table.append(ReliabilityBin(b / bins, (b + 1) / bins, int(sel.sum()), conf, acc))
    return Calibration(float(ece), bins, tuple(table))


@dataclass(frozen=True)
class SubgroupMetrics:
    """Headline metrics on the cases of one subgroup (e.g. sex = female)."""

    group: str
    n: int
    class_counts: Mapping[str, int]
    accuracy: float
    balanced_accuracy: float  # over the classes present in the subgroup
    classes_present: int
    macro_auroc: float | None
    sensitivity: Mapping[str, Proportion | None]  # high-risk classes
    auroc: Mapping[str, Auroc | None]  # high-risk classes

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "n": self.n,
            "class_counts": dict(self.class_counts),
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "classes_present": self.classes_present,
            "macro_auroc": self.macro_auroc,
            "sensitivity": {c: _opt(p) for c, p in self.sensitivity.items()},
            "auroc": {c: _opt(a) for c, a in self.auroc.items()},
        }


@dataclass(frozen=True)
class ClinicalReport:
    classes: tuple[str, ...]
    examples: int
    accuracy: float
    balanced_accuracy: float
    macro_auroc: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]  # confusion[true][predicted]
    calibration: Calibration
    subgroups: Mapping[str, tuple[SubgroupMetrics, ...]]  # SUBGROUP_TITLES keys present

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "examples": self.examples,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_auroc": self.macro_auroc,
            "per_class": [c.to_dict() for c in self.per_class],
            "confusion": [list(row) for row in self.confusion],
            "calibration": self.calibration.to_dict(),
            "subgroups": {
                attr: [row.to_dict() for row in rows] for attr, rows in self.subgroups.items()
            },
        }


def _opt(value: Proportion | Auroc | None) -> dict[str, Any] | None:
    return None if value is None else value.to_dict()


def age_band(age: float | None) -> str:
    """The band of an age in years (see AGE_BANDS); ``unknown`` when not recorded."""
    if age is None or not math.isfinite(age) or age < 0:
        return UNKNOWN
    return next(label for bound, label in AGE_BANDS if age < bound)


def record_groups(records: Sequence[Record]) -> dict[str, list[str | None]]:
    """Per-case subgroup values of ``records`` by attribute (None: not recorded); an
    attribute recorded for none of them is left out."""
    groups: dict[str, list[str | None]] = {
        "sex": [r.sex for r in records],
        "age_band": [None if r.age is None else age_band(r.age) for r in records],
        "body_site": [r.localization for r in records],
    }
    return {k: v for k, v in groups.items() if any(x is not None for x in v)}


def _group_order(attribute: str, values: set[str]) -> list[str]:
    """Age bands youngest first, other values alphabetically; ``unknown`` last."""
    known = sorted(values - {UNKNOWN})
    if attribute == "age_band":
        rank = {label: i for i, (_, label) in enumerate(AGE_BANDS)}
        known.sort(key=lambda v: rank.get(v, len(rank)))
    return known + ([UNKNOWN] if UNKNOWN in values else [])


def check_predictions(labels: np.ndarray, probs: np.ndarray) -> None:
    """Raise ValueError unless labels (N,) and probabilities (N, K) can be scored."""
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} do not match")
    if len(labels) == 0:
        raise ValueError("no examples to evaluate")
    k = probs.shape[1]
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in [0, {k}), got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or infinite values")


def _per_class(
    labels: np.ndarray, probs: np.ndarray, confusion: np.ndarray, names: Sequence[str]
) -> tuple[ClassMetrics, ...]:
    n = len(labels)
    rows = []
    for c, name in enumerate(names):
        cases = int(confusion[c].sum())
        predicted = int(confusion[:, c].sum())
        tp = int(confusion[c, c])
        negatives = n - cases
        rows.append(
            ClassMetrics(
                name=name,
                high_risk=name in HIGH_RISK,
                cases=cases,
                predicted=predicted,
                sensitivity=wilson(tp, cases),
                specificity=wilson(negatives - (predicted - tp), negatives),
                auroc=auroc(labels == c, probs[:, c]),
            )
        )
    return tuple(rows)


def _confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return np.asarray(confusion_matrix(labels, preds, labels=np.arange(k)), dtype=np.int64)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _subgroup(
    group: str, labels: np.ndarray, probs: np.ndarray, names: Sequence[str]
) -> SubgroupMetrics:
    preds = probs.argmax(axis=1)
    per_class = _per_class(labels, probs, _confusion(labels, preds, len(names)), names)
    recalls = [m.sensitivity.estimate for m in per_class if m.sensitivity is not None]
    aucs = [m.auroc.value for m in per_class if m.auroc is not None]
    by_name = {m.name: m for m in per_class}
    risky = [by_name[c] for c in HIGH_RISK if c in by_name]  # mel first
    return SubgroupMetrics(
        group=group,
        n=len(labels),
        class_counts={m.name: m.cases for m in per_class},
        accuracy=float((preds == labels).mean()),
        balanced_accuracy=float(np.mean(recalls)),
        classes_present=len(recalls),
        macro_auroc=_mean(aucs),
        sensitivity={m.name: m.sensitivity for m in risky},
        auroc={m.name: m.auroc for m in risky},
    )


def clinical_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Mapping[str, Sequence[str | None]] | None = None,
) -> ClinicalReport:
    """Everything above from true labels (N,), class probabilities (N, K) and, optionally,
    per-case subgroup values by attribute (as :func:`record_groups` returns them)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    check_predictions(labels, probs)
    names = class_names(probs.shape[1])
    preds = probs.argmax(axis=1)
    confusion = _confusion(labels, preds, len(names))
    per_class = _per_class(labels, probs, confusion, names)
    recalls = [m.sensitivity.estimate for m in per_class if m.sensitivity is not None]
    subgroups: dict[str, tuple[SubgroupMetrics, ...]] = {}
    for attribute, raw in (groups or {}).items():
        if len(raw) != len(labels):
            raise ValueError(f"{attribute}: {len(raw)} values for {len(labels)} examples")
        values = np.array([UNKNOWN if v is None else str(v) for v in raw], dtype=object)
        subgroups[attribute] = tuple(
            _subgroup(g, labels[values == g], probs[values == g], names)
            for g in _group_order(attribute, set(values.tolist()))
        )
    return ClinicalReport(
        classes=names,
        examples=len(labels),
        accuracy=float((preds == labels).mean()),
        balanced_accuracy=float(np.mean(recalls)),
        macro_auroc=_mean([m.auroc.value for m in per_class if m.auroc is not None]),
        per_class=per_class,
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        calibration=calibration(labels, probs),
        subgroups=subgroups,
    )

"""Clinician-facing metrics (common.clinical_metrics) against published and hand-counted
answers, and against the gate's own metrics (common.evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.clinical_metrics import (
    UNKNOWN,
    age_band,
    auroc,
    calibration,
    clinical_metrics,
    hanley_mcneil_se,
    record_groups,
    wilson,
)
from common.datasets import CLASS_INDEX, CLASSES, Record
from common.evaluation import binary_auroc, compute_metrics, expected_calibration_error

K = len(CLASSES)


def one_hot(labels: np.ndarray, k: int = K) -> np.ndarray:
    out = np.zeros((len(labels), k))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def noisy_probs(labels: np.ndarray, seed: int, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(K), len(labels))
    probs[np.arange(len(labels)), labels] += 0.3
    if ties:  # coarse probabilities, so AUROC has many tied scores
        probs = np.round(probs * 4) / 4 + 1e-3
    return probs / probs.sum(axis=1, keepdims=True)


def strict_json(obj: object) -> object:
    """Round-trip through JSON that refuses NaN and infinities either way."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(json.dumps(obj, allow_nan=False), parse_constant=refuse)


# --- Wilson interval ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe, Statistics in Medicine 17:857 (1998), Table II, method 3 (Wilson score).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0000),
        # The textbook example: 8 of 10.
        (8, 10, 0.4902, 0.9433),
    ],
)
def test_wilson_interval_matches_published_values(k: int, n: int, low: float, high: float):
    p = wilson(k, n)
    assert p is not None
    assert (p.k, p.n, p.estimate) == (k, n, k / n)
    assert p.low == pytest.approx(low, abs=5e-5)
    assert p.high == pytest.approx(high, abs=5e-5)


def test_wilson_is_none_without_cases_and_refuses_impossible_counts() -> None:
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(-1, 2)


# --- AUROC --------------------------------------------------------------------------------


def test_hanley_mcneil_standard_error_matches_the_paper_and_a_hand_computation() -> None:
    # Hanley & McNeil, Radiology 143:29 (1982): 51 abnormal and 58 normal images, area
    # 0.893, standard error 0.032 (their eq. 2 gives 0.0325).
    assert hanley_mcneil_se(0.893, 51, 58) == pytest.approx(0.032, abs=1e-3)
    # A = 0.75, 10 positives, 20 negatives: Q1 = 0.6, Q2 = 1.125 / 1.75,
    # SE² = (0.1875 + 9 (0.6 − 0.5625) + 19 (Q2 − 0.5625)) / 200.
    q2 = 1.125 / 1.75
    expected = math.sqrt((0.1875 + 9 * (0.6 - 0.5625) + 19 * (q2 - 0.5625)) / 200)
    assert hanley_mcneil_se(0.75, 10, 20) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.10129, abs=1e-5)


def test_per_class_auroc_agrees_with_binary_auroc_and_counts_its_cases() -> None:
    labels = np.random.default_rng(3).integers(0, K, 400)
    for ties in (False, True):
        probs = noisy_probs(labels, 4, ties=ties)
        report = clinical_metrics(labels, probs)
        for c, m in enumerate(report.per_class):
            assert m.auroc is not None
            expected = binary_auroc(labels == c, probs[:, c])
            assert m.auroc.value == pytest.approx(expected, abs=1e-12)
            assert (m.auroc.positives, m.auroc.negatives) == (m.cases, len(labels) - m.cases)
            assert 0.0 <= m.auroc.low <= m.auroc.value <= m.auroc.high <= 1.0


def test_auroc_is_none_without_positives_or_negatives() -> None:
    assert auroc(np.array([True, True]), np.array([0.2, 0.9])) is None
    assert auroc(np.array([False, False]), np.array([0.2, 0.9])) is None
    perfect = auroc(np.array([True, False]), np.array([0.9, 0.1]))
    assert perfect is not None and (perfect.value, perfect.low, perfect.high) == (1.0, 1.0, 1.0)


# --- whole report -------------------------------------------------------------------------


def test_headline_numbers_agree_with_the_gate_metrics() -> None:
    labels = np.random.default_rng(5).integers(0, K, 500)
    probs = noisy_probs(labels, 6)
    gate = compute_metrics(labels, probs)
    report = clinical_metrics(labels, probs)
    assert report.examples == gate.examples == 500
    assert report.accuracy == gate.accuracy
    assert report.balanced_accuracy == pytest.approx(gate.balanced_accuracy, abs=1e-12)
    assert report.macro_auroc == pytest.approx(gate.macro_auroc, abs=1e-12)
    assert [list(row) for row in report.confusion] == gate.confusion
    assert report.calibration.ece == pytest.approx(gate.expected_calibration_error, abs=1e-12)
    for m in report.per_class:
        assert m.sensitivity is not None and m.specificity is not None
        assert m.sensitivity.estimate == pytest.approx(gate.sensitivity[m.name])
        assert m.specificity.estimate == pytest.approx(gate.specificity[m.name])


def test_sensitivity_and_specificity_count_the_cases_behind_them() -> None:
    # Only akiec (0), bcc (1) and mel (4) occur (the gate's known-confusion example).
    labels = np.array([0, 0, 0, 0, 1, 1, 4, 4, 4, 4])
    preds = np.array([0, 0, 0, 1, 1, 4, 4, 4, 4, 0])
    report = clinical_metrics(labels, one_hot(preds) * 0.94 + 0.01)
    by = {m.name: m for m in report.per_class}
    akiec, bcc, mel, nv = by["akiec"], by["bcc"], by["mel"], by["nv"]
    assert akiec.high_risk and not nv.high_risk
    assert (akiec.cases, akiec.predicted) == (4, 4)
    assert akiec.sensitivity is not None and (akiec.sensitivity.k, akiec.sensitivity.n) == (3, 4)
    assert akiec.specificity is not None and (akiec.specificity.k, akiec.specificity.n) == (5, 6)
    assert bcc.sensitivity is not None and (bcc.sensitivity.k, bcc.sensitivity.n) == (1, 2)
    assert mel.sensitivity is not None and (mel.sensitivity.k, mel.sensitivity.n) == (3, 4)
    # A class without cases has no sensitivity and no AUROC, but a specificity.
    assert nv.cases == 0 and nv.sensitivity is None and nv.auroc is None
    assert nv.specificity is not None and (nv.specificity.k, nv.specificity.n) == (10, 10)
    assert report.balanced_accuracy == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert report.confusion[0][1] == 1 and report.confusion[4][0] == 1
    assert report.calibration.ece == pytest.approx(0.25)  # confidence 0.95, 70 % right
    assert report.subgroups == {}


def test_reliability_bins_agree_with_scikit_learn_and_the_gate_ece() -> None:
    from sklearn.calibration import calibration_curve

    labels = np.random.default_rng(7).integers(0, K, 3000)
    probs = noisy_probs(labels, 8)  # continuous: no confidence sits on a bin edge
    cal = calibration(labels, probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15)
    np.testing.assert_allclose([b.accuracy for b in cal.reliability], accuracy, atol=1e-12)
    np.testing.assert_allclose([b.confidence for b in cal.reliability], mean_confidence)
    assert sum(b.count for b in cal.reliability) == len(labels)
    assert all(b.count > 0 and b.low < b.confidence <= b.high for b in cal.reliability)
    assert cal.ece == pytest.approx(expected_calibration_error(labels, probs), abs=1e-12)


def test_undefined_values_are_null_in_strict_json() -> None:
    labels = np.array([5, 5, 5])
    report = clinical_metrics(labels, one_hot(np.array([5, 5, 4])), {"sex": ["f", None, "f"]})
    d = strict_json(report.to_dict())
    assert isinstance(d, dict)
    assert d["macro_auroc"] is None
    nv = next(c for c in d["per_class"] if c["class"] == "nv")
    assert nv["auroc"] is None and nv["specificity"] is None
    assert (nv["sensitivity"]["k"], nv["sensitivity"]["n"]) == (2, 3)
    assert nv["sensitivity"]["ci95"] == pytest.approx([0.2077, 0.9385], abs=5e-5)
    mel = next(c for c in d["per_class"] if c["class"] == "mel")
    assert mel["sensitivity"] is None and mel["specificity"]["k"] == 2
    assert [g["group"] for g in d["subgroups"]["sex"]] == ["f", UNKNOWN]
    assert d["subgroups"]["sex"][0]["sensitivity"]["mel"] is None


def test_input_errors_are_refused() -> None:
    with pytest.raises(ValueError, match="no examples"):
        clinical_metrics(np.zeros(0, dtype=int), np.zeros((0, K)))
    with pytest.raises(ValueError, match="do not match"):
        clinical_metrics(np.zeros(3, dtype=int), np.zeros((2, K)))
    with pytest.raises(ValueError, match="labels must be in"):
        clinical_metrics(np.array([7]), np.ones((1, K)) / K)
    with pytest.raises(ValueError, match="NaN"):
        clinical_metrics(np.array([0]), np.full((1, K), np.nan))
    with pytest.raises(ValueError, match="sex: 1 values for 2 examples"):
        clinical_metrics(np.array([0, 1]), np.ones((2, K)) / K, {"sex": ["female"]})


# --- subgroups ----------------------------------------------------------------------------


def test_subgroups_split_the_cases_as_counted_by_hand() -> None:
    mel, nv, bcc = CLASS_INDEX["mel"], CLASS_INDEX["nv"], CLASS_INDEX["bcc"]
    #          case: 0    1    2    3    4    5    6    7
    labels = np.array([mel, mel, nv, nv, mel, bcc, nv, mel])
    preds = np.array([mel, nv, nv, nv, mel, bcc, mel, mel])
    sex = ["female", "female", "female", "male", "male", "male", None, "male"]
    site = ["back", "back", "face", "face", "back", "face", "back", "back"]
    probs = one_hot(preds) * 0.9 + 0.1 / K
    report = clinical_metrics(labels, probs, {"sex": sex, "body_site": site})
    assert list(report.subgroups) == ["sex", "body_site"]
    female, male, unknown = report.subgroups["sex"]
    assert (female.group, male.group, unknown.group) == ("female", "male", UNKNOWN)
    assert (female.n, male.n, unknown.n) == (3, 4, 1)
    assert female.class_counts == {**dict.fromkeys(CLASSES, 0), "mel": 2, "nv": 1}
    # female: mel 1 of 2 found, nv 1 of 1 -> balanced accuracy 0.75 over 2 classes.
    assert female.sensitivity["mel"] is not None
    assert (female.sensitivity["mel"].k, female.sensitivity["mel"].n) == (1, 2)
    assert female.balanced_accuracy == 0.75 and female.classes_present == 2
    assert female.accuracy == pytest.approx(2 / 3)
    assert female.sensitivity["bcc"] is None and female.auroc["bcc"] is None
    # male: mel 2/2, nv 1/1, bcc 1/1.
    assert male.balanced_accuracy == 1.0 and male.classes_present == 3
    assert male.macro_auroc == 1.0
    assert list(male.sensitivity) == ["mel", "bcc", "akiec"]  # HIGH_RISK order, mel first
    # The one case without a recorded sex: one class, so no AUROC can be measured.
    assert unknown.macro_auroc is None and unknown.accuracy == 0.0
    back, face = report.subgroups["body_site"]
    assert (back.group, back.n, face.group, face.n) == ("back", 5, "face", 3)
    assert back.sensitivity["mel"] is not None and back.sensitivity["mel"].k == 3
    # The subgroups of one attribute partition the cases.
    for rows in report.subgroups.values():
        assert sum(r.n for r in rows) == len(labels)


def test_age_bands_and_record_groups() -> None:
    ages = {29.9: "<30", 30: "30-44", 44: "30-44", 45: "45-59", 59.5: "45-59", 60: "60-74"}
    ages |= {74: "60-74", 75: "75+", 90: "75+", 0: "<30"}
    for age, band in ages.items():
        assert age_band(age) == band, age
    assert age_band(None) == UNKNOWN and age_band(math.nan) == UNKNOWN

    def rec(i: int, **meta: object) -> Record:
        return Record(f"i{i}", f"L{i}", 0, Path(f"/x/{i}.jpg"), **meta)  # type: ignore[arg-type]

    records = [rec(0, sex="male", age=80.0), rec(1, age=None), rec(2, sex="female", age=35.0)]
    groups = record_groups(records)
    # No record has a body site: that attribute is left out, not one "unknown" row.
    assert groups == {"sex": ["male", None, "female"], "age_band": ["75+", None, "30-44"]}
    assert record_groups([rec(0), rec(1)]) == {}
    report = clinical_metrics(np.array([0, 0, 0]), np.ones((3, K)) / K, groups)
    assert [g.group for g in report.subgroups["age_band"]] == ["30-44", "75+", UNKNOWN]

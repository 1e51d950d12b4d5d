"""The validation gate's rules, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.gate import GateSettings, PairedEvidence, decide
from common.datasets import CLASSES


def m(bal=0.6, **sens):
    base = {"mel": 0.6, "bcc": 0.5, "akiec": 0.4, "nv": 0.9}
    base.update(sens)
    return {"balanced_accuracy": bal, "sensitivity": base}


S = GateSettings(rule="tolerance", tolerance=0.05, min_balanced_accuracy=0.2)


def test_accepts_within_tolerance_and_improvements():
    assert decide(m(mel=0.56), m(), S).accept
    assert decide(m(mel=0.9, bcc=0.7), m(), S).accept
    assert decide(m(nv=0.1), m(), S).accept  # nv is not high-risk


def test_rejects_a_drop_on_any_high_risk_class_and_says_which():
    for cls in ("mel", "bcc", "akiec"):
        published = m()
        candidate = m(**{cls: published["sensitivity"][cls] - 0.2})
        d = decide(candidate, published, S)
        assert not d.accept and cls in d.reason
        assert d.checks[cls]["published"] > d.checks[cls]["candidate"]


def test_balanced_accuracy_floor_applies_even_against_the_initial_model():
    assert not decide(m(bal=0.1), m(), S).accept
    assert not decide(m(bal=0.1), None, S).accept
    assert not decide(m(bal=0.1), m(mel=1.0), S, published_is_initial=True).accept


def test_the_untrained_initial_model_is_not_a_sensitivity_baseline():
    # A random network that calls everything melanoma has mel sensitivity 1.0.
    initial = m(mel=1.0, bcc=0.0, akiec=0.0)
    assert decide(m(mel=0.3), initial, S, published_is_initial=True).accept
    assert not decide(m(mel=0.3), initial, S, published_is_initial=False).accept


def test_classes_absent_from_the_holdout_are_skipped_and_disabled_gate_accepts():
    published = {"balanced_accuracy": 0.5, "sensitivity": {"mel": 0.5}}
    assert decide({"balanced_accuracy": 0.5, "sensitivity": {"mel": 0.5}}, published, S).accept
    assert decide(m(mel=0.0), m(), GateSettings(enabled=False)).accept
    assert decide(None, m(), S).accept  # no held-out set configured


# -- the paired rules --------------------------------------------------------------------

MEL, BCC, NV = CLASSES.index("mel"), CLASSES.index("bcc"), CLASSES.index("nv")
HARM = GateSettings(rule="harm", margin=0.0, alpha=0.05)
NONINF = GateSettings(rule="noninferiority", margin=0.05, alpha=0.05)


def holdout(per_class: int) -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), per_class)


def flip(predicted: np.ndarray, labels: np.ndarray, cls: int, count: int) -> np.ndarray:
    """``count`` cases of ``cls`` that ``predicted`` got right become wrong (called nv)."""
    out = predicted.copy()
    right = np.flatnonzero((labels == cls) & (out == cls))[:count]
    out[right] = NV if cls != NV else MEL
    return out


def paired(labels: np.ndarray, candidate: np.ndarray, published: np.ndarray):
    from common.evaluation import compute_metrics

    def metrics(pred: np.ndarray) -> dict:
        return compute_metrics(labels, np.eye(len(CLASSES))[pred]).to_dict()

    evidence = PairedEvidence.from_predictions(labels, candidate, published, CLASSES)
    return metrics(candidate), metrics(published), evidence


def test_harm_rule_accepts_a_candidate_that_changes_nothing_and_says_why():
    labels = holdout(40)
    published = flip(labels.copy(), labels, MEL, 10)
    cand, pub, ev = paired(labels, published.copy(), published)
    d = decide(cand, pub, HARM, evidence=ev)
    assert d.accept and d.rule == "harm" and "no evidence" in d.reason
    assert d.checks["mel"]["difference"] == 0.0 and d.checks["mel"]["p_value"] == 0.5


def test_harm_rule_rejects_a_real_drop_with_the_numbers_behind_it():
    labels = holdout(100)
    published = labels.copy()
    candidate = flip(published, labels, MEL, 20)  # mel sensitivity 1.0 -> 0.8
    cand, pub, ev = paired(labels, candidate, published)
    d = decide(cand, pub, HARM, evidence=ev)
    assert not d.accept and "mel sensitivity fell by 0.200" in d.reason
    mel = d.checks["mel"]
    assert (mel["n"], mel["candidate_only"], mel["published_only"]) == (100, 0, 20)
    assert mel["failed"] and mel["p_value"] < mel["alpha"]
    # Three high-risk classes and the balanced accuracy share alpha (Bonferroni).
    assert mel["alpha"] == pytest.approx(0.05 / 4)
    assert mel["upper"] < 0 and not d.checks["bcc"]["failed"]


def test_harm_rule_accepts_the_noise_the_old_rule_rejected():
    # The v1 rule rejected an honest round on "bcc sensitivity fell from 0.542 to 0.417":
    # 24 bcc cases, 3 fewer right — within what two similar models disagree on.
    labels = holdout(24)
    published = flip(labels.copy(), labels, BCC, 11)  # 13 of 24 right: 0.542
    candidate = published.copy()
    wrong_before = np.flatnonzero((labels == BCC) & (published != BCC))[:2]
    candidate[wrong_before] = BCC  # 2 gained ...
    candidate = flip(candidate, labels, BCC, 5)  # ... 5 lost: 10 of 24 right: 0.417
    cand, pub, ev = paired(labels, candidate, published)
    assert cand["sensitivity"]["bcc"] == pytest.approx(10 / 24)
    assert not decide(cand, pub, GateSettings(rule="tolerance")).accept
    d = decide(cand, pub, HARM, evidence=ev)
    assert d.accept, d.reason
    assert d.checks["bcc"]["p_value"] > d.checks["bcc"]["alpha"]


def test_noninferiority_needs_enough_cases_to_prove_a_candidate_no_worse():
    for per_class, accepted in ((30, False), (400, True)):
        labels = holdout(per_class)
        cand, pub, ev = paired(labels, labels.copy(), labels.copy())  # identical models
        d = decide(cand, pub, NONINF, evidence=ev)
        assert d.accept is accepted, (per_class, d.reason)
        if not accepted:
            assert "not shown non-inferior" in d.reason
        assert d.checks["mel"]["lower"] < 0.0


def test_paired_rules_need_predictions_and_keep_the_initial_model_exception():
    labels = holdout(10)
    cand, pub, ev = paired(labels, flip(labels, labels, MEL, 10), labels)
    with pytest.raises(ValueError, match="paired evidence"):
        decide(cand, pub, HARM)
    # Against the initial model only the floor applies, whatever the paired evidence says.
    assert decide(cand, pub, HARM, evidence=ev, published_is_initial=True).accept

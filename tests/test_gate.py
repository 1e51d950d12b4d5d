"""The validation gate's rule, as a pure function."""

from __future__ import annotations

from aggregator.gate import GateSettings, decide


def m(bal=0.6, **sens):
    base = {"mel": 0.6, "bcc": 0.5, "akiec": 0.4, "nv": 0.9}
    base.update(sens)
    return {"balanced_accuracy": bal, "sensitivity": base}


S = GateSettings(tolerance=0.05, min_balanced_accuracy=0.2)


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

"""The clinic's accountant math and budget guard (clinic_agent.privacy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from clinic_agent.privacy import (
    DeclineReason,
    MechanismStep,
    PlanPrivacyRequest,
    PrivacyConfig,
    default_delta,
    epsilon_for,
    plan_round,
)
from common.errors import ConfigError

# Opacus's own accountant tests (opacus/tests/accountants_test.py, v1.6):
# σ=1.5, q=0.04, 90 epochs (2250 steps), δ=1e-5.
OPACUS_RDP_EPS = 7.32911117143
OPACUS_PRV_EPS = 6.777395712150674


@dataclass(frozen=True)
class Spent:
    """A stand-in ledger record (the guard only reads these four fields)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float


def _spent(decision_step: MechanismStep, delta: float) -> Spent:
    return Spent(
        decision_step.noise_multiplier, decision_step.sample_rate, decision_step.steps, delta
    )


# -- known answers ----------------------------------------------------------------------


def test_rdp_matches_opacus_published_value() -> None:
    eps = epsilon_for([MechanismStep(1.5, 0.04, 2250)], 1e-5, "rdp")
    assert eps == pytest.approx(OPACUS_RDP_EPS, abs=1e-6)


def test_prv_matches_opacus_published_value_and_is_tighter_than_rdp() -> None:
    eps = epsilon_for([MechanismStep(1.5, 0.04, 2250)], 1e-5, "prv")
    # PRV is a numerical FFT bound (eps_error 0.01); Opacus's own value within that.
    assert eps == pytest.approx(OPACUS_PRV_EPS, abs=0.01)
    assert eps < OPACUS_RDP_EPS
    assert eps == pytest.approx(OPACUS_RDP_EPS, rel=0.15)


def test_heterogeneous_history_equals_direct_rdp_computation() -> None:
    history = [
        MechanismStep(1.0, 0.01, 300),
        MechanismStep(2.0, 0.05, 120),
        MechanismStep(1.0, 0.01, 200),
    ]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(
        rdp_analysis.compute_rdp(
            q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders
        )
        for s in history
    )
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon_for(history, 1e-5, "rdp") == pytest.approx(float(expected), rel=1e-9)
    # Composition does not depend on order, and splitting a run into rounds changes nothing.
    assert epsilon_for(list(reversed(history)), 1e-5) == pytest.approx(
        epsilon_for([MechanismStep(1.0, 0.01, 500), MechanismStep(2.0, 0.05, 120)], 1e-5)
    )


def test_rdp_and_prv_close_on_a_realistic_clinic_history() -> None:
    history = [MechanismStep(1.1, 0.05, 100)] * 5 + [MechanismStep(1.3, 0.04, 125)] * 3
    rdp = epsilon_for(history, 1e-5, "rdp")
    prv = epsilon_for(history, 1e-5, "prv")
    assert 0 < prv <= rdp
    assert prv == pytest.approx(rdp, rel=0.2)


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    assert epsilon_for([], 1e-5) == 0.0
    a = epsilon_for([MechanismStep(1.0, 0.02, 100)], 1e-5)
    b = epsilon_for([MechanismStep(1.0, 0.02, 200)], 1e-5)
    c = epsilon_for([MechanismStep(2.0, 0.02, 200)], 1e-5)
    assert 0 < c < a < b


def test_mechanism_and_delta_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        MechanismStep(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        MechanismStep(1.0, 1.5, 10)
    with pytest.raises(ValueError, match="steps"):
        MechanismStep(1.0, 0.1, 0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([MechanismStep(1.0, 0.1, 1)], 1.0)
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for([MechanismStep(1.0, 0.1, 1)], 1e-5, "gdp")


@pytest.mark.parametrize(
    ("n", "delta"),
    [
        (1, 0.1),
        (9, 0.01),
        (10, 0.01),
        (11, 0.001),
        (1000, 1e-4),
        (1001, 1e-5),
        (1500, 1e-5),
        (8499, 1e-5),
    ],
)
def test_default_delta_is_a_power_of_ten_below_one_over_ten_n(n: int, delta: float) -> None:
    got = default_delta(n)
    assert got == pytest.approx(delta, rel=1e-12)
    assert got <= 1 / (10 * n) < 1 / n


# -- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"noise_multiplier": 0.0}, "privacy.noise_multiplier"),
        ({"noise_multiplier": -1.0}, "privacy.noise_multiplier"),
        ({"noise_multiplier": 0.3, "noise_floor": 0.5}, "privacy.noise_multiplier"),
        ({"noise_multiplier": None}, "privacy.noise_multiplier"),
        ({"max_grad_norm": 0.0}, "privacy.max_grad_norm"),
        ({"max_grad_norm": math.inf}, "privacy.max_grad_norm"),
        ({"delta": 0.0}, "privacy.delta"),
        ({"delta": 1.0}, "privacy.delta"),
        ({"epsilon_max": 0.0}, "privacy.epsilon_max"),
        ({"epsilon_max": math.nan}, "privacy.epsilon_max"),
        ({"mode": "maybe"}, "privacy.mode"),
        ({"accountant": "gdp"}, "privacy.accountant"),
        ({"noise_floor": 0.0}, "privacy.noise_floor"),
        ({"target_epsilon_per_round": -1.0}, "privacy.target_epsilon_per_round"),
        ({"target_epsilon_per_round": 9.0, "epsilon_max": 8.0}, "privacy.target_epsilon_per_round"),
        ({"min_examples": 0}, "privacy.min_examples"),
    ],
)
def test_unsafe_settings_are_refused_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PrivacyConfig(**kwargs).validate()


def test_delta_must_be_below_one_over_n_once_n_is_known() -> None:
    PrivacyConfig(delta=1e-4).validate_for_dataset(1000)
    with pytest.raises(ConfigError, match=r"privacy\.delta: .*1/n"):
        PrivacyConfig(delta=1e-3).validate_for_dataset(1000)
    with pytest.raises(ConfigError, match=r"privacy\.min_examples"):
        PrivacyConfig().validate_for_dataset(5)


def test_defaults_are_valid() -> None:
    PrivacyConfig().validate()
    PrivacyConfig().validate_for_dataset(8499)


# -- the budget guard -------------------------------------------------------------------


def test_tiny_budget_accepts_round_one_and_declines_round_two() -> None:
    cfg = PrivacyConfig(epsilon_max=0.6, noise_multiplier=2.0)
    first = plan_round(cfg, [], n_examples=1000, batch_size=50, epochs=1)
    assert first.accepted and first.reason is None
    assert first.step == MechanismStep(2.0, 0.05, 20)
    assert first.delta == 1e-4
    assert first.epsilon_spent == 0.0
    assert first.epsilon_after is not None and 0 < first.epsilon_after <= 0.6
    assert first.epsilon_after == pytest.approx(epsilon_for([first.step], 1e-4))

    ledger = [_spent(first.step, first.delta)]
    second = plan_round(cfg, ledger, n_examples=1000, batch_size=50, epochs=1)
    assert not second.accepted
    assert second.reason == "privacy_budget_exhausted"
    assert second.step is None
    assert second.epsilon_spent == pytest.approx(first.epsilon_after)
    assert second.epsilon_after is not None and second.epsilon_after > 0.6
    assert "ε_max=0.6" in second.message


def test_plan_with_noise_below_the_floor_is_declined() -> None:
    cfg = PrivacyConfig(noise_multiplier=1.0, noise_floor=0.8)
    decision = plan_round(cfg, [], 1000, 50, 1, PlanPrivacyRequest(noise_multiplier=0.5))
    assert not decision.accepted
    assert decision.reason == DeclineReason.NOISE_BELOW_FLOOR == "noise_below_floor"


def test_aggregator_can_add_noise_but_never_remove_it() -> None:
    cfg = PrivacyConfig(noise_multiplier=1.2, noise_floor=0.8)
    lower = plan_round(cfg, [], 1000, 50, 1, PlanPrivacyRequest(noise_multiplier=0.9))
    higher = plan_round(cfg, [], 1000, 50, 1, PlanPrivacyRequest(noise_multiplier=3.0))
    assert lower.accepted and lower.step is not None and lower.step.noise_multiplier == 1.2
    assert higher.accepted and higher.step is not None and higher.step.noise_multiplier == 3.0


def test_target_epsilon_per_round_derives_the_noise() -> None:
    cfg = PrivacyConfig(target_epsilon_per_round=1.0, noise_floor=0.5, epsilon_max=5.0)
    decision = plan_round(cfg, [], 1000, 50, 2)
    assert decision.accepted and decision.step is not None
    assert decision.epsilon_after is not None
    assert 0.95 <= decision.epsilon_after <= 1.0
    # The floor still wins over a derived σ that would be lower.
    loose = PrivacyConfig(target_epsilon_per_round=5.0, noise_floor=2.0, epsilon_max=8.0)
    d2 = plan_round(loose, [], 1000, 50, 1)
    assert d2.step is not None and d2.step.noise_multiplier == 2.0


def test_small_or_invalid_inputs_are_declined_with_reasons() -> None:
    cfg = PrivacyConfig(min_examples=20)
    assert plan_round(cfg, [], 10, 5, 1).reason == "dataset_too_small"
    assert plan_round(cfg, [], 30, 64, 1).reason == "dataset_too_small"
    assert plan_round(cfg, [], 1000, 0, 1).reason == "invalid_plan"
    assert plan_round(cfg, [], 1000, 50, 0).reason == "invalid_plan"
    bad_noise = plan_round(cfg, [], 1000, 50, 1, PlanPrivacyRequest(noise_multiplier=math.nan))
    assert bad_noise.reason == "invalid_plan"
    assert plan_round(PrivacyConfig(delta=0.01), [], 1000, 50, 1).reason == "delta_too_large"


def test_history_is_judged_at_the_smallest_delta_ever_used() -> None:
    cfg = PrivacyConfig(epsilon_max=50.0)
    step = MechanismStep(1.0, 0.05, 20)
    # The clinic once had 100,000 examples (δ=1e-6) and now has 1,000 (default δ=1e-4).
    decision = plan_round(cfg, [_spent(step, 1e-6)], 1000, 50, 1)
    assert decision.delta == 1e-6
    assert decision.epsilon_spent == pytest.approx(epsilon_for([step], 1e-6))


def test_mode_off_charges_nothing() -> None:
    decision = plan_round(PrivacyConfig(mode="off"), [], 1000, 50, 1)
    assert decision.accepted and decision.step is None and not decision.dp_enabled
    assert decision.epsilon_after == decision.epsilon_spent == 0.0

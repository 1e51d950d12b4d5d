"""Checks on the unmasked sum, against the red-team vectors that motivated them.

The attacks go through a real secure-aggregation round (real clients, real server, real
masks): the attacker is a clinic that skips its own clipping and encodes whatever it
likes, with every ring coordinate in range, which is all the server can check per upload.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_secagg_protocol import (
    ALL_CLINICS,
    CLIP_NORM,
    LOSS_MAX,
    WEIGHT_MAX,
    Contribution,
    RoundDriver,
    SecAggFederation,
    build_federation,
    make_contributions,
)

from aggregator.fedavg import AggregateResult
from aggregator.sum_checks import CHECKS, SumBounds, SumCheckError, check_sum
from common.secagg.quantize import QuantizationPlan, UInt32Array

COHORT = ALL_CLINICS[:4]
ATTACKER = COHORT[0]
DIM = 400


@pytest.fixture(scope="module")
def secagg_fed(tmp_path_factory: pytest.TempPathFactory) -> SecAggFederation:
    return build_federation(tmp_path_factory.mktemp("sum-checks-pki"))


@dataclasses.dataclass(frozen=True)
class ScaledPlan(QuantizationPlan):
    """Encodes ``delta / factor`` honestly, then multiplies the delta's ring integers by
    ``factor``: a delta ``factor`` x its clip bound, every coordinate still in range."""

    factor: int = 1

    def encode(self, delta, *, weight, rng, loss=None) -> UInt32Array:  # type: ignore[no-untyped-def]
        out = super().encode(delta / self.factor, weight=weight, rng=rng, loss=loss)
        ints = out[: delta.size].view(np.int32)
        ints *= self.factor
        return out


@dataclasses.dataclass(frozen=True)
class ForgedWeightPlan(QuantizationPlan):
    """Encodes honestly, then overwrites the weight coordinate with ``weight_q``."""

    weight_q: int = 0

    def encode(self, delta, *, weight, rng, loss=None) -> UInt32Array:  # type: ignore[no-untyped-def]
        out = super().encode(delta, weight=weight, rng=rng, loss=loss)
        out[delta.size] = np.array([self.weight_q], dtype=np.int32).view(np.uint32)[0]
        return out


class PoisoningDriver(RoundDriver):
    """An honest server and honest clinics, but ``ATTACKER`` encodes with ``attack_plan``."""

    attack_plan: QuantizationPlan | None = None

    def _upload(self, clinic: str, contribution: Contribution, *, partial: bool = False) -> bool:
        if clinic != ATTACKER or self.attack_plan is None:
            return super()._upload(clinic, contribution, partial=partial)
        masked = self.clients[clinic].masked_input(
            self.server.shares_for(clinic),
            contribution.delta,
            weight=contribution.weight,
            plan=self.attack_plan,
            loss=contribution.loss,
        )
        upload = self.server.begin_upload(clinic)
        for chunk in masked.chunk_bytes(self.chunk_elements):
            upload.write(chunk)
        self.server.commit(upload)
        return True


def bounds_for(plan: QuantizationPlan) -> SumBounds:
    return SumBounds(
        min_weight=1.0,
        weight_max=plan.weight_max,
        norm_bound=CLIP_NORM,
        delta_scale=plan.delta_scale,
        loss_max=plan.loss_max,
        loss_scale=plan.loss_scale or 0.0,
    )


def contributions(seed: int = 3) -> dict[str, Contribution]:
    out = make_contributions(COHORT, DIM, seed)
    for c in out.values():  # every honest clinic sends a delta right at the clip bound
        c.delta = (c.delta / np.linalg.norm(c.delta) * CLIP_NORM * 0.999).astype(np.float32)
        # Small enough that 100 x the delta still has every coordinate in the ring's range.
        c.weight = 50.0
    return out


def run(secagg_fed: SecAggFederation, attack: str | None, scale: int = 1):
    driver = PoisoningDriver(secagg_fed, COHORT, threshold=3, dim=DIM)
    contribs = contributions()
    plan = {f.name: getattr(driver.plan, f.name) for f in dataclasses.fields(driver.plan)}
    if attack == "scaled":
        contribs[ATTACKER].delta = contribs[ATTACKER].delta * np.float32(scale)
        driver.attack_plan = ScaledPlan(**plan, factor=scale)
    elif attack == "tiny_weight":
        others = sum(round(contribs[c].weight * driver.plan.weight_scale) for c in COHORT[1:])
        driver.attack_plan = ForgedWeightPlan(**plan, weight_q=1 - others)
    result = driver.run(contribs)
    return result, bounds_for(driver.plan)


def test_an_honest_cohort_at_the_clip_bound_passes_every_check(
    secagg_fed: SecAggFederation,
) -> None:
    result, bounds = run(secagg_fed, None)
    measured = check_sum(result, bounds)
    assert measured["norm"] <= CLIP_NORM and measured["contributors"] == 4
    # The worst case for the norm: every clinic sends the same direction at the bound.
    same = np.full(DIM, CLIP_NORM / math.sqrt(DIM), dtype=np.float32)
    worst = AggregateResult(same, 4 * WEIGHT_MAX, 1.0, COHORT)
    assert check_sum(worst, bounds)["norm"] == pytest.approx(CLIP_NORM, rel=1e-6)


@pytest.mark.parametrize("scale", [10, 100])
def test_an_update_scaled_beyond_the_clip_bound_fails_the_norm_check(
    secagg_fed: SecAggFederation, scale: int
) -> None:
    result, bounds = run(secagg_fed, "scaled", scale)
    # The attack went through the masking undetected and would move the model this far:
    assert np.linalg.norm(result.delta) > 2 * CLIP_NORM
    with pytest.raises(SumCheckError, match="'norm'") as caught:
        check_sum(result, bounds)
    assert caught.value.check == "norm"


def test_a_weight_that_cancels_the_others_fails_the_weight_check(
    secagg_fed: SecAggFederation,
) -> None:
    result, bounds = run(secagg_fed, "tiny_weight")
    # One quantum of summed weight: the mean delta is divided by almost nothing.
    assert result.total_weight < 1.0 and np.linalg.norm(result.delta) > 1e3
    with pytest.raises(SumCheckError, match=r"'weight'.*summed weight"):
        check_sum(result, bounds)


def test_non_finite_or_impossible_sums_name_their_check() -> None:
    bounds = SumBounds(min_weight=1.0, weight_max=10.0, norm_bound=1.0, loss_max=LOSS_MAX)
    ok = np.zeros(5, dtype=np.float32)
    cases = {
        "finite": AggregateResult(np.array([0, np.nan, 0], np.float32), 3.0, None, ("a", "b")),
        "weight": AggregateResult(ok, 100.0, None, ("a", "b")),  # more than 2 x 10
        "loss": AggregateResult(ok, 5.0, LOSS_MAX * 2, ("a", "b")),
    }
    for check, result in cases.items():
        with pytest.raises(SumCheckError) as caught:
            check_sum(result, bounds)
        assert caught.value.check == check and check in CHECKS
    with pytest.raises(SumCheckError, match="no contributors"):
        check_sum(AggregateResult(ok, 0.0, None, ()), bounds)


def test_an_unclipped_plain_round_has_no_norm_bound_to_check() -> None:
    big = np.full(10, 1e3, dtype=np.float32)
    bounds = SumBounds(min_weight=1.0, weight_max=1e8, norm_bound=0.0)
    assert "norm_limit" not in check_sum(AggregateResult(big, 2.0, None, ("a", "b")), bounds)

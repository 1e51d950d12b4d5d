"""Quantization into Z_{2^32}: no overflow for any admissible cohort, and the n/s error bound.

The bound is checked in exact rational arithmetic (fractions.Fraction), so "less than n/s"
is tested as stated, not up to a float tolerance.
"""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import (
    InvalidParameterError,
    QuantizationOverflowError,
    QuantizationPlan,
    QuantizationRangeError,
    RandomnessError,
    accumulate_mask,
    agree,
    check_no_overflow,
    choose_scale,
    clinic_context,
    dequantize_sum,
    expand_mask,
    noised_norm_bound,
    pair_context,
    pairwise_mask_seed,
    pairwise_sign,
    public_key,
    quantize,
    rounding_error_bound,
    rounding_rng,
)
from common.secagg.quantize import CHUNK_ELEMENTS, MAX_ABS_SUM, NORM_TOLERANCE, max_abs_quantized

VECTORS = Path(__file__).resolve().parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def clip(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """What the clinic's privacy step does before quantization."""
    norm = float(np.linalg.norm(x.astype(np.float64)))
    return x if norm <= clip_norm else (x * (clip_norm / norm)).astype(x.dtype)


# --------------------------------------------------------------------------- vectors


def test_quantize_vectors() -> None:
    v = load("secagg_quantize.json")
    q = v["quantize"]
    got = quantize(
        np.array(q["values"]),
        scale=q["scale"],
        bound=q["bound"],
        rng=np.random.default_rng(q["rng_seed"]),
    )
    assert got.tolist() == q["expected"]
    p = v["plan"]
    plan = QuantizationPlan.choose(
        clip_norm=p["clip_norm"],
        weight_max=p["weight_max"],
        max_clinics=p["max_clinics"],
        loss_max=p["loss_max"],
    )
    assert (plan.delta_scale, plan.weight_scale, plan.loss_scale) == (
        p["delta_scale"],
        p["weight_scale"],
        p["loss_scale"],
    )
    e = v["encode"]
    encoded = plan.encode(
        np.array(e["delta_float32"], dtype=np.float32),
        weight=e["weight"],
        loss=e["loss"],
        rng=np.random.default_rng(e["rng_seed"]),
    )
    assert encoded.tolist() == e["expected"]


def test_quantize_is_floor_plus_bernoulli_of_the_fraction_across_chunks() -> None:
    # The documented formula, computed in one shot, must equal the chunked implementation.
    n = CHUNK_ELEMENTS + 1001
    values = np.random.default_rng(1).uniform(-1, 1, n)
    scale = 2.0**12
    got = quantize(values, scale=scale, bound=1.0, rng=np.random.default_rng(2))
    ys = values * scale
    u = np.random.default_rng(2).random(n)
    expected = (np.floor(ys) + (u < ys - np.floor(ys))).astype(np.int64)
    np.testing.assert_array_equal(got.view(np.int32), expected)


def test_dequantize_is_the_centered_lift() -> None:
    ring = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=np.uint32)
    assert dequantize_sum(ring, scale=4.0).tolist() == [0, 0.25, (2**31 - 1) / 4, -(2**29), -0.25]


def test_stochastic_rounding_is_unbiased() -> None:
    value, scale, n = 0.3, 1.0, 400_000
    q = quantize(np.full(n, value), scale=scale, bound=1.0, rng=np.random.default_rng(3))
    assert set(q.tolist()) == {0, 1}
    # Bernoulli(0.3) mean; 6 standard deviations is about 0.0044.
    assert abs(q.mean() - value) < 6 * math.sqrt(value * (1 - value) / n)


def test_rounding_rng_is_seeded_from_the_randomness_source() -> None:
    a = rounding_rng(lambda n: b"\x01" * n).random(4)
    b = rounding_rng(lambda n: b"\x01" * n).random(4)
    c = rounding_rng(lambda n: b"\x02" * n).random(4)
    assert a.tolist() == b.tolist() != c.tolist()
    with pytest.raises(RandomnessError):
        rounding_rng(lambda n: b"short")


# --------------------------------------------------------------------------- overflow proof


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-6, 1e9), st.integers(1, 10**7))
def test_choose_scale_is_the_largest_safe_power_of_two(bound: float, clinics: int) -> None:
    scale = choose_scale(bound=bound, max_clinics=clinics)
    assert math.frexp(scale)[0] == 0.5
    check_no_overflow(bound=bound, scale=scale, max_clinics=clinics)
    with pytest.raises(QuantizationOverflowError):
        check_no_overflow(bound=bound, scale=2 * scale, max_clinics=clinics)


def test_overflow_error_names_the_settings() -> None:
    with pytest.raises(QuantizationOverflowError) as info:
        check_no_overflow(bound=2.0, scale=2.0**30, max_clinics=10, what="weighted delta")
    message = str(info.value)
    for part in ("weighted delta", "10 clinics", "bound 2.0", "scale 1073741824.0"):
        assert part in message
    with pytest.raises(QuantizationOverflowError):
        choose_scale(bound=1.0, max_clinics=MAX_ABS_SUM + 1)
    with pytest.raises(QuantizationOverflowError):
        choose_scale(bound=1.0, max_clinics=1000, min_scale=2.0**30)
    with pytest.raises(QuantizationOverflowError):
        QuantizationPlan(
            clip_norm=1.0, weight_max=1.0, max_clinics=100, delta_scale=2.0**30, weight_scale=1.0
        )


@settings(max_examples=60, deadline=None)
@given(
    clip_norm=st.floats(1e-3, 1e3),
    weight_max=st.floats(1e-2, 1e4),
    max_clinics=st.integers(1, 10**6),
    sign=st.sampled_from([1.0, -1.0]),
    seed=st.integers(0, 2**32),
)
def test_worst_admissible_cohort_does_not_wrap(
    clip_norm: float, weight_max: float, max_clinics: int, sign: float, seed: int
) -> None:
    # Every clinic puts its whole clipped norm on one coordinate with the largest weight:
    # the largest |sum| the plan must survive. N identical clinics are an admissible
    # cohort, so the ring sum is N * (one encoding) mod 2^32.
    plan = QuantizationPlan.choose(
        clip_norm=clip_norm, weight_max=weight_max, max_clinics=max_clinics
    )
    delta = np.array([sign * clip_norm, 0.0])
    encoded = plan.encode(delta, weight=weight_max, rng=np.random.default_rng(seed))
    ring_sum = (encoded.astype(np.uint64) * max_clinics % 2**32).astype(np.uint32)
    decoded = plan.decode_sum(ring_sum, contributors=max_clinics)
    exact = Fraction(max_clinics) * Fraction(weight_max * (sign * clip_norm))
    error = abs(Fraction(float(decoded.weighted_delta_sum[0])) - exact)
    assert error < Fraction(max_clinics) / Fraction(plan.delta_scale)
    assert np.sign(decoded.weighted_delta_sum[0]) == sign
    assert abs(Fraction(decoded.weight_sum) - max_clinics * Fraction(weight_max)) < Fraction(
        max_clinics
    ) / Fraction(plan.weight_scale)


# --------------------------------------------------------------------------- error bound


@st.composite
def cohorts(draw: st.DrawFn) -> dict[str, Any]:
    max_clinics = draw(st.integers(1, 12))
    contributors = draw(st.integers(1, max_clinics))
    clip_norm = draw(st.floats(1e-3, 1e3))
    weight_max = draw(st.one_of(st.floats(1e-2, 1e4), st.integers(1, 5000).map(float)))
    dim = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    integer_weights = draw(st.booleans())
    clinics = []
    for _ in range(contributors):
        raw = draw(st.lists(st.floats(-1e4, 1e4), min_size=dim, max_size=dim))
        delta = clip(np.array(raw, dtype=dtype), clip_norm)
        if integer_weights:
            weight = float(draw(st.integers(0, int(weight_max))))
        else:
            weight = draw(st.floats(0.0, weight_max))
        loss = draw(st.floats(0.0, 10.0))
        clinics.append((delta, weight, loss))
    return dict(
        max_clinics=max_clinics,
        clip_norm=clip_norm,
        weight_max=weight_max,
        clinics=clinics,
        seed=draw(st.integers(0, 2**32)),
        integer_weights=integer_weights,
    )


@settings(max_examples=150, deadline=None)
@given(cohorts())
def test_decoded_sum_is_within_n_over_s_of_the_exact_weighted_sum(c: dict[str, Any]) -> None:
    plan = QuantizationPlan.choose(
        clip_norm=c["clip_norm"],
        weight_max=c["weight_max"],
        max_clinics=c["max_clinics"],
        loss_max=10.0,
    )
    rng = np.random.default_rng(c["seed"])
    clinics = c["clinics"]
    n = len(clinics)
    dim = clinics[0][0].size
    ring_sum = np.zeros(plan.vector_length(dim), dtype=np.uint32)
    for delta, weight, loss in clinics:
        ring_sum += plan.encode(delta, weight=weight, loss=loss, rng=rng)
    decoded = plan.decode_sum(ring_sum, contributors=n)

    bound = Fraction(n) / Fraction(plan.delta_scale)
    assert bound == Fraction(rounding_error_bound(contributors=n, scale=plan.delta_scale))
    float64_slack = n * Fraction(plan.delta_bound) * Fraction(1, 2**53)
    for j in range(dim):
        got = Fraction(float(decoded.weighted_delta_sum[j]))
        # Against the float64 products each clinic actually quantized: strictly < n/s.
        quantized_products = sum(Fraction(weight * float(delta[j])) for delta, weight, _ in clinics)
        assert abs(got - quantized_products) < bound
        # Against the real products w_i * delta_ij: plus one float64 rounding per clinic.
        real_products = sum(
            Fraction(weight) * Fraction(float(delta[j])) for delta, weight, _ in clinics
        )
        assert abs(got - real_products) < bound + float64_slack

    weight_sum = sum(Fraction(weight) for _, weight, _ in clinics)
    assert abs(Fraction(decoded.weight_sum) - weight_sum) < Fraction(n) / Fraction(
        plan.weight_scale
    )
    if c["integer_weights"] and plan.weight_scale >= 1:
        assert Fraction(decoded.weight_sum) == weight_sum  # integer weights travel exactly
    loss_sum = sum(Fraction(weight * loss) for _, weight, loss in clinics)
    assert decoded.weighted_loss_sum is not None
    assert abs(Fraction(decoded.weighted_loss_sum) - loss_sum) < Fraction(n) / Fraction(
        plan.loss_scale or 1
    )


def test_masked_sum_decodes_like_the_plain_sum() -> None:
    # Quantize, add a self mask and pairwise masks, sum, remove self masks: the aggregator
    # decodes the same sums as without masking; forgetting one self mask is caught.
    plan = QuantizationPlan.choose(clip_norm=1.0, weight_max=100.0, max_clinics=8)
    clinics = ["clinic-a", "clinic-b", "clinic-c"]
    gen = np.random.default_rng(11)
    inputs = {
        c: (clip(gen.normal(size=500).astype(np.float32), 1.0), float(10 + i))
        for i, c in enumerate(clinics)
    }
    length = plan.vector_length(500)
    plain = np.zeros(length, dtype=np.uint32)
    masked_sum = np.zeros(length, dtype=np.uint32)
    self_seeds = {c: hashlib.sha256(b"self " + c.encode()).digest() for c in clinics}
    private = {c: hashlib.sha256(b"mask key " + c.encode()).digest() for c in clinics}
    for i, c in enumerate(clinics):
        delta, weight = inputs[c]
        encoded = plan.encode(delta, weight=weight, rng=np.random.default_rng(100 + i))
        plain += encoded
        masked = encoded.copy()
        accumulate_mask(
            masked,
            self_seeds[c],
            1,
            context=clinic_context(federation="f", round_number=1, clinic_id=c),
        )
        for peer in clinics:
            if peer != c:
                where: dict[str, Any] = dict(
                    federation="f", round_number=1, clinic_a=c, clinic_b=peer
                )
                shared = agree(private[c], public_key(private[peer]))
                seed = pairwise_mask_seed(shared, **where)
                accumulate_mask(masked, seed, pairwise_sign(c, peer), context=pair_context(**where))
        masked_sum += masked
    for c in clinics[1:]:
        accumulate_mask(
            masked_sum,
            self_seeds[c],
            -1,
            context=clinic_context(federation="f", round_number=1, clinic_id=c),
        )
    with pytest.raises(QuantizationRangeError):
        plan.decode_sum(masked_sum, contributors=3)
    accumulate_mask(
        masked_sum,
        self_seeds[clinics[0]],
        -1,
        context=clinic_context(federation="f", round_number=1, clinic_id=clinics[0]),
    )
    np.testing.assert_array_equal(masked_sum, plain)
    decoded = plan.decode_sum(masked_sum, contributors=3)
    assert decoded.weight_sum == 33.0
    expected = sum(w * d.astype(np.float64) for d, w in inputs.values())
    mean = decoded.mean_delta()
    assert np.max(np.abs(decoded.weighted_delta_sum - expected)) < 3 / plan.delta_scale
    np.testing.assert_allclose(mean, expected / 33.0, atol=3 / plan.delta_scale / 33.0)


# --------------------------------------------------------------------------- refusals


def test_encode_refuses_inadmissible_inputs() -> None:
    plan = QuantizationPlan.choose(clip_norm=1.0, weight_max=10.0, max_clinics=5)
    rng = np.random.default_rng(0)
    over = np.array([1.0 + 10 * NORM_TOLERANCE, 0.0])
    with pytest.raises(QuantizationRangeError, match="clip"):
        plan.encode(over, weight=1.0, rng=rng)
    plan.encode(np.array([1.0 + NORM_TOLERANCE / 2, 0.0]), weight=10.0, rng=rng)  # tolerated
    for bad in (np.array([np.nan, 0.0]), np.array([np.inf, 0.0])):
        with pytest.raises(QuantizationRangeError):
            plan.encode(bad, weight=1.0, rng=rng)
    for weight in (-1.0, 10.5, math.nan):
        with pytest.raises(QuantizationRangeError):
            plan.encode(np.zeros(2), weight=weight, rng=rng)
    with pytest.raises(InvalidParameterError):
        plan.encode(np.zeros(2), weight=1.0, rng=rng, loss=0.5)  # plan carries no loss
    with pytest.raises(InvalidParameterError):
        plan.encode(np.zeros(2, dtype=np.int64), weight=1.0, rng=rng)
    with_loss = QuantizationPlan.choose(clip_norm=1.0, weight_max=10.0, max_clinics=5, loss_max=4.0)
    with pytest.raises(InvalidParameterError):
        with_loss.encode(np.zeros(2), weight=1.0, rng=rng)
    with pytest.raises(QuantizationRangeError):
        with_loss.encode(np.zeros(2), weight=1.0, rng=rng, loss=4.5)


def test_quantize_refuses_values_beyond_the_bound_and_bad_settings() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(QuantizationRangeError, match="exceeds the bound"):
        quantize(np.array([0.5, -1.5]), scale=4.0, bound=1.0, rng=rng)
    with pytest.raises(QuantizationRangeError, match="non-finite"):
        quantize(np.array([0.5, np.nan]), scale=4.0, bound=1.0, rng=rng)
    with pytest.raises(InvalidParameterError, match="power of two"):
        quantize(np.array([0.5]), scale=3.0, bound=1.0, rng=rng)
    with pytest.raises(QuantizationOverflowError):
        quantize(np.array([0.5]), scale=2.0**31, bound=1.0, rng=rng)  # one value cannot fit int32
    with pytest.raises(InvalidParameterError):
        quantize(np.array([0.5]), scale=4.0, bound=1.0, rng=np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        quantize(np.array([[0.5]]), scale=4.0, bound=1.0, rng=rng)
    with pytest.raises(InvalidParameterError):
        quantize(np.array([0.5]), scale=4.0, bound=1.0, rng=rng, out=np.zeros(2, np.uint32))


def test_decode_refuses_sums_no_admissible_cohort_can_produce() -> None:
    plan = QuantizationPlan.choose(clip_norm=1.0, weight_max=1.0, max_clinics=100)
    garbage = np.random.default_rng(5).integers(0, 2**32, 1001, dtype=np.uint32)
    with pytest.raises(QuantizationRangeError, match="masks not removed"):
        plan.decode_sum(garbage, contributors=3)
    negative_weight = np.zeros(plan.vector_length(4), dtype=np.uint32)
    negative_weight[-1] = np.uint32(2**32 - 1)  # weight sum -1: impossible
    with pytest.raises(QuantizationRangeError, match="weight sum"):
        plan.decode_sum(negative_weight, contributors=1)
    for contributors in (0, 101):
        with pytest.raises(InvalidParameterError):
            plan.decode_sum(negative_weight, contributors=contributors)
    zero = plan.decode_sum(np.zeros(plan.vector_length(4), dtype=np.uint32), contributors=2)
    with pytest.raises(QuantizationRangeError, match="weighted mean"):
        zero.mean_delta()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip_norm=0.0, weight_max=1.0, max_clinics=2, delta_scale=1.0, weight_scale=1.0),
        dict(clip_norm=1.0, weight_max=math.inf, max_clinics=2, delta_scale=1.0, weight_scale=1.0),
        dict(clip_norm=1.0, weight_max=1.0, max_clinics=0, delta_scale=1.0, weight_scale=1.0),
        dict(clip_norm=1.0, weight_max=1.0, max_clinics=2, delta_scale=1.5, weight_scale=1.0),
        dict(
            clip_norm=1.0,
            weight_max=1.0,
            max_clinics=2,
            delta_scale=1.0,
            weight_scale=1.0,
            loss_max=1.0,
        ),
    ],
)
def test_plan_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError):
        QuantizationPlan(**kwargs)


def test_max_abs_quantized_is_exact() -> None:
    assert max_abs_quantized(1.0, 4.0) == 4
    assert max_abs_quantized(0.1, 2.0**20) == math.ceil(Fraction(0.1) * 2**20)
    # a value exactly at the bound, rounded up, reaches M and no further
    q = quantize(np.array([1.0, -1.0] * 100), scale=4.0, bound=1.0, rng=np.random.default_rng(0))
    assert set(q.view(np.int32).tolist()) == {4, -4}
    assert expand_mask(bytes(32), 1, context=b"c").dtype == np.uint32


def test_noised_norm_bound_covers_gaussian_noise() -> None:
    clip_norm, sigma, dim = 1.0, 0.5, 20_000
    bound = noised_norm_bound(clip_norm=clip_norm, noise_std=sigma, dim=dim, failure_prob=1e-9)
    assert bound == pytest.approx(1.0 + 0.5 * (math.sqrt(dim) + math.sqrt(2 * math.log(1e9))))
    gen = np.random.default_rng(9)
    signal = np.zeros(dim)
    signal[0] = clip_norm
    norms = [float(np.linalg.norm(signal + gen.normal(0, sigma, dim))) for _ in range(50)]
    assert max(norms) < bound
    # A plan built on that bound accepts the noised vector as it is.
    plan = QuantizationPlan.choose(clip_norm=bound, weight_max=1.0, max_clinics=10)
    plan.encode(signal + gen.normal(0, sigma, dim), weight=1.0, rng=gen)
    with pytest.raises(InvalidParameterError):
        noised_norm_bound(clip_norm=1.0, noise_std=1.0, dim=0)

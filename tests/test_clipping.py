"""Delta clipping and clinic-level Gaussian noise (common.clipping)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.clipping import add_gaussian_noise, clinic_noise_std, clip_l2, l2_norm
from common.errors import InvalidUpdateError

finite_f32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    vector=arrays(np.float32, st.integers(1, 300), elements=finite_f32), bound=st.floats(1e-3, 1e4)
)
def test_clip_l2_properties(vector: np.ndarray, bound: float) -> None:
    original = vector.copy()
    clipped, norm = clip_l2(vector, bound)
    assert norm == pytest.approx(float(np.linalg.norm(vector.astype(np.float64))), rel=1e-9)
    assert clipped.dtype == np.float32 and clipped.shape == vector.shape
    assert l2_norm(clipped) <= bound  # a hard bound, float rounding included
    np.testing.assert_array_equal(vector, original)  # the input is never modified
    if norm <= bound:
        assert clipped is vector
    else:
        # Same direction, scaled down to (just about) the bound.
        assert l2_norm(clipped) == pytest.approx(bound, rel=1e-5)
        np.testing.assert_allclose(
            clipped, vector * np.float32(bound / norm), rtol=1e-5, atol=1e-30 + bound * 1e-6
        )


def test_clip_l2_on_a_model_sized_vector() -> None:
    rng = np.random.default_rng(1)
    v = rng.standard_normal(1_500_000).astype(np.float32)
    clipped, norm = clip_l2(v, 10.0)
    assert norm == pytest.approx(math.sqrt(1_500_000), rel=0.01)
    assert 10.0 * (1 - 1e-6) <= l2_norm(clipped) <= 10.0


def test_clip_l2_refuses_non_finite_and_bad_bounds() -> None:
    with pytest.raises(InvalidUpdateError, match="1 NaN or infinite"):
        clip_l2(np.array([1.0, np.nan, 2.0], dtype=np.float32), 1.0)
    with pytest.raises(InvalidUpdateError, match="int64"):
        clip_l2(np.arange(3), 1.0)
    for bound in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip bound"):
            clip_l2(np.ones(3, dtype=np.float32), bound)


def test_clinic_noise_std_formula() -> None:
    assert clinic_noise_std(clip=2.0, noise_multiplier=1.5, threshold_t=9) == pytest.approx(1.0)
    assert clinic_noise_std(clip=1.0, noise_multiplier=1.0, threshold_t=1) == 1.0
    assert clinic_noise_std(clip=3.0, noise_multiplier=0.0, threshold_t=4) == 0.0
    with pytest.raises(ValueError, match="threshold_t"):
        clinic_noise_std(clip=1.0, noise_multiplier=1.0, threshold_t=0)
    with pytest.raises(ValueError, match="clip"):
        clinic_noise_std(clip=0.0, noise_multiplier=1.0, threshold_t=3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        clinic_noise_std(clip=1.0, noise_multiplier=-0.1, threshold_t=3)


@pytest.mark.parametrize("survivors", [4, 6])
def test_t_or_more_survivors_carry_at_least_the_configured_noise(survivors: int) -> None:
    z, clip, t, dim = 1.1, 0.5, 4, 200_000
    std = clinic_noise_std(clip=clip, noise_multiplier=z, threshold_t=t)
    rng = np.random.default_rng(7)
    zero = np.zeros(dim, dtype=np.float32)
    total = sum(add_gaussian_noise(zero, std, rng).astype(np.float64) for _ in range(survivors))
    # k survivors carry std z·C·√(k/t): exactly z·C at k = t, more above it.
    expected = z * clip * math.sqrt(survivors / t)
    assert float(np.std(total)) == pytest.approx(expected, rel=0.01)
    assert float(np.std(total)) >= z * clip * 0.99
    assert abs(float(np.mean(total))) < 5 * expected / math.sqrt(dim)


def test_add_gaussian_noise_has_the_requested_std_and_keeps_the_input() -> None:
    rng = np.random.default_rng(3)
    v = np.linspace(-1, 1, 100_000, dtype=np.float32)
    out = add_gaussian_noise(v, 0.25, rng)
    assert out.dtype == np.float32 and out is not v
    noise = out.astype(np.float64) - v
    assert float(np.std(noise)) == pytest.approx(0.25, rel=0.02)
    assert abs(float(np.mean(noise))) < 0.005
    np.testing.assert_array_equal(v, np.linspace(-1, 1, 100_000, dtype=np.float32))
    same = add_gaussian_noise(v, 0.0, rng)
    assert same is not v
    np.testing.assert_array_equal(same, v)
    with pytest.raises(ValueError, match="noise std"):
        add_gaussian_noise(v, -1.0, rng)

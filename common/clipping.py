"""Delta clipping and clinic-level Gaussian noise (distributed DP under secure aggregation).

Every clinic clips its whole model delta to an L2 bound ``C`` before quantization. That
bounds each clinic's influence on the aggregate (its sensitivity) and the range the
quantizer has to cover.

Optional clinic-level DP: the aggregator only ever sees the *sum* of the surviving
clinics' inputs (secure aggregation), so the Gaussian noise protecting a clinic can be
split among the clinics. Each clinic adds ``N(0, (z·C)² / t)`` per coordinate, where ``t``
is the secure-aggregation threshold (the fewest survivors with which a round can finish).
Independent Gaussians add their variances, so any ``k ≥ t`` survivors together carry
``N(0, k·(z·C)²/t)``, at least the ``N(0, (z·C)²)`` of the central Gaussian mechanism with
noise multiplier ``z`` and sensitivity ``C``. Hence the aggregate is accounted exactly like
a central mechanism: ``MechanismStep(z, sample_rate, 1)`` per round, at the clinic level.

Caveats, stated so nobody over-reads the guarantee:

* Clinics that collude with the aggregator know their own noise and can subtract it; the
  guarantee holds while at least ``t`` *honest* clinics survive. Record-level DP-SGD inside
  each clinic (``clinic_agent.dp_training``) is the guarantee that holds whatever others do.
* A single clinic's noised delta on its own carries only ``z·C/√t`` of noise; it must never
  leave the clinic unmasked.
* The noise comes from a ``numpy`` generator: the agent must create it from OS entropy
  (``np.random.default_rng()`` with no seed); a fixed seed is only for tests.

The noise std is derived from clinic-side settings only (its own ``z``, ``C`` and the
threshold it agreed to), never from a number the aggregator sends per clinic.
"""

from __future__ import annotations

import math

import numpy as np

from common.errors import InvalidUpdateError

# After scaling in float32 the norm can land a rounding error above the bound; each retry
# shrinks by one extra ulp-sized factor, and a couple of tries always suffice.
_MAX_RESCALES = 4


_NORM_CHUNK = 1 << 20


def l2_norm(vector: np.ndarray) -> float:
    """The L2 norm accumulated in float64, chunk by chunk.

    float64 because a float32 sum over millions of entries loses digits; einsum rather than
    np.dot because OpenBLAS's threaded dot measured 10-50x slower on a loaded 2-core host;
    chunks so no full-size float64 copy is made.
    """
    flat = vector.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _NORM_CHUNK):
        chunk = flat[start : start + _NORM_CHUNK]
        total += float(np.einsum("i,i->", chunk, chunk, dtype=np.float64))
    return math.sqrt(total)


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """Scale ``vector`` so its L2 norm is at most ``bound``; return it and the original norm.

    A vector already within the bound is returned as is (no copy); otherwise a new array of
    the same dtype is returned, a positive multiple of the input. Non-finite values are
    refused: a NaN delta must never be clipped into something that looks valid.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip bound must be a finite number > 0, got {bound!r}")
    if not np.issubdtype(vector.dtype, np.floating):
        raise InvalidUpdateError(f"cannot clip a {vector.dtype} vector, expected floating point")
    if not np.isfinite(vector).all():
        bad = int((~np.isfinite(vector)).sum())
        raise InvalidUpdateError(f"delta contains {bad} NaN or infinite values; refusing to clip")
    norm = l2_norm(vector)
    if norm <= bound:
        return vector, norm
    scale = bound / norm
    clipped = (vector * vector.dtype.type(scale)).astype(vector.dtype, copy=False)
    for _ in range(_MAX_RESCALES):
        now = l2_norm(clipped)
        if now <= bound:
            break
        factor = (bound / now) * (1.0 - float(np.finfo(vector.dtype).eps))
        clipped *= vector.dtype.type(factor)
    return clipped, norm


def clinic_noise_std(*, clip: float, noise_multiplier: float, threshold_t: int) -> float:
    """Per-coordinate std each clinic adds so any ``t`` survivors sum to std ``z·C``.

    ``std = z·C/√t``: the variances of ``t`` independent draws add up to ``(z·C)²``.
    ``noise_multiplier = 0`` means no clinic-level noise (delta clipping only).
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(threshold_t, bool) or not isinstance(threshold_t, int) or threshold_t < 1:
        raise ValueError(f"threshold_t must be an integer >= 1, got {threshold_t!r}")
    return noise_multiplier * clip / math.sqrt(threshold_t)


def add_gaussian_noise(vector: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``vector + N(0, std²)`` per coordinate, as a new array of the same dtype."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    if not np.issubdtype(vector.dtype, np.floating):
        raise InvalidUpdateError(f"cannot noise a {vector.dtype} vector, expected floating point")
    if std == 0:
        return vector.copy()
    dtype = np.float32 if vector.dtype == np.float32 else np.float64
    noise = rng.standard_normal(vector.shape, dtype=dtype)
    noise *= dtype(std)
    noise += vector
    return noise.astype(vector.dtype, copy=False)

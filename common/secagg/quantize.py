"""Quantization of clipped, weighted deltas into the ring Z_{2^32}, and back.

Why a ring: masks are uniform uint32 vectors added modulo 2^32, so what a clinic masks
must be a vector of ring elements, and the aggregator can only decode the sum correctly
if the true integer sum never wraps. This module makes that a theorem rather than a hope.

**Encoding.** A float ``y`` with ``|y| <= bound`` becomes the integer
``q = floor(y*s) + [u < frac(y*s)]`` with ``u ~ U[0, 1)`` — the same distribution as the
textbook stochastic rounding ``floor(y*s + u)``, but every step is exact in float64:
the scale ``s`` is a power of two (so ``y*s`` is exact), ``frac = y*s - floor(y*s)`` is
exact (or rounds only when the result does not matter), and ``q`` is always
``floor(y*s)`` or ``floor(y*s) + 1``. ``q`` is stored as uint32 two's complement.

**No overflow.** Then ``|q| <= M = ceil(bound*s)`` exactly, and for a cohort of at most
``n`` clinics ``|sum q| <= n*M``. :func:`check_no_overflow` proves ``n*M <= 2^31 - 1``
(exact integer arithmetic), so the centered lift of the ring sum (``v - 2^32`` when
``v >= 2^31``, i.e. reading it as int32) is the true integer sum.

**Error bound.** ``|q - y*s| < 1`` for every coordinate of every clinic, so each
coordinate of the decoded sum ``(sum q)/s`` differs from ``sum y`` by **less than
n/s**. Dequantization is exact (an int32 divided by a power of two). Against the real
products ``w_i * delta_i`` (``y`` is their float64 rounding) add at most
``n * bound * 2^-53``, i.e. a relative ``2^-22`` of ``n/s``.

**Weighted FedAvg inside the vector.** :class:`QuantizationPlan` lays a clinic's vector out
as ``[q(w*delta_1) .. q(w*delta_d), q(w), q(w*loss)?]``: the ``d`` delta coordinates at
``delta_scale``, then the weight at its own ``weight_scale``, then optionally the
weighted training loss at ``loss_scale``. The aggregator thus learns only
``sum w_i*delta_i``, ``sum w_i`` (and ``sum w_i*loss_i``), and divides. Integer weights
(e.g. example counts) are carried exactly whenever ``weight_scale >= 1``, which
:meth:`QuantizationPlan.choose` gives for any ``max_clinics * weight_max <= 2^30``.

**Admissible inputs.** The overflow proof needs ``|w*delta_j| <= weight_max * clip_norm``:
:meth:`QuantizationPlan.encode` refuses a delta whose L2 norm exceeds ``clip_norm`` by
more than ``NORM_TOLERANCE`` (float rounding of the caller's clipping; clip with a
float64 norm such as :func:`common.clipping.l2_norm` — a float32 norm of a
million-entry vector can be off by more than that), a weight outside
``[0, weight_max]`` and non-finite values. When Gaussian noise is added *after* the DP
clipping, the plan's ``clip_norm`` must bound the *noised* vector: use
:func:`noised_norm_bound` (exceeded with probability below ``failure_prob``) and clip the
noised vector to it before encoding — clipping after noising is post-processing, so it
costs no privacy, and it almost never changes anything.

**Rounding randomness.** ``u`` comes from a passed-in :class:`numpy.random.Generator`. It is
not a secret: it is not a mask and each clinic's quantized vector is hidden by its masks
anyway; it only needs to be independent of the data so that rounding is unbiased. Use
:func:`rounding_rng` to seed one from the OS CSPRNG so it is also unpredictable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from common.clipping import l2_norm
from common.secagg.errors import (
    InvalidParameterError,
    QuantizationOverflowError,
    QuantizationRangeError,
)
from common.secagg.randomness import RandomSource, read_random

RING_BITS = 32
MAX_ABS_SUM = (1 << (RING_BITS - 1)) - 1
"""Largest |integer sum| the centered lift decodes correctly (2^31 - 1)."""
NORM_TOLERANCE = 1e-6
"""Relative slack on the clip norm for the float rounding of the caller's clipping."""
CHUNK_ELEMENTS = 1 << 18
"""Elements processed per step, so temporaries stay a few MiB whatever the model size."""
# Scales are kept well inside float64's exponent range so y*scale never overflows.
_MIN_SCALE_EXPONENT = -900
_MAX_SCALE_EXPONENT = 900

UInt32Array = npt.NDArray[np.uint32]
Float64Array = npt.NDArray[np.float64]


def rounding_rng(rand: RandomSource) -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits from ``rand`` (``os.urandom`` in production)."""
    seed = int.from_bytes(read_random(rand, 32), "big")
    return np.random.Generator(np.random.PCG64(seed))


def max_abs_quantized(bound: float, scale: float) -> int:
    """``M = ceil(bound * scale)``, the largest |q| a value with |y| <= bound can get."""
    _check_bound(bound)
    _check_scale(scale)
    return math.ceil(Fraction(bound) * Fraction(scale))


def check_no_overflow(
    *, bound: float, scale: float, max_clinics: int, what: str = "vector"
) -> None:
    """Prove that ``max_clinics`` values with |y| <= ``bound`` sum without wrapping.

    Raises :class:`QuantizationOverflowError` naming the settings when
    ``max_clinics * ceil(bound * scale) > 2^31 - 1``.
    """
    _check_clinics(max_clinics)
    per_clinic = max_abs_quantized(bound, scale)
    worst = max_clinics * per_clinic
    if worst > MAX_ABS_SUM:
        raise QuantizationOverflowError(
            f"{what}: {max_clinics} clinics x |q| <= {per_clinic} (bound {bound!r} x scale "
            f"{scale!r}) can sum to {worst} > 2^31 - 1 = {MAX_ABS_SUM}; lower the scale, the "
            "clip norm or weight cap, or the cohort size"
        )


def choose_scale(*, bound: float, max_clinics: int, min_scale: float | None = None) -> float:
    """The largest power of two ``s`` that passes :func:`check_no_overflow`.

    A finer scale means a smaller rounding error (``n/s``); ``min_scale`` turns a scale
    too coarse to be useful into a :class:`QuantizationOverflowError`.
    """
    _check_bound(bound)
    _check_clinics(max_clinics)
    if bound == 0:
        raise InvalidParameterError("bound must be positive to choose a scale")
    if max_clinics > MAX_ABS_SUM:
        raise QuantizationOverflowError(
            f"{max_clinics} clinics cannot fit a 32-bit ring: even |q| <= 1 each would wrap"
        )
    estimate = math.floor(math.log2(MAX_ABS_SUM / max_clinics) - math.log2(bound))
    exponent = min(max(estimate, _MIN_SCALE_EXPONENT), _MAX_SCALE_EXPONENT)
    # log2 is a float estimate; settle the exact largest exponent with integer checks.
    while not _fits(bound, math.ldexp(1.0, exponent), max_clinics):
        if exponent == _MIN_SCALE_EXPONENT:
            raise QuantizationOverflowError(
                f"bound {bound!r} with {max_clinics} clinics does not fit a 32-bit ring at "
                f"any scale >= 2^{_MIN_SCALE_EXPONENT}"
            )
        exponent -= 1
    while exponent < _MAX_SCALE_EXPONENT and _fits(
        bound, math.ldexp(1.0, exponent + 1), max_clinics
    ):
        exponent += 1
    scale = math.ldexp(1.0, exponent)
    if min_scale is not None and scale < min_scale:
        raise QuantizationOverflowError(
            f"bound {bound!r} with {max_clinics} clinics allows at most scale {scale!r} "
            f"(rounding error {max_clinics / scale:.3g} per coordinate), below the "
            f"required minimum {min_scale!r}"
        )
    return scale


def rounding_error_bound(*, contributors: int, scale: float) -> float:
    """Strict bound on |decoded sum - exact sum| per coordinate: ``contributors / scale``."""
    _check_clinics(contributors)
    _check_scale(scale)
    return contributors / scale


def quantize(
    values: npt.NDArray[np.floating],
    *,
    scale: float,
    bound: float,
    rng: np.random.Generator,
    multiplier: float = 1.0,
    out: UInt32Array | None = None,
) -> UInt32Array:
    """Stochastically round ``multiplier * values`` at ``scale`` into ring elements.

    ``y = float64(multiplier * value)`` must satisfy ``|y| <= bound`` for every element
    (:class:`QuantizationRangeError` otherwise, also for NaN/inf). Writes into ``out``
    (a 1-D uint32 array of the same length) when given, so a caller can fill one segment
    of a larger vector without copying.
    """
    _check_bound(bound)
    _check_scale(scale)
    if not isinstance(rng, np.random.Generator):
        raise InvalidParameterError("rng must be a numpy.random.Generator")
    if not isinstance(values, np.ndarray) or values.ndim != 1:
        raise InvalidParameterError("values must be a 1-D numpy array")
    if values.dtype.kind != "f":
        raise InvalidParameterError(f"values must be floating point, got {values.dtype}")
    if not math.isfinite(multiplier):
        raise QuantizationRangeError(f"multiplier {multiplier!r} is not finite")
    # Even one value must fit int32, or the two's complement encoding itself would wrap.
    check_no_overflow(bound=bound, scale=scale, max_clinics=1, what="single value")
    if out is None:
        out = np.empty(values.size, dtype=np.uint32)
    elif (
        not isinstance(out, np.ndarray)
        or out.dtype != np.uint32
        or out.shape != values.shape
        or not out.flags.writeable
    ):
        raise InvalidParameterError(f"out must be a writable uint32 array of shape {values.shape}")
    uniform = np.empty(min(CHUNK_ELEMENTS, values.size), dtype=np.float64)
    for start in range(0, values.size, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, values.size)
        y = np.multiply(values[start:stop], multiplier, dtype=np.float64)
        _check_chunk_range(y, bound, start)
        y *= scale  # exact: scale is a power of two and |y*scale| < 2^31
        low = np.floor(y)
        frac = np.subtract(y, low, out=y)
        u = uniform[: stop - start]
        rng.random(out=u)
        low += u < frac
        # |low| <= ceil(bound*scale) <= 2^31 - 1 (checked above), so int32 holds it and
        # its uint32 view is the two's complement ring element.
        out[start:stop] = low.astype(np.int32).view(np.uint32)
    return out


def dequantize_sum(ring_sum: UInt32Array, *, scale: float) -> Float64Array:
    """The float64 sum encoded by ``ring_sum`` at ``scale`` (centered lift, then / scale).

    Reading a uint32 as int32 is exactly the centered lift ``v - 2^32 if v >= 2^31``; it
    is the true integer sum whenever :func:`check_no_overflow` held for the cohort.
    """
    _check_scale(scale)
    _check_ring_vector(ring_sum)
    return np.divide(ring_sum.view(np.int32), scale, dtype=np.float64)


def check_sum_in_range(
    ring_sum: UInt32Array,
    *,
    bound: float,
    scale: float,
    contributors: int,
    nonnegative: bool = False,
    what: str = "sum",
) -> None:
    """Refuse a ring sum that no ``contributors`` admissible inputs could produce.

    A sum that was unmasked wrongly (a bad share, a missing mask) is uniform in the ring
    and almost surely fails this check, so it is a cheap guard before decoding.
    """
    _check_ring_vector(ring_sum)
    _check_clinics(contributors)
    if ring_sum.size == 0:
        return
    limit = contributors * max_abs_quantized(bound, scale)
    lifted = ring_sum.view(np.int32)
    lo, hi = int(lifted.min()), int(lifted.max())
    floor_ = 0 if nonnegative else -limit
    if lo < floor_ or hi > limit:
        raise QuantizationRangeError(
            f"{what} decodes to integers in [{lo}, {hi}], outside [{floor_}, {limit}] possible "
            f"for {contributors} admissible contributions (masks not removed correctly?)"
        )


@dataclass(frozen=True)
class DecodedSum:
    """What the aggregator learns from one round: sums only."""

    weighted_delta_sum: Float64Array
    """``sum_i w_i * delta_i`` per coordinate."""
    weight_sum: float
    """``sum_i w_i``."""
    weighted_loss_sum: float | None
    """``sum_i w_i * loss_i`` when the plan carries a loss coordinate."""
    contributors: int

    def mean_delta(self) -> Float64Array:
        """The weighted FedAvg delta ``sum w_i delta_i / sum w_i``."""
        if not self.weight_sum > 0:
            raise QuantizationRangeError(
                f"summed weight is {self.weight_sum!r}; cannot form a weighted mean"
            )
        return self.weighted_delta_sum / self.weight_sum


@dataclass(frozen=True)
class QuantizationPlan:
    """Scales, bounds and vector layout shared by every clinic of a round.

    Build it with :meth:`choose` (largest safe power-of-two scales) or give the scales
    explicitly; either way construction proves, for ``max_clinics`` contributors, that no
    segment of the summed vector can overflow.
    """

    clip_norm: float
    weight_max: float
    max_clinics: int
    delta_scale: float
    weight_scale: float
    loss_max: float | None = None
    loss_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("clip_norm", "weight_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidParameterError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise InvalidParameterError(f"{name} must be finite and positive, got {value!r}")
        if (self.loss_max is None) != (self.loss_scale is None):
            raise InvalidParameterError("loss_max and loss_scale must be given together")
        if self.loss_max is not None and not (math.isfinite(self.loss_max) and self.loss_max > 0):
            raise InvalidParameterError(
                f"loss_max must be finite and positive, got {self.loss_max!r}"
            )
        for what, bound, scale in self._segments():
            check_no_overflow(bound=bound, scale=scale, max_clinics=self.max_clinics, what=what)

    @classmethod
    def choose(
        cls,
        *,
        clip_norm: float,
        weight_max: float,
        max_clinics: int,
        loss_max: float | None = None,
        min_delta_scale: float | None = None,
    ) -> QuantizationPlan:
        """The plan with the finest scales that still cannot overflow."""
        delta_bound = coordinate_bound(clip_norm=clip_norm, weight_max=weight_max)
        loss_scale = None
        if loss_max is not None:
            loss_scale = choose_scale(bound=weight_max * loss_max, max_clinics=max_clinics)
        return cls(
            clip_norm=clip_norm,
            weight_max=weight_max,
            max_clinics=max_clinics,
            delta_scale=choose_scale(
                bound=delta_bound, max_clinics=max_clinics, min_scale=min_delta_scale
            ),
            weight_scale=choose_scale(bound=weight_max, max_clinics=max_clinics),
            loss_max=loss_max,
            loss_scale=loss_scale,
        )

    @property
    def delta_bound(self) -> float:
        return coordinate_bound(clip_norm=self.clip_norm, weight_max=self.weight_max)

    @property
    def extra_coordinates(self) -> int:
        """Coordinates after the delta: the weight, and the weighted loss if carried."""
        return 1 if self.loss_max is None else 2

    def vector_length(self, dim: int) -> int:
        """Length of the ring vector carrying a ``dim``-parameter delta."""
        return dim + self.extra_coordinates

    def encode(
        self,
        delta: npt.NDArray[np.floating],
        *,
        weight: float,
        rng: np.random.Generator,
        loss: float | None = None,
    ) -> UInt32Array:
        """``[q(w*delta), q(w), q(w*loss)?]`` for a delta with L2 norm <= ``clip_norm``."""
        if not isinstance(delta, np.ndarray) or delta.ndim != 1 or delta.dtype.kind != "f":
            raise InvalidParameterError("delta must be a 1-D floating-point numpy array")
        norm = _l2_norm(delta)
        if not norm <= self.clip_norm * (1 + NORM_TOLERANCE):
            raise QuantizationRangeError(
                f"delta L2 norm {norm!r} exceeds clip_norm {self.clip_norm!r}; clip it first"
            )
        _check_scalar("weight", weight, self.weight_max)
        if (loss is None) != (self.loss_max is None):
            raise InvalidParameterError(
                "this plan carries a loss coordinate; pass loss"
                if loss is None
                else "this plan carries no loss coordinate; loss must be None"
            )
        if loss is not None and self.loss_max is not None:
            _check_scalar("loss", loss, self.loss_max)
        d = delta.size
        out = np.empty(self.vector_length(d), dtype=np.uint32)
        quantize(
            delta,
            scale=self.delta_scale,
            bound=self.delta_bound,
            rng=rng,
            multiplier=float(weight),
            out=out[:d],
        )
        quantize(
            np.array([weight], dtype=np.float64),
            scale=self.weight_scale,
            bound=self.weight_max,
            rng=rng,
            out=out[d : d + 1],
        )
        if loss is not None and self.loss_max is not None and self.loss_scale is not None:
            quantize(
                np.array([loss], dtype=np.float64),
                scale=self.loss_scale,
                bound=self.weight_max * self.loss_max,
                rng=rng,
                multiplier=float(weight),
                out=out[d + 1 : d + 2],
            )
        return out

    def decode_sum(self, ring_sum: UInt32Array, *, contributors: int) -> DecodedSum:
        """Decode the unmasked sum of ``contributors`` clinics' encoded vectors.

        Checks first that every segment lies in the range ``contributors`` admissible
        inputs can reach (:class:`QuantizationRangeError` otherwise).
        """
        _check_ring_vector(ring_sum)
        if (
            isinstance(contributors, bool)
            or not isinstance(contributors, int)
            or not (1 <= contributors <= self.max_clinics)
        ):
            raise InvalidParameterError(
                f"contributors must be an int in 1..{self.max_clinics}, got {contributors!r}"
            )
        d = ring_sum.size - self.extra_coordinates
        if d < 0:
            raise InvalidParameterError(f"ring vector of {ring_sum.size} elements is too short")
        delta_part, weight_part = ring_sum[:d], ring_sum[d : d + 1]
        check_sum_in_range(
            delta_part,
            bound=self.delta_bound,
            scale=self.delta_scale,
            contributors=contributors,
            what="weighted delta sum",
        )
        check_sum_in_range(
            weight_part,
            bound=self.weight_max,
            scale=self.weight_scale,
            contributors=contributors,
            nonnegative=True,
            what="weight sum",
        )
        loss_sum = None
        if self.loss_max is not None and self.loss_scale is not None:
            loss_part = ring_sum[d + 1 : d + 2]
            check_sum_in_range(
                loss_part,
                bound=self.weight_max * self.loss_max,
                scale=self.loss_scale,
                contributors=contributors,
                nonnegative=True,
                what="weighted loss sum",
            )
            loss_sum = float(dequantize_sum(loss_part, scale=self.loss_scale)[0])
        return DecodedSum(
            weighted_delta_sum=dequantize_sum(delta_part, scale=self.delta_scale),
            weight_sum=float(dequantize_sum(weight_part, scale=self.weight_scale)[0]),
            weighted_loss_sum=loss_sum,
            contributors=contributors,
        )

    def _segments(self) -> list[tuple[str, float, float]]:
        segments = [
            ("weighted delta", self.delta_bound, self.delta_scale),
            ("weight", float(self.weight_max), self.weight_scale),
        ]
        if self.loss_max is not None and self.loss_scale is not None:
            segments.append(("weighted loss", self.weight_max * self.loss_max, self.loss_scale))
        return segments


def noised_norm_bound(
    *, clip_norm: float, noise_std: float, dim: int, failure_prob: float = 1e-12
) -> float:
    """A bound on ``||x + N(0, noise_std^2 I_dim)||`` for ``||x|| <= clip_norm``.

    ``clip_norm + noise_std * (sqrt(dim) + sqrt(2 ln(1/failure_prob)))``: the norm of a
    standard Gaussian vector is 1-Lipschitz, so it exceeds its mean (<= sqrt(dim)) by ``r``
    with probability at most ``exp(-r^2/2)`` (Gaussian concentration).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise InvalidParameterError(f"clip_norm must be finite and positive, got {clip_norm!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise InvalidParameterError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidParameterError(f"dim must be an int >= 1, got {dim!r}")
    if not 0 < failure_prob < 1:
        raise InvalidParameterError(f"failure_prob must be in (0, 1), got {failure_prob!r}")
    tail = math.sqrt(2 * math.log(1 / failure_prob))
    return clip_norm + noise_std * (math.sqrt(dim) + tail)


def coordinate_bound(*, clip_norm: float, weight_max: float) -> float:
    """Largest admissible |w * delta_j|: ``weight_max * clip_norm`` plus the norm tolerance.

    A single coordinate can carry the whole clipped norm, so this is the worst case the
    overflow proof must cover.
    """
    return weight_max * clip_norm * (1 + NORM_TOLERANCE)


def _fits(bound: float, scale: float, max_clinics: int) -> bool:
    return max_clinics * max_abs_quantized(bound, scale) <= MAX_ABS_SUM


def _l2_norm(x: npt.NDArray[np.floating]) -> float:
    return l2_norm(x)


def _check_chunk_range(y: Float64Array, bound: float, start: int) -> None:
    if y.size == 0:
        return
    lo, hi = float(y.min()), float(y.max())
    if not (lo >= -bound and hi <= bound):  # also false for NaN
        if not np.isfinite(y).all():
            raise QuantizationRangeError(f"non-finite value in the input near element {start}")
        raise QuantizationRangeError(
            f"value {hi if hi > bound else lo!r} near element {start} exceeds the bound "
            f"{bound!r}; the overflow guarantee only covers |value| <= bound"
        )


def _check_scalar(name: str, value: object, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    if not 0 <= float(value) <= maximum:
        raise QuantizationRangeError(f"{name} {value!r} is outside [0, {maximum!r}]")


def _check_bound(bound: object) -> None:
    if isinstance(bound, bool) or not isinstance(bound, int | float):
        raise InvalidParameterError(f"bound must be a number, got {bound!r}")
    if not (math.isfinite(bound) and bound >= 0):
        raise InvalidParameterError(f"bound must be finite and >= 0, got {bound!r}")


def _check_scale(scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise InvalidParameterError(f"scale must be a number, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5):
        # Powers of two keep y*scale and the decoded division exact in float64.
        raise InvalidParameterError(f"scale must be a positive power of two, got {scale!r}")


def _check_clinics(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"number of clinics must be an int >= 1, got {n!r}")


def _check_ring_vector(v: object) -> None:
    if not isinstance(v, np.ndarray) or v.dtype != np.uint32 or v.ndim != 1:
        raise InvalidParameterError("ring vector must be a 1-D numpy array of dtype uint32")

"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Why this field: the secrets shared in a round are 32-byte values (a self-mask seed and an
X25519 private key), so the field must hold every 256-bit integer. p = 2^521 - 1 is the
Mersenne prime M521: its primality is classical and easy to check, every secret of up to
65 bytes embeds without reduction, and shares have a fixed 66-byte encoding. The extra
share size over a 257-bit prime (66 vs 33 bytes per share) is irrelevant next to the
masked model vector.

Construction: ``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` with each ``a_k`` uniform in
GF(p) (rejection sampling of 521-bit strings from ``rand``), share for id ``i`` is
``f(i)``. Any ``t`` shares determine ``s`` by Lagrange interpolation at 0; any ``t - 1``
shares are uniformly distributed whatever ``s`` is.

Encoding: share ids are integers ``1 <= id <= MAX_SHARE_ID``; a share value is ``f(id)``
as ``SHARE_BYTES`` big-endian bytes; a secret is its bytes read as a big-endian integer,
and :func:`combine` needs its length back to restore leading zero bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.secagg.errors import (
    InconsistentSharesError,
    InsufficientSharesError,
    InvalidParameterError,
    InvalidShareIdError,
    InvalidThresholdError,
    MalformedShareError,
)
from common.secagg.randomness import RandomSource, read_random

PRIME = 2**521 - 1
FIELD_BITS = 521
SHARE_BYTES = 66
"""Fixed length of every encoded share value."""
MAX_SECRET_BYTES = 65
"""Longest secret that embeds in the field (520 bits < 521)."""
MAX_SHARE_ID = 2**32 - 1
"""Share ids fit a uint32 on the wire; far below p, so ids are distinct field points."""


def split(secret: bytes, t: int, share_ids: Sequence[int], rand: RandomSource) -> dict[int, bytes]:
    """Split ``secret`` into one share per id in ``share_ids``; any ``t`` of them recover it.

    ``rand`` supplies the random polynomial coefficients (``os.urandom`` in production).
    """
    if not isinstance(secret, bytes | bytearray):
        raise InvalidParameterError(f"secret must be bytes, got {type(secret).__name__}")
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise InvalidParameterError(
            f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}"
        )
    if isinstance(share_ids, str | bytes) or not isinstance(share_ids, Sequence):
        raise InvalidShareIdError("share_ids must be a sequence of ints")
    ids = _checked_ids(share_ids)
    _check_threshold(t, len(ids))
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element(rand) for _ in range(t - 1)]
    return {i: _encode(_evaluate(coefficients, i)) for i in ids}


def combine(shares: Mapping[int, bytes], t: int, secret_len: int) -> bytes:
    """Recover the ``secret_len``-byte secret from at least ``t`` shares ``{id: value}``.

    With more than ``t`` shares, the secret is interpolated from the ``t`` lowest ids and
    every other share must lie on the same polynomial (:class:`InconsistentSharesError`
    otherwise), so a corrupted share is detected rather than silently producing a wrong
    secret. Detection does not say which share is bad (the error names the one that
    disagreed with the lowest ``t``, which may be the honest one).
    """
    if not isinstance(shares, Mapping):
        raise MalformedShareError("shares must be a mapping {share id: share bytes}")
    if isinstance(secret_len, bool) or not isinstance(secret_len, int):
        raise InvalidParameterError(f"secret_len must be an int, got {secret_len!r}")
    if not 1 <= secret_len <= MAX_SECRET_BYTES:
        raise InvalidParameterError(f"secret_len must be 1..{MAX_SECRET_BYTES}, got {secret_len}")
    ids = _checked_ids(list(shares.keys()))
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise InvalidThresholdError(f"threshold t must be an int >= 1, got {t!r}")
    if len(ids) < t:
        raise InsufficientSharesError(f"{len(ids)} shares given, threshold is {t}")
    points = sorted((i, _decode(i, shares[i])) for i in ids)
    base, extra = points[:t], points[t:]
    interpolator = _Interpolator(base)
    for x, y in extra:
        if interpolator.at(x) != y:
            raise InconsistentSharesError(
                f"share {x} does not lie on the polynomial through shares {[i for i, _ in base]}"
            )
    secret = interpolator.at(0)
    if secret >= 1 << (8 * secret_len):
        raise InconsistentSharesError(
            f"shares reconstruct a value longer than {secret_len} bytes "
            "(corrupted shares, wrong threshold or wrong secret length)"
        )
    return secret.to_bytes(secret_len, "big")


def _check_threshold(t: object, n: int) -> None:
    if isinstance(t, bool) or not isinstance(t, int):
        raise InvalidThresholdError(f"threshold t must be an int, got {t!r}")
    if not 1 <= t <= n:
        raise InvalidThresholdError(f"threshold t={t} must satisfy 1 <= t <= n={n}")


def _checked_ids(ids: Sequence[object]) -> list[int]:
    checked: list[int] = []
    seen: set[int] = set()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InvalidShareIdError(f"share id {i!r} is not an int")
        if not 1 <= i <= MAX_SHARE_ID:
            raise InvalidShareIdError(f"share id {i} is not in 1..{MAX_SHARE_ID}")
        if i in seen:
            raise InvalidShareIdError(f"share id {i} appears more than once")
        seen.add(i)
        checked.append(i)
    return checked


def _random_field_element(rand: RandomSource) -> int:
    # Rejection sampling: a 521-bit string is uniform on [0, 2^521); keeping only values
    # below p makes it exactly uniform on GF(p) (the only rejected value is p itself).
    while True:
        value = int.from_bytes(read_random(rand, SHARE_BYTES), "big") & ((1 << FIELD_BITS) - 1)
        if value < PRIME:
            return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


class _Interpolator:
    """Evaluates the polynomial of degree < t through ``t`` points at any other x.

    Lagrange form with barycentric weights ``w_j = 1 / prod_{m != j} (x_j - x_m)``:
    ``f(x) = sum_j y_j w_j prod_{m != j} (x - x_m)``. The weights cost O(t^2) products and
    one field inversion once; each evaluation then costs O(t), so checking every extra
    share stays cheap even for large cohorts.
    """

    def __init__(self, points: Sequence[tuple[int, int]]) -> None:
        self._xs = [x for x, _ in points]
        denominators = []
        for j, xj in enumerate(self._xs):
            d = 1
            for m, xm in enumerate(self._xs):
                if m != j:
                    d = d * (xj - xm) % PRIME
            denominators.append(d)
        weights = _batch_inverse(denominators)
        self._coefficients = [y * w % PRIME for (_, y), w in zip(points, weights, strict=True)]

    def at(self, x: int) -> int:
        diffs = [(x - xm) % PRIME for xm in self._xs]
        # prod_{m != j} (x - x_m) as prefix[j] * suffix[j + 1]: no division needed.
        prefix = [1]
        for d in diffs:
            prefix.append(prefix[-1] * d % PRIME)
        total, suffix = 0, 1
        for j in range(len(diffs) - 1, -1, -1):
            total = (total + self._coefficients[j] * prefix[j] % PRIME * suffix) % PRIME
            suffix = suffix * diffs[j] % PRIME
        return total


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses of non-zero field elements with one modular inversion (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return out


def _encode(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def _decode(share_id: int, value: object) -> int:
    if not isinstance(value, bytes | bytearray):
        raise MalformedShareError(f"share {share_id} must be bytes, got {type(value).__name__}")
    if len(value) != SHARE_BYTES:
        raise MalformedShareError(f"share {share_id} is {len(value)} bytes, expected {SHARE_BYTES}")
    y = int.from_bytes(value, "big")
    if y >= PRIME:
        raise MalformedShareError(f"share {share_id} is not an element of GF(2^521 - 1)")
    return y

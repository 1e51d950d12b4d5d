"""Injected randomness: every primitive that needs random bytes takes a ``rand`` callable.

Production code passes :func:`os.urandom`; tests pass a deterministic stream so that
known-answer vectors can pin the exact output.
"""

from __future__ import annotations

from collections.abc import Callable

from common.secagg.errors import RandomnessError

RandomSource = Callable[[int], bytes]
"""``rand(n)`` returns ``n`` cryptographically secure random bytes (like :func:`os.urandom`)."""


def read_random(rand: RandomSource, n: int) -> bytes:
    """``rand(n)``, checked: a source that returns short or non-bytes output is a bug that
    would silently weaken keys, so it is refused rather than padded."""
    out = rand(n)
    if not isinstance(out, bytes | bytearray) or len(out) != n:
        got = f"{len(out)} bytes" if isinstance(out, bytes | bytearray) else type(out).__name__
        raise RandomnessError(f"randomness source returned {got}, expected {n} bytes")
    return bytes(out)

"""Exponential backoff with full jitter (randomness passed in for testability)."""

from __future__ import annotations

import random


class Backoff:
    """Delays grow ×2 from ``initial`` up to ``maximum``; each is drawn uniformly in
    [0, cap] ("full jitter") so a restarted aggregator is not hit by every clinic at once."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 62)
        return self._rng.uniform(0.0, cap)

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt

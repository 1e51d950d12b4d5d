"""Local training as it goes: a gauge on every step, a log line every tenth of the way.

A DP round on a large clinic can train for many minutes; without this an operator sees
nothing between "round N: training" and the upload, and cannot tell a slow round from a
stuck one. Logging is rate-limited (every 10 % and at most every ``interval_s``), so a
round of thousands of steps writes a dozen lines, not thousands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

log = logging.getLogger("dermafed.agent")


class TrainingProgress:
    """A ``progress(done, planned)`` callback for ``train_local`` and ``train_dp``."""

    def __init__(
        self,
        round_number: int,
        ratio: Gauge,
        round_gauge: Gauge | None = None,
        *,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.round_number = round_number
        self._ratio = ratio
        self._clock = clock
        self._interval_s = interval_s
        self._started = clock()
        self._last_log = self._started
        self._last_tenth = 0
        ratio.set(0.0)
        if round_gauge is not None:
            round_gauge.set(round_number)

    def __call__(self, done: int, planned: int) -> None:
        share = min(1.0, done / planned) if planned > 0 else 0.0
        self._ratio.set(share)
        tenth = int(share * 10)
        now = self._clock()
        if tenth > self._last_tenth or now - self._last_log >= self._interval_s:
            self._last_tenth = max(self._last_tenth, tenth)
            self._last_log = now
            of = f" of {planned}" if planned > 0 else ""
            log.info(
                "round %d: local training %.0f%% (step %d%s, %.0fs)",
                self.round_number,
                100 * share,
                done,
                of,
                now - self._started,
            )

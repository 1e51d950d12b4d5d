"""Spent epsilon can only go up: the aggregator's memory of what each clinic has spent.

Per clinic certificate identity the ledger keeps the highest epsilon the clinic has
reported. A lower report means the clinic's privacy ledger was reset or replaced (a new
state_dir, an old backup): it would spend again a budget it has already spent. Such a
clinic is refused, with a metric and a ledger event, until its report is back at the
floor (the right ledger was restored) or an admin acknowledges the reset with a reason,
which the ledger audits in the same transaction.

Not thread-safe on its own: the coordinator calls it under its lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aggregator.domain import PrivacyReport
from aggregator.ledger import Ledger
from aggregator.metrics import AggregatorMetrics
from common.errors import InvalidArgumentError, PreconditionError, PrivacyResetError

log = logging.getLogger("dermafed.aggregator")

# Reports whose epsilon comes from the clinic's ledger. "off" (no DP, nothing to account)
# and "ledger_error" (the ledger failed its check; the clinic declines every round) report
# 0 without meaning that nothing was spent, so they neither raise nor test the floor.
ACCOUNTED_STATUSES = frozenset({"dp-sgd", "exhausted"})
# Float noise in the clinic's accountant must not read as a reset.
RELATIVE_TOLERANCE = 1e-9


class PrivacyFloor:
    def __init__(
        self, ledger: Ledger, metrics: AggregatorMetrics, clock: Callable[[], float]
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock
        self._floors: dict[str, float] = {}
        # Clinics refused now, with the (lower) epsilon they report.
        self._refused: dict[str, float] = {}

    def load(self) -> None:
        self._floors = self._ledger.privacy_floors()

    @property
    def floors(self) -> dict[str, float]:
        return dict(self._floors)

    def is_refused(self, clinic: str) -> bool:
        return clinic in self._refused

    def check(self, clinic: str, report: PrivacyReport) -> None:
        """Raise :class:`PrivacyResetError` when ``report`` is below the clinic's floor."""
        floor = self._floors.get(clinic)
        if (
            floor is None
            or report.status not in ACCOUNTED_STATUSES
            or report.epsilon_spent >= floor * (1.0 - RELATIVE_TOLERANCE)
        ):
            if self._refused.pop(clinic, None) is not None:
                log.info("clinic %s reports epsilon %.4g again; no longer refused", clinic, floor)
                self._metrics.clinic_privacy_reset.labels(clinic=clinic).set(0)
            return
        if clinic not in self._refused:
            # Once per reset: a clinic polling every second must not flood the ledger.
            log.error(
                "clinic %s reports epsilon spent %.4g, below the %.4g it reported before; "
                "refusing it until an admin acknowledges the reset",
                clinic,
                report.epsilon_spent,
                floor,
            )
            self._ledger.record_clinic_event(
                None,
                clinic,
                "privacy_reset",
                json.dumps({"reported": report.epsilon_spent, "floor": floor}),
                self._clock(),
            )
        self._refused[clinic] = report.epsilon_spent
        self._metrics.clinic_privacy_reset.labels(clinic=clinic).set(1)
        raise PrivacyResetError(
            f"clinic {clinic} reports epsilon spent {report.epsilon_spent:.4g}, below the "
            f"{floor:.4g} it reported before: its privacy ledger was reset or replaced. Restore "
            f"it, or have an admin run 'dermafed admin ack-privacy-reset {clinic} --reason ...'"
        )

    def record(self, clinic: str, report: PrivacyReport) -> None:
        """Raise the clinic's floor to ``report`` if it is higher (one ledger write then)."""
        if report.status not in ACCOUNTED_STATUSES:
            return
        if report.epsilon_spent > self._floors.get(clinic, -1.0):
            self._ledger.raise_privacy_floor(clinic, report.epsilon_spent, self._clock())
            self._floors[clinic] = report.epsilon_spent

    def acknowledge(self, clinic: str, reason: str, actor: str) -> tuple[float, float]:
        """An admin accepts the clinic's lower epsilon; returns (old floor, new floor)."""
        if not reason.strip():
            raise InvalidArgumentError("a reason is required: it goes into the audit log")
        reported = self._refused.get(clinic)
        if reported is None:
            raise PreconditionError(f"clinic {clinic} is not refused for a privacy reset")
        previous = self._ledger.reset_privacy_floor(
            clinic, reported, self._clock(), actor=actor or "unknown", reason=reason.strip()
        )
        self._floors[clinic] = reported
        del self._refused[clinic]
        self._metrics.clinic_privacy_reset.labels(clinic=clinic).set(0)
        log.warning(
            "%s acknowledged clinic %s's privacy reset (epsilon floor %.4g -> %.4g): %s",
            actor,
            clinic,
            previous,
            reported,
            reason,
        )
        return previous, reported

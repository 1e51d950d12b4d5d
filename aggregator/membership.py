"""Which clinics the operator has excluded from the federation, and why.

Exclusion is the operator's "this clinic is not part of the federation for now" (it is
leaving, its data are under review, it misbehaved): unlike revocation it keeps the
clinic's certificate valid and is undone with one admin call. An excluded clinic is in
no cohort and its polls are refused with the operator's reason, so a round already
running with it goes on without it (it drops out, as a clinic that went offline would).
Every change is a clinic event in the ledger (so it survives restarts) and an audit entry
naming the admin.

Not thread-safe on its own: the coordinator calls it under its lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aggregator.ledger import Ledger
from common.errors import ExcludedError, InvalidArgumentError, PreconditionError
from common.pki import PkiError, validate_name

log = logging.getLogger("dermafed.aggregator")

EVENT = "membership"


class Membership:
    def __init__(self, ledger: Ledger, clock: Callable[[], float]) -> None:
        self._ledger = ledger
        self._clock = clock
        # Excluded clinics and the operator's reason.
        self._excluded: dict[str, str] = {}

    def load(self) -> None:
        self._excluded = {}
        for clinic, ev in self._ledger.latest_clinic_events(EVENT).items():
            try:
                detail = json.loads(ev.detail or "{}")
            except ValueError:
                continue
            if isinstance(detail, dict) and detail.get("excluded") is True:
                self._excluded[clinic] = str(detail.get("reason", ""))

    @property
    def excluded(self) -> dict[str, str]:
        return dict(self._excluded)

    def is_excluded(self, clinic: str) -> bool:
        return clinic in self._excluded

    def check(self, clinic: str) -> None:
        """Raise :class:`ExcludedError` for an excluded clinic."""
        reason = self._excluded.get(clinic)
        if reason is not None:
            raise ExcludedError(
                f"clinic {clinic} is excluded from the federation by its operator ({reason}); "
                "ask the operator, who can run 'dermafed admin include "
                f"{clinic} --reason ...'"
            )

    def set(self, clinic: str, excluded: bool, reason: str, actor: str) -> bool:
        """Exclude or include ``clinic``; returns whether it was excluded before."""
        try:
            validate_name(clinic, "clinic")
        except PkiError as exc:
            raise InvalidArgumentError(str(exc)) from None
        reason = reason.strip()
        if not reason:
            raise InvalidArgumentError("a reason is required: it goes into the audit log")
        was = clinic in self._excluded
        if was == excluded:
            state = "excluded" if excluded else "not excluded"
            raise PreconditionError(f"clinic {clinic} is already {state}")
        now = self._clock()
        detail = {"excluded": excluded, "reason": reason, "actor": actor or "unknown"}
        self._ledger.record_clinic_event(None, clinic, EVENT, json.dumps(detail), now)
        self._ledger.audit(
            actor or "unknown",
            "exclude_clinic" if excluded else "include_clinic",
            {"clinic": clinic, "reason": reason},
            now,
        )
        if excluded:
            self._excluded[clinic] = reason
        else:
            del self._excluded[clinic]
        log.warning(
            "%s %s clinic %s: %s", actor, "excluded" if excluded else "included", clinic, reason
        )
        return was

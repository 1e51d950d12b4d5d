"""The clinic's privacy guard: decide, charge, and report, around the privacy ledger.

The daemon asks the guard before every round. The guard re-opens (and so re-verifies) the
ledger each time, so a ledger damaged while the agent runs is caught before the next
round, and an operator's repair is picked up without a restart. It never assumes that
nothing was spent: if the ledger cannot be read, the answer is "decline".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from clinic_agent.privacy import (
    PlanPrivacyRequest,
    PrivacyConfig,
    RoundDecision,
    epsilon_for,
    plan_round,
)
from clinic_agent.privacy_ledger import LedgerEntry, PrivacyLedger, PrivacyLedgerError

log = logging.getLogger("dermafed.agent")

LEDGER_ERROR = "privacy_ledger_error"


@dataclass(frozen=True)
class PrivacyStatus:
    """What the clinic reports to the aggregator and its own metrics."""

    status: str  # "dp-sgd" | "off" | "exhausted" | "ledger_error"
    epsilon_spent: float
    epsilon_max: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    detail: str = ""

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_max - self.epsilon_spent)


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


class PrivacyGuard:
    def __init__(self, config: PrivacyConfig, ledger_path: Path, federation: str) -> None:
        self.config = config
        self.ledger_path = ledger_path
        self.federation = federation
        self._status = self._initial_status()

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    @property
    def status(self) -> PrivacyStatus:
        return self._status

    def _ledger(self) -> PrivacyLedger:
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        return PrivacyLedger(self.ledger_path)

    def _initial_status(self) -> PrivacyStatus:
        if not self.enabled:
            return self._make("off", 0.0, 0.0)
        try:
            entries = self._ledger().entries()
        except PrivacyLedgerError as exc:
            log.error(
                "privacy ledger %s failed its integrity check: %s; this clinic will "
                "decline every round until an operator repairs it",
                self.ledger_path,
                exc,
            )
            return self._make("ledger_error", math.nan, math.nan, detail=str(exc))
        if not entries:
            return self._make("dp-sgd", 0.0, self.config.delta or 0.0)
        delta = min(e.delta for e in entries)
        spent = epsilon_for([e.step for e in entries], delta, self.config.accountant)
        status = "exhausted" if spent >= self.config.epsilon_max else "dp-sgd"
        return self._make(status, spent, delta)

    def _make(self, status: str, spent: float, delta: float, detail: str = "") -> PrivacyStatus:
        return PrivacyStatus(
            status=status,
            epsilon_spent=spent,
            epsilon_max=self.config.epsilon_max,
            delta=delta,
            noise_multiplier=float(self.config.noise_multiplier or 0.0),
            max_grad_norm=self.config.max_grad_norm,
            detail=detail,
        )

    def clinic_noise(self, plan_multiplier: float) -> float | Refusal:
        """The clinic-level noise multiplier to add to the delta this round.

        The plan's value is used (the aggregator sized the round's quantization for it); a
        plan with less than this clinic's own requirement is declined, never silently
        over-noised, since the extra noise would be clipped away by the round's bound.
        """
        own = self.config.clinic_noise_multiplier
        if plan_multiplier < own:
            return Refusal(
                "noise_below_floor",
                f"plan clinic-level noise multiplier {plan_multiplier} is below "
                f"this clinic's privacy.clinic_noise_multiplier {own}",
            )
        return plan_multiplier

    def decide(
        self, n_examples: int, batch_size: int, epochs: int, plan_noise: float | None
    ) -> RoundDecision | Refusal:
        """Plan one round against the ledger; a :class:`Refusal` means decline it."""
        try:
            entries = self._ledger().entries()
        except PrivacyLedgerError as exc:
            self._status = self._make("ledger_error", math.nan, math.nan, detail=str(exc))
            return Refusal(LEDGER_ERROR, f"privacy ledger failed its integrity check: {exc}")
        decision = plan_round(
            self.config, entries, n_examples, batch_size, epochs, PlanPrivacyRequest(plan_noise)
        )
        if not decision.accepted:
            reason = str(decision.reason)
            if reason == "privacy_budget_exhausted":
                spent = decision.epsilon_spent
                self._status = self._make("exhausted", spent, decision.delta or math.nan)
            return Refusal(reason, decision.message)
        return decision

    def charge(
        self,
        decision: RoundDecision,
        *,
        round_number: int,
        parent: str,
        clinic_noise_multiplier: float = 0.0,
    ) -> None:
        """Record the round as spent *before* training starts (a crash cannot undo it)."""
        if decision.step is None:
            return  # DP off: nothing to charge
        entry = LedgerEntry.from_decision(
            decision,
            round=round_number,
            round_id=f"{round_number}:{parent[:16]}",
            federation=self.federation,
            clinic_noise_multiplier=clinic_noise_multiplier,
        )
        self._ledger().commit(entry)
        after = float(decision.epsilon_after or 0.0)
        self._status = self._make(
            "exhausted" if after >= self.config.epsilon_max else "dp-sgd",
            after,
            float(decision.delta or math.nan),
        )

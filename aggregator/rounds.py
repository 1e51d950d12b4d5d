"""The round state machine: pure logic, no gRPC, no I/O, no hidden clock.

A round walks through an ordered list of *stages* (plain FedAvg has one, ``train``;
secure aggregation has five). In every stage each clinic still *alive* either responds,
declines (only in the first stage) or stays silent. A stage ends when every alive clinic
has answered or its deadline passes; whoever answered stays alive, everyone else is
recorded as a dropout of that stage. If fewer than ``min_clinics`` remain the round
aborts; after the last stage the round is ready to be finalised by the coordinator.

Every method takes ``now`` so tests drive time explicitly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import (
    DuplicateSubmissionError,
    NotInCohortError,
    PreconditionError,
    StaleRoundError,
)


class Phase(enum.Enum):
    RUNNING = "running"
    READY = "ready"  # every stage finished with enough clinics; finalise now
    ABORTED = "aborted"


@dataclass(frozen=True)
class StageResult:
    stage: str
    seconds: float
    responded: frozenset[str]
    dropped: frozenset[str]


@dataclass
class Round:
    number: int
    parent: str
    cohort: tuple[str, ...]
    min_clinics: int
    stages: tuple[str, ...]
    # Seconds allowed for each stage, by stage name.
    stage_timeouts: Mapping[str, float]
    started_at: float
    phase: Phase = Phase.RUNNING
    stage_index: int = 0
    stage_started_at: float = 0.0
    alive: set[str] = field(default_factory=set)
    responded: set[str] = field(default_factory=set)
    declined: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # clinic -> stage it vanished in
    history: list[StageResult] = field(default_factory=list)
    abort_reason: str = ""

    @classmethod
    def start(
        cls,
        *,
        number: int,
        parent: str,
        cohort: Sequence[str],
        min_clinics: int,
        stages: Sequence[str],
        stage_timeouts: Mapping[str, float],
        now: float,
    ) -> Round:
        if not stages:
            raise ValueError("a round needs at least one stage")
        missing = [s for s in stages if s not in stage_timeouts]
        if missing:
            raise ValueError(f"no deadline for stage(s) {missing}")
        if len(set(cohort)) != len(cohort):
            raise ValueError("cohort contains duplicate clinic ids")
        if len(cohort) < min_clinics:
            raise PreconditionError(
                f"cohort of {len(cohort)} is below the minimum of {min_clinics} clinics"
            )
        return cls(
            number=number,
            parent=parent,
            cohort=tuple(cohort),
            min_clinics=min_clinics,
            stages=tuple(stages),
            stage_timeouts=dict(stage_timeouts),
            started_at=now,
            stage_started_at=now,
            alive=set(cohort),
        )

    # -- queries -------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """The current stage's name (the last one once the round has left RUNNING)."""
        return self.stages[min(self.stage_index, len(self.stages) - 1)]

    @property
    def deadline(self) -> float:
        return self.stage_started_at + self.stage_timeouts[self.stage]

    @property
    def finished(self) -> bool:
        return self.phase is not Phase.RUNNING

    def pending(self) -> frozenset[str]:
        """Alive clinics that have not answered the current stage yet."""
        if self.phase is not Phase.RUNNING:
            return frozenset()
        return frozenset(self.alive - self.responded)

    def is_pending(self, clinic: str) -> bool:
        return clinic in self.pending()

    # -- events --------------------------------------------------------------------------

    def check_can_respond(self, clinic: str, round_number: int, stage: str, now: float) -> None:
        """Raise the domain error that explains why ``clinic`` may not answer now."""
        if round_number != self.number:
            raise StaleRoundError(f"round {round_number} is not the running round {self.number}")
        if self.phase is not Phase.RUNNING:
            raise StaleRoundError(f"round {self.number} is no longer accepting messages")
        if clinic not in self.cohort:
            raise NotInCohortError(f"clinic {clinic!r} is not in the cohort of round {self.number}")
        if stage != self.stage:
            raise StaleRoundError(f"round {self.number} is in stage {self.stage!r}, not {stage!r}")
        if clinic in self.responded:
            raise DuplicateSubmissionError(
                f"clinic {clinic!r} already answered stage {stage!r} of round {self.number}"
            )
        if clinic in self.declined:
            raise PreconditionError(f"clinic {clinic!r} declined round {self.number}")
        if clinic not in self.alive:
            raise StaleRoundError(
                f"clinic {clinic!r} dropped out of round {self.number} in stage "
                f"{self.dropped.get(clinic, '?')!r}"
            )
        if now > self.deadline:
            raise StaleRoundError(f"the deadline of stage {stage!r} has passed")

    def respond(self, clinic: str, round_number: int, stage: str, now: float) -> None:
        self.check_can_respond(clinic, round_number, stage, now)
        self.responded.add(clinic)

    def decline(self, clinic: str, round_number: int, reason: str, now: float) -> None:
        """A clinic refuses the round (e.g. its privacy budget is spent); first stage only."""
        if self.stage_index != 0:
            raise PreconditionError("a clinic can only decline before the round's first stage ends")
        self.check_can_respond(clinic, round_number, self.stage, now)
        self.alive.discard(clinic)
        self.declined[clinic] = reason

    def abort(self, reason: str) -> None:
        if self.phase is Phase.RUNNING:
            self.phase = Phase.ABORTED
            self.abort_reason = reason

    def tick(self, now: float) -> StageResult | None:
        """Close the current stage if everyone answered or its deadline passed.

        Returns the closed stage's result (or ``None`` when nothing changed); the caller
        keeps calling ``tick`` until ``phase`` leaves RUNNING.
        """
        if self.phase is not Phase.RUNNING:
            return None
        everyone_answered = not (self.alive - self.responded)
        if not everyone_answered and now <= self.deadline:
            return None
        return self._close_stage(now)

    def _close_stage(self, now: float) -> StageResult:
        stage = self.stage
        silent = self.alive - self.responded
        for clinic in silent:
            self.dropped[clinic] = stage
        self.alive = set(self.responded)
        result = StageResult(
            stage=stage,
            seconds=max(0.0, now - self.stage_started_at),
            responded=frozenset(self.responded),
            dropped=frozenset(silent),
        )
        self.history.append(result)
        self.responded = set()
        if len(self.alive) < self.min_clinics:
            declined = f", {len(self.declined)} declined" if self.declined else ""
            self.abort(
                f"only {len(self.alive)} clinic(s) left after stage {stage!r}{declined}, "
                f"minimum is {self.min_clinics}"
            )
        elif self.stage_index + 1 >= len(self.stages):
            self.phase = Phase.READY
            self.stage_index = len(self.stages)
        else:
            self.stage_index += 1
            self.stage_started_at = now
        return result


def select_cohort(
    connected: Sequence[str], max_cohort: int, rng_sample: object | None = None
) -> list[str]:
    """Pick up to ``max_cohort`` clinics; ``rng_sample`` is ``random.Random.sample``-like."""
    clinics = sorted(set(connected))
    if len(clinics) <= max_cohort:
        return clinics
    sampler = getattr(rng_sample, "sample", None)
    if sampler is None:
        raise ValueError("a random generator is required to sample a cohort")
    return sorted(sampler(clinics, max_cohort))


def should_start_round(
    *,
    now: float,
    connected: int,
    needed: int,
    rounds_finished: int,
    max_rounds: int,
    last_finished_at: float | None,
    interval_s: float,
    requested: bool = False,
) -> bool:
    """The scheduling rule, separate from the coordinator so it can be tested alone."""
    if max_rounds and rounds_finished >= max_rounds and not requested:
        return False
    if connected < needed:
        return False
    if requested:
        return True
    due = next_round_due(last_finished_at, interval_s)
    return due is None or now >= due


def next_round_due(last_finished_at: float | None, interval_s: float) -> float | None:
    """The earliest time the interval rule lets the next round start (None: at once)."""
    if last_finished_at is None:
        return None
    return last_finished_at + interval_s

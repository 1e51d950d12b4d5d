"""The pure round state machine, driven by an explicit clock."""

from __future__ import annotations

import random

import pytest

from aggregator.rounds import Phase, Round, next_round_due, select_cohort, should_start_round
from common.errors import (
    DuplicateSubmissionError,
    NotInCohortError,
    PreconditionError,
    StaleRoundError,
)

SECURE_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")


def make_round(cohort=("a", "b", "c"), min_clinics=2, stages=("train",), timeout=10.0, now=0.0):
    return Round.start(
        number=1,
        parent="p" * 64,
        cohort=list(cohort),
        min_clinics=min_clinics,
        stages=stages,
        stage_timeouts={s: timeout for s in stages},
        now=now,
    )


def test_round_completes_when_every_clinic_answers_before_the_deadline():
    r = make_round()
    for clinic in "abc":
        r.respond(clinic, 1, "train", now=1.0)
    result = r.tick(now=2.0)
    assert result is not None and result.dropped == frozenset()
    assert r.phase is Phase.READY and r.alive == {"a", "b", "c"}


def test_silent_clinic_is_dropped_at_the_deadline_and_round_survives_above_minimum():
    r = make_round()
    r.respond("a", 1, "train", now=1.0)
    r.respond("b", 1, "train", now=1.0)
    assert r.tick(now=5.0) is None  # c may still answer
    result = r.tick(now=10.5)
    assert result is not None and result.dropped == frozenset({"c"})
    assert r.phase is Phase.READY and r.dropped == {"c": "train"}


def test_round_aborts_cleanly_below_the_minimum():
    r = make_round(min_clinics=3)
    r.respond("a", 1, "train", now=1.0)
    r.respond("b", 1, "train", now=1.0)
    r.tick(now=11.0)
    assert r.phase is Phase.ABORTED
    assert "minimum is 3" in r.abort_reason


def test_each_bad_message_raises_its_own_error_and_changes_nothing():
    r = make_round()
    r.respond("a", 1, "train", now=1.0)
    before = (set(r.responded), set(r.alive))
    with pytest.raises(DuplicateSubmissionError):
        r.respond("a", 1, "train", now=1.0)
    with pytest.raises(NotInCohortError):
        r.respond("mallory", 1, "train", now=1.0)
    with pytest.raises(StaleRoundError):
        r.respond("b", 0, "train", now=1.0)
    with pytest.raises(StaleRoundError):
        r.respond("b", 1, "unmask", now=1.0)
    with pytest.raises(StaleRoundError):
        r.respond("b", 1, "train", now=10.5)  # after the deadline
    assert (set(r.responded), set(r.alive)) == before


def test_decline_removes_the_clinic_without_counting_a_dropout():
    r = make_round()
    r.decline("c", 1, "privacy_budget_exhausted", now=1.0)
    r.respond("a", 1, "train", now=1.0)
    r.respond("b", 1, "train", now=1.0)
    result = r.tick(now=1.5)  # everyone still alive answered: no need to wait
    assert result is not None and result.dropped == frozenset()
    assert r.declined == {"c": "privacy_budget_exhausted"} and r.phase is Phase.READY
    with pytest.raises(PreconditionError):
        r.decline("a", 1, "late", now=2.0)


@pytest.mark.parametrize("drop_stage", range(len(SECURE_STAGES)))
def test_a_clinic_can_vanish_in_any_stage_of_a_multi_stage_round(drop_stage):
    r = make_round(cohort=("a", "b", "c", "d"), min_clinics=3, stages=SECURE_STAGES)
    now = 0.0
    for index, stage in enumerate(SECURE_STAGES):
        assert r.stage == stage
        for clinic in sorted(r.alive):
            if clinic == "d" and index >= drop_stage:
                continue
            r.respond(clinic, 1, stage, now=now + 1)
        now += 11.0
        r.tick(now)
    assert r.phase is Phase.READY
    assert r.dropped == {"d": SECURE_STAGES[drop_stage]}
    assert r.alive == {"a", "b", "c"}


def test_stage_deadlines_restart_at_each_stage():
    r = make_round(stages=("one", "two"), timeout=10.0)
    for clinic in "abc":
        r.respond(clinic, 1, "one", now=8.0)
    r.tick(8.0)
    assert r.stage == "two" and r.deadline == pytest.approx(18.0)


def test_start_refuses_a_cohort_below_the_minimum_and_bad_plans():
    with pytest.raises(PreconditionError):
        make_round(cohort=("a",), min_clinics=2)
    with pytest.raises(ValueError):
        Round.start(
            number=1,
            parent="p",
            cohort=["a", "a"],
            min_clinics=1,
            stages=("t",),
            stage_timeouts={"t": 1.0},
            now=0,
        )
    with pytest.raises(ValueError):
        Round.start(
            number=1,
            parent="p",
            cohort=["a"],
            min_clinics=1,
            stages=("t",),
            stage_timeouts={},
            now=0,
        )


def test_abort_is_final():
    r = make_round()
    r.abort("admin asked")
    assert r.phase is Phase.ABORTED and r.tick(100.0) is None
    with pytest.raises(StaleRoundError):
        r.respond("a", 1, "train", now=1.0)


def test_cohort_selection_is_bounded_and_seeded():
    clinics = [f"c{i}" for i in range(20)]
    assert select_cohort(clinics[:3], 5) == ["c0", "c1", "c2"]
    a = select_cohort(clinics, 5, random.Random(1))
    b = select_cohort(clinics, 5, random.Random(1))
    assert a == b and len(a) == 5 and set(a) <= set(clinics)


def test_scheduling_rule():
    base = dict(
        now=100.0,
        connected=3,
        needed=3,
        rounds_finished=0,
        max_rounds=2,
        last_finished_at=None,
        interval_s=60.0,
    )
    assert should_start_round(**base)
    assert not should_start_round(**{**base, "connected": 2})
    assert not should_start_round(**{**base, "last_finished_at": 50.0})
    assert should_start_round(**{**base, "last_finished_at": 30.0})
    assert not should_start_round(**{**base, "rounds_finished": 2})
    assert should_start_round(**{**base, "rounds_finished": 2, "requested": True})


def test_next_round_due_counts_the_interval_from_the_last_finish():
    assert next_round_due(None, 3600.0) is None  # nothing finished yet: at once
    assert next_round_due(1000.0, 3600.0) == 4600.0
    assert next_round_due(1000.0, 0.0) == 1000.0
    # The start rule and the due time agree at the boundary.
    base = dict(connected=3, needed=3, rounds_finished=1, max_rounds=0, interval_s=3600.0)
    assert not should_start_round(now=4599.9, last_finished_at=1000.0, **base)
    assert should_start_round(now=4600.0, last_finished_at=1000.0, **base)

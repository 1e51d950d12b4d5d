"""The aggregator's SQLite ledger: round lifecycle, publication history, durability."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.ledger import SCHEMA_VERSION, Ledger, RoundRecord
from common.errors import IntegrityError, NotFoundError, PreconditionError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cid_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


INITIAL = cid_of("initial")
PLAN = {
    "local_epochs": 2,
    "learning_rate": 0.01,
    "fedprox_mu": 0.001,
    "deadlines": {"advertise": 30.0, "unmask": 12.5},
    "dp": {"enabled": True, "noise_multiplier": 1.1, "delta": 1e-5},
    "note": "Zürich → Genève",
    "quantization": None,
}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "state" / "ledger.sqlite")
    led.record_checkpoint(INITIAL, None, None, 1.0)
    led.publish(INITIAL, None, 1.0, "initial", "initial model")
    yield led
    led.close()


def run_published_round(led: Ledger, number: int, parent: str, at: float) -> str:
    """A complete, published round as the coordinator records one."""
    cohort = ["clinic-a", "clinic-b", "clinic-c"]
    led.begin_round(number, parent, "secure", PLAN, cohort, at)
    cid = cid_of(f"round-{number}")
    led.record_checkpoint(cid, number, parent, at + 5)
    led.finish_round(
        number,
        "published",
        "",
        at + 6,
        checkpoint=cid,
        contributors=cohort[:2],
        train_loss=0.5,
        metrics={"accuracy": 0.7},
        publish=True,
    )
    return cid


def test_fresh_ledger_is_empty(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as led:
        assert led.schema_version() == SCHEMA_VERSION
        assert led.next_round_number() == 1
        assert led.published() is None
        assert led.rounds() == []
        assert led.round(1) is None
        assert led.publications() == []
        assert led.clinic_events() == []
        assert led.audit_log() == []
        led.integrity_check()


def test_round_lifecycle(ledger: Ledger) -> None:
    cohort = ["clinic-a", "clinic-b", "clinic-c"]
    ledger.begin_round(1, INITIAL, "secure", PLAN, cohort, 100.0)
    running = ledger.round(1)
    assert running == RoundRecord(
        number=1,
        parent=INITIAL,
        mode="secure",
        plan=PLAN,
        cohort=cohort,
        started_at=100.0,
        finished_at=None,
        outcome=None,
        reason=None,
        checkpoint=None,
        contributors=[],
        train_loss=None,
        metrics=None,
        stages={},
    )
    assert not running.finished

    for clinic in cohort:
        ledger.record_clinic_event(1, clinic, "selected", None, 100.0)
    ledger.record_stage(1, "advertise", 1.5)
    ledger.record_stage(1, "share", 2.0)
    ledger.record_stage(1, "advertise", 1.25)  # a stage recorded again is replaced
    ledger.record_clinic_event(1, "clinic-c", "dropped", "silent in stage masked_input", 104.0)
    ledger.record_clinic_event(1, "clinic-a", "contributed", "1024 bytes", 105.0)

    cid = cid_of("round-1")
    metrics = {"accuracy": 0.71, "sensitivity": {"mel": 0.6, "bcc": 0.55}, "auroc": 0.9}
    ledger.record_checkpoint(cid, 1, INITIAL, 110.0, metrics)
    ledger.finish_round(
        1,
        "published",
        "",
        111.0,
        checkpoint=cid,
        contributors=["clinic-a", "clinic-b"],
        train_loss=0.42,
        metrics=metrics,
        publish=True,
    )

    done = ledger.round(1)
    assert done is not None and done.finished
    assert done.outcome == "published"
    assert done.finished_at == 111.0
    assert done.checkpoint == cid
    assert done.contributors == ["clinic-a", "clinic-b"]
    assert done.train_loss == 0.42
    assert done.metrics == metrics
    assert done.stages == {"advertise": 1.25, "share": 2.0}
    assert done.cohort == cohort and done.plan == PLAN
    assert ledger.published() == (cid, 1)
    assert ledger.next_round_number() == 2

    record = ledger.checkpoint(cid)
    assert record is not None
    assert (record.round, record.parent, record.created_at, record.metrics) == (
        1,
        INITIAL,
        110.0,
        metrics,
    )
    assert [c.id for c in ledger.checkpoints()] == [cid, INITIAL]

    events = ledger.clinic_events(round=1)
    assert [(e.clinic, e.event) for e in events] == [
        ("clinic-a", "selected"),
        ("clinic-b", "selected"),
        ("clinic-c", "selected"),
        ("clinic-c", "dropped"),
        ("clinic-a", "contributed"),
    ]
    assert events[3].detail == "silent in stage masked_input" and events[3].at == 104.0
    assert [e.event for e in ledger.clinic_events(clinic="clinic-a")] == ["selected", "contributed"]
    assert [e.event for e in ledger.clinic_events(round=1, clinic="clinic-c")] == [
        "selected",
        "dropped",
    ]
    assert ledger.clinic_events(round=2) == []


def test_rejected_round_keeps_the_published_pointer(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 10.0)
    cid = cid_of("candidate")
    ledger.record_checkpoint(cid, 1, INITIAL, 11.0, {"sensitivity": {"mel": 0.1}})
    ledger.finish_round(1, "rejected", "mel sensitivity fell by 0.2", 12.0, checkpoint=cid)
    rec = ledger.round(1)
    assert rec is not None
    assert (rec.outcome, rec.reason, rec.checkpoint) == (
        "rejected",
        "mel sensitivity fell by 0.2",
        cid,
    )
    assert ledger.published() == (INITIAL, None)


@pytest.mark.parametrize("wrong", [0, 2, -1, 5])
def test_begin_round_with_wrong_number_is_refused(ledger: Ledger, wrong: int) -> None:
    with pytest.raises(PreconditionError, match="next round number is 1"):
        ledger.begin_round(wrong, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    assert ledger.rounds() == []


def test_begin_round_reusing_a_number_is_refused(ledger: Ledger) -> None:
    run_published_round(ledger, 1, INITIAL, 10.0)
    with pytest.raises(PreconditionError, match="next round number is 2"):
        ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 20.0)


def test_begin_round_while_one_is_running_is_refused(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    with pytest.raises(PreconditionError, match="round 1 has not finished"):
        ledger.begin_round(2, INITIAL, "plain", PLAN, ["clinic-a"], 2.0)


def test_finish_twice_is_refused(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    ledger.finish_round(1, "aborted", "below threshold", 2.0)
    with pytest.raises(PreconditionError, match="already finished"):
        ledger.finish_round(1, "rejected", "again", 3.0)
    rec = ledger.round(1)
    assert rec is not None and (rec.outcome, rec.reason, rec.finished_at) == (
        "aborted",
        "below threshold",
        2.0,
    )


def test_finish_round_argument_checks(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError, match="round 7"):
        ledger.finish_round(7, "aborted", "", 1.0)
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    with pytest.raises(ValueError, match="outcome"):
        ledger.finish_round(1, "succeeded", "", 2.0)
    with pytest.raises(ValueError, match="must name its checkpoint"):
        ledger.finish_round(1, "published", "", 2.0)
    with pytest.raises(ValueError, match="publish=True"):
        ledger.finish_round(1, "rejected", "", 2.0, checkpoint=INITIAL, publish=True)
    with pytest.raises(ValueError, match="finite"):
        ledger.finish_round(1, "aborted", "", math.nan)
    with pytest.raises(NotFoundError, match="not recorded"):
        ledger.finish_round(1, "published", "", 2.0, checkpoint=cid_of("unknown"), publish=True)
    # None of the refused calls touched the round or the pointer.
    rec = ledger.round(1)
    assert rec is not None and rec.outcome is None
    assert ledger.published() == (INITIAL, None)


def test_other_argument_checks(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="cohort"):
        ledger.begin_round(1, INITIAL, "plain", PLAN, "clinic-a", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="started_at"):
        ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], math.inf)
    with pytest.raises(NotFoundError, match="round 3"):
        ledger.record_stage(3, "share", 1.0)
    with pytest.raises(NotFoundError, match="round 3"):
        ledger.record_clinic_event(3, "clinic-a", "selected", None, 1.0)
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    with pytest.raises(ValueError, match="negative"):
        ledger.record_stage(1, "share", -1.0)
    with pytest.raises(ValueError, match="clinic"):
        ledger.record_clinic_event(1, "", "selected", None, 1.0)


def test_publication_history_and_rollback(ledger: Ledger) -> None:
    first = run_published_round(ledger, 1, INITIAL, 10.0)
    second = run_published_round(ledger, 2, first, 20.0)
    assert ledger.published() == (second, 2)

    ledger.publish(first, 1, 30.0, "rollback", "admin alice: bcc regression")
    assert ledger.published() == (first, 1)
    ledger.publish(INITIAL, None, 31.0, "rollback", "back to the start")
    assert ledger.published() == (INITIAL, None)

    history = ledger.publications()
    assert [(p.checkpoint, p.round, p.kind, p.at) for p in history] == [
        (INITIAL, None, "initial", 1.0),
        (first, 1, "round", 16.0),
        (second, 2, "round", 26.0),
        (first, 1, "rollback", 30.0),
        (INITIAL, None, "rollback", 31.0),
    ]
    assert history[3].reason == "admin alice: bcc regression"
    assert history[0].reason == "initial model"


def test_publish_refusals(ledger: Ledger) -> None:
    never_published = cid_of("candidate")
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    ledger.record_checkpoint(never_published, 1, INITIAL, 2.0)
    with pytest.raises(PreconditionError, match="never published"):
        ledger.publish(never_published, 1, 3.0, "rollback")
    with pytest.raises(NotFoundError, match="not recorded"):
        ledger.publish(cid_of("nowhere"), None, 3.0, "initial")
    with pytest.raises(ValueError, match="kind"):
        ledger.publish(INITIAL, None, 3.0, "revert")
    with pytest.raises(ValueError, match="must name its round"):
        ledger.publish(never_published, None, 3.0, "round")
    assert len(ledger.publications()) == 1


def test_separate_publish_after_finish(ledger: Ledger) -> None:
    """The explicit two-call form, grouped by atomic() so they land together."""
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    cid = cid_of("round-1")
    with ledger.atomic():
        ledger.record_checkpoint(cid, 1, INITIAL, 2.0)
        ledger.finish_round(1, "published", "", 3.0, checkpoint=cid)
        ledger.publish(cid, 1, 3.0, "round")
    assert ledger.published() == (cid, 1)


def test_atomic_rolls_back_everything_on_error(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    cid = cid_of("round-1")
    with pytest.raises(RuntimeError, match="crash"), ledger.atomic():
        ledger.record_checkpoint(cid, 1, INITIAL, 2.0)
        ledger.finish_round(1, "published", "", 3.0, checkpoint=cid, publish=True)
        raise RuntimeError("crash between the two writes")
    assert ledger.checkpoint(cid) is None
    rec = ledger.round(1)
    assert rec is not None and rec.outcome is None
    assert ledger.published() == (INITIAL, None)


def test_failed_inner_block_inside_atomic_leaves_the_rest(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    with ledger.atomic():
        ledger.record_stage(1, "train", 3.0)
        with pytest.raises(NotFoundError):
            ledger.publish(cid_of("x"), 1, 2.0, "rollback")  # not recorded → refused
        with pytest.raises(RuntimeError, match="inner"), ledger.atomic():
            ledger.record_clinic_event(1, "clinic-b", "selected", None, 2.0)
            raise RuntimeError("inner block fails after writing")
        ledger.record_clinic_event(1, "clinic-a", "contributed", None, 4.0)
    rec = ledger.round(1)
    assert rec is not None and rec.stages == {"train": 3.0}
    assert [(e.clinic, e.event) for e in ledger.clinic_events(round=1)] == [
        ("clinic-a", "contributed")
    ]
    assert ledger.published() == (INITIAL, None)


def test_abort_interrupted(ledger: Ledger) -> None:
    run_published_round(ledger, 1, INITIAL, 10.0)
    ledger.begin_round(2, cid_of("round-1"), "secure", PLAN, ["clinic-a"], 20.0)
    ledger.record_stage(2, "advertise", 1.0)

    assert ledger.abort_interrupted(25.0) == [2]
    rec = ledger.round(2)
    assert rec is not None
    assert (rec.outcome, rec.reason, rec.finished_at) == (
        "aborted",
        "aggregator restarted mid-round",
        25.0,
    )
    assert rec.stages == {"advertise": 1.0}
    first = ledger.round(1)
    assert first is not None and first.outcome == "published" and first.finished_at == 16.0
    assert ledger.abort_interrupted(26.0, "again") == []
    # The aborted round is rerun under the next number.
    assert ledger.next_round_number() == 3
    ledger.begin_round(3, cid_of("round-1"), "secure", PLAN, ["clinic-a"], 30.0)


def test_rounds_are_newest_first_and_page(ledger: Ledger) -> None:
    parent = INITIAL
    for n in range(1, 8):
        parent = run_published_round(ledger, n, parent, 10.0 * n)
    assert [r.number for r in ledger.rounds()] == [7, 6, 5, 4, 3, 2, 1]
    assert [r.number for r in ledger.rounds(limit=3)] == [7, 6, 5]
    assert [r.number for r in ledger.rounds(limit=3, before=5)] == [4, 3, 2]
    assert [r.number for r in ledger.rounds(limit=3, before=2)] == [1]
    assert ledger.rounds(limit=0) == []


def test_json_columns_roundtrip(ledger: Ledger) -> None:
    cohort = ["clinic-ü", "clinic-b", "clinic-a"]  # order is kept, not sorted
    ledger.begin_round(1, INITIAL, "secure", PLAN, cohort, 1.0)
    metrics = {
        "accuracy": 0.123456789012345,
        "per_class": {"mel": {"sensitivity": 0.5, "n": 40}, "df": {"sensitivity": None}},
        "auroc_vasc": math.nan,  # undefined when the class is absent; must still record
        "confusion": [[1, 2], [3, 4]],
        "flag": True,
    }
    cid = cid_of("round-1")
    ledger.record_checkpoint(cid, 1, INITIAL, 2.0, metrics)
    ledger.finish_round(
        1,
        "rejected",
        "gate",
        3.0,
        checkpoint=cid,
        metrics=metrics,
        contributors=["clinic-ü"],
        train_loss=1e-300,
    )
    rec = ledger.round(1)
    assert rec is not None
    assert rec.plan == PLAN
    assert rec.cohort == cohort
    assert rec.contributors == ["clinic-ü"]
    assert rec.train_loss == 1e-300
    assert rec.metrics is not None and math.isnan(rec.metrics.pop("auroc_vasc"))
    expected = dict(metrics)
    del expected["auroc_vasc"]
    assert rec.metrics == expected
    stored = ledger.checkpoint(cid)
    assert stored is not None and stored.metrics is not None
    assert stored.metrics["per_class"] == metrics["per_class"]


def test_record_checkpoint_is_idempotent(ledger: Ledger) -> None:
    ledger.record_checkpoint(INITIAL, 5, "someone", 99.0, {"x": 1})
    rec = ledger.checkpoint(INITIAL)
    assert rec is not None and (rec.round, rec.parent, rec.created_at, rec.metrics) == (
        None,
        None,
        1.0,
        None,
    )


def test_initial_checkpoint_may_use_round_zero(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as led:
        led.record_checkpoint(INITIAL, 0, None, 1.0)
        led.publish(INITIAL, 0, 1.0, "initial", "initial model")
        assert led.published() == (INITIAL, 0)
        led.integrity_check()


def test_audit_log(ledger: Ledger) -> None:
    ledger.audit("admin/alice", "rollback", {"to": INITIAL, "reason": "bcc"}, 5.0)
    ledger.audit("admin/bob", "trigger_round", {}, 6.0)
    log = ledger.audit_log()
    assert [(e.actor, e.action, e.at) for e in log] == [
        ("admin/bob", "trigger_round", 6.0),
        ("admin/alice", "rollback", 5.0),
    ]
    assert log[1].detail == {"to": INITIAL, "reason": "bcc"}
    assert [e.action for e in ledger.audit_log(limit=1)] == ["trigger_round"]


def test_reopen_after_close_preserves_everything(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    led.record_checkpoint(INITIAL, None, None, 1.0)
    led.publish(INITIAL, None, 1.0, "initial", "initial model")
    first = run_published_round(led, 1, INITIAL, 10.0)
    led.begin_round(2, first, "plain", PLAN, ["clinic-b"], 20.0)
    led.record_clinic_event(2, "clinic-b", "declined", "budget: ε would exceed 8.0", 21.0)
    led.record_stage(2, "train", 4.0)
    led.audit("admin/alice", "trigger_round", {"round": 2}, 19.0)
    before = (
        led.rounds(),
        led.publications(),
        led.clinic_events(),
        led.audit_log(),
        led.checkpoints(),
        led.published(),
    )
    led.close()
    led.close()  # closing twice is harmless
    with pytest.raises(PreconditionError, match="closed"):
        led.rounds()

    with Ledger(path) as again:
        assert again.schema_version() == SCHEMA_VERSION
        again.integrity_check()
        after = (
            again.rounds(),
            again.publications(),
            again.clinic_events(),
            again.audit_log(),
            again.checkpoints(),
            again.published(),
        )
        assert after == before
        assert again.next_round_number() == 3


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(PreconditionError, match="newer than this aggregator"):
        Ledger(path)


def test_uses_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.audit("a", "b", {}, 1.0)
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.close()
        assert Path(f"{path}-wal").exists()


def test_garbage_file_is_an_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"this is not a database " * 200)
    with pytest.raises(IntegrityError, match="cannot be opened"):
        Ledger(path)


def test_damaged_page_fails_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
        with led.atomic():  # one transaction: one fsync instead of hundreds
            for i in range(1500):
                led.record_clinic_event(1, f"clinic-{i}", "selected", "x" * 60, float(i))
    # Closing the last connection checkpoints the WAL into the main file.
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[4 * page + 64 : 5 * page - 64] = random.Random(7).randbytes(page - 128)
    path.write_bytes(bytes(data))
    with Ledger(path) as led, pytest.raises(IntegrityError):
        led.integrity_check()


def test_concurrent_writers_from_threads(ledger: Ledger) -> None:
    ledger.begin_round(1, INITIAL, "plain", PLAN, ["clinic-a"], 1.0)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                ledger.record_clinic_event(1, f"clinic-{k}", "contributed", str(i), float(i))
                ledger.record_stage(1, f"stage-{k}", float(i))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.clinic_events(round=1)) == 100
    rec = ledger.round(1)
    assert rec is not None and rec.stages == {f"stage-{k}": 24.0 for k in range(4)}
    ledger.integrity_check()


# ----------------------------------------------------------------------------- crash safety

# The child behaves like an aggregator that restarts and runs rounds back to back; each
# round's content is a function of its number so the parent can check it after a kill.
_CHILD = textwrap.dedent(
    """
    import hashlib
    import sys
    from pathlib import Path

    from aggregator.ledger import Ledger

    def cid(name):
        return hashlib.sha256(name.encode()).hexdigest()

    led = Ledger(Path(sys.argv[1]))
    led.abort_interrupted(0.0)
    if led.published() is None:
        led.record_checkpoint(cid("initial"), 0, None, 0.0)
        led.publish(cid("initial"), 0, 0.0, "initial", "initial model")
    while True:
        n = led.next_round_number()
        parent = led.published()[0]
        cohort = [f"clinic-{(n + i) % 7}" for i in range(4)]
        led.begin_round(n, parent, "secure", {"round": n, "lr": 0.01}, cohort, float(n))
        print("begin", n, flush=True)
        for clinic in cohort:
            led.record_clinic_event(n, clinic, "selected", None, n + 0.1)
        for stage in ("advertise", "share", "masked_input", "unmask"):
            led.record_stage(n, stage, 0.25)
        led.record_clinic_event(n, cohort[3], "dropped", "silent", n + 0.2)
        candidate = cid(f"round-{n}")
        led.record_checkpoint(candidate, n, parent, n + 0.5, {"accuracy": n / 1000})
        if n % 4 == 0:
            led.finish_round(n, "rejected", "mel sensitivity dropped", n + 0.6,
                             checkpoint=candidate, contributors=cohort[:3])
        else:
            led.finish_round(n, "published", "", n + 0.6, checkpoint=candidate,
                             contributors=cohort[:3], train_loss=1.0 / n,
                             metrics={"accuracy": n / 1000}, publish=True)
        print("done", n, flush=True)
    """
)


def _check_finished_round(rec: RoundRecord) -> None:
    n = rec.number
    cohort = [f"clinic-{(n + i) % 7}" for i in range(4)]
    assert rec.plan == {"round": n, "lr": 0.01}
    assert rec.cohort == cohort
    assert rec.started_at == float(n)
    if rec.outcome == "aborted":  # interrupted by a kill, then aborted on restart
        assert rec.reason == "aggregator restarted mid-round"
        return
    assert rec.stages == dict.fromkeys(("advertise", "share", "masked_input", "unmask"), 0.25)
    assert rec.contributors == cohort[:3]
    assert rec.checkpoint == cid_of(f"round-{n}")
    assert rec.finished_at == n + 0.6
    if n % 4 == 0:
        assert (rec.outcome, rec.reason, rec.train_loss) == (
            "rejected",
            "mel sensitivity dropped",
            None,
        )
    else:
        assert rec.outcome == "published"
        assert rec.train_loss == 1.0 / n
        assert rec.metrics == {"accuracy": n / 1000}


def _run_and_kill(path: Path, rounds_first: int, rng: random.Random) -> set[int]:
    """Start the child, let it finish ``rounds_first`` rounds, SIGKILL it at a random moment."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    done: set[int] = set()
    try:
        assert proc.stdout is not None
        while len(done) < rounds_first:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"child exited early (rc={proc.poll()})")
            word, number = line.split()
            if word == "done":
                done.add(int(number))
        # Land anywhere inside the next round or two (each takes a few milliseconds).
        threading.Event().wait(rng.uniform(0.0, 0.03))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return done


def test_sigkill_mid_round_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    rng = random.Random(20240611)
    reported_done: set[int] = set()
    for _ in range(4):
        reported_done |= _run_and_kill(path, rounds_first=5, rng=rng)

        with Ledger(path) as led:  # the restart
            led.integrity_check()
            unfinished = [r.number for r in led.rounds(limit=10_000) if r.outcome is None]
            assert len(unfinished) <= 1  # the child runs one round at a time
            assert led.abort_interrupted(1e9) == unfinished

            rounds = {r.number: r for r in led.rounds(limit=10_000)}
            assert sorted(rounds) == list(range(1, len(rounds) + 1))
            # A round the child saw finish survived the kill, fully.
            assert reported_done <= set(rounds)
            for n in reported_done:
                assert rounds[n].outcome in ("published", "rejected")
            for rec in rounds.values():
                _check_finished_round(rec)

            # The pointer history matches the published rounds exactly, in order.
            history = led.publications()
            assert history[0].kind == "initial"
            published_rounds = [n for n in sorted(rounds) if rounds[n].outcome == "published"]
            assert [p.round for p in history[1:]] == published_rounds
            assert all(
                p.round is not None and p.checkpoint == rounds[p.round].checkpoint
                for p in history[1:]
            )
            latest = published_rounds[-1] if published_rounds else 0
            assert led.published() == (history[-1].checkpoint, latest)
    assert len(reported_done) >= 20


def test_a_version_1_ledger_gets_its_privacy_floor_from_the_reports_it_holds(
    tmp_path: Path,
) -> None:
    from aggregator.ledger import MIGRATIONS

    path = tmp_path / "v1.sqlite"
    raw = sqlite3.connect(path)
    MIGRATIONS[0](raw)
    raw.execute("PRAGMA user_version = 1")
    reports = [("clinic-a", 2.5, 10.0), ("clinic-a", 10.02, 11.0), ("clinic-b", 1.0, 12.0)]
    insert = "INSERT INTO clinic_events (clinic, event, detail, at) VALUES (?, ?, ?, ?)"
    for clinic, spent, at in reports:
        raw.execute(insert, (clinic, "privacy", json.dumps({"epsilon_spent": spent}), at))
    raw.execute(insert, ("clinic-c", "privacy", "not json", 13.0))
    raw.commit()
    raw.close()
    with Ledger(path) as led:
        assert led.schema_version() == SCHEMA_VERSION
        assert led.privacy_floors() == {"clinic-a": 10.02, "clinic-b": 1.0}


def test_the_privacy_floor_only_rises_except_by_an_audited_reset(ledger: Ledger) -> None:
    ledger.raise_privacy_floor("clinic-a", 3.0, 1.0)
    ledger.raise_privacy_floor("clinic-a", 1.0, 2.0)
    assert ledger.privacy_floors() == {"clinic-a": 3.0}
    with pytest.raises(ValueError, match="finite"):
        ledger.raise_privacy_floor("clinic-a", float("nan"), 3.0)
    with pytest.raises(NotFoundError):
        ledger.reset_privacy_floor("clinic-z", 0.0, 4.0, actor="admin", reason="r")
    assert ledger.reset_privacy_floor("clinic-a", 0.5, 5.0, actor="admin", reason="lost") == 3.0
    assert ledger.privacy_floors() == {"clinic-a": 0.5}
    entry = ledger.audit_log(limit=1)[0]
    assert (entry.actor, entry.action, entry.detail["reason"]) == (
        "admin",
        "acknowledge_privacy_reset",
        "lost",
    )


def test_latest_clinic_events_gives_each_clinics_newest_of_one_kind(ledger: Ledger) -> None:
    ledger.record_clinic_event(None, "clinic-a", "privacy", '{"epsilon_spent": 1}', 1.0)
    ledger.record_clinic_event(None, "clinic-b", "privacy", '{"epsilon_spent": 5}', 2.0)
    ledger.record_clinic_event(None, "clinic-a", "privacy", '{"epsilon_spent": 2}', 3.0)
    ledger.record_clinic_event(None, "clinic-a", "declined", "budget", 4.0)
    latest = ledger.latest_clinic_events("privacy")
    assert {c: (e.detail, e.at) for c, e in latest.items()} == {
        "clinic-a": ('{"epsilon_spent": 2}', 3.0),
        "clinic-b": ('{"epsilon_spent": 5}', 2.0),
    }
    assert ledger.latest_clinic_events("dropped") == {}

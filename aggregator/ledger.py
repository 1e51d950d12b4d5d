"""The aggregator's durable record: rounds, clinic events, checkpoints, publications, audit.

SQLite in WAL mode with ``synchronous=FULL``: every mutation is one transaction that is on
disk when the method returns, so an aggregator killed at any instant reopens to a ledger
where each round is either fully recorded or not at all, and unfinished rounds are found
by :meth:`Ledger.abort_interrupted`. The published checkpoint is the latest row of
``publications``: moving the pointer is an insert, never an update, so its history (initial,
rounds, rollbacks) is never lost.

Callers pass every timestamp in; the ledger has no clock of its own, which keeps tests and
the round state machine deterministic.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import IntegrityError, NotFoundError, PreconditionError

OUTCOMES = ("published", "rejected", "aborted")
PUBLICATION_KINDS = ("initial", "round", "rollback")


@dataclass(frozen=True)
class RoundRecord:
    number: int
    parent: str
    mode: str
    plan: dict[str, Any]
    cohort: list[str]
    started_at: float
    finished_at: float | None
    outcome: str | None
    reason: str | None
    checkpoint: str | None
    contributors: list[str]
    train_loss: float | None
    metrics: dict[str, Any] | None
    stages: dict[str, float]

    @property
    def finished(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True)
class ClinicEvent:
    id: int
    round: int | None
    clinic: str
    event: str
    detail: str | None
    at: float


@dataclass(frozen=True)
class Publication:
    id: int
    checkpoint: str
    round: int | None
    at: float
    kind: str
    reason: str


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    round: int | None
    parent: str | None
    created_at: float
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    detail: dict[str, Any]


# --------------------------------------------------------------------------- schema

_SCHEMA_V1 = (
    """
    CREATE TABLE rounds (
        number INTEGER PRIMARY KEY,
        parent TEXT NOT NULL,
        mode TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        cohort_json TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT CHECK (outcome IN ('published', 'rejected', 'aborted') OR outcome IS NULL),
        reason TEXT,
        checkpoint TEXT REFERENCES checkpoints(id),
        contributors_json TEXT,
        train_loss REAL,
        metrics_json TEXT,
        stage_json TEXT,
        CHECK ((outcome IS NULL) = (finished_at IS NULL))
    )
    """,
    """
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        round INTEGER,
        parent TEXT,
        created_at REAL,
        metrics_json TEXT
    )
    """,
    """
    CREATE TABLE clinic_events (
        id INTEGER PRIMARY KEY,
        round INTEGER REFERENCES rounds(number),
        clinic TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT,
        at REAL NOT NULL
    )
    """,
    "CREATE INDEX clinic_events_round ON clinic_events(round)",
    "CREATE INDEX clinic_events_clinic ON clinic_events(clinic)",
    """
    CREATE TABLE publications (
        id INTEGER PRIMARY KEY,
        checkpoint TEXT NOT NULL REFERENCES checkpoints(id),
        round INTEGER,
        at REAL NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('initial', 'round', 'rollback')),
        reason TEXT
    )
    """,
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL,
        actor TEXT,
        action TEXT,
        detail_json TEXT
    )
    """,
)

# MIGRATIONS[i] takes a ledger from schema version i to i + 1, inside one transaction.
# A new schema change is appended here; existing entries never change.
Migration = Callable[[sqlite3.Connection], None]


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # The highest epsilon each clinic identity has reported: a report below it means the
    # clinic's privacy ledger was reset or replaced (see Coordinator.poll). Seeded from
    # the privacy reports already in the ledger.
    conn.execute(
        """
        CREATE TABLE privacy_floor (
            clinic TEXT PRIMARY KEY,
            epsilon_spent REAL NOT NULL CHECK (epsilon_spent >= 0),
            at REAL NOT NULL
        )
        """
    )
    conn.execute(
        """
        INSERT INTO privacy_floor (clinic, epsilon_spent, at)
        SELECT clinic, MAX(json_extract(detail, '$.epsilon_spent')), MAX(at)
        FROM clinic_events
        WHERE event = 'privacy' AND json_valid(detail)
          AND json_extract(detail, '$.epsilon_spent') >= 0
        GROUP BY clinic
        """
    )


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    # When each clinic was last seen, kept across restarts (one row per clinic, updated at
    # most once a minute), so "clinic silent" tells the truth after a restart.
    conn.execute(
        "CREATE TABLE clinic_seen (clinic TEXT PRIMARY KEY, at REAL NOT NULL CHECK (at >= 0))"
    )


MIGRATIONS: tuple[Migration, ...] = (_migrate_0_to_1, _migrate_1_to_2, _migrate_2_to_3)
SCHEMA_VERSION = len(MIGRATIONS)


# --------------------------------------------------------------------------- helpers


def _dumps(value: Any) -> str:
    # NaN is allowed on purpose: an undefined metric (AUROC of an absent class) must not
    # make a round impossible to record.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _time(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


def _text(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _str_list(name: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{name} must be a list of clinic ids, not a string")
    out = list(values)
    for v in out:
        _text(f"every entry of {name}", v)
    return out


# --------------------------------------------------------------------------- ledger


class Ledger:
    """The aggregator's SQLite ledger; one connection, shared by threads under a lock."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # RLock: atomic() holds it across several mutations, each of which takes it again.
        self._lock = threading.RLock()
        self._depth = 0
        # isolation_level=None: the sqlite3 module must not open transactions on its own;
        # every transaction here is an explicit BEGIN IMMEDIATE ... COMMIT.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self._path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            self._configure()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            self._conn = None
            raise IntegrityError(f"ledger {self._path} cannot be opened: {exc}") from exc
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db().execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Group several mutations into one transaction (all or nothing on a crash).

        Use it where two records must never be seen apart, e.g.
        ``finish_round(..., outcome="published")`` followed by ``publish(..., "round")``.
        """
        with self._transaction():
            yield

    # ----------------------------------------------------------------- rounds

    def next_round_number(self) -> int:
        with self._lock:
            row = self._db().execute("SELECT MAX(number) FROM rounds").fetchone()
        return 1 if row[0] is None else int(row[0]) + 1

    def begin_round(
        self,
        number: int,
        parent: str,
        mode: str,
        plan: dict[str, Any],
        cohort: list[str],
        started_at: float,
    ) -> None:
        """Record the start of round ``number``, which must be :meth:`next_round_number`."""
        _text("parent", parent)
        _text("mode", mode)
        members = _str_list("cohort", cohort)
        started = _time("started_at", started_at)
        plan_json = _dumps(dict(plan))
        with self._transaction() as db:
            expected = self._next_number(db)
            if number != expected:
                raise PreconditionError(
                    f"cannot begin round {number}: the next round number is {expected}"
                )
            running = db.execute("SELECT number FROM rounds WHERE outcome IS NULL").fetchone()
            if running is not None:
                raise PreconditionError(
                    f"cannot begin round {number}: round {running[0]} has not finished"
                )
            db.execute(
                "INSERT INTO rounds (number, parent, mode, plan_json, cohort_json, started_at,"
                " contributors_json, stage_json) VALUES (?, ?, ?, ?, ?, ?, '[]', '{}')",
                (number, parent, mode, plan_json, _dumps(members), started),
            )

    def record_stage(self, number: int, stage: str, seconds: float) -> None:
        """Set the duration of one stage of a round (a later call for a stage replaces it)."""
        _text("stage", stage)
        duration = _time("seconds", seconds)
        if duration < 0:
            raise ValueError(f"stage duration must not be negative, got {seconds!r}")
        with self._transaction() as db:
            row = db.execute("SELECT stage_json FROM rounds WHERE number = ?", (number,)).fetchone()
            if row is None:
                raise NotFoundError(f"round {number} is not in the ledger")
            stages = _loads(row[0]) or {}
            stages[stage] = duration
            db.execute(
                "UPDATE rounds SET stage_json = ? WHERE number = ?", (_dumps(stages), number)
            )

    def finish_round(
        self,
        number: int,
        outcome: str,
        reason: str | None,
        finished_at: float,
        *,
        checkpoint: str | None = None,
        contributors: Sequence[str] = (),
        train_loss: float | None = None,
        metrics: dict[str, Any] | None = None,
        publish: bool = False,
    ) -> None:
        """Close an unfinished round with its outcome; a finished round cannot change.

        ``publish=True`` (only with outcome 'published') also moves the published pointer
        to ``checkpoint`` in the same transaction, so a crash can never leave a round
        marked published whose checkpoint is not the published one.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        finished = _time("finished_at", finished_at)
        members = _str_list("contributors", contributors)
        loss = None if train_loss is None else float(train_loss)
        metrics_json = None if metrics is None else _dumps(dict(metrics))
        if outcome == "published" and checkpoint is None:
            raise ValueError("a published round must name its checkpoint")
        if publish and outcome != "published":
            raise ValueError(f"publish=True needs outcome 'published', got {outcome!r}")
        with self._transaction() as db:
            row = db.execute("SELECT outcome FROM rounds WHERE number = ?", (number,)).fetchone()
            if row is None:
                raise NotFoundError(f"round {number} is not in the ledger")
            if row[0] is not None:
                raise PreconditionError(f"round {number} already finished ({row[0]})")
            if checkpoint is not None:
                self._require_checkpoint(db, checkpoint)
            db.execute(
                "UPDATE rounds SET finished_at = ?, outcome = ?, reason = ?, checkpoint = ?,"
                " contributors_json = ?, train_loss = ?, metrics_json = ? WHERE number = ?",
                (
                    finished,
                    outcome,
                    reason,
                    checkpoint,
                    _dumps(members),
                    loss,
                    metrics_json,
                    number,
                ),
            )
            if publish:
                db.execute(
                    "INSERT INTO publications (checkpoint, round, at, kind, reason)"
                    " VALUES (?, ?, ?, 'round', ?)",
                    (checkpoint, number, finished, reason or ""),
                )

    def abort_interrupted(
        self, at: float, reason: str = "aggregator restarted mid-round"
    ) -> list[int]:
        """Mark every unfinished round aborted (call at startup); returns their numbers."""
        when = _time("at", at)
        with self._transaction() as db:
            numbers = [
                int(r[0])
                for r in db.execute(
                    "SELECT number FROM rounds WHERE outcome IS NULL ORDER BY number"
                )
            ]
            db.execute(
                "UPDATE rounds SET outcome = 'aborted', reason = ?, finished_at = ?"
                " WHERE outcome IS NULL",
                (reason, when),
            )
        return numbers

    def round(self, number: int) -> RoundRecord | None:
        with self._lock:
            row = (
                self._db()
                .execute(f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE number = ?", (number,))
                .fetchone()
            )
        return None if row is None else _round_record(row)

    def rounds(self, limit: int = 100, before: int | None = None) -> list[RoundRecord]:
        """Up to ``limit`` rounds, newest first; ``before`` pages to numbers below it."""
        if limit <= 0:
            return []
        with self._lock:
            if before is None:
                rows = (
                    self._db()
                    .execute(
                        f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY number DESC LIMIT ?",
                        (limit,),
                    )
                    .fetchall()
                )
            else:
                rows = (
                    self._db()
                    .execute(
                        f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE number < ?"
                        " ORDER BY number DESC LIMIT ?",
                        (before, limit),
                    )
                    .fetchall()
                )
        return [_round_record(r) for r in rows]

    # ----------------------------------------------------------------- clinic events

    def record_clinic_event(
        self, number: int | None, clinic: str, event: str, detail: str | None, at: float
    ) -> None:
        """Record what a clinic did in a round ('selected', 'contributed', 'declined', ...)."""
        _text("clinic", clinic)
        _text("event", event)
        when = _time("at", at)
        with self._transaction() as db:
            if number is not None:
                self._require_round(db, number)
            db.execute(
                "INSERT INTO clinic_events (round, clinic, event, detail, at)"
                " VALUES (?, ?, ?, ?, ?)",
                (number, clinic, event, detail, when),
            )

    def clinic_events(
        self, round: int | None = None, clinic: str | None = None
    ) -> list[ClinicEvent]:
        """Events in the order recorded, optionally only one round's and/or one clinic's."""
        clauses: list[str] = []
        params: list[Any] = []
        if round is not None:
            clauses.append("round = ?")
            params.append(round)
        if clinic is not None:
            clauses.append("clinic = ?")
            params.append(clinic)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    f"SELECT id, round, clinic, event, detail, at FROM clinic_events{where}"
                    " ORDER BY id",
                    params,
                )
                .fetchall()
            )
        return [ClinicEvent(int(r[0]), r[1], r[2], r[3], r[4], float(r[5])) for r in rows]

    def latest_clinic_events(self, event: str) -> dict[str, ClinicEvent]:
        """Each clinic's most recent event of kind ``event`` (one indexed query, no scan)."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT id, round, clinic, event, detail, at FROM clinic_events"
                    " WHERE id IN (SELECT MAX(id) FROM clinic_events WHERE event = ?"
                    " GROUP BY clinic)",
                    (event,),
                )
                .fetchall()
            )
        return {r[2]: ClinicEvent(int(r[0]), r[1], r[2], r[3], r[4], float(r[5])) for r in rows}

    # ----------------------------------------------------------------- checkpoints

    def record_checkpoint(
        self,
        cid: str,
        round: int | None,
        parent: str | None,
        created_at: float,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """List a stored checkpoint. Recording the same id again keeps the first record
        (ids are content hashes, so it is the same checkpoint). ``round`` is not checked
        against ``rounds``: the initial model has none (None, or 0 by convention)."""
        _text("checkpoint id", cid)
        when = _time("created_at", created_at)
        metrics_json = None if metrics is None else _dumps(dict(metrics))
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO checkpoints (id, round, parent, created_at, metrics_json)"
                " VALUES (?, ?, ?, ?, ?)",
                (cid, round, parent, when, metrics_json),
            )

    def set_checkpoint_metrics(self, cid: str, metrics: dict[str, Any]) -> None:
        """Attach held-out metrics to a recorded checkpoint that has none yet (e.g. the
        initial model, evaluated when a held-out set is first configured)."""
        metrics_json = _dumps(dict(metrics))
        with self._transaction() as db:
            self._require_checkpoint(db, cid)
            db.execute(
                "UPDATE checkpoints SET metrics_json = ? WHERE id = ? AND metrics_json IS NULL",
                (metrics_json, cid),
            )

    def checkpoint(self, cid: str) -> CheckpointRecord | None:
        with self._lock:
            row = (
                self._db()
                .execute(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?",
                    (cid,),
                )
                .fetchone()
            )
        return None if row is None else _checkpoint_record(row)

    def checkpoints(self, limit: int = 100) -> list[CheckpointRecord]:
        """Recorded checkpoints, newest first."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints"
                    " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [_checkpoint_record(r) for r in rows]

    # ----------------------------------------------------------------- publications

    def publish(self, cid: str, round: int | None, at: float, kind: str, reason: str = "") -> None:
        """Move the published pointer to ``cid`` (appends to the publication history).

        ``kind`` is 'initial', 'round' (needs the round number) or 'rollback' (the target
        must have been published before). ``round`` is the round that produced ``cid``;
        it is not checked against ``rounds``, so the initial model may use None or 0.
        """
        if kind not in PUBLICATION_KINDS:
            raise ValueError(
                f"publication kind must be one of {', '.join(PUBLICATION_KINDS)}, got {kind!r}"
            )
        if kind == "round" and round is None:
            raise ValueError("a 'round' publication must name its round")
        when = _time("at", at)
        with self._transaction() as db:
            self._require_checkpoint(db, cid)
            if kind == "rollback":
                seen = db.execute(
                    "SELECT 1 FROM publications WHERE checkpoint = ? LIMIT 1", (cid,)
                ).fetchone()
                if seen is None:
                    raise PreconditionError(
                        f"cannot roll back to checkpoint {cid}: it was never published"
                    )
            db.execute(
                "INSERT INTO publications (checkpoint, round, at, kind, reason)"
                " VALUES (?, ?, ?, ?, ?)",
                (cid, round, when, kind, reason),
            )

    def published(self) -> tuple[str, int | None] | None:
        """(checkpoint id, round) of the latest publication, or None before the first."""
        with self._lock:
            row = (
                self._db()
                .execute("SELECT checkpoint, round FROM publications ORDER BY id DESC LIMIT 1")
                .fetchone()
            )
        return None if row is None else (str(row[0]), row[1])

    def publications(self) -> list[Publication]:
        """Every change of the published pointer, oldest first."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT id, checkpoint, round, at, kind, reason FROM publications ORDER BY id"
                )
                .fetchall()
            )
        return [Publication(int(r[0]), r[1], r[2], float(r[3]), r[4], r[5] or "") for r in rows]

    # ----------------------------------------------------------------- clinics seen

    def record_clinic_seen(self, clinic: str, at: float) -> None:
        """Remember that ``clinic`` was seen at ``at`` (never moves backwards)."""
        _text("clinic", clinic)
        when = _time("at", at)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO clinic_seen (clinic, at) VALUES (?, ?)"
                " ON CONFLICT (clinic) DO UPDATE SET at = excluded.at"
                " WHERE excluded.at > clinic_seen.at",
                (clinic, when),
            )

    def clinics_seen(self) -> dict[str, float]:
        """When each clinic was last seen, as recorded."""
        with self._lock:
            rows = self._db().execute("SELECT clinic, at FROM clinic_seen").fetchall()
        return {r[0]: float(r[1]) for r in rows}

    # ----------------------------------------------------------------- privacy floor

    def privacy_floors(self) -> dict[str, float]:
        """The highest epsilon spent each clinic has reported (or an admin reset it to)."""
        with self._lock:
            rows = self._db().execute("SELECT clinic, epsilon_spent FROM privacy_floor").fetchall()
        return {r[0]: float(r[1]) for r in rows}

    def raise_privacy_floor(self, clinic: str, epsilon_spent: float, at: float) -> None:
        """Remember ``epsilon_spent`` for ``clinic`` if it is higher than what is known."""
        _text("clinic", clinic)
        when = _time("at", at)
        if not (math.isfinite(epsilon_spent) and epsilon_spent >= 0):
            raise ValueError(f"epsilon_spent must be finite and >= 0, got {epsilon_spent!r}")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO privacy_floor (clinic, epsilon_spent, at) VALUES (?, ?, ?)"
                " ON CONFLICT (clinic) DO UPDATE SET"
                " epsilon_spent = excluded.epsilon_spent, at = excluded.at"
                " WHERE excluded.epsilon_spent > privacy_floor.epsilon_spent",
                (clinic, float(epsilon_spent), when),
            )

    def reset_privacy_floor(
        self,
        clinic: str,
        epsilon_spent: float,
        at: float,
        *,
        actor: str,
        reason: str,
    ) -> float:
        """Lower ``clinic``'s floor to ``epsilon_spent`` and audit it, in one transaction.

        Returns the floor it replaced. Only an admin's acknowledgement calls this.
        """
        _text("clinic", clinic)
        _text("actor", actor)
        _text("reason", reason)
        when = _time("at", at)
        with self._transaction() as db:
            row = db.execute(
                "SELECT epsilon_spent FROM privacy_floor WHERE clinic = ?", (clinic,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no privacy report from clinic {clinic!r} is on record")
            db.execute(
                "UPDATE privacy_floor SET epsilon_spent = ?, at = ? WHERE clinic = ?",
                (float(epsilon_spent), when, clinic),
            )
            detail = {"clinic": clinic, "from": row[0], "to": epsilon_spent, "reason": reason}
            db.execute(
                "INSERT INTO audit (at, actor, action, detail_json) VALUES (?, ?, ?, ?)",
                (when, actor, "acknowledge_privacy_reset", _dumps(detail)),
            )
        return float(row[0])

    # ----------------------------------------------------------------- audit

    def audit(self, actor: str, action: str, detail: dict[str, Any], at: float) -> None:
        """Record an operator action (who, what, with which arguments)."""
        _text("actor", actor)
        _text("action", action)
        when = _time("at", at)
        detail_json = _dumps(dict(detail))
        with self._transaction() as db:
            db.execute(
                "INSERT INTO audit (at, actor, action, detail_json) VALUES (?, ?, ?, ?)",
                (when, actor, action, detail_json),
            )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The latest ``limit`` audit entries, newest first."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT id, at, actor, action, detail_json FROM audit ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], _loads(r[4]) or {}) for r in rows]

    # ----------------------------------------------------------------- integrity

    def integrity_check(self) -> None:
        """Raise :class:`IntegrityError` unless SQLite finds the file and all references sound."""
        with self._lock:
            db = self._db()
            try:
                problems = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
                dangling = db.execute("PRAGMA foreign_key_check").fetchall()
            except sqlite3.DatabaseError as exc:  # "database disk image is malformed"
                raise IntegrityError(f"ledger {self._path} is corrupt: {exc}") from exc
        if problems != ["ok"]:
            raise IntegrityError(
                f"ledger {self._path} failed integrity_check: {'; '.join(problems[:10])}"
            )
        if dangling:
            shown = "; ".join(f"{r[0]} row {r[1]} -> {r[2]}" for r in dangling[:10])
            raise IntegrityError(f"ledger {self._path} has dangling references: {shown}")

    # ----------------------------------------------------------------- internals

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise PreconditionError(f"ledger {self._path} is closed")
        return self._conn

    def _configure(self) -> None:
        db = self._db()
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise IntegrityError(f"ledger {self._path}: could not enable WAL (got {mode!r})")
        # FULL: the WAL is fsynced at every commit, so a returned mutation survives power
        # loss, not only a process crash.
        db.execute("PRAGMA synchronous=FULL")
        # Must be set outside any transaction, once per connection.
        db.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise PreconditionError(
                    f"ledger {self._path} has schema version {version}, newer than this "
                    f"aggregator understands ({SCHEMA_VERSION}); upgrade the aggregator"
                )
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](db)
            if version != SCHEMA_VERSION:
                # user_version lives in the database header, so it commits (or not)
                # together with the migration's DDL.
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db()
            if self._depth > 0:
                # Inside atomic(): a savepoint, so a failed inner mutation that the caller
                # catches leaves nothing half-written in the outer transaction.
                name = f"nested_{self._depth}"
                db.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield db
                except BaseException:
                    db.execute(f"ROLLBACK TO {name}")
                    db.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._depth -= 1
                db.execute(f"RELEASE {name}")
                return
            # IMMEDIATE takes the write lock up front, so a read-then-write check (e.g.
            # "is this the next round number?") cannot race another writer.
            db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (e.g. after an I/O error).
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    @staticmethod
    def _next_number(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT MAX(number) FROM rounds").fetchone()
        return 1 if row[0] is None else int(row[0]) + 1

    @staticmethod
    def _require_round(db: sqlite3.Connection, number: int) -> None:
        if db.execute("SELECT 1 FROM rounds WHERE number = ?", (number,)).fetchone() is None:
            raise NotFoundError(f"round {number} is not in the ledger")

    @staticmethod
    def _require_checkpoint(db: sqlite3.Connection, cid: str) -> None:
        if db.execute("SELECT 1 FROM checkpoints WHERE id = ?", (cid,)).fetchone() is None:
            raise NotFoundError(
                f"checkpoint {cid} is not recorded in the ledger (call record_checkpoint first)"
            )


_CHECKPOINT_COLUMNS = "id, round, parent, created_at, metrics_json"
_ROUND_COLUMNS = (
    "number, parent, mode, plan_json, cohort_json, started_at, finished_at, outcome, reason,"
    " checkpoint, contributors_json, train_loss, metrics_json, stage_json"
)


def _round_record(row: Sequence[Any]) -> RoundRecord:
    return RoundRecord(
        number=int(row[0]),
        parent=row[1],
        mode=row[2],
        plan=_loads(row[3]),
        cohort=_loads(row[4]),
        started_at=float(row[5]),
        finished_at=None if row[6] is None else float(row[6]),
        outcome=row[7],
        reason=row[8],
        checkpoint=row[9],
        contributors=_loads(row[10]) or [],
        train_loss=None if row[11] is None else float(row[11]),
        metrics=_loads(row[12]),
        stages=_loads(row[13]) or {},
    )


def _checkpoint_record(row: Sequence[Any]) -> CheckpointRecord:
    return CheckpointRecord(
        id=row[0],
        round=row[1],
        parent=row[2],
        created_at=float(row[3]),
        metrics=_loads(row[4]),
    )

"""The clinic's spent-privacy ledger: append-only, hash-chained, crash-safe.

Every round the clinic trains for is recorded here *before* training starts (write-ahead).
We charge the round at that moment because from then on information derived from the
data may leave the clinic; a round that later fails to train or upload is still charged.
That over-counts in rare failures, which is the conservative direction: a crash between
training and upload can never make the clinic forget that it spent privacy.

On disk (``privacy_ledger.jsonl`` in the agent's state directory), one JSON object per
line. Line 0 is a header (format, a random ledger id, creation time); every further line
is one charged round. Each line carries ``prev`` (the previous line's hash) and ``hash`` =
SHA-256 over its canonical JSON without ``hash``, so an edited, reordered, dropped or
half-written line breaks the chain. Every commit rewrites the file to a temporary file,
fsyncs it, ``os.replace``-s it over the old one and fsyncs the directory: a crash leaves
either the old or the new ledger, never a mix.

Dropping *trailing* lines keeps a valid chain, so a second file, the marker
(``privacy_ledger.jsonl.marker``), records the ledger id, the number of entries and the
head hash, and is rewritten after each commit. The marker also tells a deleted ledger
from a new clinic: a missing ledger next to a marker is an error, and only when neither
exists is a fresh, empty ledger created. A marker that lags the ledger by some entries
(crash between the two writes) is accepted: the ledger then records *more* spending.

Any problem (bad JSON, broken chain, a partial last line, fewer entries than the marker
promises, a missing ledger) raises :class:`PrivacyLedgerError`, and the agent must refuse
to train: it never assumes that nothing was spent.

Residual risk, by design: an operator who deletes both files (or restores both from an
old backup) resets the budget. That is an operator action on the clinic's own machine,
like editing ``epsilon_max`` in the config; the ledger defends against crashes, disk
damage and accidental deletion of one file, not against the clinic's own administrator.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinic_agent.privacy import ACCOUNTANTS, MechanismStep, RoundDecision, epsilon_for
from common.errors import IntegrityError
from common.fsutil import atomic_write

LEDGER_FORMAT = "dermafed-privacy-ledger/1"
MARKER_FORMAT = "dermafed-privacy-ledger-marker/1"
GENESIS = "0" * 64
STATUS_COMMITTED = "committed"


class PrivacyLedgerError(IntegrityError):
    """The privacy ledger cannot be trusted; the agent must not train until it is fixed."""


@dataclass(frozen=True)
class LedgerEntry:
    """One charged round. ``at`` (ISO 8601, UTC) is filled in by :meth:`PrivacyLedger.commit`."""

    round: int
    round_id: str
    federation: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    accountant: str = "rdp"
    at: str = ""
    status: str = STATUS_COMMITTED
    # Clinic-level noise multiplier on the delta this round (0: none).
    clinic_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.round) or self.round < 0:
            raise ValueError(f"ledger entry round must be an integer >= 0, got {self.round!r}")
        for name in ("round_id", "federation", "at"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"ledger entry {name} must be a string")
        if not self.round_id or not self.federation:
            raise ValueError("ledger entry needs a round_id and a federation")
        if not (is_num(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"ledger entry noise_multiplier must be > 0, got {self.noise_multiplier!r}"
            )
        if not (is_num(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(
                f"ledger entry sample_rate must be in (0, 1], got {self.sample_rate!r}"
            )
        if not is_int(self.steps) or self.steps < 1:
            raise ValueError(f"ledger entry steps must be an integer >= 1, got {self.steps!r}")
        if not (is_num(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"ledger entry delta must be in (0, 1), got {self.delta!r}")
        if not (is_num(self.epsilon_after) and self.epsilon_after >= 0):
            raise ValueError(f"ledger entry epsilon_after must be >= 0, got {self.epsilon_after!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"ledger entry accountant must be one of {ACCOUNTANTS}")
        if not (is_num(self.clinic_noise_multiplier) and self.clinic_noise_multiplier >= 0):
            raise ValueError("ledger entry clinic_noise_multiplier must be >= 0")
        if self.status != STATUS_COMMITTED:
            raise ValueError(
                f"ledger entry status must be {STATUS_COMMITTED!r}, got {self.status!r}"
            )

    @classmethod
    def from_decision(
        cls,
        decision: RoundDecision,
        *,
        round: int,
        round_id: str,
        federation: str,
        clinic_noise_multiplier: float = 0.0,
    ) -> LedgerEntry:
        """The entry charging an accepted :func:`~clinic_agent.privacy.plan_round` decision."""
        if (
            not decision.accepted
            or decision.step is None
            or decision.delta is None
            or decision.epsilon_after is None
        ):
            raise ValueError("only an accepted decision with a DP mechanism can be charged")
        return cls(
            round=round,
            round_id=round_id,
            federation=federation,
            noise_multiplier=decision.step.noise_multiplier,
            sample_rate=decision.step.sample_rate,
            steps=decision.step.steps,
            delta=decision.delta,
            epsilon_after=decision.epsilon_after,
            accountant=decision.accountant,
            clinic_noise_multiplier=clinic_noise_multiplier,
        )

    @property
    def step(self) -> MechanismStep:
        return MechanismStep(self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerEntry:
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            missing = sorted(expected - set(data))
            extra = sorted(set(data) - expected)
            raise ValueError(f"entry fields differ (missing {missing}, unexpected {extra})")
        return cls(**data)


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _line_hash(seq: int, kind: str, body: Mapping[str, Any], prev: str) -> str:
    return hashlib.sha256(
        _canonical({"seq": seq, "kind": kind, "body": body, "prev": prev})
    ).hexdigest()


def _make_line(seq: int, kind: str, body: Mapping[str, Any], prev: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "kind": kind,
        "body": dict(body),
        "prev": prev,
        "hash": _line_hash(seq, kind, body, prev),
    }


def _marker_checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _atomic_write(path: Path, data: bytes) -> None:
    """temp file + fsync + os.replace + directory fsync: readers see old or new, never half."""
    atomic_write(path, data, mode=0o600)


@dataclass(frozen=True)
class _Loaded:
    ledger_id: str
    lines: list[dict[str, Any]]
    entries: list[LedgerEntry]


class PrivacyLedger:
    """The spent-privacy ledger at ``path`` (plus its marker at ``path + '.marker'``).

    Opening verifies the whole file. With ``create=True`` (the agent's first start) a clinic
    with neither file gets a fresh ledger; with ``create=False`` that case is an error too.
    """

    def __init__(
        self, path: str | Path, *, marker_path: str | Path | None = None, create: bool = True
    ) -> None:
        self._set_paths(path, marker_path)
        with self._locked():
            if not self.path.exists() and not self.marker_path.exists():
                if not create:
                    raise PrivacyLedgerError(f"no privacy ledger at {self.path}")
                self._initialise()
            self._remove_stale_temps()
            self._load()

    # -- public API ------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every charged round, re-read and re-verified from disk."""
        return list(self._load().entries)

    def verify(self) -> int:
        """Re-read and check the chain and the marker; return the number of entries."""
        return len(self._load().entries)

    def snapshot(self) -> tuple[bytes, bytes, int]:
        """The ledger's and the marker's bytes, read together under the writer's lock and
        verified; with the number of entries. What a backup copies."""
        with self._locked():
            count = len(self._load().entries)
            return self.path.read_bytes(), self.marker_path.read_bytes(), count

    def spent_epsilon(self, accountant: str = "rdp", delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the smallest δ any entry used)."""
        entries = self.entries()
        if not entries:
            return 0.0
        at = delta if delta is not None else min(e.delta for e in entries)
        return epsilon_for([e.step for e in entries], at, accountant)

    def commit(self, entry: LedgerEntry) -> LedgerEntry:
        """Durably append ``entry`` (charge the round); returns it with ``at`` filled in.

        When this returns, the entry is on stable storage. Call it before training starts.
        """
        if not isinstance(entry, LedgerEntry):
            raise TypeError("commit() takes a LedgerEntry")
        stored = entry if entry.at else replace(entry, at=_now())
        with self._locked():
            loaded = self._load()
            seq = len(loaded.lines)
            line = _make_line(seq, "entry", stored.to_json(), loaded.lines[-1]["hash"])
            lines = [*loaded.lines, line]
            _atomic_write(self.path, b"".join(_canonical(x) + b"\n" for x in lines))
            self._write_marker(loaded.ledger_id, lines)
        return stored

    @classmethod
    def rebuild_marker(cls, path: str | Path, *, marker_path: str | Path | None = None) -> int:
        """Operator recovery after losing the marker: trust the (verified) ledger as it is.

        Returns the number of entries. This forgoes the truncation check for the past, so it
        is never called automatically.
        """
        ledger = cls.__new__(cls)  # without __init__, which would refuse the missing marker
        ledger._set_paths(path, marker_path)
        with ledger._locked():
            ledger_id, lines = ledger._read_chain()
            ledger._write_marker(ledger_id, lines)
        return len(lines) - 1

    # -- internals -------------------------------------------------------------------

    def _set_paths(self, path: str | Path, marker_path: str | Path | None) -> None:
        self.path = Path(path)
        self.marker_path = (
            Path(marker_path)
            if marker_path is not None
            else self.path.with_name(self.path.name + ".marker")
        )
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One writer at a time even if an operator starts a second agent on the same state.
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _remove_stale_temps(self) -> None:
        # Temp files are only ever written under the lock we hold: any left is from a crash.
        for target in (self.path, self.marker_path):
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _initialise(self) -> None:
        header = {"format": LEDGER_FORMAT, "ledger_id": uuid.uuid4().hex, "created_at": _now()}
        lines = [_make_line(0, "header", header, GENESIS)]
        _atomic_write(self.path, _canonical(lines[0]) + b"\n")
        self._write_marker(header["ledger_id"], lines)

    def _write_marker(self, ledger_id: str, lines: Sequence[Mapping[str, Any]]) -> None:
        body = {
            "format": MARKER_FORMAT,
            "ledger_id": ledger_id,
            "entries": len(lines) - 1,
            "head": lines[-1]["hash"],
        }
        marker = {**body, "checksum": _marker_checksum(body)}
        _atomic_write(self.marker_path, _canonical(marker) + b"\n")

    def _fail(self, what: str) -> PrivacyLedgerError:
        return PrivacyLedgerError(
            f"privacy ledger {self.path} cannot be trusted: {what}. The agent refuses to "
            "train rather than assume nothing was spent; restore the ledger and its marker "
            "from backup."
        )

    def _read_chain(self) -> tuple[str, list[dict[str, Any]]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise self._fail(
                "the ledger file is missing (its marker exists, so the clinic "
                "has a history: the ledger was deleted or moved)"
            ) from None
        except OSError as exc:
            raise self._fail(f"cannot read it ({exc.strerror})") from exc
        if not raw:
            raise self._fail("the file is empty")
        if not raw.endswith(b"\n"):
            raise self._fail("the last line is incomplete (truncated file)")
        lines: list[dict[str, Any]] = []
        prev = GENESIS
        for index, text in enumerate(raw[:-1].split(b"\n")):
            where = f"line {index + 1}"
            try:
                obj = json.loads(text.decode("ascii"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise self._fail(f"{where} is not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or set(obj) != {"seq", "kind", "body", "prev", "hash"}:
                raise self._fail(f"{where} does not have the ledger line fields")
            kind, body = obj["kind"], obj["body"]
            if type(obj["seq"]) is not int or obj["seq"] != index or not isinstance(body, dict):
                raise self._fail(f"{where} is out of sequence")
            if obj["prev"] != prev:
                raise self._fail(f"{where} does not chain to the line before it")
            try:
                digest = _line_hash(index, kind, body, prev)
            except (TypeError, ValueError) as exc:
                raise self._fail(f"{where} holds values that cannot be hashed ({exc})") from exc
            if obj["hash"] != digest:
                raise self._fail(f"{where} fails its SHA-256 check (edited or damaged)")
            if (index == 0) != (kind == "header"):
                raise self._fail(f"{where} has an unexpected kind {kind!r}")
            lines.append(obj)
            prev = digest
        header = lines[0]["body"]
        if header.get("format") != LEDGER_FORMAT or not isinstance(header.get("ledger_id"), str):
            raise self._fail(f"unknown ledger format {header.get('format')!r}")
        return header["ledger_id"], lines

    def _read_marker(self) -> dict[str, Any]:
        try:
            raw = self.marker_path.read_bytes()
        except FileNotFoundError:
            raise self._fail(
                f"its marker {self.marker_path} is missing, so a truncated ledger cannot be "
                "detected (PrivacyLedger.rebuild_marker trusts the ledger as it is)"
            ) from None
        try:
            marker = json.loads(raw.decode("ascii"))
            body = {k: marker[k] for k in ("format", "ledger_id", "entries", "head")}
            ok = marker.get("checksum") == _marker_checksum(body)
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            ValueError,
            AttributeError,
        ):
            ok = False
        if not ok or body["format"] != MARKER_FORMAT or not isinstance(body["entries"], int):
            raise self._fail(f"its marker {self.marker_path} is damaged")
        return body

    def _load(self) -> _Loaded:
        ledger_id, lines = self._read_chain()
        marker = self._read_marker() if (len(lines) > 1 or self.marker_path.exists()) else None
        if marker is not None:
            if marker["ledger_id"] != ledger_id:
                raise self._fail("the marker belongs to a different ledger")
            count = marker["entries"]
            if count < 0 or count > len(lines) - 1:
                raise self._fail(
                    f"it has {len(lines) - 1} entries but the marker records {count}: "
                    "entries were removed or an older copy was restored"
                )
            if lines[count]["hash"] != marker["head"]:
                raise self._fail("its entries differ from those the marker records")
        entries = []
        for line in lines[1:]:
            try:
                entries.append(LedgerEntry.from_json(line["body"]))
            except (TypeError, ValueError) as exc:
                raise self._fail(f"entry {line['seq']} is invalid: {exc}") from exc
        return _Loaded(ledger_id, lines, entries)

"""Backups of the aggregator's state that restore: the ledger and the checkpoints it names.

A plain ``cp`` of the WAL-mode ledger while the aggregator runs can miss committed rounds
(held 3 of 5 in one try): recent transactions live in the ``-wal`` file until a
checkpoint. :func:`backup` uses SQLite's online backup API instead, which copies one
consistent snapshot however busy the writer, then copies every checkpoint file that
snapshot names, each verified against its content hash, and writes ``MANIFEST.json``
last. A backup without a manifest was interrupted and is never restored.

:func:`restore` refuses to roll privacy state back: the ledger holds, per clinic, the
highest epsilon it reported (see ``aggregator.privacy_floor``), and an
older ledger would lower that floor. It restores into an empty state directory, or over
one whose ledger the backup is not older than; the state directory is locked meanwhile,
so a running aggregator cannot be restored under.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.checkpoints import CheckpointStore, checkpoint_id_of, validate_checkpoint_id
from aggregator.config import StorageSection
from common.errors import IntegrityError, PreconditionError
from common.fsutil import StateDirLock, atomic_write, fsync_dir
from common.manifest import read_manifest as read_common_manifest
from common.manifest import write_manifest

FORMAT = "dermafed-aggregator-backup/1"
LEDGER_FILE = "ledger.sqlite"
CHECKPOINT_DIR = "checkpoints"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LedgerSummary:
    """What decides whether one ledger is older than another."""

    last_round: int
    privacy_floors: dict[str, float]
    published: str

    def to_json(self) -> dict[str, Any]:
        return {
            "last_round": self.last_round,
            "privacy_floors": self.privacy_floors,
            "published": self.published,
        }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def summarize(ledger: Path) -> LedgerSummary:
    """Read-only look at a ledger file: last round, privacy floors, published checkpoint."""
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        last = conn.execute("SELECT COALESCE(MAX(number), 0) FROM rounds").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        floors: dict[str, float] = {}
        if "privacy_floor" in tables:
            floors = {
                r[0]: float(r[1])
                for r in conn.execute("SELECT clinic, epsilon_spent FROM privacy_floor")
            }
        row = conn.execute(
            "SELECT checkpoint FROM publications ORDER BY id DESC LIMIT 1"
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"{ledger} is not a readable dermafed ledger: {exc}") from None
    finally:
        conn.close()
    return LedgerSummary(int(last), floors, row[0] if row else "")


def backup(storage: StorageSection, out: Path) -> dict[str, Any]:
    """Write a consistent backup of ``storage`` to the new folder ``out``; returns its manifest.

    Safe while the aggregator runs. ``out`` must not exist yet (or be empty): a backup
    never overwrites another.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PreconditionError(f"{out} is not empty; back up into a new folder")
    if not storage.ledger_path.is_file():
        raise PreconditionError(f"no ledger at {storage.ledger_path}: nothing to back up")
    (out / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    ledger_copy = out / LEDGER_FILE
    source = sqlite3.connect(f"file:{storage.ledger_path}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(ledger_copy)
    try:
        source.backup(target)  # one consistent snapshot, WAL included
    finally:
        target.close()
        source.close()
    with open(ledger_copy, "rb") as fh:
        os.fsync(fh.fileno())
    summary = summarize(ledger_copy)
    conn = sqlite3.connect(f"file:{ledger_copy}?mode=ro", uri=True)
    try:
        named = [r[0] for r in conn.execute("SELECT id FROM checkpoints ORDER BY id")]
    finally:
        conn.close()
    checkpoints: dict[str, int] = {}
    for cid in named:
        source_file = storage.checkpoint_dir / f"{validate_checkpoint_id(cid)}{SUFFIX}"
        if not source_file.is_file():
            continue  # pruned by retention: the ledger keeps its record, not its bytes
        data = source_file.read_bytes()
        if checkpoint_id_of(data) != cid:
            raise IntegrityError(f"checkpoint {cid} does not match its hash; not backed up")
        atomic_write(out / CHECKPOINT_DIR / f"{cid}{SUFFIX}", data, mode=0o600)
        checkpoints[cid] = len(data)
    if summary.published and summary.published not in checkpoints:
        raise IntegrityError(f"the published checkpoint {summary.published} is missing")
    fsync_dir(out / CHECKPOINT_DIR)
    # Last: its presence is what says the backup is complete.
    return write_manifest(
        out,
        FORMAT,
        {
            "ledger_sha256": _sha256_file(ledger_copy),
            "checkpoints": checkpoints,
            **summary.to_json(),
        },
    )


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of a complete, intact backup in ``source``, or an error saying why not."""
    source = Path(source)
    manifest = read_common_manifest(source, FORMAT)
    if _sha256_file(source / LEDGER_FILE) != manifest["ledger_sha256"]:
        raise IntegrityError(f"{source / LEDGER_FILE} does not match the manifest")
    for cid in manifest["checkpoints"]:
        path = source / CHECKPOINT_DIR / f"{validate_checkpoint_id(cid)}{SUFFIX}"
        if not path.is_file() or checkpoint_id_of(path.read_bytes()) != cid:
            raise IntegrityError(f"checkpoint {cid} in the backup is missing or damaged")
    return manifest


def _older_than_current(manifest: dict[str, Any], current: LedgerSummary) -> str | None:
    """Why restoring ``manifest`` over ``current`` would roll something back, or None."""
    if current.last_round > int(manifest["last_round"]):
        return (
            f"the state_dir's ledger has reached round {current.last_round}, the backup only "
            f"round {manifest['last_round']}"
        )
    floors: dict[str, float] = manifest["privacy_floors"]
    for clinic, spent in sorted(current.privacy_floors.items()):
        if spent > floors.get(clinic, 0.0) * (1 + 1e-9):
            return (
                f"clinic {clinic} has reported epsilon {spent:.4g} since the backup "
                f"({floors.get(clinic, 0.0):.4g} there); restoring would let it spend again"
            )
    return None


def restore(storage: StorageSection, source: Path) -> dict[str, Any]:
    """Restore the backup in ``source`` into ``storage``; returns its manifest.

    Refuses while an aggregator holds the state directory, when the backup is incomplete
    or damaged, and when the state directory's ledger is newer than the backup.
    """
    manifest = read_manifest(source)
    with StateDirLock(storage.state_dir, "restore"):
        if storage.ledger_path.exists():
            why = _older_than_current(manifest, summarize(storage.ledger_path))
            if why is not None:
                raise PreconditionError(
                    f"refusing to restore an older backup: {why}. Restore into an empty "
                    "state_dir if this is really what you want"
                )
        store = CheckpointStore(storage.checkpoint_dir)
        for cid in manifest["checkpoints"]:
            store.put((Path(source) / CHECKPOINT_DIR / f"{cid}{SUFFIX}").read_bytes())
        # The ledger last, replacing any old one and its WAL in one rename.
        staged = storage.state_dir / f".{LEDGER_FILE}.restore"
        shutil.copyfile(Path(source) / LEDGER_FILE, staged)
        with open(staged, "rb") as fh:
            os.fsync(fh.fileno())
        for leftover in ("-wal", "-shm"):
            Path(f"{storage.ledger_path}{leftover}").unlink(missing_ok=True)
        os.replace(staged, storage.ledger_path)
        fsync_dir(storage.state_dir)
    return manifest

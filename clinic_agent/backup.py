"""Backups of a clinic's privacy ledger that can never under-count its spending.

The privacy ledger (and its marker) is the only record of the epsilon a clinic has spent.
:func:`backup` copies both under the ledger's own writer lock, so the pair is one
consistent state, verifies the copy, and writes ``MANIFEST.json`` last. :func:`restore`
refuses to put back a ledger with fewer charged rounds or less epsilon than the one in
place: that would let the clinic spend again what it has already spent. Restoring into an
empty state directory (a replaced machine) is what it is for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from clinic_agent.config import StorageSection
from clinic_agent.privacy_ledger import PrivacyLedger
from common.errors import IntegrityError, PreconditionError
from common.fsutil import StateDirLock, atomic_write
from common.manifest import read_manifest as read_common_manifest
from common.manifest import write_manifest

FORMAT = "dermafed-agent-backup/1"


def _names(storage: StorageSection) -> tuple[str, str]:
    ledger = storage.privacy_ledger
    return ledger.name, ledger.name + ".marker"


def backup(storage: StorageSection, out: Path) -> dict[str, Any]:
    """Copy the clinic's privacy ledger to the new folder ``out``; safe while the agent runs."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PreconditionError(f"{out} is not empty; back up into a new folder")
    if not storage.privacy_ledger.exists():
        raise PreconditionError(
            f"no privacy ledger at {storage.privacy_ledger}: nothing to back up"
        )
    ledger = PrivacyLedger(storage.privacy_ledger, create=False)
    ledger_bytes, marker_bytes, entries = ledger.snapshot()
    spent = ledger.spent_epsilon()
    ledger_name, marker_name = _names(storage)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ledger_name, ledger_bytes, mode=0o600)
    atomic_write(out / marker_name, marker_bytes, mode=0o600)
    PrivacyLedger(out / ledger_name, create=False).verify()  # the copy stands on its own
    return write_manifest(
        out,
        FORMAT,
        {
            "entries": entries,
            "epsilon_spent": spent,
            "sha256": {
                ledger_name: hashlib.sha256(ledger_bytes).hexdigest(),
                marker_name: hashlib.sha256(marker_bytes).hexdigest(),
            },
        },
    )


def read_manifest(source: Path) -> dict[str, Any]:
    source = Path(source)
    manifest = read_common_manifest(source, FORMAT)
    for name, digest in manifest["sha256"].items():
        path = source / Path(name).name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise IntegrityError(f"{path} is missing or does not match the manifest")
    return manifest


def restore(storage: StorageSection, source: Path) -> dict[str, Any]:
    """Put the backed-up privacy ledger in place; refuses to roll spending back.

    Refuses while an agent holds the state directory.
    """
    manifest = read_manifest(source)
    ledger_name, marker_name = _names(storage)
    with StateDirLock(storage.state_dir, "restore"):
        if storage.privacy_ledger.exists() or Path(f"{storage.privacy_ledger}.marker").exists():
            current = PrivacyLedger(storage.privacy_ledger, create=False)
            count, spent = current.verify(), current.spent_epsilon()
            if count > manifest["entries"] or spent > manifest["epsilon_spent"] * (1 + 1e-9):
                raise PreconditionError(
                    f"refusing to roll the privacy ledger back: the one in place has "
                    f"{count} charged round(s) and epsilon {spent:.4g}, the backup "
                    f"{manifest['entries']} and {manifest['epsilon_spent']:.4g}"
                )
        # Ledger before marker: a marker never names entries its ledger does not have.
        atomic_write(storage.privacy_ledger, (Path(source) / ledger_name).read_bytes())
        atomic_write(
            Path(f"{storage.privacy_ledger}.marker"), (Path(source) / marker_name).read_bytes()
        )
        PrivacyLedger(storage.privacy_ledger, create=False).verify()
    return manifest

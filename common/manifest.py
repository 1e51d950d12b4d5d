"""The MANIFEST.json that makes a backup folder complete (written last, read first)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.errors import IntegrityError
from common.fsutil import atomic_write

MANIFEST = "MANIFEST.json"


def write_manifest(folder: Path, fmt: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest atomically; call it after everything it describes is on disk."""
    manifest = {"format": fmt, "created_at": time.time(), **fields}
    atomic_write(Path(folder) / MANIFEST, json.dumps(manifest, indent=2).encode(), mode=0o600)
    return manifest


def read_manifest(folder: Path, fmt: str) -> dict[str, Any]:
    """The manifest of ``folder``, or an error that says the backup is incomplete or foreign."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(
            f"{folder} has no {MANIFEST}: the backup was interrupted or is not a {fmt} "
            "backup; use another one"
        ) from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise IntegrityError(f"{path} is not a {fmt} manifest")
    return manifest

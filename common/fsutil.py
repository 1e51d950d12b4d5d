"""Crash-safe file writes shared by the PKI, the checkpoint store and the privacy ledger."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (without it a power cut may lose the file)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, mode: int = 0o600, temp_prefix: str | None = None
) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half of one.

    The temporary file is created in the same directory with ``mode`` from the start (never
    wider: keys are never readable by others, even briefly), fsynced, renamed over
    ``path``, and the directory is fsynced. Its name starts with ``temp_prefix`` (default
    ``.<name>.``) and ends in ``.tmp``, so a caller can find what a crash left behind.
    """
    path = Path(path)
    prefix = temp_prefix if temp_prefix is not None else f".{path.name}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)

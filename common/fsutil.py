"""Crash-safe file writes shared by the PKI, the checkpoint store and the privacy ledger,
and the lock that gives one process a state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from common.errors import InUseError

LOCK_NAME = ".lock"


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


class StateDirLock:
    """One process at a time in a state directory: an exclusive ``flock`` on ``<dir>/.lock``.

    Two aggregators (or agents) on one directory would write one ledger from two
    coordinators, each believing its own round state. ``flock`` belongs to the open file,
    so the kernel releases it when the process dies however it dies: no stale lock to
    clean up after a SIGKILL or a power cut. The file holds the holder's PID and role, for
    the error message of the one that is refused.
    """

    def __init__(self, directory: Path, role: str) -> None:
        self.directory = Path(directory)
        self.role = role
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateDirLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InUseError(
                f"cannot use state_dir {self.directory}: {exc.strerror or exc}"
                + (f" ({exc.filename})" if exc.filename else "")
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            pid, _, role = holder.partition(" ")
            raise InUseError(
                f"state_dir {self.directory} is in use by another {role or 'process'} "
                f"(pid {pid}); stop it first, or give this one its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

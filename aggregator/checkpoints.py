"""Content-addressed checkpoint store: ``<root>/<sha256>.safetensors``.

A checkpoint's id is the SHA-256 of its bytes, so an id names exactly one content and a
file can be checked against its own name. Files are written atomically (temp file in the
same directory, fsync, rename, fsync of the directory): after a crash a checkpoint is
either complete under its final name or absent, and the only debris is temp files that
:meth:`CheckpointStore.cleanup_temp` removes at startup.

Only bytes that parse as safetensors are accepted, so a corrupt or hostile upload never
enters the store, and nothing here ever unpickles anything.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from common.errors import IntegrityError, InvalidUpdateError, NotFoundError
from common.fsutil import atomic_write, fsync_dir
from common.tensors import checkpoint_bytes, load_checkpoint_bytes

SUFFIX = ".safetensors"
# Temp files start with a dot so directory listings of checkpoints never include them,
# and carry a fixed prefix so cleanup can never touch a real checkpoint.
TEMP_PREFIX = ".partial-"
_ID_RE = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 1 << 20


def validate_checkpoint_id(cid: str) -> str:
    """Return ``cid`` if it is a lowercase SHA-256 hex digest, else raise ``NotFoundError``.

    Ids arrive from admins and clinics; checking the exact shape before building a path
    means no id can ever name a file outside the store (``../``, absolute paths, NULs).
    """
    if not isinstance(cid, str) or _ID_RE.fullmatch(cid) is None:
        shown = cid[:80] if isinstance(cid, str) else type(cid).__name__
        raise NotFoundError(
            f"invalid checkpoint id {shown!r}: expected 64 lowercase hex digits (a sha256)"
        )
    return cid


def checkpoint_id_of(data: bytes | bytearray | memoryview) -> str:
    """The id a checkpoint with these bytes has in the store."""
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """Safetensors checkpoints on local disk, named by the SHA-256 of their bytes.

    One aggregator process owns a store directory. Methods are safe to call from
    several threads (gRPC handlers stream downloads while a round writes a candidate).
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        # Ids whose file has been hashed since this process started. A file is verified
        # at least once before it is first served; later streams still hash as they go.
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self._root

    # ----------------------------------------------------------------- writing

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` (safetensors bytes) and return its id; idempotent.

        Raises :class:`InvalidUpdateError` when the bytes are not a valid safetensors
        file; nothing is written then.
        """
        data = bytes(data)
        # Parsing is the only reliable validity check; a header-only check would let a
        # file with truncated tensor buffers in.
        load_checkpoint_bytes(data)
        cid = checkpoint_id_of(data)
        final = self._file(cid)
        if self._file_hash(final) == cid:
            self._sync_dir()  # the rename of an earlier, interrupted put may not be durable
            self._mark_verified(cid)
            return cid
        # Absent, or present with the wrong content (bit rot, a foreign write): either
        # way the atomic replace below leaves the correct bytes under the final name.
        self._write_atomically(final, cid, data)
        self._mark_verified(cid)
        return cid

    def put_state(self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
        """Serialise a model state with its metadata and store it; returns the id."""
        return self.put(checkpoint_bytes(state, metadata))

    def cleanup_temp(self) -> int:
        """Remove temp files left by a crash mid-``put``; returns how many were removed.

        Call at startup, before any ``put``: a temp file of a ``put`` running in this
        process at the same time would be removed too.
        """
        removed = 0
        for entry in self._root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            self._sync_dir()
        return removed

    # ----------------------------------------------------------------- reading

    def path(self, cid: str) -> Path:
        """The final path of checkpoint ``cid`` (which may not exist)."""
        return self._file(cid)

    def delete(self, cid: str) -> bool:
        """Remove checkpoint ``cid``'s file; False when there was none."""
        try:
            self._file(cid).unlink()
        except FileNotFoundError:
            return False
        with self._lock:
            self._verified.discard(cid)
        self._sync_dir()
        return True

    def exists(self, cid: str) -> bool:
        return self._file(cid).is_file()

    def size(self, cid: str) -> int:
        try:
            return self._file(cid).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"checkpoint {cid} is not in the store") from None

    def ids(self) -> list[str]:
        """Ids of every checkpoint file in the store, sorted (content is not verified)."""
        out = []
        for entry in self._root.iterdir():
            name = entry.name
            if name.endswith(SUFFIX) and _ID_RE.fullmatch(name[: -len(SUFFIX)]):
                out.append(name[: -len(SUFFIX)])
        return sorted(out)

    def read(self, cid: str) -> bytes:
        """The checkpoint's bytes, after checking they still hash to ``cid``."""
        path = self._file(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"checkpoint {cid} is not in the store") from None
        actual = checkpoint_id_of(data)
        if actual != cid:
            self._forget(cid)
            raise IntegrityError(
                f"checkpoint {cid} is corrupt: the stored file ({len(data)} bytes) "
                f"hashes to {actual}"
            )
        self._mark_verified(cid)
        return data

    def load(self, cid: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Verified ``(state, metadata)`` of checkpoint ``cid``."""
        data = self.read(cid)
        try:
            return load_checkpoint_bytes(data)
        except InvalidUpdateError as exc:
            # The hash matched, so these are the bytes that were stored; only a file
            # planted under a correct name (bypassing put) can get here.
            raise IntegrityError(f"checkpoint {cid} does not parse: {exc}") from exc

    def iter_chunks(self, cid: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream the checkpoint in chunks of at most ``chunk_size`` bytes.

        ``NotFoundError`` is raised here, before the first chunk. A file not yet verified
        since process start is hashed in full first, so corrupt bytes are never sent; the
        stream is hashed again as it goes and ``IntegrityError`` is raised at its end if
        the file changed underneath (the receiver must then discard what it got).
        """
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        path = self._file(cid)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"checkpoint {cid} is not in the store") from None
        try:
            if not self.is_verified(cid):
                # Hash through the same open handle that will be streamed: an os.replace
                # between check and send cannot swap the content under us.
                actual = _hash_handle(handle)
                if actual != cid:
                    self._forget(cid)
                    raise IntegrityError(f"checkpoint {cid} is corrupt: file hashes to {actual}")
                self._mark_verified(cid)
                handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return self._stream(cid, handle, chunk_size)

    def is_verified(self, cid: str) -> bool:
        with self._lock:
            return cid in self._verified

    # ----------------------------------------------------------------- internals

    def _stream(self, cid: str, handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        digest = hashlib.sha256()
        with handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
                yield chunk
        if digest.hexdigest() != cid:
            self._forget(cid)
            raise IntegrityError(f"checkpoint {cid} changed on disk while it was streamed")

    def _file(self, cid: str) -> Path:
        return self._root / f"{validate_checkpoint_id(cid)}{SUFFIX}"

    def _write_atomically(self, final: Path, cid: str, data: bytes) -> None:
        atomic_write(final, data, mode=0o640, temp_prefix=f"{TEMP_PREFIX}{cid[:16]}-")

    def _sync_dir(self) -> None:
        fsync_dir(self._root)

    @staticmethod
    def _file_hash(path: Path) -> str | None:
        """SHA-256 of the file at ``path``, or None when there is no such file."""
        try:
            with path.open("rb") as handle:
                return _hash_handle(handle)
        except FileNotFoundError:
            return None

    def _mark_verified(self, cid: str) -> None:
        with self._lock:
            self._verified.add(cid)

    def _forget(self, cid: str) -> None:
        with self._lock:
            self._verified.discard(cid)


def _hash_handle(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := handle.read(_HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def checkpoints_to_prune(
    newest_first: Sequence[str], protected: Collection[str], keep_last: int
) -> list[str]:
    """Which checkpoints retention removes: neither protected nor among the newest.

    ``newest_first`` lists every stored checkpoint by creation, newest first;
    ``protected`` holds what must stay whatever its age (every checkpoint ever published,
    which a rollback can target). ``keep_last`` = 0 keeps everything.
    """
    if keep_last <= 0:
        return []
    others = [cid for cid in newest_first if cid not in protected]
    return others[keep_last:]

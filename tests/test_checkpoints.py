"""The content-addressed checkpoint store: addressing, validation, integrity, crash safety."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from aggregator.checkpoints import (
    SUFFIX,
    TEMP_PREFIX,
    CheckpointStore,
    checkpoint_id_of,
    validate_checkpoint_id,
)
from common.errors import IntegrityError, InvalidUpdateError, NotFoundError
from common.tensors import checkpoint_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_state(seed: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + seed,
        "conv.bias": torch.full((2,), 0.5 + seed),
    }


META = {"dermafed.round": "3", "dermafed.parent": ""}


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints")


def store_files(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_put_read_roundtrip_is_content_addressed(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    assert cid == hashlib.sha256(data).hexdigest() == checkpoint_id_of(data)
    assert store.path(cid) == store.root / f"{cid}{SUFFIX}"
    assert store.path(cid).read_bytes() == data
    assert store.exists(cid)
    assert store.size(cid) == len(data)
    assert store.read(cid) == data
    assert store.ids() == [cid]

    state, metadata = store.load(cid)
    assert metadata == META
    assert set(state) == set(small_state())
    for name, tensor in small_state().items():
        assert torch.equal(state[name], tensor)


def test_put_state_stores_the_state_and_its_metadata(store: CheckpointStore) -> None:
    # Compared through a parse, not byte for byte: safetensors may order the metadata keys
    # differently from one serialisation to the next.
    cid = store.put_state(small_state(1.0), META)
    assert cid == checkpoint_id_of(store.read(cid))
    state, metadata = store.load(cid)
    assert metadata == META
    assert all(torch.equal(state[k], v) for k, v in small_state(1.0).items())
    other = store.put_state(small_state(2.0), META)
    assert other != cid
    assert store.ids() == sorted([cid, other])


def test_put_is_idempotent_and_does_not_rewrite(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    inode = store.path(cid).stat().st_ino
    assert store.put(data) == cid
    assert store.put(bytearray(data)) == cid
    assert store.path(cid).stat().st_ino == inode  # same file, not replaced
    assert store_files(store) == [f"{cid}{SUFFIX}"]


def test_put_repairs_a_corrupt_file_under_the_same_id(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    flip_byte(store.path(cid), len(data) - 1)
    assert store.put(data) == cid
    assert store.read(cid) == data


def test_tampered_file_is_detected_on_read_and_load(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    data = checkpoint_bytes(small_state(), META)
    cid = CheckpointStore(root).put(data)
    flip_byte(root / f"{cid}{SUFFIX}", len(data) - 3)  # inside a tensor buffer

    # A fresh store, as after a restart: nothing has been verified in this process yet.
    store = CheckpointStore(root)
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read(cid)
    with pytest.raises(IntegrityError):
        store.load(cid)
    # A download must fail before a single corrupt byte is handed out.
    with pytest.raises(IntegrityError):
        store.iter_chunks(cid)
    assert not store.is_verified(cid)


def test_truncated_file_is_detected(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    store.path(cid).write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match=f"{len(data) // 2} bytes"):
        store.read(cid)


def test_change_during_a_verified_stream_is_reported_at_its_end(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    assert store.is_verified(cid)
    flip_byte(store.path(cid), len(data) - 1)
    chunks = store.iter_chunks(cid, chunk_size=16)
    with pytest.raises(IntegrityError, match="changed on disk"):
        for _ in chunks:
            pass
    assert not store.is_verified(cid)
    # Now unverified, the next download is refused up front.
    with pytest.raises(IntegrityError):
        store.iter_chunks(cid)


@pytest.mark.parametrize(
    "bad_id",
    [
        "../" + "a" * 61,
        "/etc/passwd",
        "A" * 64,  # uppercase hex is not the canonical form
        "g" * 64,
        "a" * 63,
        "a" * 65,
        "a" * 64 + "\n",
        "a" * 32 + "/" + "a" * 31,
        "",
    ],
)
def test_invalid_ids_are_rejected_before_touching_the_filesystem(
    store: CheckpointStore, bad_id: str
) -> None:
    with pytest.raises(NotFoundError, match="invalid checkpoint id"):
        validate_checkpoint_id(bad_id)
    for call in (store.path, store.exists, store.read, store.load, store.size, store.iter_chunks):
        with pytest.raises(NotFoundError, match="invalid checkpoint id"):
            call(bad_id)


def test_missing_checkpoint_is_not_found(store: CheckpointStore) -> None:
    cid = "0" * 64
    assert not store.exists(cid)
    for call in (store.read, store.load, store.size, store.iter_chunks):
        with pytest.raises(NotFoundError, match="not in the store"):
            call(cid)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello, not a checkpoint",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{}",  # header length beyond the data
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",  # header is not an object
    ],
)
def test_non_safetensors_bytes_are_refused(store: CheckpointStore, payload: bytes) -> None:
    with pytest.raises(InvalidUpdateError):
        store.put(payload)
    assert store_files(store) == []


def test_truncated_safetensors_is_refused(store: CheckpointStore) -> None:
    data = checkpoint_bytes(small_state(), META)
    with pytest.raises(InvalidUpdateError):
        store.put(data[:-5])
    assert store_files(store) == []


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_iter_chunks_reassembles(store: CheckpointStore, chunk_size: int) -> None:
    data = checkpoint_bytes(small_state(), META)
    cid = store.put(data)
    chunks = list(store.iter_chunks(cid, chunk_size=chunk_size))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert len(chunks) == -(-len(data) // chunk_size)


def test_first_stream_after_restart_verifies_the_file(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    data = checkpoint_bytes(small_state(), META)
    cid = CheckpointStore(root).put(data)
    store = CheckpointStore(root)
    assert not store.is_verified(cid)
    assert b"".join(store.iter_chunks(cid, chunk_size=100)) == data
    assert store.is_verified(cid)


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_iter_chunks_refuses_bad_chunk_size(store: CheckpointStore, chunk_size: int) -> None:
    cid = store.put_state(small_state(), META)
    with pytest.raises(ValueError, match="chunk_size"):
        store.iter_chunks(cid, chunk_size=chunk_size)


def test_cleanup_temp_removes_only_temp_files(store: CheckpointStore) -> None:
    cid = store.put_state(small_state(), META)
    (store.root / f"{TEMP_PREFIX}{cid[:16]}-deadbeef").write_bytes(b"half a checkpoint")
    (store.root / f"{TEMP_PREFIX}0123456789abcdef-00").write_bytes(b"")
    (store.root / "README").write_text("operator notes")
    assert store.cleanup_temp() == 2
    assert store_files(store) == sorted(["README", f"{cid}{SUFFIX}"])
    assert store.cleanup_temp() == 0
    assert store.read(cid)  # the real checkpoint is untouched


# ----------------------------------------------------------------------------- crash safety

# The child stores 50 MB checkpoints in a loop, announcing each put before and after it.
_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from aggregator.checkpoints import CheckpointStore
    from common.tensors import checkpoint_bytes

    store = CheckpointStore(Path(sys.argv[1]))
    first = int(sys.argv[2])
    for i in range(first, first + 1000):
        data = checkpoint_bytes({"w": torch.full((12_500_000,), float(i))}, {"i": str(i)})
        print("begin", i, flush=True)
        cid = store.put(data)
        print("done", i, cid, flush=True)
    """
)


def _read_line(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"child exited early (rc={proc.poll()})")
    return line.split()


_CHECKPOINT_BYTES = 50_000_000  # tensor bytes of one child checkpoint (plus a small header)


def _temp_sizes(root: Path) -> list[int]:
    sizes = []
    for p in root.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):  # renamed under us
                sizes.append(p.stat().st_size)
    return sizes


def _kill_mid_put(root: Path, first: int, phase: str) -> dict[int, str]:
    """Run the child until its second put reaches ``phase``, SIGKILL it; returns finished puts.

    phase: "parse" (before any file exists), "write" (temp file partly written) or
    "sync" (temp file complete: fsync / rename / directory fsync).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), str(first)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    done: dict[int, str] = {}
    try:
        while True:
            words = _read_line(proc)
            if words[0] == "done":
                done[int(words[1])] = words[2]
            elif words[0] == "begin" and int(words[1]) == first + 1:
                break
        if phase == "parse":
            time.sleep(0.01)
        else:
            # Poll for the phase; if the put outruns us the kill still lands somewhere.
            threshold = 1 if phase == "write" else _CHECKPOINT_BYTES
            give_up = time.monotonic() + 5.0
            while time.monotonic() < give_up and not any(
                size >= threshold for size in _temp_sizes(root)
            ):
                time.sleep(0.0005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return done


def test_sigkill_mid_put_never_leaves_a_wrong_file(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    finished: dict[int, str] = {}
    for attempt, phase in enumerate(("write", "sync", "parse")):
        finished.update(_kill_mid_put(root, first=attempt * 10, phase=phase))

        store = CheckpointStore(root)  # as at a restart
        names = [p.name for p in root.iterdir()]
        temps = [n for n in names if n.startswith(TEMP_PREFIX)]
        finals = [n for n in names if not n.startswith(TEMP_PREFIX)]
        # Every file under a final name is complete and correct.
        for name in finals:
            assert name.endswith(SUFFIX)
            cid = name[: -len(SUFFIX)]
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == cid
        # Every put that returned is there.
        assert set(finished.values()) <= set(store.ids())
        assert store.cleanup_temp() == len(temps)
        assert not any(p.name.startswith(TEMP_PREFIX) for p in root.iterdir())
    assert len(finished) == 3

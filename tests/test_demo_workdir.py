"""`dermafed demo --workdir`: refusals in one line, and a running federation left alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.fsutil import StateDirLock
from dermafed.demo import MARKER, prepare_workdir


def test_a_work_dir_that_cannot_be_created_is_one_line(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        prepare_workdir(blocker / "demo")
    message = str(exit_.value.code)
    assert message.startswith(f"dermafed demo: cannot use {blocker / 'demo'} as the work dir: ")
    assert "\n" not in message


def test_a_work_dir_a_running_federation_uses_is_not_wiped(tmp_path: Path):
    """Before, re-running the demo on a --keep-running federation's work dir wiped it and
    orphaned the processes."""
    workdir = tmp_path / "demo"
    state = workdir / "state" / "aggregator"
    state.mkdir(parents=True)
    (workdir / MARKER).write_text("created by `dermafed demo`\n")
    (state / "ledger.sqlite").write_bytes(b"in use")
    with StateDirLock(state, "aggregator"):
        with pytest.raises(SystemExit) as exit_:
            prepare_workdir(workdir)
        assert f"still running in {workdir} (aggregator pid {os.getpid()})" in str(exit_.value.code)
        assert (state / "ledger.sqlite").read_bytes() == b"in use"
    prepare_workdir(workdir)  # stopped: the work dir is reused
    assert not (state / "ledger.sqlite").exists()

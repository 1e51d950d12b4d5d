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


def test_training_progress_is_read_from_each_agents_metrics_for_the_running_round():
    from prometheus_client import CollectorRegistry

    from clinic_agent.metrics import AgentMetrics
    from common.listen import start_metrics_server
    from dermafed.demo import free_port, training_progress

    servers, agents = [], []
    try:
        for name, (round_number, ratio) in {
            "c1": (4, 0.63),
            "c2": (4, 0.2),
            "c3": (3, 1.0),
        }.items():
            registry = CollectorRegistry()
            metrics = AgentMetrics(registry)
            metrics.training_round.set(round_number)
            metrics.training_progress.set(ratio)
            listen = f"127.0.0.1:{free_port()}"
            servers.append(start_metrics_server(listen, registry))
            agents.append((name, f"http://{listen}/metrics"))
        agents.append(("gone", f"http://127.0.0.1:{free_port()}/metrics"))  # nobody there
        # c3 still reports round 3, and "gone" answers nothing: neither counts for round 4.
        assert training_progress(agents, 4) == "40% (c1 60%, c2 20%)"
        assert training_progress(agents, 5) == ""
    finally:
        for server in servers:
            server.shutdown()

"""One process per state directory and per port: a second aggregator or agent is refused.

Before this, a second `dermafed aggregator serve` with the running one's listen address
and state_dir started and logged "listening" (gRPC's SO_REUSEPORT), and clinics were
balanced at random between two coordinators writing one ledger.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from federation_harness import Federation

from aggregator.config import MetricsSection, ServerSection
from common.errors import InUseError
from common.fsutil import StateDirLock
from dermafed.demo import write_toml

REPO = Path(__file__).resolve().parents[1]


def test_a_second_lock_on_a_state_dir_names_the_holder(tmp_path: Path):
    with StateDirLock(tmp_path / "state", "aggregator"):
        with pytest.raises(InUseError) as err:
            StateDirLock(tmp_path / "state", "aggregator").acquire()
        assert f"in use by another aggregator (pid {os.getpid()})" in str(err.value)
    # Released: the next holder gets it, and the file names the new holder.
    with StateDirLock(tmp_path / "state", "agent (clinic-a)") as lock:
        assert lock.path.read_text() == f"{os.getpid()} agent (clinic-a)\n"


def test_the_lock_dies_with_its_process(tmp_path: Path):
    # No stale lock after a crash: flock belongs to the process's open file.
    code = (
        "import os, sys; from common.fsutil import StateDirLock; "
        f"StateDirLock({str(tmp_path)!r}, 'aggregator').acquire(); os._exit(9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 9
    StateDirLock(tmp_path, "aggregator").acquire().release()


def test_a_second_aggregator_on_the_same_state_dir_is_refused(federation: Federation):
    first = federation.start_aggregator()
    round_before = first.ledger.next_round_number()
    with pytest.raises(InUseError, match=r"state_dir .* is in use by another aggregator"):
        federation.start_aggregator(federation.aggregator_config())
    federation.service = first
    # The running one is untouched: still serving, same ledger.
    assert first.coordinator.status().federation == federation.pki.federation
    assert first.ledger.next_round_number() == round_before


def _held_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_second_aggregator_on_the_same_port_is_refused_and_releases_its_state_dir(
    federation: Federation, tmp_path: Path
):
    first = federation.start_aggregator()
    cfg = federation.aggregator_config()
    other = replace(
        cfg,
        storage=replace(cfg.storage, state_dir=tmp_path / "other-state"),
        server=ServerSection(listen=f"127.0.0.1:{first.port}"),
    )
    with pytest.raises(
        InUseError, match=rf"cannot listen on 127.0.0.1:{first.port} \(server.listen\)"
    ):
        federation.start_aggregator(other)
    federation.service = first
    # Nothing of the refused one is left holding its state directory.
    StateDirLock(tmp_path / "other-state", "aggregator").acquire().release()


def test_a_busy_metrics_port_stops_the_start_with_nothing_running(
    federation: Federation, tmp_path: Path
):
    sock, port = _held_port()
    try:
        cfg = federation.aggregator_config(metrics=MetricsSection(listen=f"127.0.0.1:{port}"))
        with pytest.raises(InUseError, match=rf"127.0.0.1:{port} \(metrics.listen\)"):
            federation.start_aggregator(cfg)
    finally:
        sock.close()
    # The gRPC port was released and the ledger closed: a clean start now works.
    federation.start_aggregator(federation.aggregator_config())


def test_a_second_agent_on_the_same_state_dir_is_refused(federation: Federation):
    federation.start_aggregator()
    federation.start_agent("clinic-a")
    with pytest.raises(InUseError, match=r"in use by another agent \(clinic-a\)"):
        federation.start_agent("clinic-a")


def test_the_cli_says_so_in_one_line(federation: Federation, tmp_path: Path):
    state = tmp_path / "agg-state"
    pki = federation.pki
    cfg_path = tmp_path / "aggregator.toml"
    write_toml(
        cfg_path,
        {
            "federation": pki.federation,
            "server": {"listen": "127.0.0.1:0"},
            "tls": {"ca_cert": pki.ca_cert, "cert": pki.aggregator.cert, "key": pki.aggregator.key},
            "storage": {"state_dir": state},
            "model": {"input_size": 32, "width": 8},
        },
    )
    with StateDirLock(state, "aggregator"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "dermafed.cli",
                "aggregator",
                "serve",
                "--no-gate",
                "--config",
                str(cfg_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dermafed")]
    assert lines == [
        f"dermafed: error: state_dir {state} is in use by another aggregator "
        f"(pid {os.getpid()}); stop it first, or give this one its own state_dir"
    ]
    assert "Traceback" not in proc.stderr
    assert not (state / "ledger.sqlite").exists(), "refused before touching the ledger"


# The test configs have no held-out set: the gate is off, deliberately.
AGGREGATOR_SERVE = [sys.executable, "-m", "dermafed.cli", "aggregator", "serve", "--no-gate"]


def _serve(cfg_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGGREGATOR_SERVE, "--config", str(cfg_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _aggregator_toml(path: Path, federation: Federation, state: Path, **tls: object) -> None:
    pki = federation.pki
    write_toml(
        path,
        {
            "federation": pki.federation,
            "server": {"listen": "127.0.0.1:0"},
            "tls": {
                "ca_cert": pki.ca_cert,
                "cert": tls.get("cert", pki.aggregator.cert),
                "key": tls.get("key", pki.aggregator.key),
            },
            "storage": {"state_dir": state},
            "model": {"input_size": 32, "width": 8},
        },
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dermafed")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_an_aggregator_with_a_clinic_certificate_stops_before_touching_its_state(
    federation: Federation, tmp_path: Path
):
    clinic = federation.pki.clinics["clinic-a"]
    cfg = tmp_path / "aggregator.toml"
    state = tmp_path / "state"
    _aggregator_toml(cfg, federation, state, cert=clinic.cert, key=clinic.key)
    line = _one_error_line(_serve(cfg))
    assert line == (
        f"dermafed: error: tls.cert {clinic.cert} is the certificate of clinic 'clinic-a'; "
        f"this daemon needs one for role 'aggregator' in federation '{federation.pki.federation}'"
    )
    assert not (state / "ledger.sqlite").exists()


def test_a_state_dir_that_cannot_be_created_is_one_line(federation: Federation, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "aggregator.toml"
    _aggregator_toml(cfg, federation, blocker / "state")
    line = _one_error_line(_serve(cfg))
    assert line.startswith(f"dermafed: error: cannot use state_dir {blocker / 'state'}: ")


def test_an_agent_with_an_admin_certificate_stops_with_one_line(
    federation: Federation, tmp_path: Path
):
    cfg = federation.write_clinic_toml(
        tmp_path / "agent.toml",
        "clinic-a",
        tmp_path / "agent-state",
        cert=federation.pki.admins["alice"],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dermafed.cli", "agent", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = _one_error_line(proc)
    assert "is the certificate of admin 'alice'; this daemon needs one for role 'clinic'" in line

"""The aggregator SIGKILLed mid-round and restarted: nothing lost, agents carry on.

The aggregator runs as a real `dermafed aggregator serve` process so the kill is a real
SIGKILL; the agents are in-process threads whose only link to it is mutual-TLS gRPC.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from federation_harness import CLINICS, Federation, raw_clinics

from aggregator.config import ServerSection
from dermafed.demo import write_toml
from dermafed.v1 import federation_pb2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rounds(ledger: Path) -> list[tuple[int, str | None, str | None]]:
    if not ledger.exists():
        return []
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT number, outcome, checkpoint FROM rounds ORDER BY number"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _published(ledger: Path) -> str:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT checkpoint FROM publications ORDER BY id DESC LIMIT 1"
        ).fetchone()[0]
    finally:
        conn.close()


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.system
def test_sigkill_mid_round_then_restart(federation: Federation, tmp_path: Path):
    port = _free_port()
    state = tmp_path / "agg"
    cfg_path = tmp_path / "aggregator.toml"
    pki = federation.pki
    write_toml(
        cfg_path,
        {
            "federation": pki.federation,
            "server": {"listen": f"127.0.0.1:{port}", "max_poll_wait_s": 1.0},
            "tls": {
                "ca_cert": pki.ca_cert,
                "cert": pki.aggregator.cert,
                "key": pki.aggregator.key,
                "crl": pki.crl,
            },
            "storage": {"state_dir": state},
            "model": {"input_size": 32, "width": 8},
            "rounds": {"min_clinics": 2, "start_when_connected": 3, "train_deadline_s": 60.0},
            "plan": {"local_epochs": 3, "batch_size": 8},
        },
    )
    log = open(tmp_path / "aggregator.log", "ab")  # noqa: SIM115
    cmd = [sys.executable, "-m", "dermafed.cli", "aggregator", "serve", "--no-gate"]
    cmd += ["--config", str(cfg_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    ledger = state / "ledger.sqlite"
    try:
        _wait(ledger.exists, 60, "the ledger")
        for name in CLINICS:
            federation.start_agent(name, federation.clinic_config(name, f"localhost:{port}"))
        # Let round 1 publish, then kill during round 2.
        _wait(lambda: any(o == "published" for _, o, _c in _rounds(ledger)), 120, "round 1")
        before = _published(ledger)
        _wait(lambda: any(o is None for _, o, _c in _rounds(ledger)), 60, "round 2 to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        interrupted = [n for n, o, _c in _rounds(ledger) if o is None]
        assert interrupted, "the kill should land mid-round"

        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        # The interrupted round is aborted at start; the published model is the same file.
        _wait(
            lambda: all(o is not None for n, o, _c in _rounds(ledger) if n in interrupted),
            60,
            "the interrupted round to be recorded as aborted",
        )
        rows = {n: (o, c) for n, o, c in _rounds(ledger)}
        assert all(rows[n][0] == "aborted" for n in interrupted)
        assert _published(ledger) == before
        data = (state / "checkpoints" / f"{before}.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == before
        assert not list((state / "checkpoints").glob(".tmp*"))
        # The agents reconnect on their own and the next round publishes.
        _wait(
            lambda: any(n > max(interrupted) and o == "published" for n, o, _c in _rounds(ledger)),
            180,
            "a round after the restart",
        )
        conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        for cid in [c for _n, o, c in _rounds(ledger) if o == "published"]:
            blob = (state / "checkpoints" / f"{cid}.safetensors").read_bytes()
            assert hashlib.sha256(blob).hexdigest() == cid
    finally:
        for running in federation.agents.values():
            running.stop()
        federation.agents.clear()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dermafed.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_bad_config_exits_non_zero_naming_the_key(tmp_path: Path):
    cfg = tmp_path / "aggregator.toml"
    base = 'federation = "f"\n[tls]\nca_cert="a"\ncert="b"\nkey="c"\n[storage]\nstate_dir="s"\n'
    cases = {
        base + '[rounds]\nmin_clinics = "many"\n': "rounds.min_clinics",
        base: "tls.ca_cert",  # the certificate files do not exist
        'federation = "f"\n[storage]\nstate_dir="s"\n': "tls.ca_cert",
        base + "[rounds]\nmin_cinics = 2\n": "rounds.min_cinics",
        "federation = [\n": "not valid TOML",
    }
    for body, key in cases.items():
        cfg.write_text(body)
        result = _serve("aggregator", "serve", "--config", str(cfg))
        assert result.returncode == 2, result.stderr
        assert key in result.stderr, (body, result.stderr)
        assert "Traceback" not in result.stderr
    agent_cfg = tmp_path / "clinic.toml"
    agent_cfg.write_text('federation = "f"\n[network]\npoll_wait_s = -1\n')
    result = _serve("agent", "run", "--config", str(agent_cfg))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "aggregator.address" in result.stderr  # the first missing key is named


def test_the_aggregator_refuses_to_start_with_its_gate_off(federation: Federation, tmp_path: Path):
    pki = federation.pki
    base = {
        "federation": pki.federation,
        "server": {"listen": "127.0.0.1:0"},
        "tls": {"ca_cert": pki.ca_cert, "cert": pki.aggregator.cert, "key": pki.aggregator.key},
        "storage": {"state_dir": tmp_path / "state"},
    }
    cfg = tmp_path / "aggregator.toml"
    for validation, why in (
        ({}, "no [validation] holdout is configured"),
        (
            {"validation": {"holdout": federation.holdout, "gate": False}},
            "[validation] gate = false",
        ),
    ):
        write_toml(cfg, {**base, **validation})
        result = _serve("aggregator", "serve", "--config", str(cfg))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert f"the validation gate is off ({why})" in lines[0] and "--no-gate" in lines[0]
        assert not (tmp_path / "state").exists(), "refused before touching any state"


def test_a_restart_keeps_the_schedule_and_starts_no_round_early(federation: Federation):
    """interval_s counts from the last round in the ledger, not from the restart.

    Before, every restart started a round at once (round 3 at 13:05:22, a restart at
    13:05:50, round 4 at 13:05:57 with interval_s = 3600), charging every clinic's budget.
    """
    rounds = replace(
        federation.aggregator_config().rounds,
        aggregation="plain",
        start_when_connected=3,
        interval_s=3600.0,
    )
    first = federation.start_aggregator(federation.aggregator_config(rounds=rounds))
    port = first.port
    for name in CLINICS:
        federation.start_agent(name)
    federation.wait_rounds(1)
    last = first.ledger.rounds(limit=1)[0]
    assert last.finished_at is not None
    assert first.coordinator.status().next_round_at == pytest.approx(last.finished_at + 3600)
    first.stop(grace=1.0)
    federation.service = None

    cfg = federation.aggregator_config(
        rounds=rounds, server=ServerSection(listen=f"127.0.0.1:{port}", max_poll_wait_s=1.0)
    )
    second = federation.start_aggregator(cfg)
    coord = second.coordinator
    assert coord.status().next_round_at == pytest.approx(last.finished_at + 3600)
    # Every clinic reconnects (the start condition is met) and polls for a while: still
    # no round, because the hour since round 1 has not passed.
    assert coord.wait_until(lambda: len(coord.status().connected) == len(CLINICS), 60)
    polls_after = time.monotonic() + 3.0
    while time.monotonic() < polls_after:
        assert coord.status().current is None
        time.sleep(0.2)
    assert second.ledger.next_round_number() == last.number + 1


def test_a_round_cut_short_by_a_stop_waits_retry_after_abort_after_the_restart(
    federation: Federation,
):
    rounds = replace(
        federation.aggregator_config().rounds,
        aggregation="plain",
        start_when_connected=3,
        train_deadline_s=300.0,
        retry_after_abort_s=600.0,
    )
    first = federation.start_aggregator(federation.aggregator_config(rounds=rounds))
    for name in CLINICS:
        federation.start_agent(name)
    coord = first.coordinator
    assert coord.wait_until(lambda: coord.status().current is not None, 60)
    first.stop(grace=1.0)  # mid-round: the round is recorded as aborted
    federation.service = None
    federation.stop()

    second = federation.start_aggregator(federation.aggregator_config(rounds=rounds))
    last = second.ledger.rounds(limit=1)[0]
    assert last.outcome == "aborted"
    assert last.finished_at is not None
    assert second.coordinator.status().next_round_at == pytest.approx(last.finished_at + 600)


def test_per_clinic_series_survive_a_restart(federation: Federation):
    """Before, per-clinic series started empty after a restart: "clinic silent" never fired
    for a clinic that was down across it, and budgets showed nothing until a poll."""
    rounds = replace(federation.aggregator_config().rounds, start_when_connected=9)
    first = federation.start_aggregator(federation.aggregator_config(rounds=rounds))
    stub = raw_clinics(federation, ["clinic-a"])["clinic-a"]
    report = federation_pb2.PrivacyReport(
        status="dp-sgd", epsilon_spent=2.5, epsilon_max=8.0, delta=1e-5
    )
    stub.Poll(federation_pb2.PollRequest(wait_ms=0, privacy=report), timeout=10)
    seen = first.registry.get_sample_value(
        "dermafed_clinic_last_seen_timestamp_seconds", {"clinic": "clinic-a"}
    )
    assert seen is not None
    first.stop(grace=0.5)
    federation.service = None

    second = federation.start_aggregator(federation.aggregator_config(rounds=rounds))
    reg = second.registry
    key = {"clinic": "clinic-a"}
    assert reg.get_sample_value("dermafed_clinic_last_seen_timestamp_seconds", key) == seen
    assert reg.get_sample_value("dermafed_clinic_epsilon_spent", key) == 2.5
    assert reg.get_sample_value("dermafed_clinic_epsilon_remaining", key) == 5.5
    view = next(v for v in second.coordinator.list_clinics() if v.clinic == "clinic-a")
    assert view.last_seen == seen and not view.connected

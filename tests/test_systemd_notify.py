"""sd_notify and the watchdog against a real AF_UNIX datagram socket, as systemd listens.

The first tests drive ``common.systemd`` directly; the last two run the real daemons
(``dermafed aggregator serve`` / ``dermafed agent run``) as child processes with
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, the way a ``Type=notify`` unit starts them,
and check READY=1, WATCHDOG=1 and, after SIGTERM, STOPPING=1 and a clean exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki_fixtures import make_federation

from common import systemd
from dermafed.demo import write_toml

REPO = Path(__file__).resolve().parents[1]


class NotifyListener:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.messages: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value}

    def receive_until(self, wanted: str, timeout: float = 30.0) -> list[str]:
        """Collect datagrams until one contains the assignment ``wanted``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.messages.append(data.decode())
            if wanted in data.decode().splitlines():
                return self.messages
        raise AssertionError(f"{wanted!r} never arrived; got {self.messages!r}")

    def pending(self) -> list[str]:
        """Datagrams already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return out


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    # A short directory of its own: socket paths are limited to 108 bytes, which a deep
    # pytest tmp_path can exceed.
    folder = Path(tempfile.mkdtemp(prefix="sd-"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield NotifyListener(sock, str(path))
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_ready_stopping_status_and_ping_arrive_on_a_path_socket(listener: NotifyListener):
    assert systemd.ready("serving", env=listener.env)
    assert listener.receive_until("READY=1")[-1] == "READY=1\nSTATUS=serving"
    assert systemd.watchdog_ping(env=listener.env)
    listener.receive_until("WATCHDOG=1")
    assert systemd.status("round 3: training", env=listener.env)
    listener.receive_until("STATUS=round 3: training")
    assert systemd.stopping(env=listener.env)
    assert listener.receive_until("STOPPING=1")[-1] == "STOPPING=1"


def test_abstract_socket_names_start_with_at():
    name = f"dermafed-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        assert systemd.ready(env={"NOTIFY_SOCKET": "@" + name})
        sock.settimeout(10)
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path):
    assert systemd.notify("READY=1", env={}) is False
    # A socket that vanished (supervisor gone) is reported, never raised.
    assert systemd.ready(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    assert systemd.ready(env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval_reads_usec_and_honours_watchdog_pid():
    assert systemd.watchdog_interval(env={}) is None
    assert systemd.watchdog_interval(env={"WATCHDOG_USEC": "30000000"}) == 30.0
    own = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(env=own) == 0.5
    # Inherited from a parent that was the real watchdog target: not ours.
    other = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert systemd.watchdog_interval(env=other) is None
    for bad in ("0", "-5", "soon"):
        assert systemd.watchdog_interval(env={"WATCHDOG_USEC": bad}) is None


def test_watchdog_thread_pings_while_healthy_and_stops_when_not(listener: NotifyListener):
    healthy = threading.Event()
    healthy.set()
    unhealthy_checks = threading.Semaphore(0)

    def check() -> bool:
        if healthy.is_set():
            return True
        unhealthy_checks.release()
        return False

    env = {**listener.env, "WATCHDOG_USEC": "40000"}
    watchdog = systemd.Watchdog.from_environment(check, env=env)
    assert watchdog is not None and watchdog.interval == 0.04
    try:
        for _ in range(3):
            listener.receive_until("WATCHDOG=1")
        healthy.clear()
        # Wait until the thread has seen "unhealthy" twice: from then on nothing is sent.
        for _ in range(2):
            assert unhealthy_checks.acquire(timeout=30)
        listener.pending()  # pings sent before the flip
        for _ in range(2):
            assert unhealthy_checks.acquire(timeout=30)
        assert listener.pending() == []
    finally:
        watchdog.stop()


def test_a_raising_health_check_counts_as_unhealthy(listener: NotifyListener):
    calls = threading.Semaphore(0)

    def broken() -> bool:
        calls.release()
        raise RuntimeError("health check bug")

    watchdog = systemd.Watchdog(0.02, broken, env=listener.env)
    watchdog.start()
    try:
        for _ in range(3):
            assert calls.acquire(timeout=30)
        assert watchdog.pings == 0 and listener.pending() == []
    finally:
        watchdog.stop()


def test_watchdog_rejects_a_nonpositive_interval():
    with pytest.raises(ValueError, match="positive"):
        systemd.Watchdog(0, lambda: True)


# --- the real daemons under a simulated Type=notify supervisor --------------------------


def _daemon_env(listener: NotifyListener) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMAFED__")}
    env.update(listener.env)
    env["WATCHDOG_USEC"] = "400000"
    env.pop("WATCHDOG_PID", None)
    env["PYTHONPATH"] = str(REPO)
    return env


def _run_daemon(args: list[str], listener: NotifyListener, log: Path) -> None:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dermafed.cli", *args],
            cwd=REPO,
            env=_daemon_env(listener),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                listener.receive_until("READY=1", timeout=120)
                listener.receive_until("WATCHDOG=1", timeout=30)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- daemon log ---\n{log.read_text()}") from None
            proc.send_signal(signal.SIGTERM)
            listener.receive_until("STOPPING=1", timeout=60)
            assert proc.wait(timeout=90) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_aggregator_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, listener: NotifyListener
):
    pki = make_federation(tmp_path / "pki")
    config = tmp_path / "aggregator.toml"
    write_toml(
        config,
        {
            "federation": pki.federation,
            "server": {"listen": "127.0.0.1:0"},
            "tls": {"ca_cert": pki.ca_cert, "cert": pki.aggregator.cert, "key": pki.aggregator.key},
            "storage": {"state_dir": tmp_path / "state"},
            "model": {"input_size": 32, "width": 8},
        },
    )
    _run_daemon(
        ["aggregator", "serve", "--no-gate", "--config", str(config)],
        listener,
        tmp_path / "aggregator.log",
    )


def test_agent_daemon_notifies_ready_even_before_the_aggregator_answers(
    tmp_path: Path, listener: NotifyListener
):
    pki = make_federation(tmp_path / "pki")
    clinic = pki.clinics["clinic-a"]
    data = tmp_path / "data"
    data.mkdir()
    # Port 1 on loopback: nothing listens, so the agent keeps retrying with backoff.
    config = tmp_path / "agent.toml"
    write_toml(
        config,
        {
            "federation": pki.federation,
            "aggregator": {"address": "127.0.0.1:1"},
            "tls": {"ca_cert": pki.ca_cert, "cert": clinic.cert, "key": clinic.key},
            "data": {"path": data},
            "storage": {"state_dir": tmp_path / "agent-state"},
            "network": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
        },
    )
    _run_daemon(["agent", "run", "--config", str(config)], listener, tmp_path / "agent.log")

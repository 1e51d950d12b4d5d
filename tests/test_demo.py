"""`dermafed demo` as a newcomer runs it: separate processes, a table, a clean stop."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from dermafed.demo import DemoOptions, write_configs

# Every test here runs `dermafed demo`: an aggregator and one agent per clinic as processes.
pytestmark = pytest.mark.system


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (the demo's children name its work dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _demo(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dermafed.cli", "demo", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Python leaves SIGINT ignored if it was ignored when the test started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_demo_runs_a_federation_and_prints_the_table(tmp_path: Path):
    workdir = tmp_path / "demo"
    proc = _demo(workdir, "--rounds", "1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "synthetic" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("round"))
    for column in (
        "outcome",
        "gate",
        "clinics",
        "train loss",
        "accuracy",
        "bal. acc",
        "mel sens",
        "seconds",
    ):
        assert column in header
    row = out.splitlines()[out.splitlines().index(header) + 1].split()
    assert row[:2] == ["1", "published"] and row[3] == "3/3"
    assert "local training" in out
    # The gate's decision comes with its reason (round 1: only the floor applies).
    assert "gate (harm): the published model is at chance level" in out
    ledger = workdir / "state" / "aggregator" / "ledger.sqlite"
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    outcome, mode, cid = conn.execute(
        "SELECT outcome, mode, checkpoint FROM rounds WHERE number = 1"
    ).fetchone()
    conn.close()
    assert (outcome, mode) == ("published", "secure")
    assert (workdir / "state" / "aggregator" / "checkpoints" / f"{cid}.safetensors").exists()
    for name in ("aggregator.toml", "clinic-1.toml", "admin.toml"):
        assert (workdir / "config" / name).exists()
    assert not _processes_mentioning(str(workdir))


def test_ctrl_c_stops_every_process_cleanly(tmp_path: Path):
    workdir = tmp_path / "demo"
    proc = _demo(workdir, "--rounds", "50")
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    metrics_url = ""
    for line in proc.stdout:
        if line.startswith("metrics "):
            metrics_url = line.split()[1]
        if "round 1:" in line or time.monotonic() > deadline:
            break
    # The demo serves the aggregator's Prometheus metrics and says where.
    assert metrics_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        body = response.read().decode()
    assert "dermafed_build_info{" in body and "dermafed_round_number" in body
    children = _processes_mentioning(str(workdir))
    assert len(children) >= 4, "aggregator and three agents should be running"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert "interrupted: stopping the federation" in rest
    assert proc.returncode in (0, 1)
    time.sleep(0.5)
    assert not _processes_mentioning(str(workdir)), "a demo process outlived Ctrl-C"
    conn = sqlite3.connect(f"file:{workdir / 'state/aggregator/ledger.sqlite'}?mode=ro", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    unfinished = conn.execute("SELECT COUNT(*) FROM rounds WHERE outcome IS NULL").fetchone()[0]
    conn.close()
    assert unfinished == 0  # the aggregator aborted the running round before it stopped


def test_demo_trains_the_measured_recipe_for_its_privacy_mode(tmp_path: Path):
    """DP on: frozen ImageNet trunk and a linear head at Adam 0.1; off: the trunk
    fine-tuned at 0.0001; both at 128 px unless the user picks a size."""
    for opts, arch, lr, size in [
        (DemoOptions(), "efficientnet_lite0_head", 0.1, 128),
        (DemoOptions(dp=False), "efficientnet_lite0", 0.0001, 128),
        (DemoOptions(arch="lesionres"), "lesionres", 0.002, 64),
        (DemoOptions(arch="scatternet", learning_rate=0.05), "scatternet", 0.05, 64),
        (DemoOptions(input_size=96), "efficientnet_lite0_head", 0.1, 96),
    ]:
        agg, agents, _ = write_configs(opts, tmp_path, ["clinic-1"], tmp_path, tmp_path)
        config = tomllib.loads(agg.read_text())
        model, plan = config["model"], config["plan"]
        assert (model["arch"], plan["learning_rate"], model["input_size"]) == (arch, lr, size)
        privacy = tomllib.loads(agents[0].read_text())["privacy"]
        assert privacy["mode"] == ("dp-sgd" if opts.dp else "off")

"""deploy/systemd: the units verify, stay hardened, and agree with the daemons.

``systemd-analyze verify`` checks that the ExecStart binary exists, and the units name
the documented install path /opt/dermafed/bin/dermafed. The test verifies a copy in tmp
whose ExecStart points at a stub executable; every other line is the shipped one.
``systemd-analyze security --offline=yes`` scores the shipped files themselves against
the committed bounds below.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dermafed.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "deploy" / "systemd"
AGGREGATOR = SYSTEMD / "dermafed-aggregator.service"
AGENT = SYSTEMD / "dermafed-agent@.service"
SYSUSERS = SYSTEMD / "dermafed.sysusers.conf"
INSTALLED_BINARY = "/opt/dermafed/bin/dermafed"

# Upper bounds on `systemd-analyze security` exposure (0 = fully locked down, 10 = none).
# Measured 1.2 for both units with systemd 252; what is left is the network access the
# daemons need, the @resources syscalls OpenMP uses, and MemoryDenyWriteExecute=no (see
# test_pytorch_needs_writable_executable_memory).
EXPOSURE_BOUND = {"dermafed-aggregator.service": 1.3, "dermafed-agent@.service": 1.3}


def require_binary(name: str) -> str:
    """The binary's path; skip without it, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian: apt-get install systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    """``Key`` -> values, in order (a key may repeat), over all sections."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verifiable_copy(unit: Path, tmp: Path, name: str) -> Path:
    stub = tmp / "bin" / "dermafed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    copy = tmp / name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={stub} "))
    return copy


@pytest.mark.parametrize(
    ("unit", "name"),
    [
        (AGGREGATOR, "dermafed-aggregator.service"),
        # A template is verified as an instance, so %i is expanded as at run time.
        (AGENT, "dermafed-agent@clinic-a.service"),
    ],
)
def test_units_pass_systemd_analyze_verify(unit: Path, name: str, tmp_path: Path):
    analyze = require_binary("systemd-analyze")
    copy = verifiable_copy(unit, tmp_path, name)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120, check=False
    )
    # Unknown keys and bad values are only warnings, so any output is a failure too.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_verify_would_catch_a_typo(tmp_path: Path):
    """Guards the test above: the check is not vacuous."""
    analyze = require_binary("systemd-analyze")
    copy = verifiable_copy(AGGREGATOR, tmp_path, "dermafed-aggregator.service")
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120, check=False
    )
    assert "ProtectHomes" in result.stderr


@pytest.mark.parametrize("unit", [AGGREGATOR, AGENT], ids=lambda u: u.name)
def test_security_exposure_is_within_the_committed_bound(unit: Path):
    analyze = require_binary("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    assert score <= EXPOSURE_BOUND[unit.name], (
        f"{unit.name}: exposure {score} > {EXPOSURE_BOUND[unit.name]}\n{result.stdout}"
    )


@pytest.mark.parametrize("unit", [AGGREGATOR, AGENT], ids=lambda u: u.name)
def test_units_are_notify_services_with_watchdog_graceful_stop_and_hardening(unit: Path):
    d = directives(unit)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillSignal": "SIGTERM",
        "User": "dermafed",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": "no",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], f"{unit.name}: {key}={d.get(key)}"
    assert "@system-service" in d["SystemCallFilter"]
    assert int(d["WatchdogSec"][0]) >= 30 and int(d["TimeoutStopSec"][0]) >= 60
    assert d["StateDirectory"][0].startswith("dermafed/")
    # Nothing writable but the state directory.
    assert "ReadWritePaths" not in d


def test_exec_start_runs_real_cli_commands():
    for unit, instance in ((AGGREGATOR, ""), (AGENT, "clinic-a")):
        argv = shlex.split(directives(unit)["ExecStart"][0].replace("%i", instance))
        assert argv[0] == INSTALLED_BINARY
        parsed = build_parser().parse_args(argv[1:])
        assert callable(parsed.func)
    agent = directives(AGENT)
    assert "/etc/dermafed/agent-%i.toml" in agent["ExecStart"][0]
    assert agent["StateDirectory"] == ["dermafed/agent-%i"]


def test_stop_budgets_match_the_kubernetes_grace_periods():
    """Both supervisors give a daemon the same time to stop before killing it."""
    for unit, manifest in (
        (AGGREGATOR, "base/aggregator-statefulset.yaml"),
        (AGENT, "clinic/agent-deployment.yaml"),
    ):
        workload = yaml.safe_load((REPO / "deploy" / "k8s" / manifest).read_text())
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert int(directives(unit)["TimeoutStopSec"][0]) == grace, unit.name


def test_sysusers_creates_the_units_user(tmp_path: Path):
    sysusers = require_binary("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entries = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    user = entries["dermafed"]
    assert int(user[2]) != 0 and user[6] == "/usr/sbin/nologin"
    for unit in (AGGREGATOR, AGENT):
        assert directives(unit)["User"] == ["dermafed"] == directives(unit)["Group"]


def test_pytorch_needs_writable_executable_memory():
    """Why the units keep MemoryDenyWriteExecute=no: oneDNN JIT-compiles conv kernels.

    Runs a convolution under the kernel's own W^X switch (prctl PR_SET_MDWE, Linux 6.3+),
    which refuses what MemoryDenyWriteExecute= refuses. If this ever passes, PyTorch no
    longer needs W+X pages and the units should turn the protection on.
    """
    script = textwrap.dedent("""
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(77)
        import torch
        try:
            torch.nn.Conv2d(3, 8, 3)(torch.randn(2, 3, 32, 32))
        except RuntimeError as exc:
            print(exc)
            sys.exit(1)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not create a primitive" in result.stdout

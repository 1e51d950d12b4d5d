"""An install whose grpcio or protobuf is older than the stubs need fails with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermafed.runtime_versions import StubNeeds, mismatch, release, stub_needs

ROOT = Path(__file__).resolve().parents[1]
NEEDS = StubNeeds(grpcio="1.85.4", protobuf="7.35.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.85.4", (1, 85, 4)), ("1.86.0rc1", (1, 86, 0)), ("7.36.2.post1", (7, 36, 2)), ("6", (6,))],
)
def test_release_reads_the_numeric_part(text, expected):
    assert release(text) == expected


def test_release_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="not a version"):
        release("banana")


def test_runtimes_at_or_above_the_generator_pass():
    assert mismatch(NEEDS, grpcio="1.85.4", protobuf="7.35.1") is None
    assert mismatch(NEEDS, grpcio="1.90.0", protobuf="7.40.0") is None


def test_an_older_grpcio_is_named_with_the_version_needed_and_the_fix():
    line = mismatch(NEEDS, grpcio="1.60.0", protobuf="7.36.2")
    assert line == (
        "grpcio 1.60.0 is installed, but the gRPC stubs need grpcio>=1.85.4; "
        "reinstall from the lock: bash scripts/install.sh"
    )


@pytest.mark.parametrize("protobuf", ["7.30.0", "6.33.0", "8.0.0"])
def test_protobuf_older_or_of_another_major_is_refused(protobuf):
    line = mismatch(NEEDS, grpcio="1.85.4", protobuf=protobuf)
    assert line is not None
    assert line.startswith(f"protobuf {protobuf} is installed")
    assert "protobuf>=7.35.1,<8" in line


def test_stub_needs_reads_the_committed_stubs(tmp_path: Path):
    needs = stub_needs()
    assert release(needs.grpcio) >= (1, 85)
    assert release(needs.protobuf)[0] >= 5
    with pytest.raises(ValueError, match="no generated stubs"):
        stub_needs(tmp_path)


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """A dist-info that importlib.metadata finds before the real one (earlier on sys.path)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("command", [["--help"], ["aggregator", "serve", "--config", "x.toml"]])
def test_the_cli_stops_with_one_line_under_an_old_grpcio(tmp_path: Path, command):
    _fake_distribution(tmp_path, "grpcio", "1.60.0")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-m", "dermafed.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dermafed: error: grpcio 1.60.0 is installed")
    assert f"grpcio>={stub_needs().grpcio}" in lines[0]
    assert "Traceback" not in proc.stderr

"""docs/operator-guide.md cannot rot: its command lines parse with the real CLI, and its
localhost federation and day-2 commands run for real (the latter marked ``system``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dermafed.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "operator-guide.md"
SCRIPT = REPO / "docs" / "examples" / "localhost-federation.sh"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _commands(block: str) -> list[str]:
    """The block's command lines (comments dropped, backslash continuations joined)."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def test_every_dermafed_command_in_the_guide_parses_with_the_real_cli():
    parser = build_parser()
    lines = [
        c
        for block in _bash_blocks(GUIDE.read_text())
        for c in _commands(block)
        if c.startswith("dermafed ")
    ]
    assert len(lines) >= 20
    for line in lines:
        args = shlex.split(line)[1:]
        if args == ["--version"]:
            continue
        try:
            parser.parse_args(args)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"the guide's command does not parse ({exc.code}): {line}")


def test_the_guide_runs_the_script_it_describes():
    text = GUIDE.read_text()
    assert SCRIPT.is_file() and os.access(SCRIPT, os.R_OK)
    assert "bash docs/examples/localhost-federation.sh setup guide demo-data" in text
    script = SCRIPT.read_text()
    # The certificates are made the way section 3 says: clinics by request and signature.
    assert "dermafed pki request" in script and "dermafed pki sign" in script
    assert "holdout" in script and "admin_listen" in script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dermafed(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a guide line, with this interpreter's dermafed and the repository's script."""
    line = line.replace("bash docs/examples/", f"bash {REPO}/docs/examples/")
    args = shlex.split(line)
    if args[0] == "dermafed":
        args = [sys.executable, "-m", "dermafed.cli", *args[1:]]
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def guide_federation(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    env = dict(os.environ)
    env.update(
        AGG_PORT=str(_free_port()),
        ADMIN_PORT=str(_free_port()),
        METRICS_PORT=str(_free_port()),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    start = _section(GUIDE.read_text(), "## 6. Start")
    work = tmp_path / "guide"
    try:
        for block in _bash_blocks(start):
            for line in _commands(block):
                done = _dermafed(line, tmp_path, env)
                assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        yield work, env
    finally:
        if (work / "state").is_dir():
            _dermafed("bash docs/examples/localhost-federation.sh stop guide", tmp_path, env)


def _status(work: Path, env: dict[str, str]) -> dict:
    done = _dermafed("dermafed admin --config admin.toml --json status", work, env)
    return json.loads(done.stdout) if done.returncode == 0 else {}


@pytest.mark.system
def test_the_guides_federation_trains_and_answers_every_day_two_command(guide_federation):
    work, env = guide_federation
    deadline = time.monotonic() + 420
    while int(_status(work, env).get("rounds_completed", 0)) < 2:
        assert time.monotonic() < deadline, (work / "logs" / "aggregator.log").read_text()[-3000:]
        time.sleep(2)

    outputs = {}
    day2 = _section(GUIDE.read_text(), "## 7. Day 2")
    for block in _bash_blocks(day2):
        for line in _commands(block):
            done = _dermafed(line, work, env)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            outputs[line] = done.stdout
    assert "gate" in outputs["dermafed admin --config admin.toml gate 2"]
    assert "clinic-3" in outputs["dermafed admin --config admin.toml clinics"]
    assert (
        "excluded"
        in outputs[
            'dermafed admin --config admin.toml exclude clinic-3 --reason "scanner replaced"'
        ]
    )
    assert (work / "backup" / "aggregator" / "MANIFEST.json").is_file()
    assert (work / "backup" / "clinic-1" / "MANIFEST.json").is_file()

    # The revoked clinic's next call is refused.
    log = work / "logs" / "clinic-3.log"
    deadline = time.monotonic() + 90
    while "UNAUTHENTICATED" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(1)

    stop = _dermafed("bash docs/examples/localhost-federation.sh stop guide", work.parent, env)
    assert stop.returncode == 0, stop.stderr
    for name in ("aggregator", "clinic-1", "clinic-2", "clinic-3"):
        assert "Traceback" not in (work / "logs" / f"{name}.log").read_text(), name

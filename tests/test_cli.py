"""The `dermafed` entry point: version, a reader that goes away, one line per error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dermafed import cli_admin
from dermafed.cli import main, version
from dermafed.v1 import admin_pb2

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"dermafed {version()}"
    assert version()[0].isdigit()


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path):
    # `dermafed ... | head -1`: the pipe closes while the CLI is still writing. A CA with
    # many certificates makes `pki list` write more than a pipe holds.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from common import pki\n"
        "d = Path(sys.argv[1])\n"
        "pki.init_ca('fed', d)\n"
        "for i in range(600):\n"
        "    pki.issue(d, 'clinic', f'c{i}', d / 'out' / f'c{i}')\n"
    )
    ca = str(tmp_path / "ca")
    subprocess.run([sys.executable, "-c", code, ca], cwd=REPO, check=True, timeout=300)
    # --json: ~150 KB, more than a pipe buffers, so the writer surely meets the closed pipe.
    cmd = [sys.executable, "-m", "dermafed.cli", "pki", "list", "--ca", ca, "--json"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after one line
    err = proc.stderr.read()
    proc.wait(60)
    assert first.startswith("[")
    assert err == "", err  # no traceback, and no error: a reader leaving is not one
    assert proc.returncode == 141


def test_status_never_says_more_rounds_finished_than_the_maximum(capsys):
    over = admin_pb2.GetStatusResponse(federation="f", rounds_completed=5, max_rounds=2)
    cli_admin._print_human("status", over)
    out = capsys.readouterr().out
    assert "rounds finished    5 (max_rounds 2 reached; more only by 'trigger')" in out
    under = admin_pb2.GetStatusResponse(federation="f", rounds_completed=1, max_rounds=2)
    cli_admin._print_human("status", under)
    assert "rounds finished    1 of max_rounds 2" in capsys.readouterr().out


def test_help_and_argument_parsing_load_neither_torch_nor_numpy():
    # `dermafed --help` took 1.4 s (more under load) because every command module imported
    # PyTorch; now only the commands that run need it.
    code = (
        "import sys\n"
        "from dermafed.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_checkpoint_prefix_as_the_tables_show_it_resolves_to_one_id():
    ids = ["ab12" + "0" * 60, "ab34" + "1" * 60, "cd56" + "2" * 60]
    assert cli_admin.resolve_prefix("AB12", ids) == ids[0]
    assert cli_admin.resolve_prefix(ids[2][:16], ids) == ids[2]
    with pytest.raises(cli_admin.UsageError, match="matches 2 checkpoints"):
        cli_admin.resolve_prefix("ab12", [*ids, "ab12" + "9" * 60])
    with pytest.raises(cli_admin.UsageError, match="at least 4 characters"):
        cli_admin.resolve_prefix("ab", ids)
    with pytest.raises(cli_admin.UsageError, match="no checkpoint id starts with 'ffff'"):
        cli_admin.resolve_prefix("ffff", ids)
    full = "e" * 64  # older than the listing: passed on for the server to judge
    assert cli_admin.resolve_prefix(full, ids) == full


def test_long_reasons_wrap_instead_of_being_cut(capsys):
    reason = "mel sensitivity fell from 0.458 to 0.042 (tolerance 0.050); " * 3
    cli_admin._table(["round", "reason"], [[1, reason.strip()], [2, "ok"]])
    out = capsys.readouterr().out.splitlines()
    assert len(out) > 3
    assert " ".join(line.strip() for line in out[1:-1]).endswith("(tolerance 0.050);")
    assert all(len(line) <= 7 + cli_admin.LAST_COLUMN_WIDTH for line in out)
    assert out[2].startswith(" " * 7)

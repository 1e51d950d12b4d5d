"""The clinic's persistent spent-privacy ledger (clinic_agent.privacy_ledger)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clinic_agent.privacy import MechanismStep, PrivacyConfig, epsilon_for, plan_round
from clinic_agent.privacy_ledger import LedgerEntry, PrivacyLedger, PrivacyLedgerError

REPO = Path(__file__).resolve().parents[1]


def _entry(number: int, sigma: float = 1.1, q: float = 0.05, steps: int = 40) -> LedgerEntry:
    return LedgerEntry(
        round=number,
        round_id=f"r-{number:04d}",
        federation="derm-eu",
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=1e-5,
        epsilon_after=0.5 * (number + 1),
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "privacy_ledger.jsonl"


def _with_entries(path: Path, count: int) -> PrivacyLedger:
    ledger = PrivacyLedger(path)
    for i in range(count):
        ledger.commit(_entry(i))
    return ledger


def test_new_clinic_starts_empty_and_entries_survive_reopen(path: Path) -> None:
    ledger = PrivacyLedger(path)
    assert ledger.entries() == [] and ledger.spent_epsilon() == 0.0
    stored = ledger.commit(_entry(0))
    assert stored.at  # timestamp filled in
    ledger.commit(_entry(1, sigma=2.0))

    reopened = PrivacyLedger(path, create=False)
    assert reopened.entries() == [stored, ledger.entries()[1]]
    assert reopened.verify() == 2
    expected = epsilon_for([MechanismStep(1.1, 0.05, 40), MechanismStep(2.0, 0.05, 40)], 1e-5)
    assert reopened.spent_epsilon() == pytest.approx(expected)
    assert reopened.spent_epsilon("prv") < reopened.spent_epsilon("rdp")
    assert (path.stat().st_mode & 0o777) == 0o600


def test_missing_ledger_without_create_is_an_error(path: Path) -> None:
    with pytest.raises(PrivacyLedgerError, match="no privacy ledger"):
        PrivacyLedger(path, create=False)


def test_deleted_ledger_is_not_mistaken_for_a_new_clinic(path: Path) -> None:
    _with_entries(path, 2)
    path.unlink()
    with pytest.raises(PrivacyLedgerError, match=r"missing.*deleted"):
        PrivacyLedger(path)
    assert not path.exists()  # nothing was silently re-created


def test_truncated_file_is_refused(path: Path) -> None:
    _with_entries(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])
    with pytest.raises(PrivacyLedgerError, match="incomplete"):
        PrivacyLedger(path)


def test_partial_last_line_is_refused_even_with_a_newline(path: Path) -> None:
    _with_entries(path, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40] + b"\n")
    with pytest.raises(PrivacyLedgerError, match="not valid JSON"):
        PrivacyLedger(path)


def test_edited_entry_fails_its_hash(path: Path) -> None:
    _with_entries(path, 3)
    lines = path.read_text().splitlines()
    obj = json.loads(lines[2])
    obj["body"]["noise_multiplier"] = 50.0  # pretend round 1 was nearly free
    lines[2] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrivacyLedgerError, match="SHA-256"):
        PrivacyLedger(path).entries()


def test_dropped_middle_line_breaks_the_chain(path: Path) -> None:
    _with_entries(path, 3)
    lines = path.read_text().splitlines()
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrivacyLedgerError, match=r"out of sequence|chain"):
        PrivacyLedger(path)


def test_dropped_trailing_entries_are_caught_by_the_marker(path: Path) -> None:
    _with_entries(path, 3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")  # still a valid chain on its own
    with pytest.raises(PrivacyLedgerError, match="marker records 3"):
        PrivacyLedger(path)


def test_old_copy_restored_is_caught_by_the_marker(path: Path) -> None:
    ledger = _with_entries(path, 1)
    old = path.read_bytes()
    ledger.commit(_entry(1))
    path.write_bytes(old)
    with pytest.raises(PrivacyLedgerError, match="removed or an older copy"):
        PrivacyLedger(path)


def test_damaged_or_missing_marker_is_refused_and_can_be_rebuilt(path: Path) -> None:
    _with_entries(path, 2)
    marker = path.with_name(path.name + ".marker")
    marker.write_text(marker.read_text().replace('"entries":2', '"entries":1'))
    with pytest.raises(PrivacyLedgerError, match=r"marker .* is damaged"):
        PrivacyLedger(path)
    marker.unlink()
    with pytest.raises(PrivacyLedgerError, match=r"marker .* is missing"):
        PrivacyLedger(path)
    assert PrivacyLedger.rebuild_marker(path) == 2
    assert len(PrivacyLedger(path).entries()) == 2


def test_another_ledger_swapped_in_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "ledger.jsonl", tmp_path / "b" / "ledger.jsonl"
    _with_entries(a, 1)
    _with_entries(b, 1)
    a.write_bytes(b.read_bytes())
    with pytest.raises(PrivacyLedgerError, match="different ledger"):
        PrivacyLedger(a)


def test_corruption_is_also_caught_by_an_open_ledger(path: Path) -> None:
    ledger = _with_entries(path, 1)
    path.write_bytes(b"{not json}\n")
    with pytest.raises(PrivacyLedgerError):
        ledger.entries()
    with pytest.raises(PrivacyLedgerError):
        ledger.commit(_entry(1))


def test_budget_is_enforced_across_restarts(path: Path) -> None:
    """The agent's flow: plan, charge (write-ahead), train; a restart forgets nothing."""
    cfg = PrivacyConfig(epsilon_max=0.6, noise_multiplier=2.0)
    ledger = PrivacyLedger(path)
    first = plan_round(cfg, ledger.entries(), n_examples=1000, batch_size=50, epochs=1)
    assert first.accepted
    ledger.commit(LedgerEntry.from_decision(first, round=1, round_id="r-1", federation="f"))

    restarted = PrivacyLedger(path, create=False)
    assert restarted.spent_epsilon() == pytest.approx(first.epsilon_after)
    second = plan_round(cfg, restarted.entries(), n_examples=1000, batch_size=50, epochs=1)
    assert not second.accepted and second.reason == "privacy_budget_exhausted"
    with pytest.raises(ValueError, match="only an accepted decision"):
        LedgerEntry.from_decision(second, round=2, round_id="r-2", federation="f")


def test_invalid_entries_are_refused() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        LedgerEntry(
            round=0,
            round_id="r",
            federation="f",
            noise_multiplier=0.0,
            sample_rate=0.1,
            steps=1,
            delta=1e-5,
            epsilon_after=0.1,
        )
    with pytest.raises(ValueError, match="delta"):
        LedgerEntry(
            round=0,
            round_id="r",
            federation="f",
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=1,
            delta=0.0,
            epsilon_after=0.1,
        )
    with pytest.raises(ValueError, match="status"):
        LedgerEntry(
            round=0,
            round_id="r",
            federation="f",
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=1,
            delta=1e-5,
            epsilon_after=0.1,
            status="pending",
        )


# -- crash safety -----------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from clinic_agent.privacy_ledger import LedgerEntry, PrivacyLedger
    ledger = PrivacyLedger(sys.argv[1])
    start, count = int(sys.argv[2]), int(sys.argv[3])
    for i in range(start, start + count):
        ledger.commit(LedgerEntry(round=i, round_id=f"r-{i}", federation="f",
                                  noise_multiplier=1.0, sample_rate=0.01, steps=100,
                                  delta=1e-5, epsilon_after=0.1))
        print(f"committed {i}", flush=True)
    time.sleep(60)  # "training": the parent kills us here or during a commit
    """
)


def _spawn(path: Path, start: int, count: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(start), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_sigkill_after_commit_keeps_the_entry(path: Path) -> None:
    child = _spawn(path, 0, 1)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "committed 0"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    entries = PrivacyLedger(path).entries()
    assert [e.round for e in entries] == [0]


def test_sigkill_during_commits_leaves_a_consistent_ledger(path: Path) -> None:
    acknowledged = 0
    for attempt, delay in enumerate((0.0, 0.005, 0.02, 0.05, 0.1)):
        child = _spawn(path, attempt * 1000, 1000)
        assert child.stdout is not None
        first = child.stdout.readline()  # the child is now in its commit loop
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
        acknowledged += (first + out).count("committed")
        # Always loadable, and every acknowledged commit is there.
        assert len(PrivacyLedger(path).entries()) >= acknowledged
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # opening the ledger cleaned up after the killed writers

"""Backups that restore: consistent while rounds run, refused when incomplete, never a
rollback of privacy state, and a restored aggregator that resumes.

Before, `cp` of the running WAL-mode ledger held 3 of 5 rounds, and nothing stopped an
older privacy ledger from being put back.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from federation_harness import CLINICS, Federation

from aggregator import backup as agg_backup
from aggregator.checkpoints import checkpoints_to_prune
from aggregator.config import RoundsSection, StorageSection, ValidationSection
from clinic_agent import backup as agent_backup
from clinic_agent.config import StorageSection as AgentStorage
from clinic_agent.privacy import PrivacyConfig
from clinic_agent.privacy_ledger import PrivacyLedger
from common.errors import IntegrityError, InUseError, PreconditionError
from dermafed.cli import main
from dermafed.demo import write_toml

REPO = Path(__file__).resolve().parents[1]
BACKUP_CMD = (sys.executable, "-m", "dermafed.cli", "aggregator", "backup")


def _plain(fed: Federation, **kw) -> RoundsSection:
    kw.setdefault("retry_after_abort_s", 1.0)
    return replace(fed.aggregator_config().rounds, aggregation="plain", **kw)


def _start_agents(fed: Federation) -> None:
    # A budget that lasts the whole test: these tests are about state, not about budgets.
    for name in CLINICS:
        fed.start_agent(name, fed.clinic_config(name, privacy=PrivacyConfig(epsilon_max=1000.0)))


def test_backups_taken_while_rounds_run_are_consistent_and_restore_into_a_resuming_aggregator(
    federation: Federation, tmp_path: Path
):
    service = federation.start_aggregator(federation.aggregator_config(rounds=_plain(federation)))
    _start_agents(federation)
    backups: list[Path] = []
    stop = threading.Event()

    def keep_backing_up() -> None:
        while not stop.is_set():
            out = tmp_path / f"backup-{len(backups):03d}"
            agg_backup.backup(service.config.storage, out)
            backups.append(out)
            time.sleep(0.05)

    worker = threading.Thread(target=keep_backing_up)
    worker.start()
    try:
        federation.wait_rounds(3, timeout=240)
    finally:
        stop.set()
        worker.join(60)
    assert len(backups) >= 3
    for out in backups:
        manifest = agg_backup.read_manifest(out)
        conn = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finished = conn.execute("SELECT COUNT(*) FROM rounds WHERE outcome IS NOT NULL").fetchone()
        conn.close()
        assert manifest["last_round"] >= finished[0]
        assert manifest["published"] in manifest["checkpoints"]
    last = backups[-1]
    manifest = agg_backup.read_manifest(last)
    federation.stop()

    # Restoring over the newer state refuses; into a fresh state_dir it works and resumes.
    with pytest.raises(PreconditionError, match="refusing to restore an older backup"):
        agg_backup.restore(service.config.storage, backups[0])
    fresh = StorageSection(tmp_path / "restored-state")
    agg_backup.restore(fresh, last)
    cfg = federation.aggregator_config(rounds=_plain(federation), storage=fresh)
    restored = federation.start_aggregator(cfg)
    assert restored.coordinator.published[0] == manifest["published"]
    assert restored.ledger.next_round_number() == manifest["last_round"] + 1
    _start_agents(federation)
    done = restored.coordinator.status().rounds_completed
    federation.wait_rounds(done + 1, timeout=180)


def test_a_backup_killed_midway_is_never_restored(federation: Federation, tmp_path: Path):
    """Kill `aggregator backup` at increasing moments: each result restores whole or not at all."""
    service = federation.start_aggregator(federation.aggregator_config(rounds=_plain(federation)))
    _start_agents(federation)
    federation.wait_rounds(2, timeout=180)
    federation.stop()
    config = tmp_path / "aggregator.toml"
    pki = federation.pki
    write_toml(
        config,
        {
            "federation": pki.federation,
            "tls": {"ca_cert": pki.ca_cert, "cert": pki.aggregator.cert, "key": pki.aggregator.key},
            "storage": {"state_dir": service.config.storage.state_dir},
        },
    )
    outcomes = set()
    for i, delay in enumerate([0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 3.0, 6.0]):
        out = tmp_path / f"killed-{i}"
        proc = subprocess.Popen(
            [*BACKUP_CMD, "--config", str(config), "--out", str(out)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        target = StorageSection(tmp_path / f"target-{i}")
        try:
            agg_backup.restore(target, out)
        except IntegrityError as exc:
            assert "no MANIFEST.json" in str(exc) or "does not match" in str(exc)
            assert not target.ledger_path.exists()
            outcomes.add("refused")
            continue
        summary = agg_backup.summarize(target.ledger_path)
        assert (target.checkpoint_dir / f"{summary.published}.safetensors").is_file()
        outcomes.add("restored")
    assert "refused" in outcomes  # the kill landed mid-backup at least once


def test_restore_refuses_while_the_aggregator_runs(federation: Federation, tmp_path: Path):
    service = federation.start_aggregator()
    out = tmp_path / "b"
    agg_backup.backup(service.config.storage, out)
    with pytest.raises(InUseError, match="in use by another aggregator"):
        agg_backup.restore(service.config.storage, out)
    with pytest.raises(PreconditionError, match="not empty"):
        agg_backup.backup(service.config.storage, out)


def test_a_tampered_backup_is_refused(federation: Federation, tmp_path: Path):
    service = federation.start_aggregator()
    out = tmp_path / "b"
    manifest = agg_backup.backup(service.config.storage, out)
    (out / "checkpoints" / f"{manifest['published']}.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="missing or damaged"):
        agg_backup.restore(StorageSection(tmp_path / "t"), out)
    data = json.loads((out / "MANIFEST.json").read_text())
    data["format"] = "something-else"
    (out / "MANIFEST.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="not a dermafed-aggregator-backup/1"):
        agg_backup.restore(StorageSection(tmp_path / "t"), out)


def test_retention_keeps_every_published_checkpoint_and_the_newest_others():
    newest_first = ["r9", "p8", "r7", "r6", "p5", "r4", "r3"]
    published = {"p8", "p5"}
    assert checkpoints_to_prune(newest_first, published, keep_last=2) == ["r6", "r4", "r3"]
    assert checkpoints_to_prune(newest_first, published, keep_last=0) == []
    assert checkpoints_to_prune(newest_first, published, keep_last=10) == []


def test_retention_removes_rejected_candidates_but_never_a_rollback_target(
    federation: Federation,
):
    # A gate no candidate passes: every round leaves a rejected candidate behind.
    cfg = federation.aggregator_config(
        rounds=_plain(federation),
        validation=ValidationSection(holdout=federation.holdout, min_balanced_accuracy=0.99),
    )
    cfg = replace(cfg, storage=replace(cfg.storage, keep_checkpoints=1))
    federation.start_aggregator(cfg)
    _start_agents(federation)
    federation.wait_rounds(4, timeout=240)
    federation.stop()
    files = cfg.storage.checkpoint_dir.glob("*.safetensors")
    store_ids = {p.name.removesuffix(".safetensors") for p in files}
    with sqlite3.connect(cfg.storage.ledger_path) as conn:
        outcomes = [r[0] for r in conn.execute("SELECT outcome FROM rounds ORDER BY number")]
        published = {r[0] for r in conn.execute("SELECT checkpoint FROM publications")}
        recorded = [r[0] for r in conn.execute("SELECT id FROM checkpoints ORDER BY created_at")]
    assert outcomes[:4] == ["rejected"] * 4
    assert published <= store_ids, "every rollback target stays"
    assert len(store_ids - published) == 1, "of the rejected candidates, the newest stays"
    assert recorded[-1] in store_ids
    assert len(recorded) >= 5 and set(recorded) >= store_ids  # the ledger keeps every record


def test_agent_backup_restore_refuses_to_roll_spending_back(
    tmp_path: Path, federation: Federation, capsys
):
    cfg = federation.aggregator_config(rounds=_plain(federation, max_rounds=2))
    federation.start_aggregator(cfg)
    _start_agents(federation)
    federation.wait_rounds(1, timeout=180)
    storage = federation.agents["clinic-a"].agent.config.storage
    early = agent_backup.backup(storage, tmp_path / "early")  # taken while the agent runs
    federation.wait_rounds(2, timeout=180)
    federation.stop()
    late = agent_backup.backup(storage, tmp_path / "late")
    assert late["entries"] > early["entries"] >= 1
    assert late["epsilon_spent"] > early["epsilon_spent"]

    with pytest.raises(PreconditionError, match="refusing to roll the privacy ledger back"):
        agent_backup.restore(storage, tmp_path / "early")
    assert PrivacyLedger(storage.privacy_ledger, create=False).verify() == late["entries"]
    # A replaced machine: an empty state_dir takes the latest backup, whole and verified.
    fresh = AgentStorage(tmp_path / "new-machine")
    agent_backup.restore(fresh, tmp_path / "late")
    restored = PrivacyLedger(fresh.privacy_ledger, create=False)
    assert restored.verify() == late["entries"]
    assert restored.spent_epsilon() == pytest.approx(late["epsilon_spent"])
    # Restoring the same backup again is allowed (nothing is rolled back).
    agent_backup.restore(fresh, tmp_path / "late")
    # The same through the command line, as an operator types it.
    cfg = federation.write_clinic_toml(tmp_path / "clinic-a.toml", "clinic-a", storage.state_dir)
    assert main(["agent", "backup", "--config", str(cfg), "--out", str(tmp_path / "cli")]) == 0
    assert f"charged round(s), epsilon {late['epsilon_spent']:.3f}) to" in capsys.readouterr().out
    assert main(["agent", "restore", "--config", str(cfg), "--from", str(tmp_path / "early")]) == 2
    assert "refusing to roll the privacy ledger back" in capsys.readouterr().err
    os.remove(tmp_path / "late" / "MANIFEST.json")
    with pytest.raises(IntegrityError, match=r"no MANIFEST\.json"):
        agent_backup.restore(AgentStorage(tmp_path / "other"), tmp_path / "late")

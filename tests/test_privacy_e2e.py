"""Differential privacy through the real services: budgets, refusals, crashes, reporting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from federation_harness import CLINICS, Federation

from aggregator.config import PlanSection, RoundsSection
from clinic_agent.privacy import (
    PrivacyConfig,
    accounting_delta,
    epsilon_for,
    round_mechanism,
)
from clinic_agent.privacy_ledger import PrivacyLedger
from common.datasets import load_records
from common.errors import ConfigError
from dermafed.demo import write_toml


def _budget_for_exactly_one_round(fed: Federation, clinic: str, batch: int) -> float:
    n = len(load_records(fed.shards[clinic]))
    cfg = PrivacyConfig()
    delta = accounting_delta(cfg, [], n)
    step = round_mechanism(n, batch, 1, float(cfg.noise_multiplier or 1.0))
    one = epsilon_for([step], delta)
    two = epsilon_for([step, step], delta)
    return (one + two) / 2


def test_a_clinic_out_of_budget_declines_and_the_round_goes_on(federation: Federation):
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2, start_when_connected=3, max_rounds=2, train_deadline_s=60.0
        ),
        plan=PlanSection(local_epochs=1, batch_size=8),
    )
    service = federation.start_aggregator(cfg)
    tiny = "clinic-c"
    eps_max = _budget_for_exactly_one_round(federation, tiny, 8)
    for name in CLINICS:
        ccfg = federation.clinic_config(name)
        if name == tiny:
            ccfg = replace(ccfg, privacy=PrivacyConfig(epsilon_max=eps_max))
        federation.start_agent(name, ccfg)
    federation.wait_rounds(2, timeout=180)
    ledger = service.ledger
    r1, r2 = ledger.round(1), ledger.round(2)
    assert r1 is not None and tiny in r1.contributors
    assert r2 is not None and r2.outcome == "published"
    assert sorted(r2.contributors) == sorted(set(CLINICS) - {tiny})
    declines = [e for e in ledger.clinic_events(round=2) if e.event == "declined"]
    assert [(e.clinic, (e.detail or "").split(":")[0]) for e in declines] == [
        (tiny, "privacy_budget_exhausted")
    ]
    reg = service.registry
    assert (
        reg.get_sample_value(
            "dermafed_clinic_declines_total", {"reason": "privacy_budget_exhausted"}
        )
        == 1
    )
    # The clinic stays connected and says it is out of budget, in both services' metrics.
    agent = federation.agents[tiny]
    assert agent.agent.privacy.status.status == "exhausted"
    assert agent.registry.get_sample_value("dermafed_agent_epsilon_remaining") < eps_max / 2
    coord = service.coordinator
    assert coord.wait_until(
        lambda: (reg.get_sample_value("dermafed_clinic_epsilon_spent", {"clinic": tiny}) or 0) > 0,
        10,
    )
    clinics = {c.clinic: c for c in coord.list_clinics()}
    assert clinics[tiny].connected and clinics[tiny].declines == 1
    assert clinics[tiny].epsilon_spent is not None and clinics[tiny].epsilon_spent > 0
    for name in set(CLINICS) - {tiny}:
        spent = PrivacyLedger(federation.tmp / f"{name}-state" / "privacy_ledger.jsonl")
        assert len(spent.entries()) == 2  # charged for both rounds they trained in


def test_a_plan_asking_for_less_noise_than_the_clinic_floor_is_declined(federation):
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2, start_when_connected=3, max_rounds=1, train_deadline_s=60.0
        ),
        plan=PlanSection(local_epochs=1, batch_size=8, dp_noise_multiplier=0.1),
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        federation.start_agent(name)
    federation.wait_rounds(1, timeout=120)
    rec = service.ledger.round(1)
    assert rec is not None and rec.outcome == "aborted"
    reasons = {
        (e.detail or "").split(":")[0]
        for e in service.ledger.clinic_events(round=1)
        if e.event == "declined"
    }
    assert reasons == {"noise_below_floor"}
    for name in CLINICS:  # nothing was charged for a round nobody trained in
        assert (
            PrivacyLedger(federation.tmp / f"{name}-state" / "privacy_ledger.jsonl").entries() == []
        )


def test_a_corrupted_privacy_ledger_makes_the_clinic_refuse_to_train(federation, capsys):
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2, start_when_connected=3, max_rounds=2, train_deadline_s=60.0
        ),
        plan=PlanSection(local_epochs=1, batch_size=8),
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        federation.start_agent(name)
    federation.wait_rounds(1, timeout=120)
    victim = federation.tmp / "clinic-b-state" / "privacy_ledger.jsonl"
    text = victim.read_text()
    victim.write_text(text.replace('"steps":', '"steps": 1, "x":', 1))  # tampered
    federation.wait_rounds(2, timeout=120)
    events = [
        (e.clinic, (e.detail or "").split(":")[0])
        for e in service.ledger.clinic_events(round=2)
        if e.event == "declined"
    ]
    assert events == [("clinic-b", "privacy_ledger_error")]
    assert federation.agents["clinic-b"].agent.privacy.status.status == "ledger_error"
    # The privacy officer's view says why, and exits non-zero.
    from dermafed.cli import main

    clinic_toml = federation.tmp / "clinic-b.toml"
    pair = federation.pki.clinics["clinic-b"]
    write_toml(
        clinic_toml,
        {
            "federation": federation.pki.federation,
            "aggregator": {"address": f"localhost:{service.port}"},
            "tls": {"ca_cert": federation.pki.ca_cert, "cert": pair.cert, "key": pair.key},
            "data": {"path": federation.shards["clinic-b"]},
            "storage": {"state_dir": federation.tmp / "clinic-b-state"},
        },
    )
    capsys.readouterr()
    assert main(["agent", "privacy", "--config", str(clinic_toml)]) == 1
    assert "integrity check" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("max_grad_norm", 0.0),
        ("delta", 1.0),
        ("delta", 1.5),
        ("epsilon_max", 0.0),
    ],
)
def test_settings_that_cannot_give_the_guarantee_are_refused_at_start(tmp_path, key, value):
    from clinic_agent.config import load_clinic_config

    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "clinic.toml"
    write_toml(
        cfg,
        {
            "federation": "f",
            "aggregator": {"address": "localhost:1"},
            "tls": {"ca_cert": "ca.crt", "cert": "c.crt", "key": "c.key"},
            "data": {"path": "data"},
            "storage": {"state_dir": "state"},
            "privacy": {key: value},
        },
    )
    with pytest.raises(ConfigError, match=rf"^privacy\.{key}"):
        load_clinic_config(cfg, env={})


@pytest.mark.system
def test_spent_epsilon_survives_sigkill_between_training_and_upload(federation, tmp_path):
    """The agent is killed after it charged the round but before its upload landed."""
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            aggregation="plain", min_clinics=1, start_when_connected=1, train_deadline_s=120.0
        ),
        # Many local epochs: training takes long enough for the kill to land inside it.
        plan=PlanSection(local_epochs=40, batch_size=8),
    )
    service = federation.start_aggregator(cfg)
    pair = federation.pki.clinics["clinic-a"]
    state = tmp_path / "agent-state"
    clinic_toml = tmp_path / "clinic-a.toml"
    write_toml(
        clinic_toml,
        {
            "federation": federation.pki.federation,
            "aggregator": {"address": f"localhost:{service.port}"},
            "tls": {"ca_cert": federation.pki.ca_cert, "cert": pair.cert, "key": pair.key},
            "data": {"path": federation.shards["clinic-a"]},
            "storage": {"state_dir": state},
            # Every case trains: with an evaluation slice 30 images fall below DP's minimum.
            "evaluation": {"max_cases": 0},
            "training": {"threads": 1},
            "network": {"poll_wait_s": 1.0},
            "privacy": {"epsilon_max": 1000.0},
        },
    )
    ledger_path = state / "privacy_ledger.jsonl"
    cmd = [sys.executable, "-m", "dermafed.cli", "agent", "run", "--config", str(clinic_toml)]
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ledger_path.exists() and '"round":1' in ledger_path.read_text().replace(" ", ""):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the agent never charged round 1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    # Nothing reached the aggregator, yet the spending is on disk and intact.
    assert not [e for e in service.ledger.clinic_events(round=1) if e.event == "contributed"]
    entries = PrivacyLedger(ledger_path, create=False).entries()
    assert [e.round for e in entries] == [1]
    assert entries[0].epsilon_after > 0
    summary = json.loads(
        subprocess.run(
            [*cmd[:4], "privacy", "--config", str(clinic_toml), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert summary["epsilon_spent"] == pytest.approx(entries[0].epsilon_after, rel=1e-6)


def test_clinic_level_noise_is_added_accounted_and_enforced(federation: Federation):
    """Distributed DP: each survivor adds N(0, (zC)^2/t); a clinic demanding more declines."""
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2,
            start_when_connected=3,
            max_rounds=1,
            train_deadline_s=60.0,
            secagg_stage_deadline_s=15.0,
        ),
        plan=PlanSection(
            local_epochs=1, batch_size=8, delta_clip_norm=1.0, clinic_noise_multiplier=0.5
        ),
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        ccfg = federation.clinic_config(name)
        if name == "clinic-c":  # its privacy officer requires more clinic-level noise
            ccfg = replace(ccfg, privacy=PrivacyConfig(clinic_noise_multiplier=2.0))
        federation.start_agent(name, ccfg)
    federation.wait_rounds(1, timeout=120)
    rec = service.ledger.round(1)
    assert rec is not None and rec.outcome == "published"
    assert sorted(rec.contributors) == ["clinic-a", "clinic-b"]
    declines = [
        (e.clinic, (e.detail or "").split(":")[0])
        for e in service.ledger.clinic_events(round=1)
        if e.event == "declined"
    ]
    assert declines == [("clinic-c", "noise_below_floor")]
    # The plan sized the quantization for the noised norm, not the bare clip bound.
    assert rec.plan["upload_norm_bound"] > 10 * rec.plan["delta_clip_norm"]
    # The published update carries the noise: its norm is about z*C*sqrt(d)/sqrt(t) / 2.
    coord = service.coordinator
    before, _ = coord.store.load(rec.parent)
    after, _ = coord.store.load(rec.checkpoint)
    delta = np.concatenate([(after[k] - before[k]).numpy().ravel() for k in before])
    d, t = delta.size, rec.plan["threshold"]
    expected = 0.5 * 1.0 * np.sqrt(d / t) * np.sqrt(2) / 2  # two survivors, mean of two
    assert 0.7 * expected < np.linalg.norm(delta) < 1.3 * expected + 1.0
    for name in ("clinic-a", "clinic-b"):
        entries = PrivacyLedger(federation.tmp / f"{name}-state" / "privacy_ledger.jsonl").entries()
        assert [e.clinic_noise_multiplier for e in entries] == [0.5]

"""Secure federated evaluation through the real services over mutual TLS.

Three clinics with evaluation slices train two secure rounds; round 2's candidate is
scored by every contributor on its slice and the counts are summed by a second secure
session. The tests check the sum against what each clinic computes on its own, that the
gate pools it with the held-out evidence, that a clinic vanishing mid-evaluation costs
only its counts, and that a clinic lying with out-of-range counts gets the candidate
rejected by a named check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from federation_harness import CLINICS, Federation, make_shards
from pki_fixtures import make_federation

from aggregator.config import PlanSection, RoundsSection, ValidationSection
from aggregator.ledger import RoundRecord
from clinic_agent.config import EvaluationSection
from common.datasets import CLASSES
from common.federated_eval import COUNT_SPEC
from dermafed.cli import main
from dermafed.v1 import federation_pb2

EVAL_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    # 60 images a clinic: a slice of a fifth of the lesions leaves enough to train on.
    shards, holdout = make_shards(tmp_path, per_clinic=60)
    federation = Federation(tmp_path, make_federation(tmp_path / "pki"), shards, holdout)
    try:
        yield federation
    finally:
        federation.stop()


def _start(fed: Federation, **validation: object) -> None:
    config = fed.aggregator_config(
        rounds=RoundsSection(
            aggregation="secure",
            min_clinics=2,
            start_when_connected=3,
            max_rounds=2,
            train_deadline_s=60.0,
            secagg_stage_deadline_s=6.0,
            evaluation_deadline_s=60.0,
        ),
        plan=PlanSection(local_epochs=1, batch_size=8, delta_clip_norm=5.0),
        # Compare with the published model from round 2 on, even a near-chance one, so
        # round 2's candidate is evaluated (round 1's is judged against the initial model).
        validation=ValidationSection(
            holdout=fed.holdout, rule="harm", chance_margin=-1.0, **validation
        ),
    )
    fed.start_aggregator(config)
    for name in CLINICS:
        fed.start_agent(name, fed.clinic_config(name, evaluation=EvaluationSection(max_cases=12)))


def _vanish_in_evaluation(fed: Federation, clinic: str, stage: str) -> None:
    """Make ``clinic`` disappear when its evaluation session reaches ``stage``."""
    agent = fed.agents[clinic].agent
    original = agent.evaluation.step

    def step(plan, task):
        if task.stage == stage:
            agent.stop_event.set()
            agent.client.close()
            return None
        return original(plan, task)

    agent.evaluation.step = step  # type: ignore[method-assign]


def _decided_round_two(fed: Federation) -> tuple[RoundRecord, dict[str, Any]]:
    """Round 2 once decided, and what its federated evaluation left in the ledger."""
    fed.wait_rounds(2, timeout=240)
    assert fed.service is not None
    rec = fed.service.ledger.round(2)
    assert rec is not None and rec.outcome in ("published", "rejected"), rec
    assert rec.metrics is not None
    return rec, rec.metrics["federated_evaluation"]


def _eval_plan(parent: str, candidate: str) -> federation_pb2.RoundPlan:
    return federation_pb2.RoundPlan(
        parent_checkpoint=parent, candidate_checkpoint=candidate, evaluation_max_cases=500
    )


def test_clinics_evaluate_the_candidate_and_the_gate_pools_their_counts(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    _start(fed)
    rec, summary = _decided_round_two(fed)
    assert fed.service is not None and rec.metrics is not None
    ledger = fed.service.ledger
    assert summary["contributors"] == 3 and summary["note"] == ""

    # The secure sum is exactly the sum of what each clinic computes on its own slice.
    plan = _eval_plan(rec.parent, rec.checkpoint)
    own = [fed.agents[name].agent.evaluation_counts(plan) for name in CLINICS]
    assert all(c is not None and c.cases > 0 for c in own)
    expected = np.sum([c.to_vector() for c in own if c is not None], axis=0)
    assert summary["cases"] == sum(c.cases for c in own if c is not None)
    assert summary["paired"] == expected[: 4 * len(CLASSES)].reshape(-1, 4).tolist()

    # The gate's tables are the held-out set's plus the federation's.
    evaluator = fed.service.coordinator.evaluator
    assert evaluator is not None
    checks = rec.metrics["gate"]["checks"]
    for index, name in enumerate(CLASSES):
        if name in checks:
            holdout_n = int((evaluator.labels == index).sum())
            assert checks[name]["n"] == holdout_n + summary["paired"][index][0]

    registry = fed.service.registry
    assert registry.get_sample_value("dermafed_federated_evaluation_cases") == summary["cases"]
    assert registry.get_sample_value("dermafed_federated_evaluation_contributors") == 3
    stages = dict(ledger.round(2).stages)  # type: ignore[union-attr]
    assert all(f"evaluate_{s}" in stages for s in EVAL_STAGES), stages
    for name in CLINICS:
        agent = fed.agents[name].agent
        # An evaluation is not a round: it must not move the agent's round bookkeeping.
        assert agent.last_round == 2
        value = fed.agents[name].registry.get_sample_value(
            "dermafed_agent_evaluations_total", {"result": "contributed"}
        )
        assert value == 1.0
        train, held = agent._records()
        assert held and not {r.lesion_id for r in train} & {r.lesion_id for r in held}
        assert agent.slice_path.exists()

    # The operator sees how much evidence beyond the held-out set the decision had.
    cfg = fed.write_admin_toml(tmp_path / "admin.toml")
    capsys.readouterr()
    assert main(["admin", "--config", str(cfg), "gate", "2"]) == 0
    out = capsys.readouterr().out
    assert (
        f"the held-out set + {summary['cases']} cases from 3 clinics' slices (secure federated "
        "evaluation)" in out
    )


def test_a_clinic_vanishing_mid_evaluation_costs_only_its_counts(fed: Federation):
    _start(fed)
    _vanish_in_evaluation(fed, "clinic-c", "share_keys")
    rec, summary = _decided_round_two(fed)
    assert fed.service is not None and rec.metrics is not None
    assert summary["contributors"] == 2 and summary["note"] == ""
    plan = _eval_plan(rec.parent, rec.checkpoint)
    survivors = [fed.agents[n].agent.evaluation_counts(plan) for n in ("clinic-a", "clinic-b")]
    assert summary["cases"] == sum(c.cases for c in survivors if c is not None)
    events = {(e.clinic, e.event, e.detail) for e in fed.service.ledger.clinic_events(round=2)}
    assert ("clinic-c", "dropped", "silent in stage evaluate_share_keys") in events


def test_an_evaluation_that_loses_too_many_clinics_leaves_the_decision_to_the_holdout(
    fed: Federation,
):
    _start(fed)
    for name in ("clinic-b", "clinic-c"):  # 1 of 3 left: below the threshold of 2
        _vanish_in_evaluation(fed, name, "share_keys")
    rec, summary = _decided_round_two(fed)
    assert fed.service is not None and rec.metrics is not None
    assert summary["contributors"] == 0 and "cases" not in summary
    assert summary["note"].startswith("federated evaluation aborted: only 1 clinic(s) left")
    assert "[federated evaluation aborted" in rec.metrics["gate"]["reason"]
    # The decision stands on the held-out set alone: its tables have only its own cases.
    evaluator = fed.service.coordinator.evaluator
    assert evaluator is not None
    for index, name in enumerate(CLASSES):
        check = rec.metrics["gate"]["checks"].get(name)
        if check is not None:
            assert check["n"] == int((evaluator.labels == index).sum())


def test_a_clinic_sending_negative_counts_gets_the_candidate_rejected(fed: Federation):
    _start(fed)
    liar = fed.agents["clinic-b"].agent

    def counts(plan):
        # "Minus 1000" in the ring: it would cancel the others' counts of class 0.
        vector = np.zeros(COUNT_SPEC.numel, dtype=np.uint32)
        vector[0] = 2**32 - 1000
        return SimpleNamespace(cases=1, to_vector=lambda: vector)

    liar.evaluation_counts = counts  # type: ignore[method-assign]
    fed.wait_rounds(2, timeout=240)
    assert fed.service is not None
    rec = fed.service.ledger.round(2)
    assert rec is not None and rec.outcome == "rejected", rec
    assert "federated evaluation count sum failed the bound check" in rec.reason
    assert fed.service.coordinator.published[1] == 1
    failures = fed.service.registry.get_sample_value(
        "dermafed_sum_check_failures_total", {"check": "count_bound"}
    )
    assert failures == 1.0


def test_an_operator_abort_during_evaluation_ends_the_round_and_keeps_the_candidate(
    fed: Federation,
):
    _start(fed)
    slow = fed.agents["clinic-a"].agent
    original = slow.evaluation_counts

    def counts(plan):
        time.sleep(3.0)  # keeps the evaluation's first stage open long enough to abort it
        return original(plan)

    slow.evaluation_counts = counts  # type: ignore[method-assign]
    assert fed.service is not None
    coord = fed.service.coordinator

    def evaluating() -> bool:
        current = coord.status().current
        return current is not None and current.state.startswith("evaluate_")

    assert coord.wait_until(evaluating, 240), coord.status()
    coord.abort_round(2, "operator test", actor="alice")
    fed.wait_rounds(2, timeout=60)
    rec = fed.service.ledger.round(2)
    assert rec is not None and rec.outcome == "aborted" and "operator test" in rec.reason
    # The formed candidate is recorded (unpublished), and round 1's model stays published.
    assert rec.checkpoint and coord.store.exists(rec.checkpoint)
    assert rec.checkpoint in {c.id for c in fed.service.ledger.checkpoints(limit=10)}
    assert coord.published[1] == 1

"""The clinic's evaluation runner on its own: which sessions it answers, and how it
declines the others (the secure session itself runs in test_federated_evaluation.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from clinic_agent.evaluation_rounds import NO_SLICE, NOT_CONTRIBUTED, EvaluationRounds
from clinic_agent.metrics import AgentMetrics
from common.federated_eval import evaluation_session
from dermafed.v1 import federation_pb2

PARENT, CANDIDATE = "p" * 64, "c" * 64


class FakeClient:
    def __init__(self) -> None:
        self.declines: list[tuple[int, str]] = []
        self.advertised: list[int] = []

    def decline(self, number: int, reason: str, detail: str) -> None:
        self.declines.append((number, reason))

    def advertise_keys(self, number: int, *_: Any) -> None:
        self.advertised.append(number)


class Host:
    """Stands in for ClinicAgent: what it contributed to, and what its slice holds."""

    def __init__(self, contributed: tuple[int, str], counts: Any = None) -> None:
        self.config = SimpleNamespace()
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.client = FakeClient()
        self.clinic_id = "clinic-a"
        self.contributed, self.counts, self.scored = contributed, counts, 0

    def may_evaluate(self, round_number: int, parent: str) -> bool:
        return (round_number, parent) == self.contributed

    def evaluation_counts(self, plan: federation_pb2.RoundPlan) -> Any:
        self.scored += 1
        return self.counts


def _advertise(runner: EvaluationRounds, round_number: int, parent: str = PARENT) -> None:
    plan = federation_pb2.RoundPlan(
        round=evaluation_session(round_number),
        parent_checkpoint=parent,
        candidate_checkpoint=CANDIDATE,
        evaluation_max_cases=500,
    )
    runner.step(plan, federation_pb2.SecAggTask(stage="advertise"))


def test_a_clinic_scores_only_the_round_it_trained_in_from_the_model_it_trained_from():
    host = Host(contributed=(3, PARENT))
    runner = EvaluationRounds(host, identity=None)  # type: ignore[arg-type]
    _advertise(runner, 2)  # a round it did not train in
    _advertise(runner, 3, parent="x" * 64)  # its round, from another parent
    assert host.scored == 0 and host.client.advertised == []
    assert host.client.declines == [
        (evaluation_session(2), NOT_CONTRIBUTED),
        (evaluation_session(3), NOT_CONTRIBUTED),
    ]
    # Each session is answered once: asking again gets nothing, not a second decline.
    _advertise(runner, 2)
    assert len(host.client.declines) == 2
    declined = host.registry.get_sample_value(
        "dermafed_agent_evaluations_total", {"result": "declined"}
    )
    assert declined == 2


def test_a_clinic_without_a_slice_declines_saying_so():
    host = Host(contributed=(3, PARENT), counts=None)
    runner = EvaluationRounds(host, identity=None)  # type: ignore[arg-type]
    _advertise(runner, 3)
    assert host.scored == 1
    assert host.client.declines == [(evaluation_session(3), NO_SLICE)]


def test_a_training_round_number_is_not_an_evaluation_session():
    host = Host(contributed=(3, PARENT))
    runner = EvaluationRounds(host, identity=None)  # type: ignore[arg-type]
    plan = federation_pb2.RoundPlan(round=3, candidate_checkpoint=CANDIDATE)
    runner.step(plan, federation_pb2.SecAggTask(stage="advertise"))
    assert host.scored == 0 and host.client.declines == []

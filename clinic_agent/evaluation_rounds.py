"""The clinic's side of a round's secure federated evaluation, one stage per poll.

When a secure round's candidate is formed, the aggregator asks the clinics that
contributed to score it and the published model on their evaluation slices
(:mod:`clinic_agent.eval_slice`) and to sum the counts with secure aggregation: a session
of its own with fresh keys, numbered apart from every training round
(:func:`common.federated_eval.evaluation_session`). What leaves the clinic is the masked
count vector (:class:`common.federated_eval.EvaluationCounts`); the aggregator can unmask
only the sum over at least ``threshold`` clinics.

An evaluation never touches the training bookkeeping: it spends no privacy budget (the
slice is never trained on) and it does not move ``last_round``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import grpc

from clinic_agent.client import RETRYABLE, FederationClient
from clinic_agent.config import ClinicConfig
from clinic_agent.metrics import AgentMetrics
from clinic_agent.secagg_client import SecAggClient
from clinic_agent.secure_rounds import SigningIdentity, answer_stage
from common.federated_eval import COUNT_SPEC, EvaluationCounts, evaluated_round
from common.secagg.messages import SecAggProtocolError, SharesForRecipient
from dermafed.v1 import federation_pb2

log = logging.getLogger("dermafed.agent")

#: Decline reasons: a clinic without an evaluation slice; a session for a round (or from a
#: parent) this clinic did not train in.
NO_SLICE = "no_evaluation_slice"
NOT_CONTRIBUTED = "not_a_contributor"


class EvaluationHost(Protocol):
    """What an evaluation needs from the agent that runs it (``ClinicAgent``)."""

    config: ClinicConfig
    metrics: AgentMetrics
    client: FederationClient
    clinic_id: str

    def evaluation_counts(self, plan: federation_pb2.RoundPlan) -> EvaluationCounts | None:
        """Both models' counts on the slice (at most the plan's cases); None: no slice."""
        ...

    def may_evaluate(self, round_number: int, parent: str) -> bool:
        """Whether this clinic contributed to ``round_number``, trained from ``parent``."""
        ...


@dataclass
class _Session:
    number: int
    client: SecAggClient
    counts: EvaluationCounts


class EvaluationRounds:
    def __init__(self, agent: EvaluationHost, identity: SigningIdentity) -> None:
        self.agent = agent
        self.identity = identity
        self._session: _Session | None = None
        # Sessions this agent is done with (finished, declined or left): never re-entered.
        self._finished: set[int] = set()

    def step(self, plan: federation_pb2.RoundPlan, task: federation_pb2.SecAggTask) -> None:
        """Do what the current stage of the evaluation session asks."""
        agent = self.agent
        number = int(plan.round)
        evaluated = evaluated_round(number)
        if evaluated is None or not plan.candidate_checkpoint:
            log.error("session %d is not an evaluation session; ignoring the task", number)
            return
        if number in self._finished:
            return
        session = self._session if self._session and self._session.number == number else None
        try:
            if task.stage == "advertise":
                if session is None:
                    session = self._open(plan, evaluated)
                    if session is None:
                        return
                adv = session.client.advertise()  # a retry: same keys, same signature
                agent.client.advertise_keys(
                    number, adv.cipher_public_key, adv.mask_public_key, adv.signature
                )
                return
            if session is None:
                # Keys lost (a restart mid-session): the others finish without us.
                log.warning("round %d's evaluation: no keys for stage %s", evaluated, task.stage)
                self._finished.add(number)
                return
            if task.stage == "masked_input":
                delivery = SharesForRecipient(
                    number, agent.clinic_id, {s.peer: s.ciphertext for s in task.shares}
                )
                masked = session.client.masked_integers(delivery, session.counts.to_vector())
                agent.client.upload_masked(
                    round_number=number,
                    specs=(COUNT_SPEC,),
                    chunks=masked.chunk_bytes(),
                    total_bytes=masked.nbytes,
                    train_seconds=0.0,
                )
            elif answer_stage(agent.client, session.client, number, task):
                self._end(number, "contributed")
                log.info(
                    "round %d: evaluated the candidate on %d case(s)",
                    evaluated,
                    session.counts.cases,
                )
        except SecAggProtocolError as exc:
            log.error("round %d's evaluation: leaving the secure session: %s", evaluated, exc)
            self._end(number, "refused")
        except grpc.RpcError as exc:
            level = logging.INFO if exc.code() in RETRYABLE else logging.WARNING
            log.log(level, "round %d's evaluation: %s: %s", evaluated, exc.code(), exc.details())
            if exc.code() not in RETRYABLE:
                self._end(number, "failed")
        except Exception as exc:
            log.error("round %d's evaluation failed locally: %s", evaluated, exc, exc_info=exc)
            self._end(number, "failed")

    def _open(self, plan: federation_pb2.RoundPlan, evaluated: int) -> _Session | None:
        agent = self.agent
        number = int(plan.round)
        if not agent.may_evaluate(evaluated, plan.parent_checkpoint):
            log.warning(
                "round %d's evaluation: this clinic did not contribute to that round from "
                "checkpoint %s; declining",
                evaluated,
                plan.parent_checkpoint[:12],
            )
            self._decline(number, NOT_CONTRIBUTED, "not a contributor to the evaluated round")
            return None
        counts = agent.evaluation_counts(plan)
        if counts is None or counts.cases == 0:
            log.info("round %d's evaluation: no evaluation slice; declining", evaluated)
            self._decline(number, NO_SLICE, "this clinic keeps no evaluation slice")
            return None
        self._session = _Session(number, self.identity.session(plan, agent.clinic_id), counts)
        return self._session

    def _decline(self, number: int, reason: str, detail: str) -> None:
        self._end(number, "declined")
        try:
            self.agent.client.decline(number, reason, detail)
        except grpc.RpcError as exc:
            log.warning("could not deliver the evaluation decline: %s", exc.details())

    def _end(self, number: int, result: str) -> None:
        self.agent.metrics.evaluations.labels(result=result).inc()
        self._finished.add(number)
        if self._session is not None and self._session.number == number:
            self._session = None

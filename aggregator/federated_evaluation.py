"""Secure federated evaluation of a round's candidate, as the coordinator runs it.

After a secure round's sum passes its checks and the candidate is formed and scored on
the held-out set, the clinics that contributed score the candidate and the published
model on their own evaluation slices. Their count vectors (:mod:`common.federated_eval`)
are summed by a second secure-aggregation session with fresh keys; the aggregator learns
only the federation-wide counts of the clinics that finished, and the gate pools them
with the held-out set's. This module builds that session and turns its sum into gate
evidence; the coordinator drives it through the same stage loop as a training round.

When the session cannot run (fewer contributors than a safe threshold) or aborts (too
many clinics vanish), the decision falls back to the held-out evidence and says so; a
count sum that fails its checks rejects the candidate (:class:`CountCheckError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from aggregator.domain import RoundPlan, RunningRound
from aggregator.gate import PairedEvidence
from aggregator.gate_stats import PairedCounts
from aggregator.round_modes import SecureMode
from aggregator.rounds import Round
from aggregator.secagg_server import SecAggServer
from common.datasets import CLASSES
from common.federated_eval import (
    COUNT_SPEC,
    EvaluationCounts,
    decode_sum,
    evaluation_session,
)
from common.secagg.messages import STAGE_ADVERTISE, minimum_threshold


def evaluation_threshold(contributors: int, min_clinics: int) -> int | None:
    """The session's threshold, or None when too few contributors remain to hide one
    clinic's counts in a sum (secure aggregation needs at least two, and 2t > n)."""
    if contributors < 2:
        return None
    threshold = max(min_clinics, minimum_threshold(contributors))
    return threshold if threshold <= contributors else None


def start_evaluation(
    *,
    training: RunningRound,
    cohort: Sequence[str],
    candidate: str,
    threshold: int,
    max_cases: int,
    ca_cert: x509.Certificate,
    first_stage_s: float,
    stage_s: float,
    max_bytes: int,
    now: float,
    clock: Callable[[], float],
) -> RunningRound:
    """The evaluation session of ``training``'s round, started at ``now``."""
    st = training.state
    session = evaluation_session(st.number)
    cohort = sorted(cohort)
    plan = RoundPlan(
        round=session,
        parent_checkpoint=st.parent,
        local_epochs=0,
        optimizer="",
        learning_rate=0.0,
        fedprox_mu=0.0,
        batch_size=0,
        delta_clip_norm=0.0,
        aggregation="secure",
        min_clinics=threshold,
        cohort=tuple(cohort),
        federation=training.plan.federation,
        threshold=threshold,
        candidate_checkpoint=candidate,
        evaluation_max_cases=max_cases,
    )
    server = SecAggServer(
        plan.federation,
        session,
        cohort,
        threshold,
        COUNT_SPEC.numel,
        None,
        ca_cert,
        now=lambda: datetime.fromtimestamp(clock(), UTC),
    )
    mode = SecureMode(server, (COUNT_SPEC,), max_bytes)
    timeouts = {stage: stage_s for stage in mode.stages}
    timeouts[STAGE_ADVERTISE] = first_stage_s
    state = Round.start(
        number=session,
        parent=st.parent,
        cohort=cohort,
        min_clinics=threshold,
        stages=mode.stages,
        stage_timeouts=timeouts,
        now=now,
    )
    return RunningRound(state, plan, mode)


def summed_counts(evaluation: RunningRound) -> tuple[EvaluationCounts, tuple[str, ...]]:
    """Unmask the session's sum and check it (:class:`CountCheckError` on failure); with
    the clinics whose counts are in it."""
    mode = evaluation.mode
    if not isinstance(mode, SecureMode):
        raise TypeError("an evaluation session is a secure one")
    summed = mode.server.finalize_ring()
    contributors = tuple(sorted(mode.server.participants.get("U3", ())))
    counts = decode_sum(
        summed,
        classes=len(CLASSES),
        contributors=max(1, len(contributors)),
        max_cases=evaluation.plan.evaluation_max_cases,
    )
    return counts, contributors


def evidence_of(counts: EvaluationCounts, classes: Sequence[str] = CLASSES) -> PairedEvidence:
    """The gate's paired tables from federated counts (pooled with others by ``+``)."""
    return PairedEvidence(
        {
            name: PairedCounts(c.n, c.both, c.candidate_only, c.published_only)
            for name, c in zip(classes, counts.paired, strict=True)
        }
    )


def summary(
    counts: EvaluationCounts | None, contributors: Sequence[str], note: str
) -> dict[str, Any]:
    """What the ledger keeps of an evaluation: totals only, never per-clinic values."""
    out: dict[str, Any] = {"contributors": len(contributors), "note": note}
    if counts is not None:
        out.update(counts.to_json())
        out["sensitivity"] = {
            name: {"candidate": t.candidate_sensitivity, "published": t.published_sensitivity}
            for name, t in evidence_of(counts).tables.items()
            if t.n
        }
    return out


__all__ = [
    "evaluation_threshold",
    "evidence_of",
    "start_evaluation",
    "summary",
    "summed_counts",
]

"""The aggregator's domain objects: round plans, tasks, reports and read-only views.

Plain data shared by the coordinator and the servicers (which translate them to and from
protobuf); no behaviour beyond small derived properties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aggregator.fedavg import AggregateResult
from aggregator.gate import PairedEvidence
from aggregator.ledger import RoundRecord
from aggregator.round_modes import RoundMode, SecAggStageData
from aggregator.rounds import Round
from common.secagg.quantize import QuantizationPlan


@dataclass(frozen=True)
class RoundPlan:
    """What a clinic is asked to do in a round (the domain twin of the proto message)."""

    round: int
    parent_checkpoint: str
    local_epochs: int
    optimizer: str
    learning_rate: float
    fedprox_mu: float
    batch_size: int
    delta_clip_norm: float
    aggregation: str
    min_clinics: int
    cohort: tuple[str, ...]
    federation: str
    stage_deadline: float = 0.0
    dp_noise_multiplier: float | None = None
    threshold: int = 0
    quantization: QuantizationPlan | None = None
    clinic_noise_multiplier: float = 0.0
    upload_norm_bound: float = 0.0
    # Evaluation sessions only (common/federated_eval.py): ``round`` is the session number.
    candidate_checkpoint: str = ""
    evaluation_max_cases: int = 0

    @property
    def is_evaluation(self) -> bool:
        return bool(self.candidate_checkpoint)

    def to_json(self) -> dict[str, object]:
        return {
            "round": self.round,
            "parent_checkpoint": self.parent_checkpoint,
            "local_epochs": self.local_epochs,
            "optimizer": self.optimizer,
            "learning_rate": self.learning_rate,
            "fedprox_mu": self.fedprox_mu,
            "batch_size": self.batch_size,
            "delta_clip_norm": self.delta_clip_norm,
            "aggregation": self.aggregation,
            "min_clinics": self.min_clinics,
            "dp_noise_multiplier": self.dp_noise_multiplier,
            "threshold": self.threshold,
            "clinic_noise_multiplier": self.clinic_noise_multiplier,
            "upload_norm_bound": self.upload_norm_bound,
            "quantization": None
            if self.quantization is None
            else {
                "clip_norm": self.quantization.clip_norm,
                "weight_max": self.quantization.weight_max,
                "max_clinics": self.quantization.max_clinics,
                "delta_scale": self.quantization.delta_scale,
                "weight_scale": self.quantization.weight_scale,
                "loss_max": self.quantization.loss_max,
                "loss_scale": self.quantization.loss_scale,
            },
        }


@dataclass(frozen=True)
class RoundTask:
    """The current stage of a round for one clinic: the plan plus the stage's inputs."""

    plan: RoundPlan
    stage: str
    secagg: SecAggStageData | None = None


@dataclass(frozen=True)
class PollResult:
    task: RoundTask | None
    published_checkpoint: str
    published_round: int


@dataclass(frozen=True)
class PrivacyReport:
    """A clinic's own account of its privacy budget (reported, not enforced, here)."""

    status: str
    epsilon_spent: float
    epsilon_max: float
    delta: float

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_max - self.epsilon_spent)


@dataclass
class ClinicInfo:
    clinic: str
    last_seen: float
    rounds_contributed: int = 0
    declines: int = 0
    last_decline_reason: str = ""
    privacy: PrivacyReport | None = None


@dataclass(frozen=True)
class PendingDecision:
    """A formed candidate waiting for its federated evaluation before the gate decides."""

    checkpoint: str
    result: AggregateResult
    sum_report: dict[str, float]
    metrics: dict[str, object] | None
    holdout_evidence: PairedEvidence | None
    predicted: np.ndarray | None
    aggregate_seconds: float
    validate_seconds: float


@dataclass
class RunningRound:
    state: Round
    plan: RoundPlan
    mode: RoundMode
    # Local training time each clinic reports, to split round time into training vs protocol.
    train_seconds: dict[str, float] = field(default_factory=dict)
    finalizing: bool = False
    # The round's secure federated evaluation (aggregator/federated_evaluation.py): the
    # candidate waiting for it, and the session while it runs (its own state and mode).
    pending: PendingDecision | None = None
    evaluation: RunningRound | None = None
    # Why the evaluation was skipped or ended without a usable sum ("" when it did not).
    evaluation_note: str = ""


@dataclass(frozen=True)
class RoundView:
    """A read-only summary for status calls (running or finished round)."""

    round: int
    state: str
    outcome: str
    reason: str
    parent_checkpoint: str
    checkpoint: str
    cohort: tuple[str, ...]
    contributors: tuple[str, ...]
    train_loss: float | None
    metrics: dict[str, object] | None
    started_at: float
    finished_at: float
    stage_seconds: dict[str, float]
    aggregation: str


@dataclass(frozen=True)
class CheckpointView:
    id: str
    round: int
    parent: str
    created_at: float
    metrics: dict[str, object] | None
    published: bool
    was_published: bool
    bytes: int


@dataclass(frozen=True)
class ClinicView:
    clinic: str
    connected: bool
    last_seen: float
    rounds_contributed: int
    declines: int
    dropouts: int
    last_decline_reason: str
    epsilon_spent: float | None
    epsilon_remaining: float | None
    # The highest epsilon spent this identity has reported; a report below it is refused.
    epsilon_floor: float | None = None
    privacy_reset: bool = False  # refused now: reported less than epsilon_floor
    excluded_reason: str | None = None  # excluded by the operator, with the reason


@dataclass(frozen=True)
class StatusView:
    federation: str
    published_checkpoint: str
    published_round: int
    current: RoundView | None
    last: RoundView | None
    connected: tuple[str, ...]
    rounds_completed: int
    max_rounds: int
    # Earliest start the interval allows (Unix seconds); None while a round runs, once
    # max_rounds is reached, or when the next round may start as soon as clinics connect.
    next_round_at: float | None = None


def view_of_record(rec: RoundRecord) -> RoundView:
    return RoundView(
        round=rec.number,
        state=rec.outcome or "running",
        outcome=rec.outcome or "",
        reason=rec.reason or "",
        parent_checkpoint=rec.parent,
        checkpoint=rec.checkpoint or "",
        cohort=tuple(rec.cohort),
        contributors=tuple(rec.contributors),
        train_loss=rec.train_loss,
        metrics=rec.metrics,
        started_at=rec.started_at,
        finished_at=rec.finished_at or 0.0,
        stage_seconds=dict(rec.stages),
        aggregation=rec.mode,
    )

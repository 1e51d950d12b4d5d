"""The clinic agent's configuration: one object, loaded once at start and validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from clinic_agent.privacy import PrivacyConfig
from clinic_agent.training import CLASS_WEIGHTING, DP_LOGIT_ADJUSTMENT
from common.config import (
    AggregatorSection,
    LoggingSection,
    MetricsSection,
    TlsSection,
    load_config,
    require,
)


@dataclass(frozen=True)
class DataSection:
    # HAM10000 layout, class-named folders, or an index CSV; re-read before every round.
    path: Path

    def validate(self) -> None:
        require(self.path.exists(), "data.path", f"{self.path} does not exist")


@dataclass(frozen=True)
class StorageSection:
    state_dir: Path

    @property
    def privacy_ledger(self) -> Path:
        return self.state_dir / "privacy_ledger.jsonl"


@dataclass(frozen=True)
class TrainingSection:
    threads: int = 0  # 0: let PyTorch decide
    # "logit_adjusted" (the measured recipe), "balanced", "sqrt" or "none".
    class_weighting: str = "logit_adjusted"
    # Per-batch augmentation; a model with a fixed front end (scatternet) trains on
    # features computed once per image and so always without it.
    augment: bool = True
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    # Under DP-SGD "logit_adjusted" uses the public HAM10000 prior at this strength (τ);
    # per-example clipping erases much of the adjustment, hence more than 1
    # (clinic_agent.training.DP_LOGIT_ADJUSTMENT).
    dp_logit_adjustment: float = DP_LOGIT_ADJUSTMENT

    def validate(self) -> None:
        require(self.threads >= 0, "training.threads", "must be >= 0")
        require(
            math.isfinite(self.dp_logit_adjustment) and self.dp_logit_adjustment >= 0,
            "training.dp_logit_adjustment",
            "must be a finite number >= 0",
        )
        require(
            self.class_weighting in CLASS_WEIGHTING,
            "training.class_weighting",
            f"must be one of {', '.join(CLASS_WEIGHTING)}",
        )
        require(0 <= self.momentum < 1, "training.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class NetworkSection:
    poll_wait_s: float = 20.0
    rpc_timeout_s: float = 30.0
    transfer_timeout_s: float = 600.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # How long the aggregator may keep refusing this clinic's certificate (revoked, or not
    # of this federation) before the agent stops with an error instead of retrying forever.
    give_up_unauthenticated_s: float = 600.0

    def validate(self) -> None:
        require(self.poll_wait_s > 0, "network.poll_wait_s", "must be positive")
        require(
            self.give_up_unauthenticated_s > 0,
            "network.give_up_unauthenticated_s",
            "must be positive",
        )
        require(self.rpc_timeout_s > 0, "network.rpc_timeout_s", "must be positive")
        require(self.transfer_timeout_s > 0, "network.transfer_timeout_s", "must be positive")
        require(
            0 < self.backoff_initial_s <= self.backoff_max_s,
            "network.backoff_initial_s",
            "must be positive and at most network.backoff_max_s",
        )


@dataclass(frozen=True)
class EvaluationSection:
    """The clinic's evaluation slice: lesions it never trains on, used to score each
    round's candidate for the aggregator's gate (only securely summed counts leave)."""

    # Share of the clinic's lesions held out, and the most images the slice may hold.
    # max_cases = 0: no slice, every case is trained on, and the clinic sits out
    # federated evaluation. The slice is chosen once and kept in storage.state_dir.
    fraction: float = 0.2
    max_cases: int = 200

    def validate(self) -> None:
        require(0.0 < self.fraction < 1.0, "evaluation.fraction", "must be in (0, 1)")
        require(self.max_cases >= 0, "evaluation.max_cases", "must be >= 0")


@dataclass(frozen=True)
class ClinicConfig:
    federation: str
    aggregator: AggregatorSection
    tls: TlsSection
    data: DataSection
    storage: StorageSection
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    # Record-level DP-SGD and the clinic's own budget (set by its privacy officer).
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    network: NetworkSection = field(default_factory=NetworkSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        require(bool(self.federation), "federation", "must not be empty")


def load_clinic_config(path: Path | None, **kwargs: object) -> ClinicConfig:
    return load_config(ClinicConfig, path, **kwargs)  # type: ignore[arg-type]

"""The aggregator's configuration: one object, loaded once at start and validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aggregator.gate import RULES, GateSettings
from aggregator.schedule import validate_schedule
from common.config import LoggingSection, MetricsSection, load_config, parse_hostport, require
from common.datasets import CLASSES
from common.model import DP_ARCH, RECIPE_PLANS, ModelConfig

AGGREGATION_MODES = ("plain", "secure")


@dataclass(frozen=True)
class ServerSection:
    listen: str = "0.0.0.0:7443"
    # When set, the bound port is written here (useful with port 0 in tests and the demo).
    port_file: str = ""
    # "HOST:PORT" serving only grpc.health.v1 in plaintext, for Kubernetes gRPC probes
    # (the kubelet cannot present a client certificate to the mTLS port). Empty: off.
    health_listen: str = ""
    # "HOST:PORT" serving the Admin API (mTLS, admin certificates) on its own gRPC server
    # and worker pool, so that no amount of clinic traffic delays or refuses an operator,
    # and the admin port need not face the internet. Empty: Admin shares server.listen.
    admin_listen: str = ""
    max_message_bytes: int = 4 * 1024 * 1024
    max_update_bytes: int = 512 * 1024 * 1024
    max_workers: int = 32
    # How long a Poll may be held open; agents ask for less, never more.
    max_poll_wait_s: float = 30.0
    # Uploads receiving at once; each holds one model-sized buffer until it is committed.
    max_concurrent_uploads: int = 8
    # An upload stream that sends nothing for this long is cancelled and its slot freed
    # (any chunk counts as progress). 0: never.
    upload_stall_s: float = 120.0
    # Every upload chunk but the last must carry at least this many bytes (agents send
    # 1 MiB): a stream of tiny messages costs the server per message, not per byte. 0: off.
    min_chunk_bytes: int = 65536
    # Serve gRPC server reflection on the mTLS port (for grpcurl while debugging; callers
    # still need a federation certificate). Off by default.
    reflection: bool = False

    def validate(self) -> None:
        parse_hostport(self.listen, "server.listen")
        if self.health_listen:
            parse_hostport(self.health_listen, "server.health_listen")
        if self.admin_listen:
            parse_hostport(self.admin_listen, "server.admin_listen")
        require(
            self.max_message_bytes >= 64 * 1024,
            "server.max_message_bytes",
            "must be at least 65536",
        )
        require(self.max_update_bytes > 0, "server.max_update_bytes", "must be positive")
        require(self.max_workers >= 4, "server.max_workers", "must be at least 4")
        require(self.max_poll_wait_s > 0, "server.max_poll_wait_s", "must be positive")
        require(
            self.max_concurrent_uploads >= 1, "server.max_concurrent_uploads", "must be at least 1"
        )
        require(self.upload_stall_s >= 0, "server.upload_stall_s", "must be >= 0 (0 = never)")
        require(self.min_chunk_bytes >= 0, "server.min_chunk_bytes", "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class TlsSection:
    ca_cert: Path
    cert: Path
    key: Path
    # X.509 CRL signed by the federation CA; re-read when it changes, no restart needed.
    crl: Path | None = None

    def validate(self) -> None:
        for name in ("ca_cert", "cert", "key"):
            path = getattr(self, name)
            require(path.is_file(), f"tls.{name}", f"file {path} does not exist")


@dataclass(frozen=True)
class StorageSection:
    state_dir: Path
    # Checkpoint files kept besides every checkpoint ever published (which a rollback can
    # target, so they are never removed): the newest N others, mostly rejected candidates
    # kept for inspection. 0 keeps every file.
    keep_checkpoints: int = 20

    def validate(self) -> None:
        require(self.keep_checkpoints >= 0, "storage.keep_checkpoints", "must be >= 0")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"


@dataclass(frozen=True)
class ModelSection:
    # The DP recipe's model, as clinics train with DP-SGD unless their officer turns it off.
    arch: str = DP_ARCH
    input_size: int = RECIPE_PLANS[DP_ARCH].input_size
    width: int = 24
    dropout: float = 0.1
    seed: int = 0

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(
            arch=self.arch, input_size=self.input_size, width=self.width, dropout=self.dropout
        )

    def validate(self) -> None:
        require(self.input_size >= 16, "model.input_size", "must be at least 16")
        require(self.width >= 4, "model.width", "must be at least 4")
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class RoundsSection:
    aggregation: str = "secure"
    min_clinics: int = 2
    max_cohort: int = 100
    # Wait until this many clinics are connected before starting a round (0: min_clinics).
    start_when_connected: int = 0
    # Seconds between the end of one round and the start of the next.
    interval_s: float = 0.0
    # After an aborted round, wait at least this long before the next one, so a federation
    # whose clinics all decline (e.g. budgets spent) does not spin through empty rounds.
    retry_after_abort_s: float = 30.0
    # Stop scheduling after this many finished rounds (0: run forever).
    max_rounds: int = 0
    # A clinic counts as connected if it polled within this many seconds.
    connected_timeout_s: float = 30.0
    train_deadline_s: float = 1800.0
    # Deadline of each secure-aggregation stage other than the masked input (which
    # includes local training and uses train_deadline_s).
    secagg_stage_deadline_s: float = 60.0
    # First stage of a round's secure evaluation: clinics download the candidate and score
    # it and the published model on their evaluation slices (validation.federated_evaluation).
    evaluation_deadline_s: float = 300.0
    seed: int = 0

    def validate(self) -> None:
        require(
            self.aggregation in AGGREGATION_MODES,
            "rounds.aggregation",
            f"must be one of {', '.join(AGGREGATION_MODES)}",
        )
        require(self.min_clinics >= 1, "rounds.min_clinics", "must be at least 1")
        require(
            self.max_cohort >= self.min_clinics,
            "rounds.max_cohort",
            "must be at least rounds.min_clinics",
        )
        require(self.start_when_connected >= 0, "rounds.start_when_connected", "must be >= 0")
        require(self.interval_s >= 0, "rounds.interval_s", "must be >= 0")
        require(self.retry_after_abort_s >= 0, "rounds.retry_after_abort_s", "must be >= 0")
        require(self.max_rounds >= 0, "rounds.max_rounds", "must be >= 0")
        require(self.connected_timeout_s > 0, "rounds.connected_timeout_s", "must be positive")
        require(self.train_deadline_s > 0, "rounds.train_deadline_s", "must be positive")
        require(
            self.secagg_stage_deadline_s > 0, "rounds.secagg_stage_deadline_s", "must be positive"
        )
        require(self.evaluation_deadline_s > 0, "rounds.evaluation_deadline_s", "must be positive")


@dataclass(frozen=True)
class PlanSection:
    """Training settings sent to every clinic in a round plan."""

    local_epochs: int = 1
    optimizer: str = "adam"
    # The base rate; lr_schedule decays it across rounds (benchmarks/quality.py). The
    # defaults are the DP recipe's (RECIPE_PLANS, like [model]); a federation of clinics
    # without DP trains efficientnet_lite0 at 0.0001 with batches of 32 (README).
    learning_rate: float = RECIPE_PLANS[DP_ARCH].learning_rate
    lr_schedule: str = "cosine"
    # Rounds over which the schedule decays to lr_min_factor x the base rate; it then
    # stays there (a federation that keeps running keeps fine-tuning).
    lr_horizon_rounds: int = 30
    lr_min_factor: float = 0.1
    fedprox_mu: float = 0.0
    # A clinic with fewer local examples than the batch declines DP rounds (it would
    # sample all of them every step); such a federation lowers it.
    batch_size: int = RECIPE_PLANS[DP_ARCH].batch_size
    # L2 bound on each clinic's whole delta; bounds each clinic's influence and, in secure
    # rounds, the quantization range (0 = unclipped, plain rounds only).
    delta_clip_norm: float = 10.0
    # Secure rounds: the largest FedAvg weight (local example count) a clinic may claim;
    # larger counts are capped. The weighted mean's rounding error grows with it.
    weight_max: float = 10000.0
    # Secure rounds: the training loss travels masked next to the weight, clamped to this.
    loss_max: float = 20.0
    # Proposed DP-SGD noise multiplier (0: leave it to each clinic's own setting).
    dp_noise_multiplier: float = 0.0
    # Clinic-level (distributed) DP: noise multiplier z on each clipped delta, calibrated
    # so any t survivors together carry N(0, (z·C)²). 0: off. Needs delta_clip_norm > 0.
    clinic_noise_multiplier: float = 0.0

    def validate(self) -> None:
        require(self.dp_noise_multiplier >= 0, "plan.dp_noise_multiplier", "must be >= 0")
        require(self.clinic_noise_multiplier >= 0, "plan.clinic_noise_multiplier", "must be >= 0")
        require(
            self.clinic_noise_multiplier == 0 or self.delta_clip_norm > 0,
            "plan.clinic_noise_multiplier",
            "needs plan.delta_clip_norm > 0",
        )
        require(self.local_epochs >= 1, "plan.local_epochs", "must be at least 1")
        require(self.optimizer in ("sgd", "adam"), "plan.optimizer", "must be 'sgd' or 'adam'")
        require(self.learning_rate > 0, "plan.learning_rate", "must be positive")
        validate_schedule(self.lr_schedule, self.lr_horizon_rounds, self.lr_min_factor, 0)
        require(self.fedprox_mu >= 0, "plan.fedprox_mu", "must be >= 0")
        require(self.batch_size >= 1, "plan.batch_size", "must be at least 1")
        require(self.delta_clip_norm >= 0, "plan.delta_clip_norm", "must be >= 0 (0 = unclipped)")
        require(self.weight_max > 0, "plan.weight_max", "must be positive")
        require(self.loss_max > 0, "plan.loss_max", "must be positive")


@dataclass(frozen=True)
class ValidationSection:
    # Held-out data (HAM10000 layout, class folders or an index CSV); empty = no evaluation.
    holdout: Path | None = None
    max_examples: int = 0
    # The gate: reject a candidate whose balanced accuracy is below
    # `min_balanced_accuracy`, or that `rule` finds worse than the published checkpoint
    # on a high-risk class; the published checkpoint then stays. `tolerance` is the
    # allowed point-estimate drop of the "tolerance" rule only.
    gate: bool = True
    high_risk: list[str] = field(default_factory=lambda: ["mel", "bcc", "akiec"])
    tolerance: float = 0.05
    min_balanced_accuracy: float = 0.0
    # A published model within this of chance-level balanced accuracy (1/k) is no baseline
    # for sensitivities; negative: always compare with the published model.
    chance_margin: float = 0.05
    # How the candidate is compared with the published model (aggregator/gate.py):
    # "harm" rejects on evidence (paired test at `alpha`) that a high-risk sensitivity or
    # the balanced accuracy fell by more than `margin`; "noninferiority" accepts only on
    # evidence that none did; "tolerance" is the v1 point-estimate rule.
    rule: str = "harm"
    margin: float = 0.0
    alpha: float = 0.05
    # Checks on the unmasked sum (aggregator/sum_checks.py): the smallest weight (example
    # count) an honest clinic sends, and the relative slack on the norm bound.
    min_clinic_weight: float = 1.0
    sum_norm_slack: float = 1e-3
    # Secure federated evaluation (secure rounds, paired rules): the contributors score the
    # candidate and the published model on their own evaluation slices and the gate pools
    # the securely summed counts with the held-out set's. `evaluation_max_cases` bounds
    # one clinic's slice (a larger slice is subsampled), and so the count sum.
    federated_evaluation: bool = True
    evaluation_max_cases: int = 500

    def validate(self) -> None:
        if self.holdout is not None and str(self.holdout):
            require(self.holdout.exists(), "validation.holdout", f"{self.holdout} does not exist")
        unknown = sorted(set(self.high_risk) - set(CLASSES))
        require(not unknown, "validation.high_risk", f"unknown class code(s) {unknown}")
        require(0.0 <= self.tolerance <= 1.0, "validation.tolerance", "must be in [0, 1]")
        require(
            self.chance_margin <= 1.0,
            "validation.chance_margin",
            "must be at most 1 (negative: always compare with the published model)",
        )
        require(
            0.0 <= self.min_balanced_accuracy <= 1.0,
            "validation.min_balanced_accuracy",
            "must be in [0, 1]",
        )
        require(self.rule in RULES, "validation.rule", f"must be one of {', '.join(RULES)}")
        require(0.0 <= self.margin < 1.0, "validation.margin", "must be in [0, 1)")
        require(0.0 < self.alpha < 0.5, "validation.alpha", "must be in (0, 0.5)")
        require(self.min_clinic_weight > 0, "validation.min_clinic_weight", "must be positive")
        require(self.sum_norm_slack >= 0, "validation.sum_norm_slack", "must be >= 0")
        require(
            1 <= self.evaluation_max_cases <= 1_000_000,
            "validation.evaluation_max_cases",
            "must be in [1, 1000000]",
        )

    def gate_settings(self) -> GateSettings:
        return GateSettings(
            enabled=self.gate,
            high_risk=tuple(self.high_risk),
            tolerance=self.tolerance,
            min_balanced_accuracy=self.min_balanced_accuracy,
            chance_margin=self.chance_margin,
            rule=self.rule,
            margin=self.margin,
            alpha=self.alpha,
        )


@dataclass(frozen=True)
class AggregatorConfig:
    federation: str
    tls: TlsSection
    storage: StorageSection
    server: ServerSection = field(default_factory=ServerSection)
    model: ModelSection = field(default_factory=ModelSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    plan: PlanSection = field(default_factory=PlanSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def validate(self) -> None:
        require(bool(self.federation), "federation", "must not be empty")
        if self.rounds.aggregation == "secure":
            require(
                self.plan.delta_clip_norm > 0,
                "plan.delta_clip_norm",
                "must be > 0 with secure aggregation (it bounds the quantization range)",
            )
            require(
                self.rounds.min_clinics >= 2,
                "rounds.min_clinics",
                "must be at least 2 with secure aggregation",
            )


def gate_off_reason(config: AggregatorConfig) -> str | None:
    """Why this configuration would publish every candidate unchecked (None: it would not)."""
    if not config.validation.gate:
        return "[validation] gate = false"
    if config.validation.holdout is None or not str(config.validation.holdout):
        return "no [validation] holdout is configured"
    return None


def load_aggregator_config(path: Path | None, **kwargs: object) -> AggregatorConfig:
    return load_config(AggregatorConfig, path, **kwargs)  # type: ignore[arg-type]

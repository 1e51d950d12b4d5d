"""Prometheus metrics exported by the aggregator.

The registry is passed in (never the process-global one) so tests can run several
aggregators in one process. Names follow Prometheus conventions: ``dermafed_`` prefix,
base units, ``_total`` for counters. The only per-clinic label is the clinic id.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aggregator.gate import RULES
from aggregator.sum_checks import CHECKS
from common.build_info import register_build_info
from common.federated_eval import COUNT_CHECKS
from common.secagg.messages import STAGES

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry)
        self.registry = registry
        self.round_number = Gauge(
            "dermafed_round_number",
            "Number of the running or most recent round.",
            registry=registry,
        )
        self.published_round = Gauge(
            "dermafed_published_round",
            "Round whose checkpoint is currently published (0 = the initial model).",
            registry=registry,
        )
        self.published_timestamp = Gauge(
            "dermafed_published_timestamp_seconds",
            "Unix time the published checkpoint last changed.",
            registry=registry,
        )
        self.rounds = Counter(
            "dermafed_rounds_total", "Finished rounds by outcome.", ["outcome"], registry=registry
        )
        self.round_running = Gauge(
            "dermafed_round_running", "1 while a round is running.", registry=registry
        )
        self.stage_duration = Histogram(
            "dermafed_round_stage_duration_seconds",
            "Wall time of each round stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.round_duration = Histogram(
            "dermafed_round_duration_seconds",
            "Wall time of whole rounds.",
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.cohort_size = Gauge(
            "dermafed_round_cohort_size",
            "Clinics selected for the current round.",
            registry=registry,
        )
        self.contributors = Gauge(
            "dermafed_round_contributors",
            "Clinics whose update made it into the last round.",
            registry=registry,
        )
        self.dropouts = Counter(
            "dermafed_clinic_dropouts_total",
            "Clinics that went silent, by stage.",
            ["stage"],
            registry=registry,
        )
        self.declines = Counter(
            "dermafed_clinic_declines_total",
            "Rounds declined by clinics, by reason.",
            ["reason"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "dermafed_received_bytes_total",
            "Payload bytes received from clinics.",
            ["kind"],
            registry=registry,
        )
        self.sent_bytes = Counter(
            "dermafed_sent_bytes_total",
            "Payload bytes sent to clinics.",
            ["kind"],
            registry=registry,
        )
        self.rejected_rpcs = Counter(
            "dermafed_rejected_requests_total",
            "Requests refused, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.connected_clinics = Gauge(
            "dermafed_connected_clinics", "Clinics that polled recently.", registry=registry
        )
        self.clinic_last_seen = Gauge(
            "dermafed_clinic_last_seen_timestamp_seconds",
            "Unix time each clinic last polled.",
            ["clinic"],
            registry=registry,
        )
        self.validation = Gauge(
            "dermafed_validation_score",
            "Held-out metric of the published checkpoint "
            "(accuracy, balanced_accuracy, macro_auroc).",
            ["metric"],
            registry=registry,
        )
        self.sensitivity = Gauge(
            "dermafed_validation_sensitivity",
            "Held-out per-class sensitivity of the published checkpoint.",
            ["class"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "dermafed_rollbacks_total",
            "Candidate checkpoints rejected by the gate (automatic) and admin rollbacks.",
            ["kind"],
            registry=registry,
        )
        self.train_loss = Gauge(
            "dermafed_round_train_loss",
            "Weighted mean local training loss of the last round.",
            registry=registry,
        )
        self.clinic_epsilon_spent = Gauge(
            "dermafed_clinic_epsilon_spent",
            "Differential-privacy epsilon each clinic reports having spent.",
            ["clinic"],
            registry=registry,
        )
        self.clinic_epsilon_remaining = Gauge(
            "dermafed_clinic_epsilon_remaining",
            "Epsilon each clinic reports having left.",
            ["clinic"],
            registry=registry,
        )
        self.clinic_privacy_reset = Gauge(
            "dermafed_clinic_privacy_reset",
            "1 while a clinic is refused because it reported less epsilon spent than before "
            "(its privacy ledger was reset or replaced), until an admin acknowledges it.",
            ["clinic"],
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "dermafed_certificate_expiry_timestamp_seconds",
            "Unix time the service's own TLS certificate expires.",
            registry=registry,
        )
        self.limit_hits = Counter(
            "dermafed_clinic_limit_hits_total",
            "Times a clinic exceeded a per-clinic limit (held_polls: a poll while its previous "
            "one was still held, the older one is released; uploads_in_flight: a second upload "
            "while one is in flight, refused; stalled_upload: an upload stream that sent "
            "nothing for server.upload_stall_s, cancelled). The log names the clinic.",
            ["limit"],
            registry=registry,
        )
        for limit in ("held_polls", "uploads_in_flight", "stalled_upload"):
            self.limit_hits.labels(limit=limit)
        self.gate_decisions = Counter(
            "dermafed_gate_decisions_total",
            "Validation-gate decisions on candidate checkpoints, by rule and verdict.",
            ["rule", "verdict"],
            registry=registry,
        )
        self.sum_check_failures = Counter(
            "dermafed_sum_check_failures_total",
            "Rounds whose unmasked sum no honest cohort could produce, by failed check "
            "(the candidate is rejected before it is scored).",
            ["check"],
            registry=registry,
        )
        self.gate_change_bound = Gauge(
            "dermafed_gate_change_bound",
            "Last paired gate decision: the one-sided confidence bound on the change of each "
            "tested quantity (high-risk sensitivity or balanced_accuracy) that the rule uses "
            "(upper bound for 'harm', lower bound for 'noninferiority').",
            ["check"],
            registry=registry,
        )
        self.gate_p_value = Gauge(
            "dermafed_gate_p_value",
            "Last paired gate decision: the one-sided p-value of each test.",
            ["check"],
            registry=registry,
        )
        self.federated_cases = Gauge(
            "dermafed_federated_evaluation_cases",
            "Last decided round: evaluation-slice cases whose summed counts the gate pooled "
            "with the held-out set (0 when the round had no federated evaluation).",
            registry=registry,
        )
        self.federated_contributors = Gauge(
            "dermafed_federated_evaluation_contributors",
            "Last decided round: clinics in the federated evaluation's secure sum.",
            registry=registry,
        )
        for rule in (*RULES, "off"):
            for verdict in ("accept", "reject"):
                self.gate_decisions.labels(rule=rule, verdict=verdict)
        for check in (*CHECKS, *(f"count_{c}" for c in COUNT_CHECKS)):
            self.sum_check_failures.labels(check=check)
        for outcome in ("published", "rejected", "aborted"):
            self.rounds.labels(outcome=outcome)
        for kind in ("automatic", "admin"):
            self.rollbacks.labels(kind=kind)
        # Pre-create the label children so increase() sees the first event of each series.
        evaluation = tuple(f"evaluate_{s}" for s in STAGES)
        for stage in (*STAGES, *evaluation, "train", "aggregate", "validate"):
            self.stage_duration.labels(stage=stage)
            self.dropouts.labels(stage=stage)
        for reason in (
            "privacy_budget_exhausted",
            "noise_below_floor",
            "no_data",
            "privacy_ledger_error",
            "other",
        ):
            self.declines.labels(reason=reason)

    def set_validation(self, metrics: Mapping[str, object]) -> None:
        for name in ("accuracy", "balanced_accuracy", "macro_auroc"):
            value = metrics.get(name)
            if isinstance(value, int | float):
                self.validation.labels(metric=name).set(float(value))
        sens = metrics.get("sensitivity")
        if isinstance(sens, Mapping):
            for cls, value in sens.items():
                if isinstance(value, int | float):
                    self.sensitivity.labels(**{"class": str(cls)}).set(float(value))

    def set_gate_evidence(self, rule: str, checks: Mapping[str, object]) -> None:
        """Export the bound and p-value behind the last paired decision, per test."""
        side = "upper" if rule == "harm" else "lower"
        for name, check in checks.items():
            if not isinstance(check, Mapping) or "p_value" not in check:
                continue
            bound, p = check.get(side), check.get("p_value")
            if isinstance(bound, int | float):
                self.gate_change_bound.labels(check=name).set(float(bound))
            if isinstance(p, int | float):
                self.gate_p_value.labels(check=name).set(float(p))

"""Prometheus metrics exported by a clinic agent (registry passed in).

Nothing here carries a per-example value, an image, a label or the clinic's delta: only
aggregate training statistics the clinic's own operators watch.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.build_info import register_build_info

ROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        register_build_info(registry)
        self.registry = registry
        self.connected = Gauge(
            "dermafed_agent_connected",
            "1 when the last call to the aggregator succeeded.",
            registry=registry,
        )
        self.train_loss = Gauge(
            "dermafed_agent_train_loss",
            "Mean local training loss of the last round.",
            registry=registry,
        )
        self.examples_per_second = Gauge(
            "dermafed_agent_train_examples_per_second",
            "Local training throughput.",
            registry=registry,
        )
        self.training_progress = Gauge(
            "dermafed_agent_training_progress_ratio",
            "Share of the current local training's planned optimiser steps done (0 to 1; "
            "stays at 1 after a round until the next one starts).",
            registry=registry,
        )
        self.training_round = Gauge(
            "dermafed_agent_training_round",
            "The round the local training progress refers to.",
            registry=registry,
        )
        self.local_examples = Gauge(
            "dermafed_agent_local_examples",
            "Training examples found in the data folder.",
            registry=registry,
        )
        self.round_duration = Histogram(
            "dermafed_agent_round_duration_seconds",
            "Wall time the agent spent per round.",
            ["phase"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.rounds = Counter(
            "dermafed_agent_rounds_total", "Rounds by result.", ["result"], registry=registry
        )
        self.last_round = Gauge(
            "dermafed_agent_last_round", "Last round this clinic contributed to.", registry=registry
        )
        self.last_success = Gauge(
            "dermafed_agent_last_success_timestamp_seconds",
            "Unix time of the last successful contribution.",
            registry=registry,
        )
        self.epsilon_spent = Gauge(
            "dermafed_agent_epsilon_spent",
            "Differential-privacy epsilon spent so far.",
            registry=registry,
        )
        self.epsilon_remaining = Gauge(
            "dermafed_agent_epsilon_remaining",
            "Differential-privacy epsilon left in the budget.",
            registry=registry,
        )
        self.sent_bytes = Counter(
            "dermafed_agent_sent_bytes_total", "Payload bytes uploaded.", registry=registry
        )
        self.received_bytes = Counter(
            "dermafed_agent_received_bytes_total", "Payload bytes downloaded.", registry=registry
        )
        self.certificate_expiry = Gauge(
            "dermafed_certificate_expiry_timestamp_seconds",
            "Unix time the agent's own TLS certificate expires.",
            registry=registry,
        )
        for result in ("contributed", "declined", "failed"):
            self.rounds.labels(result=result)
        self.evaluations = Counter(
            "dermafed_agent_evaluations_total",
            "Secure federated evaluations of a candidate, by result.",
            ["result"],
            registry=registry,
        )
        self.evaluation_cases = Gauge(
            "dermafed_agent_evaluation_slice_cases",
            "Images in the clinic's evaluation slice (never trained on).",
            registry=registry,
        )
        for result in ("contributed", "declined", "failed", "refused"):
            self.evaluations.labels(result=result)

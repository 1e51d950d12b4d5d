"""Local training progress: every step reaches the gauge, a few lines reach the log."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from clinic_agent.dp_training import train_dp
from clinic_agent.privacy import MechanismStep
from clinic_agent.progress import TrainingProgress
from clinic_agent.training import TrainConfig, train_local
from common.model import ModelConfig, initial_state

TINY = ModelConfig(input_size=16, width=8, dropout=0.0)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic tensors (not patient data)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 7, n)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str) -> Gauge:
    return Gauge(name, "test", registry=CollectorRegistry())


def test_the_gauge_follows_every_step_and_the_log_every_tenth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ratio, round_no, clock = gauge("r"), gauge("n"), Clock()
    progress = TrainingProgress(7, ratio, round_no, clock=clock)
    assert ratio._value.get() == 0.0 and round_no._value.get() == 7
    with caplog.at_level(logging.INFO, logger="dermafed.agent"):
        for step in range(1, 201):
            progress(step, 200)
            assert ratio._value.get() == pytest.approx(step / 200)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("round 7: local training 10% (step 20 of 200")
    assert lines[-1].startswith("round 7: local training 100% (step 200 of 200")


def test_a_slow_round_logs_at_least_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = TrainingProgress(3, gauge("r"), clock=clock, interval_s=30.0)
    with caplog.at_level(logging.INFO, logger="dermafed.agent"):
        for step in range(1, 6):  # 5 steps of 1,000, a minute apart: no tenth is reached
            clock.now += 60
            progress(step, 1000)
    assert len(caplog.records) == 5
    assert "local training 0% (step 5 of 1000, 300s)" in caplog.records[-1].getMessage()


def test_train_local_reports_every_planned_step() -> None:
    images, labels = data(10)
    calls: list[tuple[int, int]] = []
    cfg = TrainConfig(epochs=2, batch_size=4, momentum=0.0, augment=False)
    train_local(
        TINY,
        initial_state(TINY, 0),
        images,
        labels,
        cfg,
        threads=1,
        progress=lambda d, p: calls.append((d, p)),
    )
    assert calls == [(step, 6) for step in range(1, 7)]  # 2 epochs x ceil(10 / 4)


def test_train_dp_reports_every_step_of_its_mechanism() -> None:
    images, labels = data(40)
    calls: list[tuple[int, int]] = []
    cfg = TrainConfig(epochs=1, batch_size=10, momentum=0.0, augment=False)
    mech = MechanismStep(1.0, 0.25, 5)
    train_dp(
        TINY,
        initial_state(TINY, 0),
        images,
        labels,
        cfg,
        mech,
        max_grad_norm=1.0,
        threads=1,
        progress=lambda d, p: calls.append((d, p)),
    )
    assert calls == [(step, 5) for step in range(1, 6)]

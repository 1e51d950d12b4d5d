"""The coordinator without gRPC and without its thread: a fake clock, a temporary ledger and
checkpoint store, and ``Coordinator.step`` turning the round loop by hand. Deadlines,
dropouts, declines, aborts, rollbacks, a restart, and the gate's reject, each as the
coordinator's own API sees it (the services' tests cover the same over mutual TLS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from aggregator.checkpoints import CheckpointStore
from aggregator.config import (
    AggregatorConfig,
    ModelSection,
    PlanSection,
    RoundsSection,
    StorageSection,
    TlsSection,
    ValidationSection,
)
from aggregator.coordinator import Coordinator
from aggregator.ledger import Ledger
from aggregator.metrics import AggregatorMetrics
from aggregator.round_modes import UploadHeader
from aggregator.validation import HoldoutEvaluator
from common.datasets import CLASSES
from common.errors import PreconditionError, StaleRoundError
from common.tensors import encode_f32le, flatten, in_order, total_numel

CLINICS = ("clinic-a", "clinic-b", "clinic-c")
MODEL = ModelSection(arch="lesionres", input_size=32, width=8, dropout=0.0, seed=0)


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _config(tmp: Path, validation: ValidationSection, **rounds: object) -> AggregatorConfig:
    settings: dict[str, object] = {
        "aggregation": "plain",
        "min_clinics": 2,
        "start_when_connected": 3,
        "train_deadline_s": 60.0,
        "retry_after_abort_s": 30.0,
    }
    settings.update(rounds)
    return AggregatorConfig(
        federation="testfed",
        # Never read here: the coordinator is built without the gRPC services.
        tls=TlsSection(tmp / "ca.crt", tmp / "agg.crt", tmp / "agg.key"),
        storage=StorageSection(tmp / "state"),
        model=MODEL,
        rounds=RoundsSection(**settings),  # type: ignore[arg-type]
        plan=PlanSection(delta_clip_norm=0.0),
        validation=validation,
    )


class Harness:
    def __init__(
        self, tmp: Path, clock: FakeClock, evaluator: HoldoutEvaluator | None = None, **rounds
    ):
        self.tmp, self.clock, self.evaluator = tmp, clock, evaluator
        # With a held-out set, the default rule compares even with a near-chance model.
        validation = (
            ValidationSection(gate=False)
            if evaluator is None
            else ValidationSection(rule="harm", chance_margin=-1.0)
        )
        self.config = _config(tmp, validation, **rounds)
        self.config.storage.state_dir.mkdir(parents=True, exist_ok=True)
        self.coord = self.reopen()

    def reopen(self) -> Coordinator:
        """A new coordinator on the same ledger and store: what a restart does."""
        self.ledger = Ledger(self.config.storage.ledger_path)
        coord = Coordinator(
            self.config,
            ledger=self.ledger,
            store=CheckpointStore(self.config.storage.checkpoint_dir),
            metrics=AggregatorMetrics(CollectorRegistry()),
            evaluator=self.evaluator,
            clock=self.clock,
        )
        coord.open()
        self.coord = coord
        return coord

    def poll(self, *clinics: str) -> None:
        for clinic in clinics:
            self.coord.poll(clinic, 0, 0.0)

    def upload(
        self, clinic: str, vector: np.ndarray, weight: float = 10.0, number: int | None = None
    ) -> None:
        coord = self.coord
        number = number or coord.running_round()
        assert number is not None
        payload = encode_f32le(vector.astype(np.float32))
        header = UploadHeader(number, "f32le", coord.specs, len(payload), weight, 0.5, 1.0)
        sink = coord.begin_upload(clinic, header)
        sink.write(payload)
        coord.complete_upload(clinic, header, sink)

    def zeros(self) -> np.ndarray:
        return np.zeros(total_numel(self.coord.specs), np.float32)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def h(tmp_path: Path, clock: FakeClock) -> Iterator[Harness]:
    harness = Harness(tmp_path, clock)
    yield harness
    harness.ledger.close()


def _published_vector(h: Harness) -> np.ndarray:
    state, _ = h.coord.store.load(h.coord.published[0])
    return flatten(in_order(state, [s.name for s in h.coord.specs]))


def test_a_round_starts_once_enough_clinics_poll_and_publishes_their_weighted_mean(h):
    h.poll("clinic-a", "clinic-b")
    h.coord.step()
    assert h.coord.running_round() is None  # start_when_connected = 3
    h.poll("clinic-c")
    h.coord.step()
    assert h.coord.running_round() == 1
    before = _published_vector(h)
    delta = h.zeros()
    for clinic, value, weight in (("clinic-a", 1.0, 10.0), ("clinic-b", 4.0, 30.0)):
        d = delta.copy()
        d[:5] = value
        h.upload(clinic, d, weight)
    h.upload("clinic-c", delta, 60.0)
    assert h.coord.step()  # every clinic answered: the stage closes and the round finalises
    assert h.coord.published[1] == 1
    rec = h.ledger.round(1)
    assert rec is not None and rec.outcome == "published"
    after = _published_vector(h)
    # (1·10 + 4·30 + 0·60) / 100 = 1.3 on the first five coordinates, nothing elsewhere.
    assert np.allclose(after[:5] - before[:5], 1.3, atol=1e-5)
    assert np.allclose(after[5:], before[5:])


def test_a_silent_clinic_drops_at_the_deadline_and_the_round_goes_on(h, clock):
    h.poll(*CLINICS)
    h.coord.step()
    h.upload("clinic-a", h.zeros())
    h.upload("clinic-b", h.zeros())
    clock.advance(59.0)
    assert not h.coord.step()  # before the deadline: still waiting for clinic-c
    clock.advance(2.0)
    assert h.coord.step()
    rec = h.ledger.round(1)
    assert rec is not None and rec.outcome == "published"
    assert sorted(rec.contributors) == ["clinic-a", "clinic-b"]
    events = {(e.clinic, e.event) for e in h.ledger.clinic_events(round=1)}
    assert ("clinic-c", "dropped") in events
    # A late upload is refused with the domain error the servicer maps to a status.
    with pytest.raises(PreconditionError, match="no round is running"):
        h.upload("clinic-c", h.zeros(), number=1)


def test_below_the_minimum_the_round_aborts_and_the_next_waits_for_the_retry_delay(h, clock):
    h.poll(*CLINICS)
    h.coord.step()
    h.upload("clinic-a", h.zeros())
    clock.advance(61.0)
    h.coord.step()
    rec = h.ledger.round(1)
    assert rec is not None and rec.outcome == "aborted" and "minimum is 2" in rec.reason
    assert h.coord.published[1] == 0
    h.poll(*CLINICS)
    clock.advance(10.0)
    h.coord.step()
    assert h.coord.running_round() is None  # retry_after_abort_s = 30
    clock.advance(21.0)
    h.poll(*CLINICS)
    h.coord.step()
    assert h.coord.running_round() == 2


def test_a_declining_clinic_leaves_the_round_with_its_reason(h):
    h.poll(*CLINICS)
    h.coord.step()
    with pytest.raises(StaleRoundError):  # a decline for another round changes nothing
        h.coord.decline("clinic-c", 7, "privacy_budget_exhausted", "")
    h.coord.decline("clinic-c", 1, "privacy_budget_exhausted", "ε 8 spent")
    h.upload("clinic-a", h.zeros())
    h.upload("clinic-b", h.zeros())
    assert h.coord.step()  # the alive clinics all answered: no need to wait for the deadline
    rec = h.ledger.round(1)
    assert rec is not None and rec.outcome == "published"
    events = {(e.clinic, e.event) for e in h.ledger.clinic_events(round=1)}
    assert ("clinic-c", "declined") in events


def test_an_admin_abort_and_a_rollback_are_audited(h, clock):
    for number in (1, 2):
        h.poll(*CLINICS)
        h.coord.step()
        assert h.coord.running_round() == number
        for clinic in CLINICS:
            d = h.zeros()
            d[0] = float(number)
            h.upload(clinic, d)
        h.coord.step()
    first = h.ledger.round(1)
    assert first is not None and h.coord.published[1] == 2
    h.poll(*CLINICS)
    h.coord.step()
    h.coord.abort_round(3, "maintenance", actor="alice")
    rec = h.ledger.round(3)
    assert rec is not None and rec.outcome == "aborted" and "maintenance" in rec.reason
    cid, number, changed = h.coord.rollback(round_number=1, reason="check", actor="alice")
    assert (cid, number, changed) == (first.checkpoint, 1, True)
    assert h.coord.published == (first.checkpoint, 1)
    actions = [a.action for a in h.ledger.audit_log()]
    assert actions[:2] == ["rollback", "abort_round"]


def test_a_restart_records_the_interrupted_round_and_keeps_the_schedule(h, clock):
    h.poll(*CLINICS)
    h.coord.step()
    h.upload("clinic-a", h.zeros())
    published = h.coord.published
    h.ledger.close()
    clock.advance(5.0)
    coord = h.reopen()
    rec = h.ledger.round(1)
    assert rec is not None and rec.outcome == "aborted" and "restarted" in rec.reason
    assert coord.published == published
    # The interrupted round counts as aborted: the next one waits retry_after_abort_s.
    h.poll(*CLINICS)
    coord.step()
    assert coord.running_round() is None
    clock.advance(30.0)
    h.poll(*CLINICS)
    coord.step()
    assert coord.running_round() == 2


def test_the_gate_rejects_a_candidate_that_loses_every_melanoma(tmp_path, clock):
    from federation_harness import make_shards

    _, holdout = make_shards(tmp_path, per_clinic=1, holdout=80)
    evaluator = HoldoutEvaluator(holdout, MODEL.to_model_config())
    if not (evaluator.labels == CLASSES.index("mel")).any():
        pytest.skip("no melanoma in this held-out subset")
    h = Harness(tmp_path / "agg", clock, evaluator=evaluator)
    try:
        # Round 1 against the initial model: only the floor applies, it is published.
        h.poll(*CLINICS)
        h.coord.step()
        bias = _bias_offset(h, CLASSES.index("mel"))
        for clinic in CLINICS:
            d = h.zeros()
            d[bias] = 20.0  # every case called melanoma: mel sensitivity 1.0
            h.upload(clinic, d)
        h.coord.step()
        assert h.coord.published[1] == 1
        # Round 2 takes it all back and more: no case is called melanoma any more.
        h.poll(*CLINICS)
        h.coord.step()
        for clinic in CLINICS:
            d = h.zeros()
            d[bias] = -40.0
            h.upload(clinic, d)
        h.coord.step()
        rec = h.ledger.round(2)
        assert rec is not None and rec.outcome == "rejected"
        assert "mel sensitivity fell by 1.000" in rec.reason
        assert h.coord.published[1] == 1
    finally:
        h.ledger.close()


def _bias_offset(h: Harness, cls: int) -> int:
    """Where the classifier's bias for class ``cls`` sits in the flat delta."""
    offset = 0
    for spec in h.coord.specs:
        if spec.name.endswith("bias") and spec.shape == (len(CLASSES),):
            last = offset
        offset += spec.numel
    return last + cls

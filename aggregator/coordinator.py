"""The aggregator's domain service: rounds, uploads, checkpoints and the ledger.

The gRPC servicers call these methods with an authenticated clinic id and plain Python
values; nothing here knows about protobuf or status codes. A background thread drives
the pure :class:`~aggregator.rounds.Round` through its stages (deadlines, dropouts) and
finalises a finished round: aggregate, write the candidate checkpoint, evaluate it on the
held-out set, publish it, and record everything in the ledger.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from aggregator.checkpoints import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.fedavg import PlainFedAvg, check_weight
from aggregator.ledger import Ledger, RoundRecord
from aggregator.metrics import AggregatorMetrics
from aggregator.rounds import Phase, Round, select_cohort, should_start_round
from aggregator.validation import HoldoutEvaluator
from common.errors import (
    InvalidUpdateError,
    NotFoundError,
    PayloadTooLargeError,
    PreconditionError,
)
from common.model import ModelConfig, build_model, initial_state
from common.tensors import (
    TensorSpec,
    check_specs,
    decode_f32le,
    in_order,
    load_checkpoint_bytes,
    specs_of,
    total_numel,
    unflatten,
)

log = logging.getLogger("dermafed.aggregator")

TRAIN_STAGE = "train"
# Declines carry a machine-readable reason; anything else is folded into "other" so a
# misbehaving clinic cannot blow up the metric's label cardinality.
KNOWN_DECLINE_REASONS = frozenset(
    {
        "privacy_budget_exhausted",
        "noise_below_floor",
        "no_data",
        "dataset_too_small",
        "incompatible_plan",
        "shutting_down",
    }
)


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
        }


@dataclass(frozen=True)
class PollResult:
    task: RoundPlan | None
    published_checkpoint: str
    published_round: int


@dataclass(frozen=True)
class UploadHeader:
    round: int
    encoding: str
    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    weight: float
    train_loss: float | None
    train_seconds: float


@dataclass
class ClinicInfo:
    clinic: str
    last_seen: float
    rounds_contributed: int = 0
    declines: int = 0
    last_decline_reason: str = ""


@dataclass
class RunningRound:
    state: Round
    plan: RoundPlan
    strategy: PlainFedAvg
    # Local training time each clinic reports, to split round time into training vs protocol.
    train_seconds: dict[str, float] = field(default_factory=dict)
    finalizing: bool = False


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
class StatusView:
    federation: str
    published_checkpoint: str
    published_round: int
    current: RoundView | None
    last: RoundView | None
    connected: tuple[str, ...]
    rounds_completed: int
    max_rounds: int


def _view_of_record(rec: RoundRecord) -> RoundView:
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


class Coordinator:
    def __init__(
        self,
        config: AggregatorConfig,
        *,
        ledger: Ledger,
        store: CheckpointStore,
        metrics: AggregatorMetrics,
        evaluator: HoldoutEvaluator | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.store = store
        self.metrics = metrics
        self.evaluator = evaluator
        self._clock = clock
        self._rng = rng or random.Random(config.rounds.seed)
        self._cond = threading.Condition()
        self._clinics: dict[str, ClinicInfo] = {}
        self._running: RunningRound | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_requested = False
        self._last_finished_at: float | None = None
        self._rounds_finished = 0
        self.model_config: ModelConfig = config.model.to_model_config()
        self._published: tuple[str, int] = ("", 0)
        self._specs: tuple[TensorSpec, ...] = ()

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Resume from the ledger (or create the initial model); call before serving."""
        now = self._clock()
        self.store.cleanup_temp()
        aborted = self.ledger.abort_interrupted(now, "aggregator restarted mid-round")
        for number in aborted:
            log.warning("round %d was interrupted by a restart and is recorded as aborted", number)
            self.metrics.rounds.labels(outcome="aborted").inc()
        published = self.ledger.published()
        if published is None:
            state = initial_state(self.model_config, self.config.model.seed)
            cid = self.store.put_state(state, self._checkpoint_metadata(0, ""))
            self.ledger.record_checkpoint(cid, 0, None, now)
            self.ledger.publish(cid, 0, now, "initial", "initial model")
            published = (cid, 0)
            log.info("created initial checkpoint %s", cid[:12])
        cid, round_no = published
        state, meta = self.store.load(cid)  # verifies the hash: a corrupt file stops us here
        stored_cfg = ModelConfig.from_metadata(meta)
        if stored_cfg != self.model_config:
            raise PreconditionError(
                f"published checkpoint {cid[:12]} was made for model {stored_cfg}, but the "
                f"configuration asks for {self.model_config}; start a new state_dir to change it"
            )
        order = list(build_model(self.model_config).state_dict().keys())
        self._specs = tuple(specs_of(in_order(state, order)))
        self._published = (cid, int(round_no or 0))
        self._rounds_finished = sum(1 for r in self.ledger.rounds(limit=1_000_000) if r.outcome)
        last = self.ledger.rounds(limit=1)
        self.metrics.round_number.set(last[0].number if last else 0)
        self.metrics.published_round.set(self._published[1])
        self.metrics.published_timestamp.set(now)
        rec = self.ledger.round(self._published[1]) if self._published[1] else None
        if rec is not None and rec.metrics:
            self.metrics.set_validation(rec.metrics)
        log.info(
            "resumed: published checkpoint %s (round %d), next round %d",
            cid[:12],
            self._published[1],
            self.ledger.next_round_number(),
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rounds", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "aggregator shutting down") -> None:
        self._stop.set()
        with self._cond:
            running = self._running
            if running is not None and not running.finalizing:
                running.state.abort(reason)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cond:
            self._settle_locked(self._clock())

    # -- clinic-facing operations --------------------------------------------------------

    def poll(self, clinic: str, last_round: int, wait_s: float) -> PollResult:
        """Long-poll: return a task for ``clinic`` as soon as there is one, or after wait_s."""
        give_up = time.monotonic() + max(0.0, wait_s)
        with self._cond:
            self._touch(clinic)
            while True:
                task = self._task_for_locked(clinic)
                if task is not None or self._stop.is_set():
                    break
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 1.0))
                self._touch(clinic)
            return PollResult(task, *self._published)

    def _task_for_locked(self, clinic: str) -> RoundPlan | None:
        running = self._running
        if running is None or running.finalizing:
            return None
        if not running.state.is_pending(clinic):
            return None
        return replace(running.plan, stage_deadline=running.state.deadline)

    def checkpoint_chunks(self, clinic: str, cid: str) -> Iterator[bytes]:
        """Stream a checkpoint the federation has recorded (never an arbitrary file)."""
        if not self.store.exists(cid):
            raise NotFoundError(f"checkpoint {cid[:16]} is not known")
        return self.store.iter_chunks(cid)

    def checkpoint_size(self, cid: str) -> int:
        return self.store.size(cid)

    def begin_upload(self, clinic: str, header: UploadHeader) -> int:
        """Validate an upload's header before any payload is read; returns the byte count."""
        with self._cond:
            running = self._running
            if running is None:
                raise PreconditionError("no round is running")
            running.state.check_can_respond(clinic, header.round, TRAIN_STAGE, self._clock())
        if header.encoding != "f32le":
            raise InvalidUpdateError(f"encoding {header.encoding!r} is not accepted in plain mode")
        check_specs(header.tensors, self._specs)
        expected = total_numel(self._specs) * 4
        if header.total_bytes != expected:
            raise InvalidUpdateError(
                f"header declares {header.total_bytes} bytes, the model needs {expected}"
            )
        if expected > self.config.server.max_update_bytes:
            raise PayloadTooLargeError(
                f"an update of {expected} bytes exceeds server.max_update_bytes"
            )
        check_weight(header.weight, header.train_loss)
        return expected

    def complete_upload(self, clinic: str, header: UploadHeader, payload: bytes) -> None:
        vector = decode_f32le(payload, self._specs)
        with self._cond:
            running = self._running
            if running is None:
                raise PreconditionError("no round is running")
            # Re-check under the lock: the stage may have closed while the payload streamed.
            running.state.check_can_respond(clinic, header.round, TRAIN_STAGE, self._clock())
            running.strategy.add(clinic, vector, header.weight, header.train_loss)
            running.state.respond(clinic, header.round, TRAIN_STAGE, self._clock())
            if math.isfinite(header.train_seconds) and header.train_seconds >= 0:
                running.train_seconds[clinic] = header.train_seconds
            self.metrics.received_bytes.labels(kind="update").inc(len(payload))
            self.ledger.record_clinic_event(
                header.round, clinic, "contributed", f"{len(payload)} bytes", self._clock()
            )
            self._cond.notify_all()
        log.info("round %d: update from %s accepted (%d bytes)", header.round, clinic, len(payload))

    def decline(self, clinic: str, round_number: int, reason: str, detail: str) -> None:
        label = reason if reason in KNOWN_DECLINE_REASONS else "other"
        with self._cond:
            running = self._running
            if running is None:
                raise PreconditionError("no round is running")
            running.state.decline(clinic, round_number, reason, self._clock())
            info = self._clinics.get(clinic)
            if info is not None:
                info.declines += 1
                info.last_decline_reason = reason
            self.metrics.declines.labels(reason=label).inc()
            self.ledger.record_clinic_event(
                round_number, clinic, "declined", f"{reason}: {detail}"[:500], self._clock()
            )
            self._cond.notify_all()
        log.info("round %d: %s declined (%s)", round_number, clinic, reason)

    # -- admin-facing operations ---------------------------------------------------------

    def request_round(self) -> None:
        with self._cond:
            if self._running is not None:
                raise PreconditionError(f"round {self._running.state.number} is running")
            self._round_requested = True
            self._cond.notify_all()

    def status(self) -> StatusView:
        with self._cond:
            current = self._running_view_locked()
            connected = tuple(self._connected_locked(self._clock()))
            published = self._published
        recent = [r for r in self.ledger.rounds(limit=5) if r.outcome]
        last = _view_of_record(recent[0]) if recent else None
        return StatusView(
            federation=self.config.federation,
            published_checkpoint=published[0],
            published_round=published[1],
            current=current,
            last=last,
            connected=connected,
            rounds_completed=self._rounds_finished,
            max_rounds=self.config.rounds.max_rounds,
        )

    def _running_view_locked(self) -> RoundView | None:
        running = self._running
        if running is None:
            return None
        st = running.state
        return RoundView(
            round=st.number,
            state="finalizing" if running.finalizing else st.stage,
            outcome="",
            reason="",
            parent_checkpoint=st.parent,
            checkpoint="",
            cohort=st.cohort,
            contributors=(),
            train_loss=None,
            metrics=None,
            started_at=st.started_at,
            finished_at=0.0,
            stage_seconds={h.stage: h.seconds for h in st.history},
            aggregation=running.plan.aggregation,
        )

    # -- the round loop ------------------------------------------------------------------

    def _touch(self, clinic: str) -> None:
        now = self._clock()
        info = self._clinics.get(clinic)
        if info is None:
            info = self._clinics[clinic] = ClinicInfo(clinic, now)
            log.info("clinic %s connected", clinic)
        info.last_seen = now
        self.metrics.clinic_last_seen.labels(clinic=clinic).set(now)

    def _connected_locked(self, now: float) -> list[str]:
        horizon = self.config.rounds.connected_timeout_s
        return sorted(c for c, i in self._clinics.items() if now - i.last_seen <= horizon)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready: RunningRound | None = None
            with self._cond:
                now = self._clock()
                ready = self._settle_locked(now)
                if self._running is None and not self._stop.is_set():
                    self._maybe_start_locked(now)
                if ready is None:
                    self._cond.wait(0.2)
            if ready is not None:
                self._finalize(ready)

    def _settle_locked(self, now: float) -> RunningRound | None:
        """Advance the running round; returns it when it is ready to be finalised."""
        running = self._running
        if running is None or running.finalizing:
            return None
        st = running.state
        while (result := st.tick(now)) is not None:
            self.ledger.record_stage(st.number, result.stage, result.seconds)
            self.metrics.stage_duration.labels(stage=result.stage).observe(result.seconds)
            for clinic in sorted(result.dropped):
                self.metrics.dropouts.labels(stage=result.stage).inc()
                self.ledger.record_clinic_event(
                    st.number, clinic, "dropped", f"silent in stage {result.stage}", now
                )
                log.warning("round %d: %s dropped out in stage %s", st.number, clinic, result.stage)
        if st.phase is Phase.ABORTED:
            self._finish_locked(running, "aborted", st.abort_reason, now)
            return None
        if st.phase is Phase.READY:
            running.finalizing = True
            self._cond.notify_all()
            return running
        return None

    def _maybe_start_locked(self, now: float) -> None:
        rc = self.config.rounds
        connected = self._connected_locked(now)
        self.metrics.connected_clinics.set(len(connected))
        needed = max(rc.min_clinics, rc.start_when_connected)
        if not should_start_round(
            now=now,
            connected=len(connected),
            needed=needed,
            rounds_finished=self._rounds_finished,
            max_rounds=rc.max_rounds,
            last_finished_at=self._last_finished_at,
            interval_s=rc.interval_s,
            requested=self._round_requested,
        ):
            return
        self._round_requested = False
        cohort = select_cohort(connected, rc.max_cohort, self._rng)
        number = self.ledger.next_round_number()
        pc = self.config.plan
        plan = RoundPlan(
            round=number,
            parent_checkpoint=self._published[0],
            local_epochs=pc.local_epochs,
            optimizer=pc.optimizer,
            learning_rate=pc.learning_rate,
            fedprox_mu=pc.fedprox_mu,
            batch_size=pc.batch_size,
            delta_clip_norm=pc.delta_clip_norm,
            aggregation=rc.aggregation,
            min_clinics=rc.min_clinics,
            cohort=tuple(cohort),
            federation=self.config.federation,
        )
        state = Round.start(
            number=number,
            parent=self._published[0],
            cohort=cohort,
            min_clinics=rc.min_clinics,
            stages=(TRAIN_STAGE,),
            stage_timeouts={TRAIN_STAGE: rc.train_deadline_s},
            now=now,
        )
        self.ledger.begin_round(
            number, self._published[0], rc.aggregation, plan.to_json(), list(cohort), now
        )
        for clinic in cohort:
            self.ledger.record_clinic_event(number, clinic, "selected", "", now)
        self._running = RunningRound(
            state, plan, PlainFedAvg(total_numel(self._specs), pc.delta_clip_norm)
        )
        self.metrics.round_number.set(number)
        self.metrics.round_running.set(1)
        self.metrics.cohort_size.set(len(cohort))
        log.info(
            "round %d started with cohort %s from checkpoint %s",
            number,
            ", ".join(cohort),
            self._published[0][:12],
        )
        self._cond.notify_all()

    def _finalize(self, running: RunningRound) -> None:
        """Aggregate, store, evaluate and publish; runs outside the lock (it is slow)."""
        st = running.state
        started = self._clock()
        try:
            result = running.strategy.result(st.alive)
            parent_state, _ = self.store.load(st.parent)
            delta = unflatten(result.delta, self._specs)
            new_state = {k: parent_state[k] + delta[k] for k in parent_state}
            cid = self.store.put_state(new_state, self._checkpoint_metadata(st.number, st.parent))
            aggregate_seconds = self._clock() - started
            metrics = None
            eval_seconds = 0.0
            if self.evaluator is not None:
                t0 = self._clock()
                metrics = self.evaluator.evaluate(new_state).to_dict()
                eval_seconds = self._clock() - t0
        except Exception as exc:  # a failed finalisation must abort, never half-publish
            log.exception("round %d: finalisation failed", st.number)
            with self._cond:
                self._finish_locked(
                    running, "aborted", f"finalisation failed: {exc}", self._clock()
                )
            return
        with self._cond:
            now = self._clock()
            if running.train_seconds:
                # The slowest contributor bounds the round; the rest of the time is protocol.
                self.ledger.record_stage(
                    st.number, "local_training", max(running.train_seconds.values())
                )
            self.ledger.record_stage(st.number, "aggregate", aggregate_seconds)
            self.metrics.stage_duration.labels(stage="aggregate").observe(aggregate_seconds)
            if self.evaluator is not None:
                self.ledger.record_stage(st.number, "validate", eval_seconds)
                self.metrics.stage_duration.labels(stage="validate").observe(eval_seconds)
            self.ledger.record_checkpoint(cid, st.number, st.parent, now, metrics)
            self._finish_locked(
                running,
                "published",
                "",
                now,
                checkpoint=cid,
                contributors=result.contributors,
                train_loss=result.mean_loss,
                metrics=metrics,
            )

    def _finish_locked(
        self,
        running: RunningRound,
        outcome: str,
        reason: str,
        now: float,
        *,
        checkpoint: str | None = None,
        contributors: Sequence[str] = (),
        train_loss: float | None = None,
        metrics: dict[str, object] | None = None,
    ) -> None:
        st = running.state
        if outcome == "published" and checkpoint is not None:
            self.ledger.finish_round(
                st.number,
                outcome,
                reason,
                now,
                checkpoint=checkpoint,
                contributors=list(contributors),
                train_loss=train_loss,
                metrics=metrics,
                publish=True,
            )
            self._published = (checkpoint, st.number)
            self.metrics.published_round.set(st.number)
            self.metrics.published_timestamp.set(now)
            if metrics:
                self.metrics.set_validation(metrics)
            if train_loss is not None:
                self.metrics.train_loss.set(train_loss)
            for clinic in contributors:
                info = self._clinics.get(clinic)
                if info is not None:
                    info.rounds_contributed += 1
            log.info(
                "round %d published checkpoint %s from %d clinic(s)",
                st.number,
                checkpoint[:12],
                len(contributors),
            )
        else:
            self.ledger.finish_round(
                st.number, outcome, reason, now, contributors=list(contributors)
            )
            log.warning("round %d %s: %s", st.number, outcome, reason)
        self.metrics.rounds.labels(outcome=outcome).inc()
        self.metrics.round_duration.observe(max(0.0, now - st.started_at))
        self.metrics.contributors.set(len(contributors))
        self.metrics.round_running.set(0)
        self._running = None
        self._rounds_finished += 1
        self._last_finished_at = now
        self._cond.notify_all()

    def _checkpoint_metadata(self, round_number: int, parent: str) -> dict[str, str]:
        meta = dict(self.model_config.to_metadata())
        meta.update(
            {
                "dermafed.round": str(round_number),
                "dermafed.parent": parent,
                "dermafed.federation": self.config.federation,
            }
        )
        return meta

    # -- helpers for tests and the servicer ----------------------------------------------

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return self._specs

    @property
    def published(self) -> tuple[str, int]:
        return self._published

    def running_round(self) -> int | None:
        with self._cond:
            return self._running.state.number if self._running else None

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (checked on every state change)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def published_state(self) -> dict[str, object]:
        state, _ = load_checkpoint_bytes(self.store.read(self._published[0]))
        return dict(state)

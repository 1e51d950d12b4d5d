"""The aggregator's domain service: rounds, uploads, checkpoints and the ledger.

The gRPC servicers call these methods with an authenticated clinic id and plain Python
values; nothing here knows about protobuf or status codes. A background thread drives
the pure :class:`~aggregator.rounds.Round` through its stages (deadlines, dropouts) and
finalises a finished round: aggregate, write the candidate checkpoint, evaluate it on the
held-out set, publish it, and record everything in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from cryptography import x509

from aggregator.checkpoints import CheckpointStore, checkpoints_to_prune
from aggregator.config import AggregatorConfig
from aggregator.domain import (
    CheckpointView,
    ClinicInfo,
    ClinicView,
    PendingDecision,
    PollResult,
    PrivacyReport,
    RoundPlan,
    RoundTask,
    RoundView,
    RunningRound,
    StatusView,
    view_of_record,
)
from aggregator.fedavg import MAX_WEIGHT
from aggregator.federated_evaluation import (
    evaluation_threshold,
    evidence_of,
    start_evaluation,
    summary,
    summed_counts,
)
from aggregator.gate import GateDecision, PairedEvidence, compares, decide
from aggregator.ledger import AuditEntry, Ledger
from aggregator.membership import Membership
from aggregator.metrics import AggregatorMetrics
from aggregator.privacy_floor import PrivacyFloor
from aggregator.round_modes import (
    TRAIN_STAGE,
    PlainMode,
    RoundMode,
    SecureMode,
    UploadHeader,
    UploadSink,
)
from aggregator.rounds import Phase, Round, next_round_due, select_cohort, should_start_round
from aggregator.schedule import round_learning_rate
from aggregator.secagg_server import SecAggAbortedError, SecAggServer
from aggregator.sum_checks import SumBounds, SumCheckError, check_sum
from aggregator.validation import HoldoutEvaluator
from common.clipping import clinic_noise_std
from common.datasets import CLASSES
from common.errors import (
    BusyError,
    InvalidUpdateError,
    NotFoundError,
    PreconditionError,
    StaleRoundError,
)
from common.federated_eval import CountCheckError, EvaluationCounts, evaluated_round
from common.model import ModelConfig, build_model, initial_state
from common.secagg.messages import (
    KeyAdvertisement,
    Reveal,
    ShareSubmission,
    SurvivorSignature,
    minimum_threshold,
    plan_quantization,
)
from common.secagg.quantize import noised_norm_bound
from common.tensors import (
    TensorSpec,
    in_order,
    load_checkpoint_bytes,
    specs_of,
    total_numel,
    unflatten,
)

# How often a polling clinic's "last seen" is written to the ledger.
SEEN_PERSIST_INTERVAL_S = 60.0

log = logging.getLogger("dermafed.aggregator")

# Declines carry a machine-readable reason; anything else is folded into "other" so a
# misbehaving clinic cannot blow up the metric's label cardinality.
KNOWN_DECLINE_REASONS = frozenset(
    {
        # clinic_agent.privacy.DeclineReason values, and the agent's own reasons
        "privacy_budget_exhausted",
        "noise_below_floor",
        "dataset_too_small",
        "delta_too_large",
        "invalid_plan",
        "noise_not_derivable",
        "accounting_failed",
        "privacy_ledger_error",
        "no_data",
        "no_evaluation_slice",
        "not_a_contributor",
    }
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
        ca_cert: x509.Certificate | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.store = store
        self.metrics = metrics
        self.evaluator = evaluator
        # Secure rounds verify clinic signatures against the federation CA.
        self.ca_cert = ca_cert
        self._clock = clock
        # Each upload in flight holds one model-sized buffer; this bounds their number so
        # the aggregator's memory grows with the model, not with the cohort.
        self._upload_slots = threading.BoundedSemaphore(config.server.max_concurrent_uploads)
        self._rng = rng or random.Random(config.rounds.seed)
        self._cond = threading.Condition()
        self._clinics: dict[str, ClinicInfo] = {}
        self._running: RunningRound | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_requested = False
        self._last_finished_at: float | None = None
        self._last_outcome = ""
        self._rounds_finished = 0
        self.model_config: ModelConfig = config.model.to_model_config()
        self._published: tuple[str, int] = ("", 0)
        # Held-out metrics of the published checkpoint: what the gate compares against.
        self._published_metrics: dict[str, object] | None = None
        # The published checkpoint's predicted held-out labels, for the gate's paired
        # tests: (checkpoint id, labels), computed when first needed.
        self._published_predictions: tuple[str, np.ndarray] | None = None
        self._specs: tuple[TensorSpec, ...] = ()
        self.gate = config.validation.gate_settings()
        self.privacy_floor = PrivacyFloor(ledger, metrics, clock)
        self.membership = Membership(ledger, clock)
        # When each clinic was last seen as of the ledger (restored at start), and when
        # this process last wrote it there.
        self._seen_at_start: dict[str, float] = {}
        self._seen_persisted: dict[str, float] = {}
        # Held polls: the newest poll's ticket per clinic, the clinics holding one now, and
        # when a clinic's exceeding a limit was last logged.
        self._poll_tickets: dict[str, int] = {}
        self._holding: set[str] = set()
        # Clinics with an upload in flight (at most one each).
        self._uploading: set[str] = set()
        self._limit_logged: dict[tuple[str, str], float] = {}

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
        self.privacy_floor.load()
        self.membership.load()
        self._restore_clinic_metrics()
        last = self.ledger.rounds(limit=1)
        # The schedule resumes from the ledger, not from the restart: otherwise every
        # restart (an upgrade, a config change, a Restart=on-failure loop) would start a
        # round at once and charge every clinic's privacy budget for it. A round the
        # restart interrupted was just recorded as aborted, so retry_after_abort_s applies.
        if last and last[0].finished_at is not None:
            self._last_finished_at = last[0].finished_at
            self._last_outcome = last[0].outcome or ""
        self.metrics.round_number.set(last[0].number if last else 0)
        self.metrics.published_round.set(self._published[1])
        pubs = self.ledger.publications()
        # When the model last changed (not when this process started): the "no round
        # published for a long time" alert must survive restarts.
        self.metrics.published_timestamp.set(pubs[-1].at if pubs else now)
        self._published_metrics = self._metrics_of(cid, state)
        if self._published_metrics:
            self.metrics.set_validation(self._published_metrics)
        log.info(
            "resumed: published checkpoint %s (round %d), next round %d",
            cid[:12],
            self._published[1],
            self.ledger.next_round_number(),
        )

    def _restore_clinic_metrics(self) -> None:
        """Per-clinic series start from the ledger, not empty, after a restart: a clinic
        that was down across the restart still looks silent, and its budget is known."""
        # An excluded clinic is out of the federation, not silent: no series for it.
        self._seen_at_start = {
            c: at
            for c, at in self.ledger.clinics_seen().items()
            if not self.membership.is_excluded(c)
        }
        for clinic, at in self._seen_at_start.items():
            self.metrics.clinic_last_seen.labels(clinic=clinic).set(at)
        for clinic, ev in self.ledger.latest_clinic_events("privacy").items():
            if self.membership.is_excluded(clinic):
                continue
            try:
                report = json.loads(ev.detail or "")
            except ValueError:
                continue
            if not isinstance(report, dict):
                continue
            spent, remaining = report.get("epsilon_spent"), report.get("epsilon_remaining")
            if isinstance(spent, int | float) and isinstance(remaining, int | float):
                self.metrics.clinic_epsilon_spent.labels(clinic=clinic).set(spent)
                self.metrics.clinic_epsilon_remaining.labels(clinic=clinic).set(remaining)

    def _metrics_of(self, cid: str, state: dict | None = None) -> dict[str, object] | None:
        """Held-out metrics of a stored checkpoint, evaluating (and recording) if missing."""
        rec = self.ledger.checkpoint(cid)
        if rec is not None and rec.metrics:
            return dict(rec.metrics)
        if self.evaluator is None:
            return None
        if state is None:
            state, _ = self.store.load(cid)
        metrics = self.evaluator.evaluate(state).to_dict()
        self.ledger.set_checkpoint_metrics(cid, metrics)
        return metrics

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rounds", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the round loop thread runs (the systemd watchdog's health check)."""
        return self._thread is not None and self._thread.is_alive()

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

    def poll(
        self, clinic: str, last_round: int, wait_s: float, privacy: PrivacyReport | None = None
    ) -> PollResult:
        """Long-poll: return a task for ``clinic`` as soon as there is one, or after wait_s.

        One held poll per clinic: a new poll from the same clinic releases the one it
        already holds (which answers at once, without a task). An honest agent never has
        two, and a buggy or hostile one cannot park many of the server's workers.
        """
        give_up = time.monotonic() + max(0.0, wait_s)
        with self._cond:
            # Before _touch: an excluded or refused clinic does not count as connected.
            self.membership.check(clinic)
            if privacy is not None:
                self.privacy_floor.check(clinic, privacy)
            self._touch(clinic)
            if privacy is not None:
                self._record_privacy_locked(clinic, privacy)
            ticket = self._poll_tickets.get(clinic, 0) + 1
            if ticket > 1 and clinic in self._holding:
                self._limit_hit_locked(
                    clinic,
                    "held_polls",
                    "polls while its previous poll is still held; the older one is released "
                    "(one held poll per clinic)",
                )
            self._poll_tickets[clinic] = ticket
            self._cond.notify_all()  # wakes the clinic's earlier poll, if one is held
            self._holding.add(clinic)
            try:
                while True:
                    if self._poll_tickets.get(clinic) != ticket:
                        task = None  # a newer poll from this clinic took over
                        break
                    task = self._task_for_locked(clinic)
                    if task is not None or self._stop.is_set():
                        break
                    remaining = give_up - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, 1.0))
                    self._touch(clinic)
            finally:
                if self._poll_tickets.get(clinic) == ticket:
                    self._holding.discard(clinic)
            return PollResult(task, *self._published)

    def _limit_hit_locked(self, clinic: str, limit: str, what: str) -> None:
        """Count a per-clinic limit being hit, and say so at most once a minute per clinic
        and limit: the flood itself must not flood the log."""
        self.metrics.limit_hits.labels(limit=limit).inc()
        now = self._clock()
        if now - self._limit_logged.get((clinic, limit), -math.inf) >= 60.0:
            self._limit_logged[(clinic, limit)] = now
            log.warning("clinic %s %s", clinic, what)

    def acknowledge_privacy_reset(
        self, clinic: str, reason: str, actor: str
    ) -> tuple[float, float]:
        """An admin accepts a clinic's lower epsilon; returns (old floor, new floor)."""
        with self._cond:
            return self.privacy_floor.acknowledge(clinic, reason, actor)

    def set_clinic_excluded(self, clinic: str, excluded: bool, reason: str, actor: str) -> bool:
        """An admin takes ``clinic`` out of the federation or brings it back; returns whether
        it was excluded before. A running round with it in its cohort goes on without it."""
        with self._cond:
            was = self.membership.set(clinic, excluded, reason, actor)
            if excluded:
                # Its per-clinic series go: an excluded clinic is not "silent", it is out.
                self._clinics.pop(clinic, None)
                self._seen_at_start.pop(clinic, None)
                self._forget_clinic_series(clinic)
            self._cond.notify_all()
            return was

    def _forget_clinic_series(self, clinic: str) -> None:
        for gauge in (
            self.metrics.clinic_last_seen,
            self.metrics.clinic_epsilon_spent,
            self.metrics.clinic_epsilon_remaining,
            self.metrics.clinic_privacy_reset,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(clinic)

    def _record_privacy_locked(self, clinic: str, report: PrivacyReport) -> None:
        self.privacy_floor.record(clinic, report)
        info = self._clinics[clinic]
        self.metrics.clinic_epsilon_spent.labels(clinic=clinic).set(report.epsilon_spent)
        self.metrics.clinic_epsilon_remaining.labels(clinic=clinic).set(report.epsilon_remaining)
        if info.privacy != report:
            # Only changes go to the ledger, so a polling clinic does not flood it.
            info.privacy = report
            running = self._running
            self.ledger.record_clinic_event(
                running.state.number if running else None,
                clinic,
                "privacy",
                json.dumps(
                    {
                        "status": report.status,
                        "epsilon_spent": report.epsilon_spent,
                        "epsilon_max": report.epsilon_max,
                        "epsilon_remaining": report.epsilon_remaining,
                        "delta": report.delta,
                    }
                ),
                self._clock(),
            )

    def _task_for_locked(self, clinic: str) -> RoundTask | None:
        running = self._running
        if running is None or running.finalizing:
            return None
        target = running.evaluation or running
        st = target.state
        if not st.is_pending(clinic):
            return None
        plan = replace(target.plan, stage_deadline=st.deadline)
        return RoundTask(plan, st.stage, target.mode.stage_data(st.stage, clinic))

    def checkpoint_chunks(self, clinic: str, cid: str) -> Iterator[bytes]:
        """Stream a checkpoint the federation has recorded (never an arbitrary file)."""
        if not self.store.exists(cid):
            raise NotFoundError(f"checkpoint {cid[:16]} is not known")
        return self.store.iter_chunks(cid)

    def checkpoint_size(self, cid: str) -> int:
        return self.store.size(cid)

    def begin_upload(self, clinic: str, header: UploadHeader) -> UploadSink:
        """Check an upload's header before any payload is read; returns where chunks go.

        The caller must finish with :meth:`complete_upload` or :meth:`abandon_upload`.
        """
        with self._cond:
            running = self._require_round(header.round)
            running.state.check_can_respond(
                clinic, header.round, running.mode.upload_stage, self._clock()
            )
            # One upload in flight per clinic: an honest agent sends one per round (a retry
            # follows a broken stream), so a clinic that opens many and stalls them takes one
            # of the shared slots, never all of them.
            if clinic in self._uploading:
                self._limit_hit_locked(
                    clinic,
                    "uploads_in_flight",
                    "opened a second upload while one is in flight (one per clinic); refused",
                )
                raise BusyError(f"clinic {clinic} already has an upload in flight")
            self._uploading.add(clinic)
        try:
            wait = max(0.0, running.state.deadline - self._clock())
            if not self._upload_slots.acquire(timeout=min(wait, 60.0)):
                raise BusyError("too many uploads in flight; retry shortly")
        except BaseException:
            with self._cond:
                self._uploading.discard(clinic)
            raise
        try:
            with self._cond:
                running = self._require_round(header.round)
                running.state.check_can_respond(
                    clinic, header.round, running.mode.upload_stage, self._clock()
                )
                return running.mode.begin_upload(clinic, header)
        except BaseException:
            self._release_upload(clinic)
            raise

    def uploads_in_flight(self) -> frozenset[str]:
        """The clinics with an upload stream open now."""
        with self._cond:
            return frozenset(self._uploading)

    def _release_upload(self, clinic: str) -> None:
        with self._cond:
            self._uploading.discard(clinic)
        self._upload_slots.release()

    def abandon_upload(self, sink: UploadSink) -> None:
        """A broken or refused stream: drop its buffer, nothing reaches the round."""
        try:
            with self._cond:
                sink.discard()
        finally:
            self._release_upload(sink.clinic)

    def complete_upload(self, clinic: str, header: UploadHeader, sink: UploadSink) -> None:
        try:
            if sink.received_bytes != sink.expected_bytes:
                raise InvalidUpdateError(
                    f"payload is {sink.received_bytes} bytes, the header declared "
                    f"{sink.expected_bytes}"
                )
            with self._cond:
                running = self._require_round(header.round)
                stage = running.mode.upload_stage
                # Re-check under the lock: the stage may have closed while the payload streamed.
                running.state.check_can_respond(clinic, header.round, stage, self._clock())
                running.mode.commit_upload(clinic, header, sink)
                running.state.respond(clinic, header.round, stage, self._clock())
                if math.isfinite(header.train_seconds) and header.train_seconds >= 0:
                    running.train_seconds[clinic] = header.train_seconds
                evaluated = evaluated_round(header.round)
                self.metrics.received_bytes.labels(
                    kind="update" if evaluated is None else "evaluation"
                ).inc(sink.received_bytes)
                self.ledger.record_clinic_event(
                    header.round if evaluated is None else evaluated,
                    clinic,
                    "contributed" if evaluated is None else "evaluated",
                    f"{sink.received_bytes} bytes",
                    self._clock(),
                )
                self._cond.notify_all()
        except BaseException:
            with self._cond:
                sink.discard()
            raise
        finally:
            self._release_upload(clinic)
        log.info(
            "round %d: update from %s accepted (%d bytes)",
            header.round,
            clinic,
            sink.received_bytes,
        )

    def _require_round(self, number: int) -> RunningRound:
        """The running round, or its evaluation session when ``number`` names that."""
        running = self._running
        if running is None:
            raise PreconditionError("no round is running")
        if running.state.number == number:
            return running
        evaluation = running.evaluation
        if evaluation is not None and evaluation.state.number == number:
            return evaluation
        if evaluated_round(number) == running.state.number:
            raise StaleRoundError(f"round {running.state.number} is not being evaluated now")
        raise StaleRoundError(f"round {number} is not the running round {running.state.number}")

    def _secure_step(
        self, clinic: str, round_number: int, stage: str, action: Callable[[SecureMode], None]
    ) -> None:
        """One secure-aggregation message: stage checks, the server step, then respond."""
        with self._cond:
            running = self._require_round(round_number)
            if not isinstance(running.mode, SecureMode):
                raise PreconditionError(f"round {round_number} does not use secure aggregation")
            running.state.check_can_respond(clinic, round_number, stage, self._clock())
            action(running.mode)
            running.state.respond(clinic, round_number, stage, self._clock())
            self._cond.notify_all()

    def secagg_advertise(self, clinic: str, adv: KeyAdvertisement, cert_pem: bytes) -> None:
        self._secure_step(
            clinic, adv.round_number, "advertise", lambda m: m.advertise(clinic, adv, cert_pem)
        )

    def secagg_share_keys(self, clinic: str, submission: ShareSubmission) -> None:
        self._secure_step(
            clinic,
            submission.round_number,
            "share_keys",
            lambda m: m.submit_shares(clinic, submission),
        )

    def secagg_sign(self, clinic: str, signature: SurvivorSignature) -> None:
        self._secure_step(
            clinic,
            signature.round_number,
            "consistency",
            lambda m: m.submit_signature(clinic, signature),
        )

    def secagg_reveal(self, clinic: str, reveal: Reveal) -> None:
        self._secure_step(clinic, reveal.round_number, "unmask", lambda m: m.reveal(clinic, reveal))

    def decline(self, clinic: str, round_number: int, reason: str, detail: str) -> None:
        label = reason if reason in KNOWN_DECLINE_REASONS else "other"
        with self._cond:
            running = self._require_round(round_number)
            running.state.decline(clinic, round_number, reason, self._clock())
            round_number = evaluated_round(round_number) or round_number
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

    def request_round(self, actor: str = "") -> None:
        """Start a round at the next tick (even past max_rounds or before interval_s)."""
        with self._cond:
            if self._running is not None:
                raise PreconditionError(f"round {self._running.state.number} is running")
            if self._round_requested:
                return  # already asked; idempotent
            self._round_requested = True
            self.ledger.audit(actor, "trigger_round", {}, self._clock())
            self._cond.notify_all()

    def abort_round(self, number: int, reason: str, actor: str = "") -> None:
        with self._cond:
            running = self._running
            if running is None:
                raise PreconditionError("no round is running")
            if number != running.state.number:
                raise PreconditionError(
                    f"round {number} is not the running round {running.state.number}"
                )
            if running.finalizing:
                raise PreconditionError(f"round {number} is already being aggregated and validated")
            why = f"aborted by {actor}: {reason}" if reason else f"aborted by {actor}"
            self.ledger.audit(
                actor, "abort_round", {"round": number, "reason": reason}, self._clock()
            )
            if running.evaluation is not None:
                # The candidate is formed and stored; the operator's abort ends the round
                # without a decision (the candidate stays on disk, unpublished).
                running.evaluation.state.abort(why)
                running.evaluation.mode.abort(why)
                self._abort_pending_locked(running, why)
                return
            running.state.abort(why)
            self._settle_locked(self._clock())

    def rollback(
        self,
        *,
        round_number: int | None = None,
        checkpoint: str | None = None,
        reason: str = "",
        actor: str = "",
    ) -> tuple[str, int, bool]:
        """Publish an earlier published checkpoint again; returns (id, round, changed)."""
        if (round_number is None) == (checkpoint is None):
            raise InvalidUpdateError("name exactly one rollback target: a round or a checkpoint")
        if round_number is not None:
            if round_number < 0:
                raise InvalidUpdateError("round numbers are not negative")
            if round_number == 0:
                pubs = [p for p in self.ledger.publications() if p.kind == "initial"]
                if not pubs:
                    raise NotFoundError("the ledger has no initial checkpoint")
                target, target_round = pubs[0].checkpoint, 0
            else:
                rec = self.ledger.round(round_number)
                if rec is None:
                    raise NotFoundError(f"round {round_number} is not in the ledger")
                if rec.outcome != "published" or not rec.checkpoint:
                    raise InvalidUpdateError(
                        f"round {round_number} did not publish a checkpoint "
                        f"(outcome: {rec.outcome or 'running'})"
                    )
                target, target_round = rec.checkpoint, round_number
        else:
            target = str(checkpoint)
            if len(target) != 64 or any(c not in "0123456789abcdef" for c in target):
                raise InvalidUpdateError("checkpoint id must be 64 lowercase hex characters")
            crec = self.ledger.checkpoint(target)
            if crec is None:
                raise NotFoundError(f"checkpoint {target[:16]} is not in the ledger")
            if not any(p.checkpoint == target for p in self.ledger.publications()):
                raise InvalidUpdateError(
                    f"checkpoint {target[:16]} was never published (a rejected or aborted "
                    "candidate cannot be rolled back to)"
                )
            target_round = int(crec.round or 0)
        with self._cond:
            if self._running is not None:
                raise PreconditionError(
                    f"round {self._running.state.number} is running; abort it before rolling back"
                )
            if target == self._published[0]:
                return target, self._published[1], False
            state, _ = self.store.load(target)  # the file must still be intact
            now = self._clock()
            with self.ledger.atomic():
                self.ledger.publish(target, target_round, now, "rollback", reason)
                self.ledger.audit(
                    actor,
                    "rollback",
                    {"checkpoint": target, "round": target_round, "reason": reason},
                    now,
                )
            self._published = (target, target_round)
            self._published_metrics = self._metrics_of(target, state)
            self.metrics.rollbacks.labels(kind="admin").inc()
            self.metrics.published_round.set(target_round)
            self.metrics.published_timestamp.set(now)
            if self._published_metrics:
                self.metrics.set_validation(self._published_metrics)
            log.warning(
                "rolled back to checkpoint %s (round %d) by %s", target[:12], target_round, actor
            )
            self._cond.notify_all()
            return target, target_round, True

    def list_rounds(self, limit: int, before: int | None) -> list[RoundView]:
        views = []
        with self._cond:
            current = self._running_view_locked()
        if current is not None and (before is None or current.round < before):
            views.append(current)
        for rec in self.ledger.rounds(limit=limit, before=before):
            if rec.outcome is None:
                continue  # the running one, shown above from memory
            views.append(view_of_record(rec))
        return views[:limit]

    def list_checkpoints(self, limit: int) -> list[CheckpointView]:
        published_ids = {p.checkpoint for p in self.ledger.publications()}
        out = []
        for rec in self.ledger.checkpoints(limit=limit):
            out.append(
                CheckpointView(
                    id=rec.id,
                    round=int(rec.round or 0),
                    parent=rec.parent or "",
                    created_at=rec.created_at,
                    metrics=rec.metrics,
                    published=rec.id == self._published[0],
                    was_published=rec.id in published_ids,
                    bytes=self.store.size(rec.id) if self.store.exists(rec.id) else 0,
                )
            )
        return out

    def list_clinics(self) -> list[ClinicView]:
        """Every clinic the ledger or this process knows, with its participation."""
        now = self._clock()
        counts: dict[str, dict[str, int]] = {}
        last_decline: dict[str, str] = {}
        epsilon: dict[str, tuple[float | None, float | None]] = {}
        for ev in self.ledger.clinic_events():
            c = counts.setdefault(ev.clinic, {"contributed": 0, "declined": 0, "dropped": 0})
            if ev.event in c:
                c[ev.event] += 1
            if ev.event == "declined":
                last_decline[ev.clinic] = (ev.detail or "").split(":", 1)[0]
            if ev.event == "privacy" and ev.detail:
                report = json.loads(ev.detail)
                epsilon[ev.clinic] = (report.get("epsilon_spent"), report.get("epsilon_remaining"))
        with self._cond:
            seen = {**self._seen_at_start, **{c: i.last_seen for c, i in self._clinics.items()}}
            connected = set(self._connected_locked(now))
            floors = self.privacy_floor.floors
            refused = {c for c in floors if self.privacy_floor.is_refused(c)}
            excluded = self.membership.excluded
        views = []
        for clinic in sorted(set(counts) | set(seen) | set(floors) | set(excluded)):
            c = counts.get(clinic, {})
            spent, remaining = epsilon.get(clinic, (None, None))
            views.append(
                ClinicView(
                    clinic=clinic,
                    connected=clinic in connected,
                    last_seen=seen.get(clinic, 0.0),
                    rounds_contributed=c.get("contributed", 0),
                    declines=c.get("declined", 0),
                    dropouts=c.get("dropped", 0),
                    last_decline_reason=last_decline.get(clinic, ""),
                    epsilon_spent=spent,
                    epsilon_remaining=remaining,
                    epsilon_floor=floors.get(clinic),
                    privacy_reset=clinic in refused,
                    excluded_reason=excluded.get(clinic),
                )
            )
        return views

    def audit_log(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` audited admin actions."""
        return self.ledger.audit_log(limit)

    def audit(self, actor: str, action: str, detail: dict[str, object]) -> None:
        self.ledger.audit(actor, action, detail, self._clock())

    def status(self) -> StatusView:
        with self._cond:
            current = self._running_view_locked()
            connected = tuple(self._connected_locked(self._clock()))
            published = self._published
            next_round_at = self._next_round_at_locked()
        recent = [r for r in self.ledger.rounds(limit=5) if r.outcome]
        last = view_of_record(recent[0]) if recent else None
        return StatusView(
            federation=self.config.federation,
            published_checkpoint=published[0],
            published_round=published[1],
            current=current,
            last=last,
            connected=connected,
            rounds_completed=self._rounds_finished,
            max_rounds=self.config.rounds.max_rounds,
            next_round_at=next_round_at,
        )

    def _running_view_locked(self) -> RoundView | None:
        running = self._running
        if running is None:
            return None
        st = running.state
        evaluation = running.evaluation
        stage = st.stage if evaluation is None else f"evaluate_{evaluation.state.stage}"
        history = list(st.history)
        if evaluation is not None:
            history += [replace(h, stage=f"evaluate_{h.stage}") for h in evaluation.state.history]
        return RoundView(
            round=st.number,
            state="finalizing" if running.finalizing else stage,
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
            stage_seconds={h.stage: h.seconds for h in history},
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
        # Persisted at most once a minute per clinic: a polling clinic costs one small
        # UPSERT a minute, and a restart loses at most a minute of "last seen".
        if now - self._seen_persisted.get(clinic, -math.inf) >= SEEN_PERSIST_INTERVAL_S:
            self.ledger.record_clinic_seen(clinic, now)
            self._seen_persisted[clinic] = now

    def _connected_locked(self, now: float) -> list[str]:
        horizon = self.config.rounds.connected_timeout_s
        # A clinic refused for a privacy reset is never in a cohort, however recently seen.
        return sorted(
            c
            for c, i in self._clinics.items()
            if now - i.last_seen <= horizon
            and not self.privacy_floor.is_refused(c)
            and not self.membership.is_excluded(c)
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step(wait_s=0.2)

    def step(self, wait_s: float = 0.0) -> bool:
        """One turn of the round loop in the caller's thread: close stages whose deadline
        passed or whose clinics all answered, start a round when one is due, and finalise
        a round that is ready (slow: outside the lock). The loop thread calls it with a
        wait for the next event; tests call it directly, with a fake clock and no thread.
        Returns whether a round was finalised (or its evaluation started)."""
        with self._cond:
            now = self._clock()
            ready = self._settle_locked(now)
            if self._running is None and not self._stop.is_set():
                self._maybe_start_locked(now)
            if ready is None and wait_s > 0:
                self._cond.wait(wait_s)
        if ready is not None:
            self._finalize(ready)
        return ready is not None

    def _settle_locked(self, now: float) -> RunningRound | None:
        """Advance the running round (or its evaluation session); returns the round when it
        is ready to be finalised."""
        running = self._running
        if running is None or running.finalizing:
            return None
        target = running.evaluation or running
        st = target.state
        # An evaluation session's stages are the round's, recorded as "evaluate_<stage>".
        prefix = "" if target is running else "evaluate_"
        number = running.state.number
        while (result := st.tick(now)) is not None:
            if st.phase is not Phase.ABORTED:
                try:
                    # The mode may keep fewer clinics than the stage's responders (secure:
                    # only uploads that committed are in the sum) or abort below t.
                    kept = target.mode.close_stage(result.stage, result.responded)
                except SecAggAbortedError as exc:
                    st.abort(str(exc))
                else:
                    lost = set(st.alive) - kept
                    if lost:
                        st.alive = set(kept)
                        for clinic in sorted(lost):
                            st.dropped[clinic] = result.stage
            stage = prefix + result.stage
            self.ledger.record_stage(number, stage, result.seconds)
            self.metrics.stage_duration.labels(stage=stage).observe(result.seconds)
            for clinic in sorted(result.dropped):
                self.metrics.dropouts.labels(stage=stage).inc()
                self.ledger.record_clinic_event(
                    number, clinic, "dropped", f"silent in stage {stage}", now
                )
                log.warning("round %d: %s dropped out in stage %s", number, clinic, stage)
        if st.phase is Phase.ABORTED:
            target.mode.abort(st.abort_reason)
            if target is running:
                self._finish_locked(running, "aborted", st.abort_reason, now)
                return None
            # A failed evaluation costs the round its federated evidence, not the candidate:
            # the gate decides on the held-out set and says so.
            running.evaluation_note = f"federated evaluation aborted: {st.abort_reason}"
        if st.phase is not Phase.RUNNING:
            running.finalizing = True
            self._cond.notify_all()
            return running
        return None

    def _interval_locked(self) -> float:
        """Seconds the next round waits after the last one finished (longer after an abort)."""
        rc = self.config.rounds
        if self._last_outcome == "aborted":
            return max(rc.interval_s, rc.retry_after_abort_s)
        return rc.interval_s

    def _next_round_at_locked(self) -> float | None:
        """When the schedule lets the next round start; None while one runs or none will."""
        rc = self.config.rounds
        if self._running is not None or (rc.max_rounds and self._rounds_finished >= rc.max_rounds):
            return None
        return next_round_due(self._last_finished_at, self._interval_locked())

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
            interval_s=self._interval_locked(),
            requested=self._round_requested,
        ):
            return
        self._round_requested = False
        cohort = select_cohort(connected, rc.max_cohort, self._rng)
        number = self.ledger.next_round_number()
        try:
            state, plan, mode = self._new_round(number, cohort, now)
        except (PreconditionError, InvalidUpdateError, ValueError) as exc:
            # A plan that cannot be made safe (e.g. too small a cohort for secure
            # aggregation) is not started; try again after retry_after_abort_s.
            log.error("round %d not started: %s", number, exc)
            self._last_finished_at = now
            self._last_outcome = "aborted"
            return
        self.ledger.begin_round(
            number, self._published[0], rc.aggregation, plan.to_json(), list(cohort), now
        )
        for clinic in cohort:
            self.ledger.record_clinic_event(number, clinic, "selected", "", now)
        self._running = RunningRound(state, plan, mode)
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

    def _new_round(
        self, number: int, cohort: list[str], now: float
    ) -> tuple[Round, RoundPlan, RoundMode]:
        """The plan, state machine and aggregation mode of a new round."""
        rc, pc = self.config.rounds, self.config.plan
        plan = RoundPlan(
            round=number,
            parent_checkpoint=self._published[0],
            local_epochs=pc.local_epochs,
            optimizer=pc.optimizer,
            # Rounds count from 1; the schedule decays the base rate across them.
            learning_rate=round_learning_rate(
                pc.learning_rate,
                number - 1,
                pc.lr_horizon_rounds,
                schedule=pc.lr_schedule,
                min_factor=pc.lr_min_factor,
            ),
            fedprox_mu=pc.fedprox_mu,
            batch_size=pc.batch_size,
            delta_clip_norm=pc.delta_clip_norm,
            aggregation=rc.aggregation,
            min_clinics=rc.min_clinics,
            cohort=tuple(cohort),
            federation=self.config.federation,
            dp_noise_multiplier=pc.dp_noise_multiplier or None,
        )
        max_bytes = self.config.server.max_update_bytes
        mode: RoundMode
        if rc.aggregation == "secure":
            if self.ca_cert is None:
                raise PreconditionError("secure aggregation needs the federation CA certificate")
            # Unmasking needs t clinics, and 2t > n stops a lying aggregator from splitting
            # the cohort into two quorums; the round survives dropouts down to t.
            threshold = max(rc.min_clinics, minimum_threshold(len(cohort)))
            if threshold > len(cohort):
                raise PreconditionError(
                    f"cohort of {len(cohort)} is below the threshold {threshold}"
                )
            bound = self._upload_bound(threshold)
            quant = plan_quantization(
                bound, len(cohort), weight_max=pc.weight_max, loss_max=pc.loss_max
            )
            plan = replace(
                plan,
                threshold=threshold,
                quantization=quant,
                min_clinics=threshold,
                clinic_noise_multiplier=pc.clinic_noise_multiplier,
                upload_norm_bound=bound,
            )
            server = SecAggServer(
                self.config.federation,
                number,
                cohort,
                threshold,
                quant.vector_length(total_numel(self._specs)),
                quant,
                self.ca_cert,
                now=lambda: datetime.fromtimestamp(self._clock(), UTC),
            )
            mode = SecureMode(server, self._specs, max_bytes)
            timeouts = {stage: rc.secagg_stage_deadline_s for stage in mode.stages}
            timeouts[mode.upload_stage] = rc.train_deadline_s
        else:
            bound = self._upload_bound(1) if pc.delta_clip_norm > 0 else 0.0
            plan = replace(
                plan, clinic_noise_multiplier=pc.clinic_noise_multiplier, upload_norm_bound=bound
            )
            mode = PlainMode(self._specs, bound, max_bytes)
            timeouts = {TRAIN_STAGE: rc.train_deadline_s}
        state = Round.start(
            number=number,
            parent=self._published[0],
            cohort=cohort,
            min_clinics=plan.min_clinics,
            stages=mode.stages,
            stage_timeouts=timeouts,
            now=now,
        )
        return state, plan, mode

    def _sum_bounds(self, plan: RoundPlan) -> SumBounds:
        quant = plan.quantization
        return SumBounds(
            min_weight=self.config.validation.min_clinic_weight,
            weight_max=quant.weight_max if quant is not None else MAX_WEIGHT,
            norm_bound=plan.upload_norm_bound,
            delta_scale=quant.delta_scale if quant is not None else 0.0,
            loss_max=quant.loss_max if quant is not None else None,
            loss_scale=(quant.loss_scale or 0.0) if quant is not None else 0.0,
            slack=self.config.validation.sum_norm_slack,
        )

    def _published_predicted(self) -> np.ndarray:
        """The published checkpoint's predicted held-out labels (scored once per checkpoint)."""
        assert self.evaluator is not None
        cid = self._published[0]
        cached = self._published_predictions
        if cached is None or cached[0] != cid:
            state, _ = self.store.load(cid)
            cached = (cid, self.evaluator.score(state)[1])
            self._published_predictions = cached
        return cached[1]

    def _upload_bound(self, threshold: int) -> float:
        """The L2 norm an upload may have: the clip bound, or with clinic-level noise a bound
        the noised delta exceeds with probability below 1e-12 (it sizes the quantization)."""
        pc = self.config.plan
        if pc.clinic_noise_multiplier <= 0:
            return pc.delta_clip_norm
        std = clinic_noise_std(
            clip=pc.delta_clip_norm,
            noise_multiplier=pc.clinic_noise_multiplier,
            threshold_t=threshold,
        )
        return noised_norm_bound(
            clip_norm=pc.delta_clip_norm, noise_std=std, dim=total_numel(self._specs)
        )

    def _finalize(self, running: RunningRound) -> None:
        """Aggregate, store and score the candidate, run its federated evaluation when it
        applies, then decide; runs outside the lock (it is slow)."""
        if running.pending is None:
            pending = self._form_candidate(running)
            if pending is None or self._start_evaluation(running, pending):
                return
        self._decide(running)

    def _form_candidate(self, running: RunningRound) -> PendingDecision | None:
        """The checked sum applied to the parent, stored and scored on the held-out set;
        None when the round was finished here instead (a sum check or a failure)."""
        st = running.state
        started = self._clock()
        result = None
        try:
            result = running.mode.finalize(st.alive)
            # Before any model is formed or scored: could honest clinics have sent this?
            sum_report = check_sum(result, self._sum_bounds(running.plan))
            parent_state, _ = self.store.load(st.parent)
            delta = unflatten(result.delta, self._specs)
            new_state = {k: parent_state[k] + delta[k] for k in parent_state}
            cid = self.store.put_state(new_state, self._checkpoint_metadata(st.number, st.parent))
            aggregate_seconds = self._clock() - started
            metrics: dict[str, object] | None = None
            evidence: PairedEvidence | None = None
            predicted: np.ndarray | None = None
            eval_seconds = 0.0
            if self.evaluator is not None:
                t0 = self._clock()
                scored, predicted = self.evaluator.score(new_state)
                metrics = scored.to_dict()
                if self.gate.enabled and self.gate.rule != "tolerance":
                    evidence = PairedEvidence.from_predictions(
                        self.evaluator.labels, predicted, self._published_predicted(), CLASSES
                    )
                eval_seconds = self._clock() - t0
        except SumCheckError as exc:
            log.warning("round %d: %s", st.number, exc)
            self.metrics.sum_check_failures.labels(check=exc.check).inc()
            with self._cond:
                self._finish_locked(
                    running,
                    "rejected",
                    str(exc),
                    self._clock(),
                    contributors=result.contributors if result is not None else (),
                    metrics={"sum_checks": {"failed": exc.check, "reason": str(exc)}},
                )
            return None
        except Exception as exc:  # a failed finalisation must abort, never half-publish
            log.exception("round %d: finalisation failed", st.number)
            with self._cond:
                self._finish_locked(
                    running, "aborted", f"finalisation failed: {exc}", self._clock()
                )
            return None
        pending = PendingDecision(
            checkpoint=cid,
            result=result,
            sum_report=sum_report,
            metrics=metrics,
            holdout_evidence=evidence,
            predicted=predicted,
            aggregate_seconds=aggregate_seconds,
            validate_seconds=eval_seconds,
        )
        with self._cond:
            # Recorded now, not at the decision: a restart during the federated evaluation
            # leaves a listed (so retention-managed) candidate, never a stray file.
            self.ledger.record_checkpoint(cid, st.number, st.parent, self._clock(), metrics)
        running.pending = pending
        return pending

    def _start_evaluation(self, running: RunningRound, pending: PendingDecision) -> bool:
        """Start the candidate's secure federated evaluation when it applies (True)."""
        validation = self.config.validation
        wanted = (
            validation.federated_evaluation
            and isinstance(running.mode, SecureMode)
            and self.gate.enabled
            and self.gate.rule != "tolerance"
            and pending.holdout_evidence is not None
            # Against the initial or a chance-level model only the floor applies.
            and compares(
                self._published_metrics, self.gate, published_is_initial=self._published[1] == 0
            )
        )
        if not wanted or self.ca_cert is None:  # a secure round always has the CA
            return False
        contributors = pending.result.contributors
        threshold = evaluation_threshold(len(contributors), self.config.rounds.min_clinics)
        with self._cond:
            if threshold is None:
                running.evaluation_note = (
                    f"federated evaluation skipped: {len(contributors)} contributor(s) cannot "
                    "form a secure sum"
                )
                return False
            rc = self.config.rounds
            running.evaluation = start_evaluation(
                training=running,
                cohort=contributors,
                candidate=pending.checkpoint,
                threshold=threshold,
                max_cases=validation.evaluation_max_cases,
                ca_cert=self.ca_cert,
                first_stage_s=rc.evaluation_deadline_s,
                stage_s=rc.secagg_stage_deadline_s,
                max_bytes=self.config.server.max_update_bytes,
                now=self._clock(),
                clock=self._clock,
            )
            running.finalizing = False
            self._cond.notify_all()
        log.info(
            "round %d: candidate %s formed; federated evaluation by %d clinic(s)",
            running.state.number,
            pending.checkpoint[:12],
            len(contributors),
        )
        return True

    def _federated_counts(
        self, running: RunningRound
    ) -> tuple[EvaluationCounts | None, tuple[str, ...]]:
        """The evaluation's checked count sum and its clinics, or None (with a note)."""
        evaluation = running.evaluation
        if evaluation is None or evaluation.state.phase is not Phase.READY:
            return None, ()
        try:
            return summed_counts(evaluation)
        except SecAggAbortedError as exc:
            running.evaluation_note = f"federated evaluation failed to unmask: {exc}"
            return None, ()

    def _decide(self, running: RunningRound) -> None:
        """The gate's decision on the pending candidate, recorded and applied."""
        st = running.state
        pending = running.pending
        assert pending is not None
        counts: EvaluationCounts | None = None
        evaluated: tuple[str, ...] = ()
        try:
            try:
                counts, evaluated = self._federated_counts(running)
            except CountCheckError as exc:
                # Honest clinics cannot produce this sum: someone lied about their counts.
                self.metrics.sum_check_failures.labels(check=f"count_{exc.check}").inc()
                decision = GateDecision(
                    False,
                    f"federated evaluation count sum failed the {exc.check} check: {exc}",
                    rule=self.gate.rule,
                )
            else:
                evidence = pending.holdout_evidence
                if counts is not None and evidence is not None:
                    evidence = evidence + evidence_of(counts)
                decision = decide(
                    pending.metrics,
                    self._published_metrics,
                    self.gate,
                    published_is_initial=self._published[1] == 0,
                    evidence=evidence,
                )
        except Exception as exc:  # a failed decision must abort, never half-publish
            log.exception("round %d: the gate's decision failed", st.number)
            with self._cond:
                self._abort_pending_locked(running, f"finalisation failed: {exc}")
            return
        result, cid, metrics = pending.result, pending.checkpoint, pending.metrics
        with self._cond:
            now = self._clock()
            if running.train_seconds:
                # The slowest contributor bounds the round; the rest of the time is protocol.
                self.ledger.record_stage(
                    st.number, "local_training", max(running.train_seconds.values())
                )
            self.ledger.record_stage(st.number, "aggregate", pending.aggregate_seconds)
            self.metrics.stage_duration.labels(stage="aggregate").observe(pending.aggregate_seconds)
            if self.evaluator is not None:
                self.ledger.record_stage(st.number, "validate", pending.validate_seconds)
                self.metrics.stage_duration.labels(stage="validate").observe(
                    pending.validate_seconds
                )
            recorded = dict(metrics or {})
            recorded["sum_checks"] = pending.sum_report
            if running.evaluation is not None or running.evaluation_note:
                recorded["federated_evaluation"] = summary(
                    counts, evaluated, running.evaluation_note
                )
            self.metrics.gate_decisions.labels(rule=decision.rule, verdict=decision.verdict).inc()
            self.metrics.federated_cases.set(counts.cases if counts is not None else 0)
            self.metrics.federated_contributors.set(len(evaluated))
            reason = decision.reason
            if running.evaluation_note:
                reason = f"{reason} [{running.evaluation_note}]"
            if metrics is not None:
                recorded["gate"] = {
                    "verdict": decision.verdict,
                    "rule": decision.rule,
                    "reason": reason,
                    "checks": decision.checks,
                }
                self.metrics.set_gate_evidence(decision.rule, decision.checks)
            if decision.accept and pending.predicted is not None:
                self._published_predictions = (cid, pending.predicted)
            if not decision.accept:
                self.metrics.rollbacks.labels(kind="automatic").inc()
                log.warning(
                    "round %d: candidate %s rejected by the validation gate: %s",
                    st.number,
                    cid[:12],
                    reason,
                )
            self._finish_locked(
                running,
                "published" if decision.accept else "rejected",
                "" if decision.accept else reason,
                now,
                checkpoint=cid,
                contributors=result.contributors,
                train_loss=result.mean_loss,
                metrics=recorded or None,
                candidate_metrics=metrics,
            )

    def _abort_pending_locked(self, running: RunningRound, reason: str) -> None:
        """End a round whose candidate is formed (and recorded) but undecided: the round is
        aborted and the candidate stays on disk for inspection, unpublished."""
        now = self._clock()
        pending = running.pending
        self._finish_locked(
            running,
            "aborted",
            reason,
            now,
            checkpoint=pending.checkpoint if pending is not None else None,
            contributors=pending.result.contributors if pending is not None else (),
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
        candidate_metrics: dict[str, object] | None = None,
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
            self._published_metrics = candidate_metrics
            self.metrics.published_round.set(st.number)
            self.metrics.published_timestamp.set(now)
            if candidate_metrics:
                self.metrics.set_validation(candidate_metrics)
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
            # A rejected candidate stays on disk (and in the ledger) for inspection, but the
            # published pointer does not move.
            self.ledger.finish_round(
                st.number,
                outcome,
                reason,
                now,
                checkpoint=checkpoint,
                contributors=list(contributors),
                train_loss=train_loss,
                metrics=metrics,
            )
            log.warning("round %d %s: %s", st.number, outcome, reason)
        self.metrics.rounds.labels(outcome=outcome).inc()
        self.metrics.round_duration.observe(max(0.0, now - st.started_at))
        self.metrics.contributors.set(len(contributors))
        self.metrics.round_running.set(0)
        self._running = None
        self._rounds_finished += 1
        self._last_finished_at = now
        self._last_outcome = outcome
        self._prune_checkpoints_locked()
        self._cond.notify_all()

    def _prune_checkpoints_locked(self) -> None:
        """Apply storage.keep_checkpoints; the ledger keeps the records, not the bytes."""
        keep = self.config.storage.keep_checkpoints
        if keep <= 0:
            return
        protected = {p.checkpoint for p in self.ledger.publications()} | {self._published[0]}
        stored = set(self.store.ids())
        newest_first = [r.id for r in self.ledger.checkpoints(limit=1_000_000) if r.id in stored]
        for cid in checkpoints_to_prune(newest_first, protected, keep):
            if self.store.delete(cid):
                log.info("retention: removed checkpoint %s (storage.keep_checkpoints)", cid[:12])

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

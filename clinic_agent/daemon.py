"""The clinic agent daemon: poll, download, train locally, upload — and survive outages.

The agent only ever opens outbound connections. Images and labels stay in this process;
what leaves is the (clipped) weight delta of the whole model and the example count.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from cryptography import x509

from clinic_agent.client import RETRYABLE, FederationClient, connection_hint
from clinic_agent.config import ClinicConfig
from clinic_agent.dp_training import train_dp
from clinic_agent.eval_slice import SLICE_FILE, EvaluationSlice, capped
from clinic_agent.evaluation_rounds import EvaluationRounds
from clinic_agent.metrics import AgentMetrics
from clinic_agent.outcomes import PreparedRound, RoundOutcome, TrainedUpdate
from clinic_agent.privacy_guard import PrivacyGuard, Refusal
from clinic_agent.progress import TrainingProgress
from clinic_agent.secure_rounds import SecureRounds
from clinic_agent.training import (
    TrainConfig,
    TrainResult,
    compute_delta,
    torch_threads,
    train_local,
)
from common.backoff import Backoff
from common.clipping import add_gaussian_noise, clinic_noise_std, clip_l2
from common.datasets import (
    CLASSES,
    ImageCache,
    Record,
    load_records,
    public_class_weights,
    public_logit_offsets,
)
from common.errors import REFUSAL_KEY, PrivacyResetError
from common.evaluation import predict_proba
from common.features import FeatureCache
from common.federated_eval import EvaluationCounts
from common.fsutil import StateDirLock, atomic_write
from common.identity import IdentityError, identity_from_certificate, own_identity
from common.model import ModelConfig, build_model
from common.pki import PkiError, certificate_expiry_reader, load_certificate
from common.tensors import flatten, in_order, load_checkpoint_bytes, specs_of
from common.tls import file_stamp
from dermafed.v1 import federation_pb2

log = logging.getLogger("dermafed.agent")


class ClinicAgent:
    def __init__(
        self,
        config: ClinicConfig,
        *,
        metrics: AgentMetrics,
        stop: threading.Event | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.stop_event = stop or threading.Event()
        self._rng = rng or random.Random()
        cert = load_certificate(config.tls.cert)
        _require_current(cert, config.tls.cert)
        self.identity = own_identity(
            cert, config.federation, "clinic", f"tls.cert {config.tls.cert}"
        )
        self.clinic_id = self.identity.name
        metrics.certificate_expiry.set_function(certificate_expiry_reader(config.tls.cert))
        self.state_dir = config.storage.state_dir
        # Two agents on one state_dir would charge one privacy ledger from two processes.
        self._state_lock = StateDirLock(self.state_dir, f"agent ({self.clinic_id})").acquire()
        try:
            self.checkpoint_dir = self.state_dir / "checkpoints"
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            # Read first: a corrupt privacy ledger stops the agent before it connects.
            self.privacy = PrivacyGuard(
                config.privacy, config.storage.privacy_ledger, config.federation
            )
            self._tls_stamp = file_stamp(config.tls.ca_cert, config.tls.cert, config.tls.key)
            self.client = self._connect()
        except BaseException:
            self._state_lock.release()
            raise
        self._export_privacy()
        self.images = ImageCache()
        # A fixed front end's features (scatternet), kept across rounds: images rarely
        # change between rounds and the front end costs far more than the head.
        self.features = FeatureCache()
        self.secure = SecureRounds(self)
        self.evaluation = EvaluationRounds(self, self.secure.identity)
        # The evaluation slice (clinic_agent/eval_slice.py), read or chosen with the data.
        self.slice_path = self.state_dir / SLICE_FILE
        self._slice: EvaluationSlice | None = None
        # The slice's records as the last prepared round read them (one folder scan a round).
        self._held: list[Record] = []
        self._predictions: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        # The parent each round trained from, and the last round this clinic contributed
        # to with its parent: the only candidate it will evaluate (see may_evaluate).
        self._trained_from: dict[int, str] = {}
        self._contributed: tuple[int, str] = (0, "")
        self.last_round = 0
        self.history: list[RoundOutcome] = []

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Poll until stopped; outages are retried with exponential backoff and jitter."""
        net = self.config.network
        backoff = Backoff(net.backoff_initial_s, net.backoff_max_s, self._rng)
        log.info("clinic %s polling %s", self.clinic_id, self.config.aggregator.address)
        refused_since: float | None = None
        last_hint = ""  # said once per cause, not at every retry
        while not self.stop_event.is_set():
            self._follow_certificate_rotation()
            try:
                task = self.client.poll(self.last_round, net.poll_wait_s, self.privacy_report())
            except grpc.RpcError as exc:
                self.metrics.connected.set(0)
                # The files may have been renewed since start: judge the current one (a
                # file caught mid-rotation is judged on the next failure).
                with contextlib.suppress(PkiError):
                    current = load_certificate(self.config.tls.cert)
                    _require_current(current, self.config.tls.cert)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since >= net.give_up_unauthenticated_s:
                        raise IdentityError(
                            f"the aggregator has refused this clinic's certificate for "
                            f"{net.give_up_unauthenticated_s:.0f}s ({exc.details()}); it may be "
                            "revoked: ask the federation's operator, install a new certificate "
                            "(dermafed pki request / sign) and start the agent again"
                        ) from None
                else:
                    refused_since = None
                if _is_privacy_reset_refusal(exc):
                    # This identity has spent more than this ledger says (a new state_dir,
                    # an old backup): training on it would spend that budget again.
                    raise PrivacyResetError(
                        f"refusing to run: {exc.details()}; then start the agent again"
                    ) from None
                delay = backoff.next_delay()
                level = logging.INFO if exc.code() in RETRYABLE else logging.ERROR
                log.log(
                    level,
                    "poll failed (%s: %s); retrying in %.1fs",
                    exc.code().name,
                    exc.details(),
                    delay,
                )
                hint = connection_hint(exc.details() or "")
                if hint and hint != last_hint:
                    log.warning("cannot reach the aggregator: %s", hint)
                last_hint = hint
                self.stop_event.wait(delay)
                continue
            self.metrics.connected.set(1)
            refused_since = None
            last_hint = ""
            backoff.reset()
            fresh = task.plan is not None and task.plan.round > self.last_round
            if task.kind == "train" and task.plan is not None and fresh:
                self.history.append(self.run_round(task.plan))
            elif (
                task.kind == "secagg"
                and task.plan is not None
                and task.secagg is not None
                and fresh
            ):
                outcome = self.secure.step(task.plan, task.secagg)
                if outcome is not None:
                    self.history.append(outcome)
            elif task.kind == "evaluate" and task.plan is not None and task.secagg is not None:
                self.evaluation.step(task.plan, task.secagg)
            else:
                # The server already held the call for poll_wait_s; a short pause keeps an
                # idle federation from spinning when the server answers early.
                self.stop_event.wait(
                    min(task.retry_after_s, 0.2)
                    if task.kind == "idle"
                    else task.retry_after_s or 1.0
                )

    def close(self) -> None:
        self.client.close()
        self._state_lock.release()

    def _connect(self) -> FederationClient:
        config = self.config
        return FederationClient(
            config.aggregator.address,
            ca_cert=config.tls.ca_cert,
            cert=config.tls.cert,
            key=config.tls.key,
            server_name=config.aggregator.server_name,
            rpc_timeout_s=config.network.rpc_timeout_s,
            transfer_timeout_s=config.network.transfer_timeout_s,
        )

    def _follow_certificate_rotation(self) -> None:
        """Reconnect with the new files when the clinic's certificate or key was rotated."""
        tls = self.config.tls
        stamp = file_stamp(tls.ca_cert, tls.cert, tls.key)
        if stamp == self._tls_stamp:
            return
        try:
            cert = load_certificate(tls.cert)
            identity = identity_from_certificate(cert, self.config.federation)
            fresh = self._connect()
            secure = SecureRounds(self)
        except Exception as exc:  # a half-written rotation: keep the old files for now
            log.warning("certificate files changed but cannot be loaded yet: %s", exc)
            return
        if identity.name != self.clinic_id or identity.role != "clinic":
            log.error(
                "the rotated certificate names %s, not clinic %s; ignoring it",
                identity.uri,
                self.clinic_id,
            )
            self._tls_stamp = stamp
            return
        old, self.client = self.client, fresh
        old.close()
        if self.secure._session is None:
            self.secure = secure  # signing key for future rounds; a running round keeps its own
            self.evaluation.identity = secure.identity
        self._tls_stamp = stamp
        log.info("clinic certificate rotated (serial %x); reconnected", cert.serial_number)

    # -- one plain round -----------------------------------------------------------------

    def run_round(self, plan: federation_pb2.RoundPlan) -> RoundOutcome:
        """A plain round: train and upload the clipped float32 delta."""
        started = time.monotonic()
        number = int(plan.round)
        try:
            prepared = self.prepare(plan)
            if isinstance(prepared, RoundOutcome):
                return prepared
            update = self.train(plan, prepared)
            sent = self.client.upload(
                round_number=number,
                specs=prepared.specs,
                vector=update.vector,
                weight=float(update.num_examples),
                # The mean loss is computed on the raw data without noise: under DP it would
                # leak outside the guarantee, so a plain round only shares it with DP off.
                train_loss=None if self.privacy.enabled else update.mean_loss,
                train_seconds=update.train_seconds,
            )
        except grpc.RpcError as exc:
            return self.failed(number, exc)
        except Exception as exc:
            return self.failed_locally(number, exc)
        return self.contributed(number, update, sent, time.monotonic() - started)

    # -- steps shared by plain and secure rounds -----------------------------------------

    def prepare(self, plan: federation_pb2.RoundPlan) -> PreparedRound | RoundOutcome:
        """Fetch the parent model and the current local data, and ask the privacy guard.

        Returns a :class:`RoundOutcome` when the clinic declines the round.
        """
        number = int(plan.round)
        global_state, model_cfg = self._global_model(plan.parent_checkpoint)
        self._trained_from[number] = plan.parent_checkpoint
        images, labels = self._local_data(model_cfg)
        if len(labels) == 0:
            return self.decline(number, "no_data", f"no images under {self.config.data.path}")
        tcfg = self._train_config(plan)
        decision = None
        if self.privacy.enabled:
            noise = plan.dp_noise_multiplier if plan.HasField("dp_noise_multiplier") else None
            verdict = self.privacy.decide(len(labels), tcfg.batch_size, tcfg.epochs, noise)
            self._export_privacy()
            if isinstance(verdict, Refusal):
                return self.decline(number, verdict.reason, verdict.message)
            decision = verdict
        clinic_noise = self.privacy.clinic_noise(plan.clinic_noise_multiplier)
        if isinstance(clinic_noise, Refusal):
            return self.decline(number, clinic_noise.reason, clinic_noise.message)
        return PreparedRound(
            global_state,
            model_cfg,
            images,
            labels,
            tcfg,
            decision,
            tuple(specs_of(global_state)),
            clinic_noise,
        )

    def train(self, plan: federation_pb2.RoundPlan, prepared: PreparedRound) -> TrainedUpdate:
        """Charge the privacy budget (first), train, and form the clipped delta."""
        threads = self.config.training.threads or None
        t0 = time.monotonic()
        result: TrainResult
        progress = TrainingProgress(
            int(plan.round), self.metrics.training_progress, self.metrics.training_round
        )
        if prepared.decision is not None:
            # Charged before training starts: a crash from here on can never make the
            # clinic forget the spending.
            self.privacy.charge(
                prepared.decision,
                round_number=int(plan.round),
                parent=plan.parent_checkpoint,
                clinic_noise_multiplier=prepared.clinic_noise,
            )
            self._export_privacy()
            step = prepared.decision.step
            if step is None:
                raise RuntimeError("an accepted DP decision must carry its mechanism")
            # Class weights from the published HAM10000 counts: public, so they cost no
            # budget (weights from the clinic's own label counts would leak outside DP).
            # Per-example clipping erases loss weights, so "logit_adjusted" (the recipe)
            # becomes a logit adjustment with the public prior; other modes public weights.
            mode = prepared.tcfg.class_weighting
            weights = public_class_weights() if mode in ("balanced", "sqrt") else None
            offsets = (
                public_logit_offsets(self.config.training.dp_logit_adjustment)
                if mode == "logit_adjusted"
                else None
            )
            result = train_dp(
                prepared.model_cfg,
                prepared.global_state,
                prepared.images,
                prepared.labels,
                prepared.tcfg,
                step,
                max_grad_norm=prepared.decision.max_grad_norm,
                class_weight=weights,
                logit_offsets=offsets,
                threads=threads,
                features=self.features,
                progress=progress,
            )
        else:
            result = train_local(
                prepared.model_cfg,
                prepared.global_state,
                prepared.images,
                prepared.labels,
                prepared.tcfg,
                threads=threads,
                features=self.features,
                progress=progress,
            )
        train_seconds = time.monotonic() - t0
        vector = flatten(compute_delta(result.state, prepared.global_state))
        if plan.delta_clip_norm > 0:
            vector, _norm = clip_l2(vector, plan.delta_clip_norm)
            vector = vector.astype(np.float32)
        if prepared.clinic_noise > 0:
            vector = self._clinic_level_noise(plan, vector, prepared.clinic_noise)
        self.metrics.train_loss.set(result.mean_loss)
        self.metrics.examples_per_second.set(result.examples_per_second)
        self.metrics.round_duration.labels(phase="train").observe(train_seconds)
        return TrainedUpdate(vector, result.num_examples, float(result.mean_loss), train_seconds)

    @staticmethod
    def _clinic_level_noise(
        plan: federation_pb2.RoundPlan, vector: np.ndarray, multiplier: float
    ) -> np.ndarray:
        """Gaussian noise on the clipped delta so any ``t`` survivors carry N(0, (z·C)²)."""
        if plan.delta_clip_norm <= 0:
            raise ValueError("clinic-level noise needs a clip bound (plan.delta_clip_norm)")
        t = int(plan.threshold) if plan.aggregation == "secure" and plan.threshold else 1
        std = clinic_noise_std(
            clip=plan.delta_clip_norm, noise_multiplier=multiplier, threshold_t=t
        )
        rng = np.random.default_rng(secrets.randbits(128))  # noise must not be predictable
        noised = add_gaussian_noise(vector, std, rng)
        # Post-processing (no privacy cost): the round admits vectors up to
        # upload_norm_bound, which this noise exceeds with probability below 1e-12.
        bounded, _ = clip_l2(noised, plan.upload_norm_bound or plan.delta_clip_norm)
        return bounded.astype(np.float32)

    def contributed(
        self, number: int, update: TrainedUpdate, sent: int, total_seconds: float
    ) -> RoundOutcome:
        self.last_round = number
        self._contributed = (number, self._trained_from.get(number, ""))
        self._trained_from = {number: self._contributed[1]}
        self.metrics.sent_bytes.inc(sent)
        self.metrics.round_duration.labels(phase="protocol").observe(
            max(0.0, total_seconds - update.train_seconds)
        )
        self.metrics.rounds.labels(result="contributed").inc()
        self.metrics.last_round.set(number)
        self.metrics.last_success.set(time.time())
        log.info(
            "round %d: trained on %d examples (%.1fs), uploaded %d bytes",
            number,
            update.num_examples,
            update.train_seconds,
            sent,
        )
        return RoundOutcome(
            number,
            "contributed",
            "",
            update.mean_loss,
            update.train_seconds,
            total_seconds - update.train_seconds,
        )

    def failed(self, number: int, exc: grpc.RpcError) -> RoundOutcome:
        self.metrics.rounds.labels(result="failed").inc()
        log.warning("round %d failed: %s: %s", number, exc.code().name, exc.details())
        if exc.code() not in RETRYABLE:
            # The aggregator said no (stale round, already uploaded...): do not retry it.
            self.last_round = number
        return RoundOutcome(number, "failed", f"{exc.code().name}: {exc.details()}")

    def failed_locally(self, number: int, exc: Exception) -> RoundOutcome:
        self.metrics.rounds.labels(result="failed").inc()
        log.error("round %d failed locally: %s", number, exc, exc_info=exc)
        self.last_round = number
        return RoundOutcome(number, "failed", str(exc))

    def decline(self, number: int, reason: str, message: str) -> RoundOutcome:
        """Tell the aggregator why this clinic sits the round out (machine-readable)."""
        log.warning("declining round %d: %s (%s)", number, reason, message)
        self.last_round = number
        self.metrics.rounds.labels(result="declined").inc()
        try:
            self.client.decline(number, reason, message)
        except grpc.RpcError as exc:
            log.warning("could not deliver the decline of round %d: %s", number, exc.details())
        return RoundOutcome(number, "declined", reason)

    def privacy_report(self) -> federation_pb2.PrivacyReport:
        st = self.privacy.status

        def finite(v: float) -> float:
            return v if math.isfinite(v) else 0.0

        return federation_pb2.PrivacyReport(
            status=st.status,
            epsilon_spent=finite(st.epsilon_spent),
            epsilon_max=finite(st.epsilon_max),
            delta=finite(st.delta),
            noise_multiplier=st.noise_multiplier,
            max_grad_norm=st.max_grad_norm,
        )

    def _export_privacy(self) -> None:
        st = self.privacy.status
        if math.isfinite(st.epsilon_spent):
            self.metrics.epsilon_spent.set(st.epsilon_spent)
            self.metrics.epsilon_remaining.set(st.epsilon_remaining)

    def _train_config(self, plan: federation_pb2.RoundPlan) -> TrainConfig:
        t = self.config.training
        seed_material = f"{self.clinic_id}/{plan.round}/{t.seed}".encode()
        seed = int.from_bytes(hashlib.sha256(seed_material).digest()[:4], "little")
        return TrainConfig(
            epochs=int(plan.local_epochs),
            optimizer=plan.optimizer or "sgd",
            learning_rate=float(plan.learning_rate),
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            fedprox_mu=float(plan.fedprox_mu),
            batch_size=int(plan.batch_size) or 32,
            class_weighting=t.class_weighting,
            augment=t.augment,
            seed=seed,
        )

    def _global_model(self, checkpoint: str) -> tuple[dict, ModelConfig]:
        """Load the round's parent checkpoint from the local cache or the aggregator."""
        path = self.checkpoint_dir / f"{checkpoint}.safetensors"
        data = None
        if path.exists():
            cached = path.read_bytes()
            if hashlib.sha256(cached).hexdigest() == checkpoint:
                data = cached
        if data is None:
            data = self.client.download(checkpoint)
            self.metrics.received_bytes.inc(len(data))
            atomic_write(path, data, mode=0o640)
            self._prune_cache(keep=path)
        state, meta = load_checkpoint_bytes(data)
        cfg = ModelConfig.from_metadata(meta)
        return in_order(state, list(build_model(cfg).state_dict().keys())), cfg

    def _prune_cache(self, keep: Path, limit: int = 3) -> None:
        files = sorted(self.checkpoint_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for old in files[:-limit]:
            if old != keep:
                old.unlink(missing_ok=True)

    def _records(self) -> tuple[list[Record], list[Record]]:
        """``(training, evaluation slice)`` of the clinic's current data."""
        # Re-read the folder every round so cases added since the last one are used,
        # without a restart; the cache decodes only new or changed files.
        records = load_records(self.config.data.path)
        ev = self.config.evaluation
        if self._slice is None and (ev.max_cases > 0 or self.slice_path.exists()):
            self._slice = EvaluationSlice.load_or_choose(
                self.slice_path,
                records,
                fraction=ev.fraction,
                max_cases=ev.max_cases,
                rng=random.Random(secrets.randbits(64)),
                keep=self.config.privacy.min_examples if self.privacy.enabled else 1,
            )
        if self._slice is None:
            return records, []
        train, held = self._slice.split(records)
        self.metrics.evaluation_cases.set(len(held))
        return train, held

    def may_evaluate(self, round_number: int, parent: str) -> bool:
        """Whether to score a candidate for ``round_number`` from ``parent``: only for the
        round this clinic last contributed to, from the model it trained from. The
        aggregator chooses the model the clinics score, so each evaluation is a question
        about the slices; this limits a dishonest aggregator to one per round the clinic
        trained in (one evaluation per session is enforced by the session itself)."""
        return (round_number, parent) == self._contributed and bool(parent)

    def evaluation_counts(self, plan: federation_pb2.RoundPlan) -> EvaluationCounts | None:
        """Both models' counts on the evaluation slice (at most the plan's cases), as read
        when the evaluated round was prepared (may_evaluate requires that round)."""
        held = capped(self._held, int(plan.evaluation_max_cases))
        if not held:
            return None
        labels = np.array([r.label for r in held], dtype=np.int64)
        cand = self._slice_predictions(plan.candidate_checkpoint, held)
        pub = self._slice_predictions(plan.parent_checkpoint, held)
        return EvaluationCounts.of(labels, cand, pub, len(CLASSES))

    def _slice_predictions(self, checkpoint: str, held: list[Record]) -> np.ndarray:
        """A checkpoint's predicted labels on the slice, scored once per checkpoint: the
        published model is compared with a new candidate every round."""
        key = (checkpoint, tuple(r.image_id for r in held))
        cached = self._predictions.get(key)
        if cached is None:
            state, cfg = self._global_model(checkpoint)
            images = self.images.load(held, cfg.input_size)
            with torch_threads(self.config.training.threads or None):
                probs = predict_proba(cfg, state, images, features=self.features)
            cached = probs.argmax(axis=1)
            self._predictions[key] = cached
            while len(self._predictions) > 4:  # the published model and recent candidates
                del self._predictions[next(iter(self._predictions))]
        return cached

    def _local_data(self, model_cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
        records, held = self._records()
        self._held = held
        if held:
            # The slice's fixed front-end features, once per image, while the round is
            # prepared: an evaluation then runs only the two heads.
            with torch_threads(self.config.training.threads or None):
                self.features.warm(model_cfg, self.images.load(held, model_cfg.input_size))
        self.metrics.local_examples.set(len(records))
        if not records:
            return (
                np.zeros((0, model_cfg.input_size, model_cfg.input_size, 3), np.uint8),
                np.zeros(0, np.int64),
            )
        images = self.images.load(records, model_cfg.input_size)
        labels = np.array([r.label for r in records], dtype=np.int64)
        return images, labels


def _is_privacy_reset_refusal(exc: grpc.RpcError) -> bool:
    trailing = getattr(exc, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    refusal = PrivacyResetError.refusal
    return any(key == REFUSAL_KEY and value == refusal for key, value in metadata or ())


def _require_current(cert: x509.Certificate, path: Path) -> None:
    """Stop on an expired (or not yet valid) own certificate: no handshake can succeed."""
    now = datetime.now(UTC)
    if now >= cert.not_valid_after_utc:
        raise IdentityError(
            f"tls.cert {path} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "renew it (dermafed pki renew, or pki request / sign) and start the agent again"
        )
    if now < cert.not_valid_before_utc:
        raise IdentityError(
            f"tls.cert {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; check this host's clock"
        )

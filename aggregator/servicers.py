"""Thin gRPC servicers: authenticate, translate proto <-> domain, map errors to codes.

No federation rule lives here; it all sits in :mod:`aggregator.coordinator` and
:mod:`aggregator.rounds`. The caller's identity always comes from its certificate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import grpc

from aggregator.coordinator import Coordinator
from aggregator.domain import PrivacyReport, RoundPlan, RoundView
from aggregator.metrics import AggregatorMetrics
from aggregator.round_modes import SecAggStageData, UploadHeader
from aggregator.stall_watch import StallWatch
from common.errors import (
    REFUSAL_KEY,
    BusyError,
    DermafedError,
    DuplicateSubmissionError,
    ExcludedError,
    IntegrityError,
    InvalidArgumentError,
    InvalidUpdateError,
    NotFoundError,
    NotInCohortError,
    PayloadTooLargeError,
    PreconditionError,
    StaleRoundError,
)
from common.identity import Identity, PeerAuthenticator, RevocationList
from common.secagg.messages import (
    KeyAdvertisement,
    Reveal,
    ShareSubmission,
    SurvivorSignature,
)
from common.tensors import TensorSpec
from dermafed.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc

log = logging.getLogger("dermafed.aggregator")

CHUNK_BYTES = 1 << 20

# One domain error class, one status code.
_STATUS: list[tuple[type[DermafedError], grpc.StatusCode]] = [
    (InvalidUpdateError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateSubmissionError, grpc.StatusCode.ALREADY_EXISTS),
    (StaleRoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotInCohortError, grpc.StatusCode.PERMISSION_DENIED),
    (ExcludedError, grpc.StatusCode.PERMISSION_DENIED),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
]

T = TypeVar("T")


def status_for(error: DermafedError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


class _Base:
    def __init__(
        self, coordinator: Coordinator, auth: PeerAuthenticator, metrics: AggregatorMetrics
    ) -> None:
        self.coordinator = coordinator
        self.auth = auth
        self.metrics = metrics

    def _abort(
        self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        self.metrics.rejected_rpcs.labels(method=method, code=code.name).inc()
        context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DermafedError as exc:
            if exc.refusal is not None:
                context.set_trailing_metadata(((REFUSAL_KEY, exc.refusal),))
            self._abort(context, method, status_for(exc), str(exc))

    def _identity(self, context: grpc.ServicerContext, method: str, *roles: str) -> Identity:
        try:
            return self.auth.authenticate(context, roles)
        except Exception:
            # authenticate() aborted the call; count it before letting the abort propagate.
            code = context.code() if hasattr(context, "code") else None
            name = code.name if isinstance(code, grpc.StatusCode) else "UNAUTHENTICATED"
            self.metrics.rejected_rpcs.labels(method=method, code=name).inc()
            raise


def plan_to_proto(plan: RoundPlan) -> federation_pb2.RoundPlan:
    msg = federation_pb2.RoundPlan(
        round=plan.round,
        parent_checkpoint=plan.parent_checkpoint,
        local_epochs=plan.local_epochs,
        optimizer=plan.optimizer,
        learning_rate=plan.learning_rate,
        fedprox_mu=plan.fedprox_mu,
        batch_size=plan.batch_size,
        delta_clip_norm=plan.delta_clip_norm,
        aggregation=plan.aggregation,
        min_clinics=plan.min_clinics,
        cohort=list(plan.cohort),
        stage_deadline=plan.stage_deadline,
        federation=plan.federation,
        dp_noise_multiplier=plan.dp_noise_multiplier,
        threshold=plan.threshold,
        clinic_noise_multiplier=plan.clinic_noise_multiplier,
        upload_norm_bound=plan.upload_norm_bound,
        candidate_checkpoint=plan.candidate_checkpoint,
        evaluation_max_cases=plan.evaluation_max_cases,
    )
    q = plan.quantization
    if q is not None:
        msg.quantization.CopyFrom(
            federation_pb2.QuantizationSpec(
                clip_norm=q.clip_norm,
                weight_max=q.weight_max,
                max_clinics=q.max_clinics,
                delta_scale=q.delta_scale,
                weight_scale=q.weight_scale,
                loss_max=q.loss_max,
                loss_scale=q.loss_scale,
            )
        )
    return msg


def header_from_proto(msg: federation_pb2.UpdateHeader) -> UploadHeader:
    return UploadHeader(
        round=msg.round,
        encoding=msg.encoding,
        tensors=tuple(
            TensorSpec(t.name, tuple(int(d) for d in t.shape), t.dtype) for t in msg.tensors
        ),
        total_bytes=msg.total_bytes,
        weight=msg.weight,
        train_loss=msg.train_loss if msg.HasField("train_loss") else None,
        train_seconds=msg.train_seconds,
    )


def peer_certificate_pem(context: grpc.ServicerContext) -> bytes:
    auth: Any = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    return bytes(pems[0]) if pems else b""


def _unique_peers(
    base: _Base,
    context: grpc.ServicerContext,
    method: str,
    shares: Iterable[federation_pb2.SealedShare],
) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for share in shares:
        if share.peer in out:
            base._abort(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"clinic {share.peer!r} appears twice",
            )
        out[share.peer] = share.ciphertext
    return out


def secagg_task_to_proto(data: SecAggStageData) -> federation_pb2.SecAggTask:
    msg = federation_pb2.SecAggTask(stage=data.stage)
    for relayed in data.advertisements:
        adv = relayed.advertisement
        msg.advertisements.add(
            clinic=adv.clinic_id,
            cipher_public_key=adv.cipher_public_key,
            mask_public_key=adv.mask_public_key,
            signature=adv.signature,
            certificate_pem=relayed.certificate_pem,
        )
    if data.shares is not None:
        for sender, ciphertext in sorted(data.shares.ciphertexts.items()):
            msg.shares.add(peer=sender, ciphertext=ciphertext)
    if data.survivors is not None:
        msg.survivors.extend(data.survivors.survivors)
    if data.unmask is not None:
        msg.survivors.extend(data.unmask.survivors)
        msg.dropped.extend(data.unmask.dropped)
        for clinic, signature in sorted(data.unmask.signatures.items()):
            msg.signatures.add(clinic=clinic, signature=signature)
    return msg


class FederationServicer(_Base, federation_pb2_grpc.FederationServicer):
    def __init__(
        self,
        coordinator: Coordinator,
        auth: PeerAuthenticator,
        metrics: AggregatorMetrics,
        *,
        max_poll_wait_s: float,
        max_update_bytes: int,
        upload_stall_s: float = 0.0,
        min_chunk_bytes: int = 0,
    ) -> None:
        super().__init__(coordinator, auth, metrics)
        self.max_poll_wait_s = max_poll_wait_s
        self.max_update_bytes = max_update_bytes
        self.min_chunk_bytes = min_chunk_bytes
        self.stalls = StallWatch(
            upload_stall_s,
            lambda clinic, idle: metrics.limit_hits.labels(limit="stalled_upload").inc(),
        )

    def Poll(
        self, request: federation_pb2.PollRequest, context: grpc.ServicerContext
    ) -> federation_pb2.PollResponse:
        who = self._identity(context, "Poll", "clinic")
        wait = min(request.wait_ms / 1000.0, self.max_poll_wait_s)
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer before the caller's deadline so it sees IDLE, not DEADLINE_EXCEEDED.
            wait = max(0.0, min(wait, remaining - 0.5))
        privacy = None
        if request.HasField("privacy"):
            p = request.privacy
            values = (p.epsilon_spent, p.epsilon_max, p.delta)
            if not all(math.isfinite(v) and v >= 0 for v in values) or len(p.status) > 32:
                self._abort(
                    context,
                    "Poll",
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "privacy report values must be finite and non-negative",
                )
            privacy = PrivacyReport(p.status, p.epsilon_spent, p.epsilon_max, p.delta)
        result = self._call(
            context,
            "Poll",
            lambda: self.coordinator.poll(who.name, request.last_round, wait, privacy),
        )
        response = federation_pb2.PollResponse(
            published_checkpoint=result.published_checkpoint,
            published_round=result.published_round,
        )
        task = result.task
        if task is None:
            response.kind = federation_pb2.PollResponse.IDLE
            response.retry_after_ms = 1000
        elif task.secagg is None:
            response.kind = federation_pb2.PollResponse.TRAIN
            response.plan.CopyFrom(plan_to_proto(task.plan))
        else:
            response.kind = (
                federation_pb2.PollResponse.EVALUATE
                if task.plan.is_evaluation
                else federation_pb2.PollResponse.SECAGG
            )
            response.plan.CopyFrom(plan_to_proto(task.plan))
            response.secagg.CopyFrom(secagg_task_to_proto(task.secagg))
        return response

    def DownloadCheckpoint(
        self, request: federation_pb2.DownloadCheckpointRequest, context: grpc.ServicerContext
    ) -> Iterator[federation_pb2.CheckpointChunk]:
        who = self._identity(context, "DownloadCheckpoint", "clinic")
        cid = request.checkpoint
        size = self._call(
            context, "DownloadCheckpoint", lambda: self._checkpoint_size(who.name, cid)
        )
        chunks = self._call(
            context, "DownloadCheckpoint", lambda: self.coordinator.checkpoint_chunks(who.name, cid)
        )
        first = True
        sent = 0
        try:
            for data in chunks:
                sent += len(data)
                yield federation_pb2.CheckpointChunk(total_bytes=size if first else 0, data=data)
                first = False
        except DermafedError as exc:
            self._abort(context, "DownloadCheckpoint", status_for(exc), str(exc))
        finally:
            self.metrics.sent_bytes.labels(kind="checkpoint").inc(sent)

    def _checkpoint_size(self, clinic: str, cid: str) -> int:
        if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
            raise InvalidUpdateError("checkpoint id must be 64 lowercase hex characters")
        if not self.coordinator.store.exists(cid):
            raise NotFoundError(f"checkpoint {cid[:16]} is not known")
        return self.coordinator.checkpoint_size(cid)

    def UploadUpdate(
        self, request_iterator: Iterator[federation_pb2.UpdateChunk], context: grpc.ServicerContext
    ) -> federation_pb2.UploadReceipt:
        who = self._identity(context, "UploadUpdate", "clinic")
        watch = self.stalls.watch(context, who.name)
        try:
            return self._upload(who.name, request_iterator, context, watch)
        finally:
            self.stalls.done(watch)

    def _upload(
        self,
        clinic: str,
        request_iterator: Iterator[federation_pb2.UpdateChunk],
        context: grpc.ServicerContext,
        watch: int,
    ) -> federation_pb2.UploadReceipt:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            self._abort(
                context,
                "UploadUpdate",
                grpc.StatusCode.INVALID_ARGUMENT,
                "an upload must start with a header message",
            )
        header = header_from_proto(first.header)
        if header.total_bytes > self.max_update_bytes:
            self._abort(
                context,
                "UploadUpdate",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"declared update of {header.total_bytes} bytes exceeds the limit of "
                f"{self.max_update_bytes}",
            )
        self.stalls.progress(watch)
        sink = self._call(
            context, "UploadUpdate", lambda: self.coordinator.begin_upload(clinic, header)
        )
        try:
            for msg in request_iterator:
                if msg.WhichOneof("part") != "data":
                    raise InvalidUpdateError("only payload chunks may follow the header")
                size = len(msg.data)
                if size < self.min_chunk_bytes and sink.received_bytes + size < sink.expected_bytes:
                    raise InvalidUpdateError(
                        f"a {size}-byte chunk: every chunk but the last must carry at least "
                        f"{self.min_chunk_bytes} bytes"
                    )
                sink.write(msg.data)
                self.stalls.progress(watch)
        except DermafedError as exc:
            self.coordinator.abandon_upload(sink)
            self._abort(context, "UploadUpdate", status_for(exc), str(exc))
        except BaseException:
            # The client vanished mid-stream (or the server is stopping): nothing is kept.
            self.coordinator.abandon_upload(sink)
            raise
        self._call(
            context,
            "UploadUpdate",
            lambda: self.coordinator.complete_upload(clinic, header, sink),
        )
        return federation_pb2.UploadReceipt(round=header.round, bytes_received=sink.received_bytes)

    def AdvertiseKeys(
        self, request: federation_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> federation_pb2.StageReceipt:
        who = self._identity(context, "AdvertiseKeys", "clinic")
        # The certificate relayed to the other clinics is the one this connection
        # authenticated with, never one the request could name.
        pem = peer_certificate_pem(context)
        adv = KeyAdvertisement(
            round_number=request.round,
            clinic_id=who.name,
            cipher_public_key=request.cipher_public_key,
            mask_public_key=request.mask_public_key,
            signature=request.signature,
        )
        self._call(
            context, "AdvertiseKeys", lambda: self.coordinator.secagg_advertise(who.name, adv, pem)
        )
        return federation_pb2.StageReceipt(round=request.round, stage="advertise")

    def ShareKeys(
        self, request: federation_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> federation_pb2.StageReceipt:
        who = self._identity(context, "ShareKeys", "clinic")
        ciphertexts = _unique_peers(self, context, "ShareKeys", request.shares)
        submission = ShareSubmission(
            round_number=request.round, sender=who.name, ciphertexts=ciphertexts
        )
        self._call(
            context, "ShareKeys", lambda: self.coordinator.secagg_share_keys(who.name, submission)
        )
        return federation_pb2.StageReceipt(round=request.round, stage="share_keys")

    def SignSurvivors(
        self, request: federation_pb2.SignSurvivorsRequest, context: grpc.ServicerContext
    ) -> federation_pb2.StageReceipt:
        who = self._identity(context, "SignSurvivors", "clinic")
        sig = SurvivorSignature(
            round_number=request.round, clinic_id=who.name, signature=request.signature
        )
        self._call(context, "SignSurvivors", lambda: self.coordinator.secagg_sign(who.name, sig))
        return federation_pb2.StageReceipt(round=request.round, stage="consistency")

    def RevealShares(
        self, request: federation_pb2.RevealSharesRequest, context: grpc.ServicerContext
    ) -> federation_pb2.StageReceipt:
        who = self._identity(context, "RevealShares", "clinic")
        reveal = Reveal(
            round_number=request.round,
            clinic_id=who.name,
            self_mask_shares=_unique_peers(self, context, "RevealShares", request.self_mask_shares),
            key_shares=_unique_peers(self, context, "RevealShares", request.key_shares),
        )
        self._call(
            context, "RevealShares", lambda: self.coordinator.secagg_reveal(who.name, reveal)
        )
        return federation_pb2.StageReceipt(round=request.round, stage="unmask")

    def DeclineRound(
        self, request: federation_pb2.DeclineRequest, context: grpc.ServicerContext
    ) -> federation_pb2.DeclineReceipt:
        who = self._identity(context, "DeclineRound", "clinic")
        reason = request.reason.strip()
        if not reason or len(reason) > 64:
            self._abort(
                context,
                "DeclineRound",
                grpc.StatusCode.INVALID_ARGUMENT,
                "reason must be a short machine-readable string",
            )
        self._call(
            context,
            "DeclineRound",
            lambda: self.coordinator.decline(who.name, request.round, reason, request.detail[:500]),
        )
        return federation_pb2.DeclineReceipt(round=request.round)


def metrics_to_proto(m: Mapping[str, Any] | None) -> admin_pb2.ValidationMetrics:
    m = m or {}
    msg = admin_pb2.ValidationMetrics(
        accuracy=float(m.get("accuracy") or 0.0),
        balanced_accuracy=float(m.get("balanced_accuracy") or 0.0),
        macro_auroc=float(m.get("macro_auroc") or 0.0),
        examples=int(m.get("examples") or 0),
        expected_calibration_error=float(m.get("expected_calibration_error") or 0.0),
    )
    for field_name in ("sensitivity", "specificity"):
        values = m.get(field_name)
        if isinstance(values, Mapping):
            getattr(msg, field_name).update(
                {str(k): float(v) for k, v in values.items() if isinstance(v, int | float)}
            )
    return msg


def round_to_proto(view: RoundView) -> admin_pb2.RoundSummary:
    msg = admin_pb2.RoundSummary(
        round=view.round,
        state=view.state,
        outcome=view.outcome,
        reason=view.reason,
        parent_checkpoint=view.parent_checkpoint,
        checkpoint=view.checkpoint,
        cohort=list(view.cohort),
        contributors=list(view.contributors),
        train_loss=view.train_loss or 0.0,
        started_at=view.started_at,
        finished_at=view.finished_at,
        aggregation=view.aggregation,
    )
    msg.stage_seconds.update(view.stage_seconds)
    msg.metrics.CopyFrom(metrics_to_proto(view.metrics))
    gate = (view.metrics or {}).get("gate")
    if isinstance(gate, Mapping):
        msg.gate = str(gate.get("verdict", ""))
        msg.gate_rule = str(gate.get("rule", ""))
        msg.gate_reason = str(gate.get("reason", ""))
        checks = gate.get("checks")
        if isinstance(checks, Mapping):
            msg.gate_checks.extend(
                gate_check_to_proto(str(name), check)
                for name, check in checks.items()
                if isinstance(check, Mapping)
            )
    sums = (view.metrics or {}).get("sum_checks")
    if isinstance(sums, Mapping):
        msg.sum_check_failed = str(sums.get("failed", ""))
    federated = (view.metrics or {}).get("federated_evaluation")
    if isinstance(federated, Mapping):
        msg.federated_cases = int(federated.get("cases", 0) or 0)
        msg.federated_contributors = int(federated.get("contributors", 0) or 0)
        msg.federated_note = str(federated.get("note", ""))
    return msg


def gate_check_to_proto(name: str, check: Mapping[str, Any]) -> admin_pb2.GateCheck:
    """One gate test as recorded in the ledger; absent numbers become NaN (or 0 counts)."""

    def num(key: str) -> float:
        value = check.get(key)
        return float(value) if isinstance(value, int | float) else math.nan

    def count(key: str) -> int:
        value = check.get(key)
        return int(value) if isinstance(value, int) and value >= 0 else 0

    published = num("published")
    if math.isnan(published) and not math.isnan(num("difference")):
        published = num("candidate") - num("difference")
    return admin_pb2.GateCheck(
        name=name,
        candidate=num("candidate"),
        published=published,
        cases=count("n"),
        candidate_only=count("candidate_only"),
        published_only=count("published_only"),
        difference=num("difference"),
        lower=num("lower"),
        upper=num("upper"),
        p_value=num("p_value"),
        alpha=num("alpha"),
        margin=num("margin"),
        failed=bool(check.get("failed", False)),
    )


class AdminServicer(_Base, admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        coordinator: Coordinator,
        auth: PeerAuthenticator,
        metrics: AggregatorMetrics,
        revocations: RevocationList,
    ) -> None:
        super().__init__(coordinator, auth, metrics)
        self.revocations = revocations

    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        self._identity(context, "GetStatus", "admin")
        st = self._call(context, "GetStatus", self.coordinator.status)
        response = admin_pb2.GetStatusResponse(
            federation=st.federation,
            published_round=st.published_round,
            published_checkpoint=st.published_checkpoint,
            connected_clinics=list(st.connected),
            rounds_completed=st.rounds_completed,
            max_rounds=st.max_rounds,
        )
        if st.next_round_at is not None:
            response.next_round_at = st.next_round_at
        if st.current is not None:
            response.current_round.CopyFrom(round_to_proto(st.current))
        if st.last is not None:
            response.last_round.CopyFrom(round_to_proto(st.last))
        return response

    def TriggerRound(
        self, request: admin_pb2.TriggerRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.TriggerRoundResponse:
        who = self._identity(context, "TriggerRound", "admin")
        self._call(context, "TriggerRound", lambda: self.coordinator.request_round(who.uri))
        return admin_pb2.TriggerRoundResponse(
            detail="round requested; it starts once enough clinics are connected"
        )

    def AbortRound(
        self, request: admin_pb2.AbortRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.AbortRoundResponse:
        who = self._identity(context, "AbortRound", "admin")
        if request.round == 0:
            self._abort(
                context,
                "AbortRound",
                grpc.StatusCode.INVALID_ARGUMENT,
                "name the running round to abort (round must be >= 1)",
            )
        self._call(
            context,
            "AbortRound",
            lambda: self.coordinator.abort_round(request.round, request.reason[:500], who.uri),
        )
        return admin_pb2.AbortRoundResponse(round=request.round)

    def Rollback(
        self, request: admin_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RollbackResponse:
        who = self._identity(context, "Rollback", "admin")
        which = request.WhichOneof("target")
        if which is None:
            self._abort(
                context,
                "Rollback",
                grpc.StatusCode.INVALID_ARGUMENT,
                "name a target round or checkpoint",
            )
        cid, rnd, changed = self._call(
            context,
            "Rollback",
            lambda: self.coordinator.rollback(
                round_number=request.round if which == "round" else None,
                checkpoint=request.checkpoint if which == "checkpoint" else None,
                reason=request.reason[:500],
                actor=who.uri,
            ),
        )
        return admin_pb2.RollbackResponse(checkpoint=cid, round=rnd, changed=changed)

    def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListRoundsResponse:
        self._identity(context, "ListRounds", "admin")
        limit = min(request.limit or 50, 1000)
        views = self._call(
            context,
            "ListRounds",
            lambda: self.coordinator.list_rounds(limit, request.before or None),
        )
        return admin_pb2.ListRoundsResponse(rounds=[round_to_proto(v) for v in views])

    def ListCheckpoints(
        self, request: admin_pb2.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListCheckpointsResponse:
        self._identity(context, "ListCheckpoints", "admin")
        views = self._call(
            context,
            "ListCheckpoints",
            lambda: self.coordinator.list_checkpoints(min(request.limit or 50, 1000)),
        )
        return admin_pb2.ListCheckpointsResponse(
            checkpoints=[
                admin_pb2.CheckpointInfo(
                    id=v.id,
                    round=v.round,
                    parent=v.parent,
                    created_at=v.created_at,
                    metrics=metrics_to_proto(v.metrics),
                    published=v.published,
                    was_published=v.was_published,
                    bytes=v.bytes,
                )
                for v in views
            ]
        )

    def ListClinics(
        self, request: admin_pb2.ListClinicsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListClinicsResponse:
        self._identity(context, "ListClinics", "admin")
        views = self._call(context, "ListClinics", self.coordinator.list_clinics)
        out = admin_pb2.ListClinicsResponse()
        for v in views:
            info = out.clinics.add(
                clinic=v.clinic,
                connected=v.connected,
                last_seen=v.last_seen,
                rounds_contributed=v.rounds_contributed,
                declines=v.declines,
                dropouts=v.dropouts,
                last_decline_reason=v.last_decline_reason,
            )
            if v.epsilon_spent is not None:
                info.epsilon_spent = v.epsilon_spent
            if v.epsilon_remaining is not None:
                info.epsilon_remaining = v.epsilon_remaining
            if v.epsilon_floor is not None:
                info.epsilon_floor = v.epsilon_floor
            info.privacy_reset = v.privacy_reset
            if v.excluded_reason is not None:
                info.excluded = True
                info.excluded_reason = v.excluded_reason
        return out

    def ListAudit(
        self, request: admin_pb2.ListAuditRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAuditResponse:
        self._identity(context, "ListAudit", "admin")
        limit = min(request.limit or 50, 1000)
        entries = self._call(context, "ListAudit", lambda: self.coordinator.audit_log(limit))
        out = admin_pb2.ListAuditResponse()
        for e in entries:
            out.entries.add(
                id=e.id,
                at=e.at,
                actor=e.actor,
                action=e.action,
                detail_json=json.dumps(e.detail, sort_keys=True),
            )
        return out

    def SetClinicExcluded(
        self, request: admin_pb2.SetClinicExcludedRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SetClinicExcludedResponse:
        who = self._identity(context, "SetClinicExcluded", "admin")
        was = self._call(
            context,
            "SetClinicExcluded",
            lambda: self.coordinator.set_clinic_excluded(
                request.clinic, request.excluded, request.reason, who.uri
            ),
        )
        return admin_pb2.SetClinicExcludedResponse(was_excluded=was)

    def AcknowledgePrivacyReset(
        self, request: admin_pb2.AcknowledgePrivacyResetRequest, context: grpc.ServicerContext
    ) -> admin_pb2.AcknowledgePrivacyResetResponse:
        who = self._identity(context, "AcknowledgePrivacyReset", "admin")
        previous, new = self._call(
            context,
            "AcknowledgePrivacyReset",
            lambda: self.coordinator.acknowledge_privacy_reset(
                request.clinic, request.reason, who.uri
            ),
        )
        return admin_pb2.AcknowledgePrivacyResetResponse(previous_floor=previous, new_floor=new)

    def ReloadRevocations(
        self, request: admin_pb2.ReloadRevocationsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ReloadRevocationsResponse:
        who = self._identity(context, "ReloadRevocations", "admin")
        error = self.revocations.reload()
        count = len(self.revocations.revoked)
        if error is not None:
            self.coordinator.audit(
                who.uri, "reload_revocations_refused", {"reason": error, "revoked": count}
            )
            refused = PreconditionError(
                f"the CRL was refused: {error}; the previous {count} revocation(s) stay in force"
            )
            self._abort(context, "ReloadRevocations", status_for(refused), str(refused))
        self.coordinator.audit(who.uri, "reload_revocations", {"revoked": count})
        return admin_pb2.ReloadRevocationsResponse(revoked=count)

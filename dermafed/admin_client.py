"""Operator access to the aggregator's admin service (admin certificate required)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import AggregatorSection, TlsSection, load_config, require
from common.tls import channel_credentials, secure_channel
from dermafed.v1 import admin_pb2, admin_pb2_grpc


@dataclass(frozen=True)
class AdminConfig:
    federation: str
    aggregator: AggregatorSection
    tls: TlsSection
    timeout_s: float = 10.0

    def validate(self) -> None:
        require(self.timeout_s > 0, "timeout_s", "must be positive")


def load_admin_config(path: Path) -> AdminConfig:
    return load_config(AdminConfig, path)


class AdminClient:
    def __init__(self, config: AdminConfig) -> None:
        creds = channel_credentials(config.tls.ca_cert, config.tls.cert, config.tls.key)
        options: list[tuple[str, object]] = []
        if config.aggregator.server_name:
            options.append(("grpc.ssl_target_name_override", config.aggregator.server_name))
        self.channel = secure_channel(config.aggregator.address, creds, options=options)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.timeout_s = config.timeout_s

    def status(self) -> admin_pb2.GetStatusResponse:
        return self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=self.timeout_s)

    def trigger(self) -> admin_pb2.TriggerRoundResponse:
        return self.stub.TriggerRound(admin_pb2.TriggerRoundRequest(), timeout=self.timeout_s)

    def abort(self, round_number: int, reason: str = "") -> admin_pb2.AbortRoundResponse:
        return self.stub.AbortRound(
            admin_pb2.AbortRoundRequest(round=round_number, reason=reason), timeout=self.timeout_s
        )

    def rollback(
        self, *, round_number: int | None = None, checkpoint: str | None = None, reason: str = ""
    ) -> admin_pb2.RollbackResponse:
        request = admin_pb2.RollbackRequest(reason=reason)
        if round_number is not None:
            request.round = round_number
        if checkpoint is not None:
            request.checkpoint = checkpoint
        return self.stub.Rollback(request, timeout=self.timeout_s)

    def rounds(self, limit: int = 50, before: int = 0) -> admin_pb2.ListRoundsResponse:
        return self.stub.ListRounds(
            admin_pb2.ListRoundsRequest(limit=limit, before=before), timeout=self.timeout_s
        )

    def checkpoints(self, limit: int = 50) -> admin_pb2.ListCheckpointsResponse:
        return self.stub.ListCheckpoints(
            admin_pb2.ListCheckpointsRequest(limit=limit), timeout=self.timeout_s
        )

    def clinics(self) -> admin_pb2.ListClinicsResponse:
        return self.stub.ListClinics(admin_pb2.ListClinicsRequest(), timeout=self.timeout_s)

    def reload_revocations(self) -> admin_pb2.ReloadRevocationsResponse:
        return self.stub.ReloadRevocations(
            admin_pb2.ReloadRevocationsRequest(), timeout=self.timeout_s
        )

    def ack_privacy_reset(
        self, clinic: str, reason: str
    ) -> admin_pb2.AcknowledgePrivacyResetResponse:
        return self.stub.AcknowledgePrivacyReset(
            admin_pb2.AcknowledgePrivacyResetRequest(clinic=clinic, reason=reason),
            timeout=self.timeout_s,
        )

    def set_clinic_excluded(
        self, clinic: str, excluded: bool, reason: str
    ) -> admin_pb2.SetClinicExcludedResponse:
        return self.stub.SetClinicExcluded(
            admin_pb2.SetClinicExcludedRequest(clinic=clinic, excluded=excluded, reason=reason),
            timeout=self.timeout_s,
        )

    def audit(self, limit: int = 50) -> admin_pb2.ListAuditResponse:
        return self.stub.ListAudit(admin_pb2.ListAuditRequest(limit=limit), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

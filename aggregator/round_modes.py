"""How a round aggregates: plain FedAvg or secure aggregation, behind one interface.

The coordinator drives stages, deadlines and the ledger the same way for both; a mode
only says which stages it has, what a clinic needs for a stage, how an upload is
received, and how the stage's survivors are aggregated. Nothing here takes a lock or
does I/O: the coordinator calls every method under its own lock (except
``UploadSink.write``, which only touches that upload's private buffer).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aggregator.fedavg import AggregateResult, PlainFedAvg, check_weight
from aggregator.secagg_server import MaskedUpload, SecAggServer
from common.errors import InvalidUpdateError, PayloadTooLargeError, PreconditionError
from common.secagg.messages import (
    STAGE_MASKED_INPUT,
    STAGES,
    KeyAdvertisement,
    RelayedAdvertisement,
    Reveal,
    SharesForRecipient,
    ShareSubmission,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
)
from common.tensors import TensorSpec, check_specs, decode_f32le, total_numel

TRAIN_STAGE = "train"


@dataclass(frozen=True)
class UploadHeader:
    round: int
    encoding: str
    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    weight: float
    train_loss: float | None
    train_seconds: float


@dataclass(frozen=True)
class SecAggStageData:
    """What a clinic receives for the current stage of a secure round."""

    stage: str
    advertisements: tuple[RelayedAdvertisement, ...] = ()
    shares: SharesForRecipient | None = None
    survivors: SurvivorSet | None = None
    unmask: UnmaskRequest | None = None


class UploadSink(Protocol):
    clinic: str
    expected_bytes: int
    received_bytes: int

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None: ...


class _BufferSink:
    """Plain mode: the float32 payload is kept until it is validated whole."""

    def __init__(self, clinic: str, expected_bytes: int) -> None:
        self.clinic = clinic
        self.expected_bytes = expected_bytes
        self.received_bytes = 0
        # Allocated once at its final size: growing a bytearray chunk by chunk and copying
        # it out again cost more than everything else in a plain upload.
        self._buffer = bytearray(expected_bytes)

    def write(self, data: bytes) -> None:
        end = self.received_bytes + len(data)
        if end > self.expected_bytes:
            raise InvalidUpdateError(
                f"payload exceeds the {self.expected_bytes} bytes the header declared"
            )
        self._buffer[self.received_bytes : end] = data
        self.received_bytes = end

    def payload(self) -> memoryview:
        return memoryview(self._buffer)[: self.received_bytes]

    def discard(self) -> None:
        self._buffer = bytearray()


class _MaskedSink:
    """Secure mode: chunks go straight into the server's per-upload ring buffer."""

    def __init__(self, clinic: str, upload: MaskedUpload) -> None:
        self.clinic = clinic
        self.upload = upload
        self.expected_bytes = upload.numel * 4
        self.received_bytes = 0

    def write(self, data: bytes) -> None:
        if self.received_bytes + len(data) > self.expected_bytes:
            raise InvalidUpdateError(
                f"payload exceeds the {self.expected_bytes} bytes the header declared"
            )
        self.upload.write(data)
        self.received_bytes += len(data)

    def discard(self) -> None:
        self.upload.discard()


def _check_header_layout(
    header: UploadHeader,
    specs: Sequence[TensorSpec],
    encoding: str,
    expected_bytes: int,
    max_bytes: int,
) -> None:
    if header.encoding != encoding:
        raise InvalidUpdateError(
            f"encoding {header.encoding!r} is not accepted in this round (expected {encoding!r})"
        )
    check_specs(header.tensors, specs)
    if header.total_bytes != expected_bytes:
        raise InvalidUpdateError(
            f"header declares {header.total_bytes} bytes, the round needs {expected_bytes}"
        )
    if expected_bytes > max_bytes:
        raise PayloadTooLargeError(f"an update of {expected_bytes} bytes exceeds the limit")


class PlainMode:
    """Weighted FedAvg of float32 deltas the aggregator can see (for comparison)."""

    name = "plain"
    stages: tuple[str, ...] = (TRAIN_STAGE,)
    upload_stage = TRAIN_STAGE

    def __init__(self, specs: Sequence[TensorSpec], clip_norm: float, max_bytes: int) -> None:
        self.specs = tuple(specs)
        self.max_bytes = max_bytes
        self.fedavg = PlainFedAvg(total_numel(self.specs), clip_norm)

    def stage_data(self, stage: str, clinic: str) -> SecAggStageData | None:
        return None

    def begin_upload(self, clinic: str, header: UploadHeader) -> UploadSink:
        expected = total_numel(self.specs) * 4
        _check_header_layout(header, self.specs, "f32le", expected, self.max_bytes)
        check_weight(header.weight, header.train_loss)
        return _BufferSink(clinic, expected)

    def commit_upload(self, clinic: str, header: UploadHeader, sink: UploadSink) -> None:
        if not isinstance(sink, _BufferSink):
            raise PreconditionError("upload does not belong to this round")
        vector = decode_f32le(sink.payload(), self.specs)
        self.fedavg.add(clinic, vector, header.weight, header.train_loss)

    def close_stage(self, stage: str, alive: Collection[str]) -> frozenset[str]:
        return frozenset(alive)

    def abort(self, reason: str) -> None:
        pass

    def finalize(self, alive: Collection[str]) -> AggregateResult:
        return self.fedavg.result(frozenset(alive))


class SecureMode:
    """Pairwise-masked secure aggregation: the aggregator only ever sees the sum."""

    name = "secure"
    stages: tuple[str, ...] = STAGES
    upload_stage = STAGE_MASKED_INPUT

    def __init__(self, server: SecAggServer, specs: Sequence[TensorSpec], max_bytes: int) -> None:
        self.server = server
        self.specs = tuple(specs)
        self.max_bytes = max_bytes

    def stage_data(self, stage: str, clinic: str) -> SecAggStageData:
        if stage == "share_keys":
            return SecAggStageData(stage, advertisements=self.server.advertisements())
        if stage == "masked_input":
            return SecAggStageData(stage, shares=self.server.shares_for(clinic))
        if stage == "consistency":
            return SecAggStageData(stage, survivors=self.server.survivors())
        if stage == "unmask":
            return SecAggStageData(stage, unmask=self.server.unmask_request_for(clinic))
        return SecAggStageData(stage)

    def advertise(self, clinic: str, adv: KeyAdvertisement, certificate_pem: bytes) -> None:
        self.server.advertise(clinic, adv, certificate_pem)

    def submit_shares(self, clinic: str, submission: ShareSubmission) -> None:
        self.server.submit_shares(clinic, submission)

    def submit_signature(self, clinic: str, signature: SurvivorSignature) -> None:
        self.server.submit_signature(clinic, signature)

    def reveal(self, clinic: str, reveal: Reveal) -> None:
        self.server.reveal(clinic, reveal)

    def begin_upload(self, clinic: str, header: UploadHeader) -> UploadSink:
        expected = self.server.numel_ring * 4
        _check_header_layout(header, self.specs, "ring_u32le", expected, self.max_bytes)
        return _MaskedSink(clinic, self.server.begin_upload(clinic))

    def commit_upload(self, clinic: str, header: UploadHeader, sink: UploadSink) -> None:
        if not isinstance(sink, _MaskedSink) or sink.upload.clinic_id != clinic:
            raise PreconditionError("upload does not belong to this round")
        self.server.commit(sink.upload)

    def close_stage(self, stage: str, alive: Collection[str]) -> frozenset[str]:
        return self.server.close_stage(stage, alive)

    def abort(self, reason: str) -> None:
        self.server.abort(reason)

    def finalize(self, alive: Collection[str]) -> AggregateResult:
        result = self.server.finalize()
        if not np.isfinite(result.delta).all():
            raise InvalidUpdateError("the unmasked aggregate is not finite")
        return result


RoundMode = PlainMode | SecureMode

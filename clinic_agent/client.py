"""The clinic's side of the wire: every call outbound, every call with a deadline.

This module only speaks gRPC. Deciding what to do with a task lives in
:mod:`clinic_agent.daemon`; training lives in :mod:`clinic_agent.training`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from common.tensors import TensorSpec, encode_f32le
from common.tls import channel_credentials, secure_channel
from dermafed.v1 import federation_pb2, federation_pb2_grpc

CHUNK_BYTES = 1 << 20

# Codes worth retrying after a pause: the aggregator is restarting, overloaded or the
# network blinked. Anything else is an answer, not an outage.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


# What a failed connection's details say about the cause, for the operator: gRPC reports
# every handshake failure as UNAVAILABLE with the TLS library's words in the details.
_HINTS = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the aggregator's certificate is not signed by this clinic's tls.ca_cert: is it the "
        "federation's ca.crt?",
    ),
    (
        "not in peer certificate",
        "the aggregator's certificate does not name the host in aggregator.address "
        "(its --dns when it was issued)",
    ),
    (
        "Socket closed",
        "the aggregator closed the connection during the TLS handshake: it does not accept "
        "this clinic's certificate (issued by another CA, or expired); `dermafed config "
        "check --role agent` checks the files, the federation's operator checks the CA",
    ),
    (
        "Connection refused",
        "nothing listens at aggregator.address (the aggregator is down, or a wrong port)",
    ),
    ("DNS resolution failed", "aggregator.address's host name does not resolve"),
)


def connection_hint(details: str) -> str:
    """A likely cause of a failed connection, from its gRPC details ("" when unknown)."""
    for marker, hint in _HINTS:
        if marker in details:
            return hint
    return ""


@dataclass(frozen=True)
class Task:
    kind: str  # "idle" | "train" | "secagg" | "evaluate"
    plan: federation_pb2.RoundPlan | None
    published_checkpoint: str
    published_round: int
    retry_after_s: float
    secagg: federation_pb2.SecAggTask | None = None


class FederationClient:
    def __init__(
        self,
        address: str,
        *,
        ca_cert: object,
        cert: object,
        key: object,
        server_name: str = "",
        rpc_timeout_s: float = 30.0,
        transfer_timeout_s: float = 600.0,
    ) -> None:
        creds = channel_credentials(ca_cert, cert, key)  # type: ignore[arg-type]
        options: list[tuple[str, object]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = secure_channel(address, creds, options=options)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.rpc_timeout_s = rpc_timeout_s
        self.transfer_timeout_s = transfer_timeout_s

    def close(self) -> None:
        self.channel.close()

    def poll(
        self, last_round: int, wait_s: float, privacy: federation_pb2.PrivacyReport | None = None
    ) -> Task:
        resp = self.stub.Poll(
            federation_pb2.PollRequest(
                wait_ms=int(wait_s * 1000), last_round=last_round, privacy=privacy
            ),
            timeout=wait_s + self.rpc_timeout_s,
        )
        kind = {
            federation_pb2.PollResponse.TRAIN: "train",
            federation_pb2.PollResponse.SECAGG: "secagg",
            federation_pb2.PollResponse.EVALUATE: "evaluate",
        }.get(resp.kind, "idle")
        return Task(
            kind,
            resp.plan if kind != "idle" else None,
            resp.published_checkpoint,
            resp.published_round,
            resp.retry_after_ms / 1000.0,
            resp.secagg if kind in ("secagg", "evaluate") else None,
        )

    def download(self, checkpoint: str) -> bytes:
        """Fetch a checkpoint and check it hashes to its content address."""
        buf = bytearray()
        total = None
        for chunk in self.stub.DownloadCheckpoint(
            federation_pb2.DownloadCheckpointRequest(checkpoint=checkpoint),
            timeout=self.transfer_timeout_s,
        ):
            if total is None:
                total = chunk.total_bytes
            buf += chunk.data
        data = bytes(buf)
        if total is not None and len(data) != total:
            raise ValueError(f"checkpoint download truncated: {len(data)} of {total} bytes")
        digest = hashlib.sha256(data).hexdigest()
        if digest != checkpoint:
            raise ValueError(
                f"checkpoint hash mismatch: asked {checkpoint[:12]}, got {digest[:12]}"
            )
        return data

    def upload(
        self,
        *,
        round_number: int,
        specs: Sequence[TensorSpec],
        vector: np.ndarray,
        weight: float,
        train_loss: float | None,
        train_seconds: float,
    ) -> int:
        """A plain round's float32 delta, streamed in 1 MiB chunks."""
        payload = memoryview(encode_f32le(vector))
        header = self._header(
            round_number,
            "f32le",
            specs,
            len(payload),
            train_seconds,
            weight=weight,
            train_loss=train_loss,
        )
        chunks = (bytes(payload[i : i + CHUNK_BYTES]) for i in range(0, len(payload), CHUNK_BYTES))
        return self._stream(header, chunks)

    def upload_masked(
        self,
        *,
        round_number: int,
        specs: Sequence[TensorSpec],
        chunks: Iterable[bytes],
        total_bytes: int,
        train_seconds: float,
    ) -> int:
        """A secure round's masked ring vector; chunks are generated while they stream."""
        header = self._header(round_number, "ring_u32le", specs, total_bytes, train_seconds)
        return self._stream(header, chunks)

    @staticmethod
    def _header(
        round_number: int,
        encoding: str,
        specs: Sequence[TensorSpec],
        total_bytes: int,
        train_seconds: float,
        *,
        weight: float = 0.0,
        train_loss: float | None = None,
    ) -> federation_pb2.UpdateHeader:
        return federation_pb2.UpdateHeader(
            round=round_number,
            encoding=encoding,
            total_bytes=total_bytes,
            weight=weight,
            train_loss=train_loss,
            train_seconds=train_seconds,
            tensors=[
                federation_pb2.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype)
                for s in specs
            ],
        )

    def _stream(self, header: federation_pb2.UpdateHeader, chunks: Iterable[bytes]) -> int:
        def messages() -> Iterator[federation_pb2.UpdateChunk]:
            yield federation_pb2.UpdateChunk(header=header)
            for data in chunks:
                yield federation_pb2.UpdateChunk(data=data)

        receipt = self.stub.UploadUpdate(messages(), timeout=self.transfer_timeout_s)
        return int(receipt.bytes_received)

    def advertise_keys(
        self, round_number: int, cipher_pk: bytes, mask_pk: bytes, signature: bytes
    ) -> None:
        self.stub.AdvertiseKeys(
            federation_pb2.AdvertiseKeysRequest(
                round=round_number,
                cipher_public_key=cipher_pk,
                mask_public_key=mask_pk,
                signature=signature,
            ),
            timeout=self.rpc_timeout_s,
        )

    def share_keys(self, round_number: int, ciphertexts: Mapping[str, bytes]) -> None:
        self.stub.ShareKeys(
            federation_pb2.ShareKeysRequest(
                round=round_number,
                shares=[
                    federation_pb2.SealedShare(peer=p, ciphertext=c)
                    for p, c in sorted(ciphertexts.items())
                ],
            ),
            timeout=self.rpc_timeout_s,
        )

    def sign_survivors(self, round_number: int, signature: bytes) -> None:
        self.stub.SignSurvivors(
            federation_pb2.SignSurvivorsRequest(round=round_number, signature=signature),
            timeout=self.rpc_timeout_s,
        )

    def reveal_shares(
        self,
        round_number: int,
        self_mask_shares: Mapping[str, bytes],
        key_shares: Mapping[str, bytes],
    ) -> None:
        self.stub.RevealShares(
            federation_pb2.RevealSharesRequest(
                round=round_number,
                self_mask_shares=[
                    federation_pb2.SealedShare(peer=p, ciphertext=c)
                    for p, c in sorted(self_mask_shares.items())
                ],
                key_shares=[
                    federation_pb2.SealedShare(peer=p, ciphertext=c)
                    for p, c in sorted(key_shares.items())
                ],
            ),
            timeout=self.rpc_timeout_s,
        )

    def decline(self, round_number: int, reason: str, detail: str) -> None:
        self.stub.DeclineRound(
            federation_pb2.DeclineRequest(round=round_number, reason=reason, detail=detail),
            timeout=self.rpc_timeout_s,
        )

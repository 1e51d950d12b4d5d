"""The clinic's side of a secure round, one stage per poll.

The pure protocol lives in :class:`~clinic_agent.secagg_client.SecAggClient`; this module
only connects it to the wire and to local training. Any protocol violation it detects
(a substituted key, a forged signature, an inconsistent survivor set, a second reveal)
makes the clinic leave the round at once and say so in its log and metrics; it never
sends anything more for that round.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from clinic_agent.client import RETRYABLE, FederationClient
from clinic_agent.config import ClinicConfig
from clinic_agent.metrics import AgentMetrics
from clinic_agent.outcomes import PreparedRound, RoundOutcome, TrainedUpdate
from clinic_agent.secagg_client import SecAggClient
from common.config import TlsSection
from common.pki import load_certificate, load_private_key
from common.secagg.messages import (
    KeyAdvertisement,
    RelayedAdvertisement,
    SecAggProtocolError,
    SharesForRecipient,
    SurvivorSet,
    UnmaskRequest,
)
from common.secagg.quantize import QuantizationPlan
from dermafed.v1 import federation_pb2


class RoundHost(Protocol):
    """What a secure round needs from the agent that runs it (``ClinicAgent``).

    Declared here rather than imported, so this module and the daemon that dispatches to
    it do not import each other.
    """

    config: ClinicConfig
    metrics: AgentMetrics
    client: FederationClient
    clinic_id: str
    last_round: int

    def prepare(self, plan: federation_pb2.RoundPlan) -> PreparedRound | RoundOutcome: ...

    def train(self, plan: federation_pb2.RoundPlan, prepared: PreparedRound) -> TrainedUpdate: ...

    def contributed(
        self, number: int, update: TrainedUpdate, sent: int, total_seconds: float
    ) -> RoundOutcome: ...

    def failed(self, number: int, exc: grpc.RpcError) -> RoundOutcome: ...

    def failed_locally(self, number: int, exc: Exception) -> RoundOutcome: ...


log = logging.getLogger("dermafed.agent")


@dataclass
class _Session:
    round: int
    client: SecAggClient
    prepared: PreparedRound
    started: float
    train_seconds: float = 0.0
    sent_bytes: int = 0
    num_examples: int = 0
    mean_loss: float = 0.0


def quantization_from_proto(spec: federation_pb2.QuantizationSpec) -> QuantizationPlan:
    """Rebuild the round's ring encoding; construction re-proves it cannot overflow."""
    return QuantizationPlan(
        clip_norm=spec.clip_norm,
        weight_max=spec.weight_max,
        max_clinics=spec.max_clinics,
        delta_scale=spec.delta_scale,
        weight_scale=spec.weight_scale,
        loss_max=spec.loss_max if spec.HasField("loss_max") else None,
        loss_scale=spec.loss_scale if spec.HasField("loss_scale") else None,
    )


@dataclass(frozen=True)
class SigningIdentity:
    """What a clinic signs its secure-aggregation messages with: its TLS key and cert."""

    signing_key: ec.EllipticCurvePrivateKey
    certificate_pem: bytes
    ca_cert: x509.Certificate

    @classmethod
    def load(cls, tls: TlsSection) -> SigningIdentity:
        return cls(load_private_key(tls.key), tls.cert.read_bytes(), load_certificate(tls.ca_cert))

    def session(self, plan: federation_pb2.RoundPlan, clinic_id: str) -> SecAggClient:
        """A fresh protocol state for the session ``plan`` describes (new keys)."""
        return SecAggClient(
            plan.federation,
            int(plan.round),
            clinic_id,
            tuple(plan.cohort),
            int(plan.threshold),
            self.signing_key,
            self.certificate_pem,
            self.ca_cert,
            rand=os.urandom,
            now=lambda: datetime.now(UTC),
        )


class SecureRounds:
    def __init__(self, agent: RoundHost) -> None:
        self.agent = agent
        self.identity = SigningIdentity.load(agent.config.tls)
        self._session: _Session | None = None

    def step(
        self, plan: federation_pb2.RoundPlan, task: federation_pb2.SecAggTask
    ) -> RoundOutcome | None:
        """Do what the current stage asks; returns an outcome when the round ends here."""
        agent = self.agent
        number = int(plan.round)
        session = self._session if self._session and self._session.round == number else None
        try:
            if task.stage == "advertise":
                return self._advertise(plan)
            if session is None:
                # We lost the round's keys (e.g. a restart after advertising): the protocol
                # cannot be resumed, so sit it out; the others carry on without us.
                log.warning(
                    "round %d is in stage %s but this agent holds no keys for it; "
                    "skipping the round",
                    number,
                    task.stage,
                )
                agent.last_round = number
                return None
            if task.stage == "masked_input":
                self._masked_input(plan, session, task)
            elif answer_stage(agent.client, session.client, number, task):
                return self._done(session)
        except SecAggProtocolError as exc:
            # A security event: the aggregator (or a peer) broke the protocol.
            log.error("round %d: leaving the secure round: %s", number, exc)
            agent.metrics.rounds.labels(result="refused").inc()
            agent.last_round = number
            self._session = None
            return RoundOutcome(number, "refused", str(exc))
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                self._session = None
            return agent.failed(number, exc)
        except Exception as exc:
            self._session = None
            return agent.failed_locally(number, exc)
        return None

    def _advertise(self, plan: federation_pb2.RoundPlan) -> RoundOutcome | None:
        agent = self.agent
        number = int(plan.round)
        if self._session is not None and self._session.round == number:
            adv = self._session.client.advertise()  # a retry: same keys, same signature
        else:
            prepared = agent.prepare(plan)
            if isinstance(prepared, RoundOutcome):
                return prepared  # declined (privacy budget, no data, ...)
            client = self.identity.session(plan, agent.clinic_id)
            self._session = _Session(number, client, prepared, time.monotonic())
            adv = client.advertise()
        agent.client.advertise_keys(
            number, adv.cipher_public_key, adv.mask_public_key, adv.signature
        )
        return None

    def _masked_input(
        self, plan: federation_pb2.RoundPlan, session: _Session, task: federation_pb2.SecAggTask
    ) -> None:
        agent = self.agent
        number = session.round
        quant = quantization_from_proto(plan.quantization)
        update = agent.train(plan, session.prepared)
        # Example counts beyond the plan's cap weigh as the cap (it bounds the ring).
        weight = float(min(update.num_examples, quant.weight_max))
        loss = None
        if quant.loss_max is not None:
            # Only the cohort's weighted mean loss is ever revealed (it travels masked).
            loss = min(max(update.mean_loss, 0.0), quant.loss_max)
        delivery = SharesForRecipient(
            number, agent.clinic_id, {s.peer: s.ciphertext for s in task.shares}
        )
        masked = session.client.masked_input(
            delivery, update.vector, weight=weight, plan=quant, loss=loss
        )
        session.train_seconds = update.train_seconds
        session.num_examples = update.num_examples
        session.mean_loss = update.mean_loss
        session.sent_bytes = agent.client.upload_masked(
            round_number=number,
            specs=session.prepared.specs,
            chunks=masked.chunk_bytes(),
            total_bytes=masked.nbytes,
            train_seconds=update.train_seconds,
        )

    def _done(self, session: _Session) -> RoundOutcome:
        self._session = None
        update = TrainedUpdate(
            vector=np.zeros(0, np.float32),
            num_examples=session.num_examples,
            mean_loss=session.mean_loss,
            train_seconds=session.train_seconds,
        )
        return self.agent.contributed(
            session.round, update, session.sent_bytes, time.monotonic() - session.started
        )


def answer_stage(
    client: FederationClient, secagg: SecAggClient, number: int, task: federation_pb2.SecAggTask
) -> bool:
    """Answer ``share_keys``, ``consistency`` or ``unmask``, which every secure session
    (training or evaluation) answers alike; True once the reveal, the last message, is sent.
    An unknown stage is logged and ignored (False)."""
    if task.stage == "share_keys":
        ads = [_relayed(a, number) for a in task.advertisements]
        submission = secagg.share_keys(ads)
        client.share_keys(number, submission.ciphertexts)
    elif task.stage == "consistency":
        signed = secagg.consistency(SurvivorSet(number, tuple(task.survivors)))
        client.sign_survivors(number, signed.signature)
    elif task.stage == "unmask":
        request = UnmaskRequest(
            round_number=number,
            survivors=tuple(task.survivors),
            dropped=tuple(task.dropped),
            signatures={s.clinic: s.signature for s in task.signatures},
        )
        reveal = secagg.unmask(request)
        client.reveal_shares(number, reveal.self_mask_shares, reveal.key_shares)
        return True
    else:
        log.error("session %d: unknown secure-aggregation stage %r", number, task.stage)
    return False


def _relayed(msg: federation_pb2.Advertisement, number: int) -> RelayedAdvertisement:
    return RelayedAdvertisement(
        advertisement=KeyAdvertisement(
            round_number=number,
            clinic_id=msg.clinic,
            cipher_public_key=msg.cipher_public_key,
            mask_public_key=msg.mask_public_key,
            signature=msg.signature,
        ),
        certificate_pem=msg.certificate_pem,
    )

"""The clinic side of secure aggregation, as pure steps (no gRPC, no clock, no OS randomness).

One :class:`SecAggClient` per clinic and round. Each stage is one method that checks what
the aggregator relayed and returns the message to send back:

=================  =====================================  =============================
stage              input (from the aggregator)            output (to the aggregator)
=================  =====================================  =============================
``advertise``      --                                     :class:`KeyAdvertisement`
``share_keys``     every advertisement of U1              :class:`ShareSubmission`
``masked_input``   the sealed shares addressed to us      :class:`MaskedInput` (streamed)
``consistency``    U3 (:class:`SurvivorSet`)              :class:`SurvivorSignature`
``unmask``         :class:`UnmaskRequest`                 :class:`Reveal`
=================  =====================================  =============================

The aggregator is not trusted. Anything that could be an attack raises a
:class:`~common.secagg.messages.SecAggProtocolError` subclass, after which the client
refuses every further call of the round: the clinic leaves the round rather than reveal
anything. The checks follow Bonawitz et al. (CCS 2017), malicious-server variant:

* every advertisement is signed by its clinic's certificate (chained to the federation
  CA, naming that clinic), our own comes back unchanged, ids are unique, inside the
  cohort, and at least ``t`` of them;
* shares are sealed to their recipient with round, sender and recipient as associated
  data, so they can be neither read, altered, replayed nor redirected;
* the survivor set U3 is signed, and shares are revealed only against ``t`` valid
  signatures over exactly the U3 this clinic signed, for the dropped set it computes
  itself, never both kinds of share for one clinic, and only once per round.

Calling a stage again with the same input returns the same message (a retry after a lost
reply); with a different input it is refused. ``masked_input`` runs once: its
:class:`MaskedInput` can be streamed again, always yielding the same bytes (sending two
different masked vectors under the same masks would reveal their difference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError
from common.pki import PeerVerificationError, peer_uri, sign, uri_sans, verify_peer_signature
from common.secagg.aead import open_, seal
from common.secagg.context import clinic_context, pair_context, pairwise_sign, share_aad
from common.secagg.errors import (
    DecryptionError,
    InvalidKeyError,
    InvalidParameterError,
)
from common.secagg.kex import (
    agree,
    generate_keypair,
    pairwise_mask_seed,
    share_encryption_key,
)
from common.secagg.messages import (
    PUBLIC_KEY_BYTES,
    SEED_BYTES,
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    STAGES,
    UPLOAD_CHUNK_ELEMENTS,
    BadSignatureError,
    InconsistentUnmaskRequestError,
    KeyAdvertisement,
    KeySubstitutionError,
    MalformedMessageError,
    ParticipantSetError,
    ProtocolStateError,
    RelayedAdvertisement,
    Reveal,
    RevealRefusedError,
    SecAggProtocolError,
    ShareDecryptionError,
    SharesForRecipient,
    ShareSubmission,
    StaleMessageError,
    SurvivorSet,
    SurvivorSignature,
    TooFewParticipantsError,
    UnmaskRequest,
    advertise_payload,
    check_threshold,
    parse_share_plaintext,
    share_plaintext,
    survivors_payload,
)
from common.secagg.prg import accumulate_keystream, mask_key
from common.secagg.quantize import QuantizationPlan, rounding_rng
from common.secagg.randomness import RandomSource, read_random
from common.secagg.shamir import split

UInt32Array = npt.NDArray[np.uint32]
_T = TypeVar("_T")


class MaskedInput:
    """A clinic's masked vector ``y = x + PRG(b) + sum_j sign(i,j) PRG(s_ij)`` (mod 2^32),
    produced chunk by chunk.

    Holds the quantized plaintext ``x`` (one uint32 per coordinate) and the mask keys; each
    chunk is masked on demand at its offset in every keystream, so memory stays at the
    model size plus one chunk and the work is the keystream generation itself. Streaming
    again yields identical bytes (the masks and ``x`` are fixed), so a broken upload can
    simply be restarted.
    """

    def __init__(self, plaintext: UInt32Array, masks: Sequence[tuple[bytes, int]]) -> None:
        self._x = plaintext
        self._masks = tuple(masks)

    @property
    def numel(self) -> int:
        """Number of ring elements (``plan.vector_length(delta.size)``)."""
        return int(self._x.size)

    @property
    def nbytes(self) -> int:
        return int(self._x.size) * 4

    @property
    def mask_count(self) -> int:
        """Masks applied: the self mask plus one pairwise mask per other clinic of U2."""
        return len(self._masks)

    def chunks(self, chunk_elements: int = UPLOAD_CHUNK_ELEMENTS) -> Iterator[UInt32Array]:
        """The masked vector as consecutive uint32 arrays of ``chunk_elements`` (the last
        may be shorter). Each yielded array is a new array the caller may keep."""
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
            raise InvalidParameterError(f"chunk_elements must be an int, got {chunk_elements!r}")
        if chunk_elements < 1:
            raise InvalidParameterError(f"chunk_elements must be >= 1, got {chunk_elements}")
        for start in range(0, self._x.size, chunk_elements):
            out = self._x[start : start + chunk_elements].copy()
            for key, mask_sign in self._masks:
                accumulate_keystream(out, key, mask_sign, offset=start)
            yield out

    def chunk_bytes(self, chunk_elements: int = UPLOAD_CHUNK_ELEMENTS) -> Iterator[bytes]:
        """The masked vector as little-endian uint32 bytes, ``4 * chunk_elements`` per chunk
        (the wire format the aggregator's :class:`MaskedUpload` reads)."""
        for chunk in self.chunks(chunk_elements):
            yield chunk.astype("<u4", copy=False).tobytes()

    def vector(self) -> UInt32Array:
        """The whole masked vector in one array (tests and benchmarks; uploads stream)."""
        out = np.empty(self._x.size, dtype=np.uint32)
        step = UPLOAD_CHUNK_ELEMENTS
        for i, chunk in enumerate(self.chunks(step)):
            out[i * step : i * step + chunk.size] = chunk
        return out


class SecAggClient:
    """The clinic's state for one secure round; call the stage methods in order."""

    def __init__(
        self,
        federation: str,
        round_number: int,
        clinic_id: str,
        cohort: Sequence[str],
        threshold: int,
        signing_key: ec.EllipticCurvePrivateKey,
        certificate_pem: bytes,
        ca_cert: x509.Certificate,
        *,
        rand: RandomSource,
        now: Callable[[], datetime],
    ) -> None:
        if not isinstance(federation, str) or not federation:
            raise ConfigError(f"federation must be a non-empty str, got {federation!r}")
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise ConfigError(f"round_number must be a non-negative int, got {round_number!r}")
        cohort_ids = tuple(cohort)
        if any(not isinstance(c, str) or not c for c in cohort_ids):
            raise ConfigError("cohort must be a sequence of non-empty clinic ids")
        if len(set(cohort_ids)) != len(cohort_ids):
            raise ConfigError("cohort contains a clinic id twice")
        if clinic_id not in cohort_ids:
            raise ConfigError(f"clinic {clinic_id!r} is not in the round's cohort")
        try:
            check_threshold(threshold, len(cohort_ids))
        except InvalidParameterError as exc:
            # The threshold comes from the aggregator's plan: an unsafe one is refused.
            raise ConfigError(str(exc)) from None
        if not isinstance(signing_key, ec.EllipticCurvePrivateKey):
            raise ConfigError("signing_key must be the EC private key of the clinic certificate")
        try:
            own_cert = x509.load_pem_x509_certificate(bytes(certificate_pem))
        except (TypeError, ValueError):
            raise ConfigError("certificate_pem is not a PEM certificate") from None
        expected_uri = peer_uri(federation, "clinic", clinic_id)
        if uri_sans(own_cert) != [expected_uri]:
            raise ConfigError(f"the clinic certificate does not name {expected_uri}")
        if _spki(own_cert.public_key()) != _spki(signing_key.public_key()):
            raise ConfigError("signing_key does not belong to the clinic certificate")

        self.federation = federation
        self.round_number = round_number
        self.clinic_id = clinic_id
        self.cohort: frozenset[str] = frozenset(cohort_ids)
        self.threshold = threshold
        self._signing_key = signing_key
        self._ca_cert = ca_cert
        self._rand = rand
        self._now = now

        self._next_stage = 0
        self._refusal: SecAggProtocolError | None = None
        # Idempotent retries: (stage, input) -> output already sent.
        self._sent: dict[str, tuple[Any, Any]] = {}

        self._cipher_sk = b""
        self._mask_sk = b""
        self._advertisement: KeyAdvertisement | None = None
        self._u1: tuple[str, ...] = ()
        self._certs: dict[str, x509.Certificate] = {}
        self._share_keys: dict[str, bytes] = {}
        self._mask_seeds: dict[str, bytes] = {}
        self._self_seed = b""
        # j -> (our share of b_j, our share of s_j's private key), for every j in U2.
        self._held_shares: dict[str, tuple[bytes, bytes]] = {}
        self._u2: frozenset[str] = frozenset()
        self._u3: tuple[str, ...] = ()

    # -- stages ---------------------------------------------------------------------------

    def advertise(self) -> KeyAdvertisement:
        """Stage 1: two fresh X25519 key pairs, the public halves signed with our cert key."""
        return self._run(STAGE_ADVERTISE, (), self._advertise)

    def share_keys(self, advertisements: Sequence[RelayedAdvertisement]) -> ShareSubmission:
        """Stage 2: verify every advertisement of U1, then Shamir-share b_i and s_i's key
        ``t``-of-|U1| and seal one share pair to each other clinic of U1."""
        return self._run(STAGE_SHARE_KEYS, tuple(advertisements), self._share_keys_stage)

    def masked_input(
        self,
        delivery: SharesForRecipient,
        delta: npt.NDArray[np.floating],
        *,
        weight: float,
        plan: QuantizationPlan,
        loss: float | None = None,
    ) -> MaskedInput:
        """Stage 3: open the shares addressed to us (which fixes U2) and mask our input.

        ``delta`` must already be clipped (and noised, and clipped to the plan's bound);
        it is encoded as ``plan.encode(delta, weight=weight, loss=loss)``. Runs once per
        round: stream the returned :class:`MaskedInput` again to retry an upload.
        """
        if self._refusal is None and self._next_stage > STAGES.index(STAGE_MASKED_INPUT):
            self._refuse(ProtocolStateError("masked input was already produced for this round"))
        return self._run(
            STAGE_MASKED_INPUT,
            None,
            lambda _: self._masked_input_stage(
                delivery, lambda: self._encode(delta, weight, plan, loss)
            ),
        )

    def masked_integers(self, delivery: SharesForRecipient, values: UInt32Array) -> MaskedInput:
        """Stage 3 for a session that sums integers (evaluation counts): mask ``values``
        as they are. The caller keeps them small enough that no admissible sum wraps."""
        if self._refusal is None and self._next_stage > STAGES.index(STAGE_MASKED_INPUT):
            self._refuse(ProtocolStateError("masked input was already produced for this round"))
        x = np.array(values, dtype=np.uint32, copy=True)
        if x.ndim != 1 or x.size == 0:
            raise ValueError("values must be a non-empty 1-D vector")
        return self._run(
            STAGE_MASKED_INPUT, None, lambda _: self._masked_input_stage(delivery, lambda: x)
        )

    def consistency(self, announcement: SurvivorSet) -> SurvivorSignature:
        """Stage 4: sign the survivor set U3 after checking it against what we know."""
        return self._run(STAGE_CONSISTENCY, announcement, self._consistency_stage)

    def unmask(self, request: UnmaskRequest) -> Reveal:
        """Stage 5: reveal b-shares for U3 and key shares for D, if the request is proven
        consistent by ``t`` signatures over the U3 we signed."""
        if self._refusal is None and STAGE_UNMASK in self._sent:
            previous_request, previous_reveal = self._sent[STAGE_UNMASK]
            if _same_sets(previous_request, request):
                return previous_reveal
            self._refuse(
                RevealRefusedError(
                    "the aggregator asked to reveal a second time with a different survivor "
                    "or dropped set; a clinic reveals at most once per round"
                )
            )
        return self._run(STAGE_UNMASK, request, self._unmask_stage)

    # -- introspection (for logs and metrics; never key material) -------------------------

    @property
    def refused(self) -> SecAggProtocolError | None:
        """The error that made this clinic leave the round, if any."""
        return self._refusal

    @property
    def participants(self) -> dict[str, frozenset[str]]:
        """U1, U2, U3 as far as this clinic has learnt them."""
        return {"U1": frozenset(self._u1), "U2": self._u2, "U3": frozenset(self._u3)}

    # -- stage implementations ------------------------------------------------------------

    def _advertise(self, _: object) -> KeyAdvertisement:
        self._cipher_sk, cipher_pk = generate_keypair(self._rand)
        self._mask_sk, mask_pk = generate_keypair(self._rand)
        payload = advertise_payload(
            federation=self.federation,
            round_number=self.round_number,
            clinic_id=self.clinic_id,
            cipher_public_key=cipher_pk,
            mask_public_key=mask_pk,
        )
        self._advertisement = KeyAdvertisement(
            round_number=self.round_number,
            clinic_id=self.clinic_id,
            cipher_public_key=cipher_pk,
            mask_public_key=mask_pk,
            signature=sign(self._signing_key, payload),
        )
        return self._advertisement

    def _share_keys_stage(self, relayed: tuple[RelayedAdvertisement, ...]) -> ShareSubmission:
        own = self._advertisement
        if own is None:  # unreachable: stage order is enforced by _run
            raise ProtocolStateError("advertise() must run first")
        now = self._now()
        verified: dict[str, KeyAdvertisement] = {}
        for item in relayed:
            if not isinstance(item, RelayedAdvertisement) or not isinstance(
                item.advertisement, KeyAdvertisement
            ):
                raise MalformedMessageError("advertisement list contains a non-advertisement")
            adv = item.advertisement
            self._check_round("advertisement", adv.round_number)
            cid = adv.clinic_id
            if not isinstance(cid, str) or cid not in self.cohort:
                raise ParticipantSetError(f"advertisement from {cid!r}, who is not in the cohort")
            if cid in verified:
                raise ParticipantSetError(f"clinic {cid!r} is advertised twice")
            for name, key in (("cipher", adv.cipher_public_key), ("mask", adv.mask_public_key)):
                if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                    raise MalformedMessageError(f"{cid!r} advertised a malformed {name} key")
            if cid == self.clinic_id and (
                adv.cipher_public_key != own.cipher_public_key
                or adv.mask_public_key != own.mask_public_key
            ):
                raise KeySubstitutionError(
                    "our own advertisement came back with different public keys: the "
                    "aggregator substituted a key"
                )
            cert = _load_certificate(cid, item.certificate_pem)
            payload = advertise_payload(
                federation=self.federation,
                round_number=self.round_number,
                clinic_id=cid,
                cipher_public_key=adv.cipher_public_key,
                mask_public_key=adv.mask_public_key,
            )
            self._verify(cert, payload, adv.signature, cid, what="advertisement", now=now)
            verified[cid] = adv
            self._certs[cid] = cert
        if self.clinic_id not in verified:
            raise ParticipantSetError("our own advertisement is missing from U1")
        if len(verified) < self.threshold:
            raise TooFewParticipantsError(
                f"only {len(verified)} clinics advertised keys; the threshold is {self.threshold}"
            )
        self._u1 = tuple(sorted(verified))
        for cid in self._u1:
            if cid == self.clinic_id:
                continue
            adv = verified[cid]
            try:
                self._share_keys[cid] = share_encryption_key(
                    agree(self._cipher_sk, adv.cipher_public_key), **self._pair(cid)
                )
                self._mask_seeds[cid] = pairwise_mask_seed(
                    agree(self._mask_sk, adv.mask_public_key), **self._pair(cid)
                )
            except InvalidKeyError as exc:  # includes low-order points
                raise MalformedMessageError(f"{cid!r} advertised an unusable key: {exc}") from None

        self._self_seed = read_random(self._rand, SEED_BYTES)
        share_ids = list(range(1, len(self._u1) + 1))
        seed_shares = split(self._self_seed, self.threshold, share_ids, self._rand)
        key_shares = split(self._mask_sk, self.threshold, share_ids, self._rand)
        ciphertexts: dict[str, bytes] = {}
        for share_id, cid in enumerate(self._u1, start=1):
            if cid == self.clinic_id:
                self._held_shares[cid] = (seed_shares[share_id], key_shares[share_id])
                continue
            plaintext = share_plaintext(
                federation=self.federation,
                round_number=self.round_number,
                sender=self.clinic_id,
                recipient=cid,
                self_mask_share=seed_shares[share_id],
                key_share=key_shares[share_id],
            )
            ciphertexts[cid] = seal(
                self._share_keys[cid],
                plaintext,
                aad=self._aad(sender=self.clinic_id, recipient=cid),
                rand=self._rand,
            )
        return ShareSubmission(
            round_number=self.round_number, sender=self.clinic_id, ciphertexts=ciphertexts
        )

    def _encode(
        self,
        delta: npt.NDArray[np.floating],
        weight: float,
        plan: QuantizationPlan,
        loss: float | None,
    ) -> UInt32Array:
        if not isinstance(plan, QuantizationPlan):
            raise MalformedMessageError("plan must be a QuantizationPlan")
        if plan.max_clinics < len(self.cohort):
            raise MalformedMessageError(
                f"the quantization plan covers {plan.max_clinics} clinics, fewer than the "
                f"cohort of {len(self.cohort)}: the sum could wrap"
            )
        return plan.encode(delta, weight=weight, rng=rounding_rng(self._rand), loss=loss)

    def _masked_input_stage(
        self, delivery: SharesForRecipient, encode: Callable[[], UInt32Array]
    ) -> MaskedInput:
        if not isinstance(delivery, SharesForRecipient):
            raise MalformedMessageError("expected the shares addressed to this clinic")
        self._check_round("share delivery", delivery.round_number)
        if delivery.recipient != self.clinic_id:
            raise ParticipantSetError(f"shares addressed to {delivery.recipient!r}, not to us")
        u1 = set(self._u1)
        for sender in delivery.ciphertexts:
            if sender == self.clinic_id:
                raise ParticipantSetError("the aggregator relayed a share from ourselves")
            if sender not in u1:
                raise ParticipantSetError(f"share from {sender!r}, who is not in U1")
        received: dict[str, tuple[bytes, bytes]] = {}
        for sender, sealed in delivery.ciphertexts.items():
            if not isinstance(sealed, bytes):
                raise ShareDecryptionError(f"share from {sender!r} is not bytes")
            try:
                plaintext = open_(
                    self._share_keys[sender],
                    sealed,
                    aad=self._aad(sender=sender, recipient=self.clinic_id),
                )
            except DecryptionError:
                raise ShareDecryptionError(
                    f"share from {sender!r} failed authentication (tampered, replayed or "
                    "redirected)"
                ) from None
            received[sender] = parse_share_plaintext(
                plaintext,
                federation=self.federation,
                round_number=self.round_number,
                sender=sender,
                recipient=self.clinic_id,
            )
        u2 = frozenset(received) | {self.clinic_id}
        if len(u2) < self.threshold:
            raise TooFewParticipantsError(
                f"only {len(u2)} clinics shared keys; the threshold is {self.threshold}"
            )
        x = encode()
        masks = [(mask_key(self._self_seed, context=self._clinic_context(self.clinic_id)), 1)]
        for peer in sorted(u2 - {self.clinic_id}):
            context = pair_context(
                federation=self.federation,
                round_number=self.round_number,
                clinic_a=self.clinic_id,
                clinic_b=peer,
            )
            masks.append(
                (
                    mask_key(self._mask_seeds[peer], context=context),
                    pairwise_sign(self.clinic_id, peer),
                )
            )
        self._held_shares.update(received)
        self._u2 = u2
        return MaskedInput(x, masks)

    def _consistency_stage(self, announcement: SurvivorSet) -> SurvivorSignature:
        if not isinstance(announcement, SurvivorSet):
            raise MalformedMessageError("expected a survivor set")
        self._check_round("survivor set", announcement.round_number)
        survivors = _id_tuple("survivor set", announcement.survivors)
        outside = set(survivors) - self._u2
        if outside:
            raise ParticipantSetError(
                f"survivor set names {sorted(outside)}, who did not share keys with us (not in U2)"
            )
        if self.clinic_id not in survivors:
            raise ParticipantSetError("we are not in the announced survivor set")
        if len(survivors) < self.threshold:
            raise TooFewParticipantsError(
                f"only {len(survivors)} survivors announced; the threshold is {self.threshold}"
            )
        self._u3 = tuple(sorted(survivors))
        payload = survivors_payload(
            federation=self.federation, round_number=self.round_number, survivors=self._u3
        )
        return SurvivorSignature(
            round_number=self.round_number,
            clinic_id=self.clinic_id,
            signature=sign(self._signing_key, payload),
        )

    def _unmask_stage(self, request: UnmaskRequest) -> Reveal:
        if not isinstance(request, UnmaskRequest):
            raise MalformedMessageError("expected an unmask request")
        self._check_round("unmask request", request.round_number)
        survivors = _id_tuple("survivor set", request.survivors)
        dropped = _id_tuple("dropped set", request.dropped)
        both = set(survivors) & set(dropped)
        if both:
            raise InconsistentUnmaskRequestError(
                f"{sorted(both)} listed both as survivors and as dropped: that would reveal "
                "both secrets of a clinic"
            )
        if tuple(sorted(survivors)) != self._u3:
            raise InconsistentUnmaskRequestError(
                "the unmask request's survivor set differs from the one we signed"
            )
        expected_dropped = self._u2 - set(self._u3)
        if set(dropped) != expected_dropped:
            raise InconsistentUnmaskRequestError(
                f"the dropped set {sorted(dropped)} is not U2 \\ U3 = {sorted(expected_dropped)}"
            )
        self._check_quorum(request.signatures)
        return Reveal(
            round_number=self.round_number,
            clinic_id=self.clinic_id,
            self_mask_shares={j: self._held_shares[j][0] for j in self._u3},
            key_shares={j: self._held_shares[j][1] for j in sorted(expected_dropped)},
        )

    def _check_quorum(self, signatures: Mapping[str, bytes]) -> None:
        """At least ``t`` valid signatures over our U3, from distinct clinics of U3.

        Signers outside U3 are not counted (an honest clinic signs only a set it belongs
        to); any signature that fails is refused outright, since the aggregator verified
        them all before relaying and a bad one can only be tampering.
        """
        if not isinstance(signatures, Mapping):
            raise MalformedMessageError("signatures must map clinic ids to signatures")
        payload = survivors_payload(
            federation=self.federation, round_number=self.round_number, survivors=self._u3
        )
        now = self._now()
        u3 = set(self._u3)
        valid = 0
        for signer, signature in signatures.items():
            if signer not in self._certs:
                raise ParticipantSetError(f"signature from {signer!r}, who is not in U1")
            if not isinstance(signature, bytes):
                raise MalformedMessageError(f"signature of {signer!r} is not bytes")
            self._verify(
                self._certs[signer], payload, signature, signer, what="survivor signature", now=now
            )
            if signer in u3:
                valid += 1
        if valid < self.threshold:
            raise TooFewParticipantsError(
                f"only {valid} valid signatures over our survivor set; at least "
                f"{self.threshold} are needed before revealing anything"
            )

    # -- helpers --------------------------------------------------------------------------

    def _run(self, stage: str, key: Any, step: Callable[[Any], _T]) -> _T:
        """Enforce stage order, replay the answer to an identical retry, and turn every
        protocol error into a refusal of the whole round."""
        if self._refusal is not None:
            raise ProtocolStateError(
                f"clinic {self.clinic_id!r} refused round {self.round_number}: {self._refusal}"
            ) from self._refusal
        index = STAGES.index(stage)
        if stage in self._sent and index == self._next_stage - 1:
            previous_key, previous_out = self._sent[stage]
            if previous_key == key:
                return previous_out
            self._refuse(
                ProtocolStateError(f"stage {stage!r} was already answered for a different input")
            )
        if index != self._next_stage:
            expected = STAGES[self._next_stage] if self._next_stage < len(STAGES) else "none"
            raise ProtocolStateError(
                f"stage {stage!r} called out of order (next expected: {expected!r})"
            )
        try:
            out = step(key)
        except SecAggProtocolError as exc:
            self._refusal = exc
            raise
        self._next_stage += 1
        if key is not None:
            self._sent[stage] = (key, out)
        return out

    def _refuse(self, error: SecAggProtocolError) -> None:
        self._refusal = error
        raise error

    def _check_round(self, what: str, round_number: object) -> None:
        if round_number != self.round_number:
            raise StaleMessageError(
                f"{what} is for round {round_number!r}, this is round {self.round_number}"
            )

    def _verify(
        self,
        cert: x509.Certificate,
        payload: bytes,
        signature: bytes,
        clinic: str,
        *,
        what: str,
        now: datetime,
    ) -> None:
        try:
            verify_peer_signature(
                cert,
                self._ca_cert,
                payload,
                signature,
                expected_uri=peer_uri(self.federation, "clinic", clinic),
                now=now,
            )
        except PeerVerificationError as exc:
            raise BadSignatureError(f"{what} of {clinic!r} does not verify: {exc}") from None

    def _pair(self, peer: str) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "round_number": self.round_number,
            "clinic_a": self.clinic_id,
            "clinic_b": peer,
        }

    def _aad(self, *, sender: str, recipient: str) -> bytes:
        return share_aad(
            federation=self.federation,
            round_number=self.round_number,
            sender=sender,
            recipient=recipient,
        )

    def _clinic_context(self, clinic: str) -> bytes:
        return clinic_context(
            federation=self.federation, round_number=self.round_number, clinic_id=clinic
        )


def _load_certificate(clinic: str, pem: object) -> x509.Certificate:
    if not isinstance(pem, bytes | bytearray):
        raise BadSignatureError(f"certificate of {clinic!r} is not bytes")
    try:
        return x509.load_pem_x509_certificate(bytes(pem))
    except ValueError:
        raise BadSignatureError(f"certificate of {clinic!r} is not a PEM certificate") from None


def _id_tuple(what: str, ids: object) -> tuple[str, ...]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise MalformedMessageError(f"{what} must be a sequence of clinic ids")
    out = tuple(ids)
    if any(not isinstance(i, str) or not i for i in out):
        raise MalformedMessageError(f"{what} contains something that is not a clinic id")
    if len(set(out)) != len(out):
        raise ParticipantSetError(f"{what} names a clinic twice")
    return out


def _same_sets(a: UnmaskRequest, b: object) -> bool:
    if not isinstance(b, UnmaskRequest):
        return False
    try:
        return (
            a.round_number == b.round_number
            and sorted(a.survivors) == sorted(b.survivors)
            and sorted(a.dropped) == sorted(b.dropped)
        )
    except TypeError:
        return False


def _spki(key: ec.EllipticCurvePublicKey | Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


__all__ = ["MaskedInput", "SecAggClient"]

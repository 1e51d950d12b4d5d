"""The aggregator side of secure aggregation, as a pure state machine (no gRPC, no threads).

One :class:`SecAggServer` per round. It stores what the clinics send, relays it, keeps a
single uint32 accumulator of the masked inputs, and at the end reconstructs the secrets
the survivors reveal, removes the masks and decodes the weighted FedAvg sum. It never
holds one clinic's vector except while that clinic's upload is in flight
(:class:`MaskedUpload`), and even then the vector is masked.

Who is alive is decided outside, by the round state machine (:mod:`aggregator.rounds`,
stages named in :data:`common.secagg.messages.STAGES`): at each stage deadline the
coordinator calls :meth:`SecAggServer.close_stage` with the clinics still alive, and the
server forms the next participant set:

* ``advertise``    U1 = clinics that advertised (and are alive)
* ``share_keys``   U2 = clinics of U1 that sent their sealed shares
* ``masked_input`` U3 = clinics whose masked upload was committed (an input already in the
  sum cannot be taken out, so U3 is exactly the committed set)
* ``consistency``  U4 = clinics of U3 that signed U3
* ``unmask``       U5 = clinics of U4 that revealed their shares

Fewer than ``t`` clinics at any point aborts the round (:class:`SecAggAbortedError`).

Errors are the shared domain errors, so the servicers' error -> status mapping applies:
malformed -> :class:`~common.errors.InvalidUpdateError`, wrong round/stage or a clinic
that already dropped out -> :class:`~common.errors.StaleRoundError`, second submission ->
:class:`~common.errors.DuplicateSubmissionError`, outsider ->
:class:`~common.errors.NotInCohortError`, too large an upload ->
:class:`~common.errors.PayloadTooLargeError`, round cannot finish ->
:class:`SecAggAbortedError` (a :class:`~common.errors.PreconditionError`).

Thread safety: the server is not thread-safe; the coordinator serialises calls with its
lock. The one exception is :meth:`MaskedUpload.write`, which touches only that upload's
own buffer, so several uploads can stream concurrently outside the lock; ``begin_upload``,
``commit`` and ``discard`` must be called under it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography import x509

from aggregator.fedavg import AggregateResult
from common.errors import (
    DuplicateSubmissionError,
    InvalidUpdateError,
    NotInCohortError,
    PayloadTooLargeError,
    PreconditionError,
    StaleRoundError,
)
from common.pki import PeerVerificationError, peer_uri, verify_peer_signature
from common.secagg.context import clinic_context, pair_context, pairwise_sign
from common.secagg.errors import SecAggCryptoError
from common.secagg.kex import agree, pairwise_mask_seed, public_key
from common.secagg.messages import (
    PUBLIC_KEY_BYTES,
    RING_ELEMENT_BYTES,
    SEED_BYTES,
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    STAGES,
    KeyAdvertisement,
    RelayedAdvertisement,
    Reveal,
    SharesForRecipient,
    ShareSubmission,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    advertise_payload,
    check_threshold,
    share_ciphertext_length,
    survivors_payload,
)
from common.secagg.prg import accumulate_mask
from common.secagg.quantize import QuantizationPlan
from common.secagg.shamir import SHARE_BYTES, combine

UInt32Array = npt.NDArray[np.uint32]
_R = TypeVar("_R")

_DONE = len(STAGES)
"""Stage index once the unmask stage is closed."""
_SELF_MASK = "self-mask"
_MASK_KEY = "mask-key"


class SecAggAbortedError(PreconditionError):
    """The secure round cannot finish (fewer than ``t`` clinics left, or unmasking
    failed); nothing is returned and the next round starts from the published checkpoint."""


class UnmaskFailedError(SecAggAbortedError):
    """The revealed shares do not reconstruct the secrets, or the unmasked sum does not
    decode into the range admissible inputs can produce."""


class InvalidSecAggMessageError(InvalidUpdateError):
    """A clinic's secure-aggregation message is malformed or does not verify."""


class MaskedUpload:
    """One clinic's masked vector arriving in sequential chunks.

    Created by :meth:`SecAggServer.begin_upload`; :meth:`write` each chunk in order, then
    :meth:`SecAggServer.commit` adds it into the round's accumulator (and frees the
    buffer) or :meth:`discard` drops it (a broken stream). The buffer holds a masked
    vector only, never a plaintext.
    """

    def __init__(self, owner: SecAggServer, clinic_id: str, numel: int) -> None:
        self._owner = owner
        self.clinic_id = clinic_id
        self.numel = numel
        self.received = 0
        self._buffer: UInt32Array | None = np.empty(numel, dtype=np.uint32)
        self.state = "open"

    @property
    def complete(self) -> bool:
        return self.received == self.numel

    def write(self, chunk: bytes | bytearray | memoryview | UInt32Array) -> None:
        """Append the next chunk: little-endian uint32 bytes, or a 1-D uint32 array."""
        # Take the buffer once: a concurrent discard (stage closed under the coordinator's
        # lock) then only drops our reference, and this write lands in a dead buffer.
        buffer = self._buffer
        if self.state != "open" or buffer is None:
            raise StaleRoundError(
                f"upload of {self.clinic_id!r} is {self.state}; it no longer accepts chunks"
            )
        if isinstance(chunk, np.ndarray):
            if chunk.dtype != np.uint32 or chunk.ndim != 1:
                raise InvalidSecAggMessageError("a masked chunk must be a 1-D uint32 array")
            values = chunk
        elif isinstance(chunk, bytes | bytearray | memoryview):
            if len(chunk) % RING_ELEMENT_BYTES:
                raise InvalidSecAggMessageError(
                    f"a masked chunk of {len(chunk)} bytes is not whole uint32 elements"
                )
            values = np.frombuffer(chunk, dtype="<u4")
        else:
            raise InvalidSecAggMessageError(
                f"a masked chunk must be bytes or a uint32 array, got {type(chunk).__name__}"
            )
        end = self.received + values.size
        if end > self.numel:
            raise PayloadTooLargeError(
                f"masked input of {self.clinic_id!r} exceeds the round's {self.numel} elements"
            )
        buffer[self.received : end] = values
        self.received = end

    def discard(self) -> None:
        """Drop the upload (a broken stream); the clinic may begin a new one."""
        if self.state == "open":
            self._release("discarded")
            self._owner._forget_upload(self)

    def _take(self) -> UInt32Array:
        if self._buffer is None:
            raise StaleRoundError(f"upload of {self.clinic_id!r} is {self.state}")
        return self._buffer

    def _release(self, state: str) -> None:
        self._buffer = None
        self.state = state


class SecAggServer:
    """The aggregator's state for one secure round."""

    def __init__(
        self,
        federation: str,
        round_number: int,
        cohort: Sequence[str],
        threshold: int,
        numel_ring: int,
        quant_plan: QuantizationPlan | None,
        ca_cert: x509.Certificate,
        *,
        now: Callable[[], datetime],
    ) -> None:
        if not isinstance(federation, str) or not federation:
            raise PreconditionError(f"federation must be a non-empty str, got {federation!r}")
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise PreconditionError(
                f"round_number must be a non-negative int, got {round_number!r}"
            )
        cohort_ids = tuple(cohort)
        if len(set(cohort_ids)) != len(cohort_ids) or any(
            not isinstance(c, str) or not c for c in cohort_ids
        ):
            raise PreconditionError("cohort must be distinct non-empty clinic ids")
        check_threshold(threshold, len(cohort_ids))
        # Without a quantization plan the inputs are integers already (evaluation counts):
        # the caller bounds them and takes the raw sum with finalize_ring().
        extra = 0
        if quant_plan is not None:
            if not isinstance(quant_plan, QuantizationPlan):
                raise PreconditionError("quant_plan must be a QuantizationPlan or None")
            if quant_plan.max_clinics < len(cohort_ids):
                raise PreconditionError(
                    f"the quantization plan covers {quant_plan.max_clinics} clinics, fewer "
                    f"than the cohort of {len(cohort_ids)}; the sum could wrap"
                )
            extra = quant_plan.extra_coordinates
        if isinstance(numel_ring, bool) or not isinstance(numel_ring, int) or numel_ring <= extra:
            raise PreconditionError(
                f"numel_ring must be an int > {extra} (the model's parameters plus the "
                f"weight/loss coordinates), got {numel_ring!r}"
            )
        self.federation = federation
        self.round_number = round_number
        self.cohort: frozenset[str] = frozenset(cohort_ids)
        self.threshold = threshold
        self.numel_ring = numel_ring
        self.plan = quant_plan
        self._ca_cert = ca_cert
        self._now = now

        self._stage_index = 0
        self._aborted: SecAggAbortedError | None = None
        self._result: AggregateResult | None = None
        self._ring_sum: UInt32Array | None = None
        # Participant sets U1..U5 in order, as stages close.
        self._sets: list[frozenset[str]] = []

        self._advertisements: dict[str, RelayedAdvertisement] = {}
        self._certs: dict[str, x509.Certificate] = {}
        self._share_ids: dict[str, int] = {}
        self._shares: dict[str, dict[str, bytes]] = {}
        self._accumulator: UInt32Array | None = None
        self._uploads: dict[str, MaskedUpload] = {}
        self._committed: set[str] = set()
        self._signatures: dict[str, bytes] = {}
        self._reveals: dict[str, Reveal] = {}

    # -- queries ---------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """The open stage, ``"done"`` once unmask closed, ``"aborted"`` after an abort."""
        if self._aborted is not None:
            return "aborted"
        return STAGES[self._stage_index] if self._stage_index < _DONE else "done"

    @property
    def participants(self) -> dict[str, frozenset[str]]:
        """U1..U5 as far as they are fixed (for metrics: dropouts per stage)."""
        return {f"U{i}": s for i, s in enumerate(self._sets, start=1)}

    @property
    def uploads_in_flight(self) -> int:
        return len(self._uploads)

    # -- stage 1: advertise ----------------------------------------------------------------

    def advertise(
        self, clinic_id: str, advertisement: KeyAdvertisement, certificate_pem: bytes
    ) -> None:
        """Store ``clinic_id``'s key advertisement with the certificate of its connection."""
        if not isinstance(advertisement, KeyAdvertisement):
            raise InvalidSecAggMessageError("expected a KeyAdvertisement")
        self._accept(clinic_id, advertisement.round_number, STAGE_ADVERTISE)
        if clinic_id in self._advertisements:
            raise DuplicateSubmissionError(f"clinic {clinic_id!r} already advertised its keys")
        if advertisement.clinic_id != clinic_id:
            raise InvalidSecAggMessageError(
                f"advertisement names {advertisement.clinic_id!r} but comes from {clinic_id!r}"
            )
        for name, key in (
            ("cipher", advertisement.cipher_public_key),
            ("mask", advertisement.mask_public_key),
        ):
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise InvalidSecAggMessageError(
                    f"{name} public key must be {PUBLIC_KEY_BYTES} bytes"
                )
        if not isinstance(advertisement.signature, bytes):
            raise InvalidSecAggMessageError("advertisement signature must be bytes")
        try:
            cert = x509.load_pem_x509_certificate(bytes(certificate_pem))
        except (TypeError, ValueError):
            raise InvalidSecAggMessageError(
                f"certificate of {clinic_id!r} is not a PEM certificate"
            ) from None
        payload = advertise_payload(
            federation=self.federation,
            round_number=self.round_number,
            clinic_id=clinic_id,
            cipher_public_key=advertisement.cipher_public_key,
            mask_public_key=advertisement.mask_public_key,
        )
        self._verify(cert, payload, advertisement.signature, clinic_id, "advertisement")
        self._advertisements[clinic_id] = RelayedAdvertisement(
            advertisement=advertisement, certificate_pem=bytes(certificate_pem)
        )
        self._certs[clinic_id] = cert

    def advertisements(self) -> tuple[RelayedAdvertisement, ...]:
        """Every advertisement of U1 (with certificates), sorted by clinic id."""
        self._require_stage_at_least(STAGE_SHARE_KEYS)
        return tuple(self._advertisements[c] for c in sorted(self._set(1)))

    # -- stage 2: share keys ---------------------------------------------------------------

    def submit_shares(self, clinic_id: str, submission: ShareSubmission) -> None:
        """Store ``clinic_id``'s sealed shares: exactly one per other clinic of U1."""
        if not isinstance(submission, ShareSubmission):
            raise InvalidSecAggMessageError("expected a ShareSubmission")
        self._accept(clinic_id, submission.round_number, STAGE_SHARE_KEYS, member_of=1)
        if clinic_id in self._shares:
            raise DuplicateSubmissionError(f"clinic {clinic_id!r} already sent its shares")
        if submission.sender != clinic_id:
            raise InvalidSecAggMessageError(
                f"shares claim to be from {submission.sender!r} but come from {clinic_id!r}"
            )
        if not isinstance(submission.ciphertexts, Mapping):
            raise InvalidSecAggMessageError("ciphertexts must map recipients to sealed shares")
        expected = self._set(1) - {clinic_id}
        got = set(submission.ciphertexts)
        if got != expected:
            raise InvalidSecAggMessageError(
                f"shares must go to exactly U1 minus the sender; missing "
                f"{sorted(expected - got)}, unexpected {sorted(map(str, got - expected))}"
            )
        for recipient, sealed in submission.ciphertexts.items():
            size = share_ciphertext_length(
                federation=self.federation,
                round_number=self.round_number,
                sender=clinic_id,
                recipient=recipient,
            )
            if not isinstance(sealed, bytes) or len(sealed) != size:
                raise InvalidSecAggMessageError(
                    f"sealed share for {recipient!r} must be {size} bytes"
                )
        self._shares[clinic_id] = dict(submission.ciphertexts)

    def shares_for(self, clinic_id: str) -> SharesForRecipient:
        """The sealed shares addressed to ``clinic_id`` from the other clinics of U2."""
        self._accept(clinic_id, self.round_number, STAGE_MASKED_INPUT, member_of=2)
        return SharesForRecipient(
            round_number=self.round_number,
            recipient=clinic_id,
            ciphertexts={
                sender: self._shares[sender][clinic_id]
                for sender in sorted(self._set(2))
                if sender != clinic_id
            },
        )

    # -- stage 3: masked input -------------------------------------------------------------

    def begin_upload(self, clinic_id: str) -> MaskedUpload:
        """Start receiving ``clinic_id``'s masked vector; an unfinished earlier upload of the
        same clinic (a broken stream being retried) is discarded."""
        self._accept(clinic_id, self.round_number, STAGE_MASKED_INPUT, member_of=2)
        if clinic_id in self._committed:
            raise DuplicateSubmissionError(f"clinic {clinic_id!r} already sent its masked input")
        previous = self._uploads.get(clinic_id)
        if previous is not None:
            previous.discard()
        upload = MaskedUpload(self, clinic_id, self.numel_ring)
        self._uploads[clinic_id] = upload
        return upload

    def commit(self, upload: MaskedUpload) -> None:
        """Add a complete upload into the accumulator and free its buffer."""
        if not isinstance(upload, MaskedUpload) or upload._owner is not self:
            raise InvalidSecAggMessageError("this upload does not belong to this round")
        if self._uploads.get(upload.clinic_id) is not upload or upload.state != "open":
            raise StaleRoundError(f"upload of {upload.clinic_id!r} is {upload.state}")
        try:
            self._accept(upload.clinic_id, self.round_number, STAGE_MASKED_INPUT, member_of=2)
        except StaleRoundError:
            upload.discard()
            raise
        if not upload.complete:
            raise InvalidSecAggMessageError(
                f"masked input of {upload.clinic_id!r} is incomplete: {upload.received} of "
                f"{upload.numel} elements"
            )
        if self._accumulator is None:
            self._accumulator = np.zeros(self.numel_ring, dtype=np.uint32)
        # uint32 addition wraps modulo 2^32: exactly the ring operation.
        np.add(self._accumulator, upload._take(), out=self._accumulator)
        upload._release("committed")
        del self._uploads[upload.clinic_id]
        self._committed.add(upload.clinic_id)

    def _forget_upload(self, upload: MaskedUpload) -> None:
        if self._uploads.get(upload.clinic_id) is upload:
            del self._uploads[upload.clinic_id]

    # -- stage 4: consistency --------------------------------------------------------------

    def survivors(self) -> SurvivorSet:
        """U3, the clinics whose masked input is in the sum, for every clinic to sign."""
        self._require_stage_at_least(STAGE_CONSISTENCY)
        return SurvivorSet(round_number=self.round_number, survivors=tuple(sorted(self._set(3))))

    def submit_signature(self, clinic_id: str, signature: SurvivorSignature) -> None:
        """Verify and store ``clinic_id``'s signature over U3."""
        if not isinstance(signature, SurvivorSignature):
            raise InvalidSecAggMessageError("expected a SurvivorSignature")
        self._accept(clinic_id, signature.round_number, STAGE_CONSISTENCY, member_of=3)
        if clinic_id in self._signatures:
            raise DuplicateSubmissionError(f"clinic {clinic_id!r} already signed the survivors")
        if signature.clinic_id != clinic_id:
            raise InvalidSecAggMessageError(
                f"signature claims to be from {signature.clinic_id!r} but comes from {clinic_id!r}"
            )
        if not isinstance(signature.signature, bytes):
            raise InvalidSecAggMessageError("signature must be bytes")
        payload = survivors_payload(
            federation=self.federation,
            round_number=self.round_number,
            survivors=sorted(self._set(3)),
        )
        self._verify(self._certs[clinic_id], payload, signature.signature, clinic_id, "signature")
        self._signatures[clinic_id] = signature.signature

    # -- stage 5: unmask -------------------------------------------------------------------

    def unmask_request_for(self, clinic_id: str) -> UnmaskRequest:
        """U3, D = U2 \\ U3 and every signature over U3, for a clinic of U4."""
        self._accept(clinic_id, self.round_number, STAGE_UNMASK, member_of=4)
        u2, u3 = self._set(2), self._set(3)
        return UnmaskRequest(
            round_number=self.round_number,
            survivors=tuple(sorted(u3)),
            dropped=tuple(sorted(u2 - u3)),
            signatures=dict(sorted(self._signatures.items())),
        )

    def reveal(self, clinic_id: str, reveal: Reveal) -> None:
        """Store ``clinic_id``'s shares: b-shares exactly for U3, key shares exactly for D."""
        if not isinstance(reveal, Reveal):
            raise InvalidSecAggMessageError("expected a Reveal")
        self._accept(clinic_id, reveal.round_number, STAGE_UNMASK, member_of=4)
        if clinic_id in self._reveals:
            raise DuplicateSubmissionError(f"clinic {clinic_id!r} already revealed its shares")
        if reveal.clinic_id != clinic_id:
            raise InvalidSecAggMessageError(
                f"reveal claims to be from {reveal.clinic_id!r} but comes from {clinic_id!r}"
            )
        u3 = self._set(3)
        dropped = self._set(2) - u3
        for kind, shares, expected in (
            ("self-mask", reveal.self_mask_shares, u3),
            ("mask-key", reveal.key_shares, dropped),
        ):
            if not isinstance(shares, Mapping) or set(shares) != expected:
                raise InvalidSecAggMessageError(
                    f"{kind} shares must be given for exactly {sorted(expected)}"
                )
            for owner, share in shares.items():
                if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
                    raise InvalidSecAggMessageError(
                        f"{kind} share of {owner!r} must be {SHARE_BYTES} bytes"
                    )
        self._reveals[clinic_id] = reveal

    def finalize(self) -> AggregateResult:
        """Reconstruct the secrets, remove every mask, decode, and return the weighted mean.

        Needs reveals from at least ``t`` clinics. Every shared secret is reconstructed
        from all reveals (so a corrupted share is detected when more than ``t`` arrived),
        every reconstructed mask key is checked against its advertised public key, and the
        unmasked sum must decode into the admissible range. Any failure aborts the round
        (:class:`UnmaskFailedError`); nothing partial is returned. Calling again returns
        the same result.
        """
        if self._result is not None:
            return self._result
        if self.plan is None:
            raise PreconditionError("this session sums integers: use finalize_ring()")
        plan = self.plan
        self._result = self._finalizing(lambda ring: self._decode(ring, plan))
        return self._result

    def finalize_ring(self) -> UInt32Array:
        """The unmasked sum itself, modulo 2^32 (sessions without a quantization plan).

        The same reconstruction and checks as :meth:`finalize`; bounding the values is the
        caller's job (:func:`common.eval_counts.decode_sum`).
        """
        if self._ring_sum is None:
            self._ring_sum = self._finalizing(lambda ring: ring.copy())
        return self._ring_sum.copy()

    def _finalizing(self, decode: Callable[[UInt32Array], _R]) -> _R:
        if self._aborted is not None:
            raise self._aborted
        if self._stage_index < STAGES.index(STAGE_UNMASK):
            raise StaleRoundError(f"cannot finalise in stage {self.stage!r}")
        try:
            result = decode(self._unmask())
        except UnmaskFailedError as exc:
            self._abort(exc)
            raise
        self._accumulator = None
        return result

    # -- stage transitions -----------------------------------------------------------------

    def close_stage(self, stage: str, alive: Collection[str]) -> frozenset[str]:
        """Close ``stage`` with the clinics the round state machine still counts as alive.

        Returns the new participant set (see the module docstring). For ``masked_input``
        it is the set of committed uploads whatever ``alive`` says, because their inputs
        are already in the sum; unfinished uploads are discarded. Raises
        :class:`SecAggAbortedError` (and aborts) when fewer than ``t`` remain.
        """
        if self._aborted is not None:
            raise self._aborted
        if stage not in STAGES:
            raise PreconditionError(f"unknown secure-aggregation stage {stage!r}")
        if self._stage_index >= _DONE or stage != STAGES[self._stage_index]:
            raise StaleRoundError(
                f"round {self.round_number} is in stage {self.stage!r}, not {stage!r}"
            )
        alive_set = frozenset(alive)
        submitted: Collection[str]
        if stage == STAGE_ADVERTISE:
            submitted = self._advertisements
        elif stage == STAGE_SHARE_KEYS:
            submitted = self._shares
        elif stage == STAGE_MASKED_INPUT:
            submitted = self._committed
        elif stage == STAGE_CONSISTENCY:
            submitted = self._signatures
        else:
            submitted = self._reveals
        if stage == STAGE_MASKED_INPUT:
            participants = frozenset(self._committed)
            for upload in list(self._uploads.values()):
                upload.discard()
        else:
            participants = frozenset(submitted) & alive_set
            if stage == STAGE_UNMASK:
                # Reveals of clinics no longer counted are not used.
                self._reveals = {c: r for c, r in self._reveals.items() if c in participants}
        self._sets.append(participants)
        self._stage_index += 1
        if stage == STAGE_ADVERTISE:
            self._share_ids = {c: i for i, c in enumerate(sorted(participants), start=1)}
        if len(participants) < self.threshold:
            error = SecAggAbortedError(
                f"only {len(participants)} clinic(s) left after stage {stage!r} of round "
                f"{self.round_number}; the secure-aggregation threshold is {self.threshold}"
            )
            self._abort(error)
            raise error
        return participants

    def abort(self, reason: str) -> None:
        """Abort the round from outside (admin abort, round deadline); frees every buffer."""
        if self._aborted is None and self._result is None:
            self._abort(SecAggAbortedError(reason))

    # -- helpers ---------------------------------------------------------------------------

    def _abort(self, error: SecAggAbortedError) -> None:
        self._aborted = error
        for upload in list(self._uploads.values()):
            upload.discard()
        self._accumulator = None

    def _set(self, k: int) -> frozenset[str]:
        """U_k (1-based), which must be fixed already."""
        return self._sets[k - 1]

    def _accept(
        self, clinic_id: str, round_number: object, stage: str, member_of: int | None = None
    ) -> None:
        """Raise the domain error that explains why ``clinic_id`` may not act now."""
        if round_number != self.round_number:
            raise StaleRoundError(
                f"message is for round {round_number!r}, the running round is {self.round_number}"
            )
        if self._aborted is not None or self._result is not None:
            raise StaleRoundError(f"round {self.round_number} is no longer accepting messages")
        if clinic_id not in self.cohort:
            raise NotInCohortError(
                f"clinic {clinic_id!r} is not in the cohort of round {self.round_number}"
            )
        if self._stage_index >= _DONE or STAGES[self._stage_index] != stage:
            raise StaleRoundError(
                f"round {self.round_number} is in stage {self.stage!r}, not {stage!r}"
            )
        if member_of is not None and clinic_id not in self._set(member_of):
            raise StaleRoundError(
                f"clinic {clinic_id!r} is no longer part of round {self.round_number} "
                f"(dropped before stage {stage!r})"
            )

    def _require_stage_at_least(self, stage: str) -> None:
        if self._aborted is not None:
            raise StaleRoundError(f"round {self.round_number} was aborted: {self._aborted}")
        if self._stage_index < STAGES.index(stage):
            raise StaleRoundError(
                f"round {self.round_number} is in stage {self.stage!r}; {stage!r} has not started"
            )

    def _verify(
        self, cert: x509.Certificate, payload: bytes, signature: bytes, clinic_id: str, what: str
    ) -> None:
        try:
            verify_peer_signature(
                cert,
                self._ca_cert,
                payload,
                signature,
                expected_uri=peer_uri(self.federation, "clinic", clinic_id),
                now=self._now(),
            )
        except PeerVerificationError as exc:
            raise InvalidSecAggMessageError(
                f"{what} of {clinic_id!r} does not verify: {exc}"
            ) from None

    def _unmask(self) -> UInt32Array:
        """Remove every mask from the accumulator (in place) and return it."""
        reveals = self._reveals
        if len(reveals) < self.threshold:
            raise UnmaskFailedError(
                f"only {len(reveals)} clinic(s) revealed their shares; {self.threshold} are needed"
            )
        accumulator = self._accumulator
        if accumulator is None:  # unreachable: U3 >= t >= 2 committed uploads
            raise UnmaskFailedError("no masked input was received")
        u2, u3 = self._set(2), self._set(3)
        dropped = sorted(u2 - u3)
        survivors = sorted(u3)
        # Reconstruct everything before touching the accumulator.
        seeds = {j: self._combine(j, "self-mask seed", _SELF_MASK) for j in survivors}
        mask_keys: dict[str, bytes] = {}
        for j in dropped:
            secret = self._combine(j, "mask key", _MASK_KEY)
            advertised = self._advertisements[j].advertisement.mask_public_key
            if public_key(secret) != advertised:
                raise UnmaskFailedError(
                    f"the reconstructed mask key of {j!r} does not match its advertised public key "
                    "(a revealed share is wrong)"
                )
            mask_keys[j] = secret
        try:
            for j in survivors:
                accumulate_mask(accumulator, seeds[j], -1, context=self._clinic_context(j))
            for j in dropped:
                for k in survivors:
                    # k added sign(k, j) * PRG(s_kj) for its peer j; j's own input is absent.
                    peer_key = self._advertisements[k].advertisement.mask_public_key
                    seed = pairwise_mask_seed(
                        agree(mask_keys[j], peer_key),
                        federation=self.federation,
                        round_number=self.round_number,
                        clinic_a=j,
                        clinic_b=k,
                    )
                    context = pair_context(
                        federation=self.federation,
                        round_number=self.round_number,
                        clinic_a=j,
                        clinic_b=k,
                    )
                    accumulate_mask(accumulator, seed, -pairwise_sign(k, j), context=context)
        except SecAggCryptoError as exc:
            raise UnmaskFailedError(f"the masks cannot be removed: {exc}") from None
        return accumulator

    def _decode(self, accumulator: UInt32Array, plan: QuantizationPlan) -> AggregateResult:
        survivors = sorted(self._set(3))
        try:
            decoded = plan.decode_sum(accumulator, contributors=len(survivors))
            mean = decoded.mean_delta()
        except SecAggCryptoError as exc:
            raise UnmaskFailedError(f"the unmasked sum is unusable: {exc}") from None
        loss = None
        if decoded.weighted_loss_sum is not None:
            loss = decoded.weighted_loss_sum / decoded.weight_sum
        return AggregateResult(
            delta=mean.astype(np.float32),
            total_weight=decoded.weight_sum,
            mean_loss=loss,
            contributors=tuple(survivors),
        )

    def _combine(self, owner: str, what: str, kind: str) -> bytes:
        shares = {
            self._share_ids[r]: (
                reveal.self_mask_shares[owner] if kind == _SELF_MASK else reveal.key_shares[owner]
            )
            for r, reveal in self._reveals.items()
        }
        try:
            return combine(shares, self.threshold, SEED_BYTES)
        except SecAggCryptoError as exc:
            raise UnmaskFailedError(
                f"the revealed shares of {owner!r}'s {what} do not reconstruct it: {exc}"
            ) from None

    def _clinic_context(self, clinic_id: str) -> bytes:
        return clinic_context(
            federation=self.federation, round_number=self.round_number, clinic_id=clinic_id
        )


__all__ = [
    "InvalidSecAggMessageError",
    "MaskedUpload",
    "SecAggAbortedError",
    "SecAggServer",
    "UnmaskFailedError",
]

"""What travels in a secure-aggregation round, how it is signed, and the protocol's errors.

The round protocol (Bonawitz et al., CCS 2017, with the malicious-aggregator defences;
README's "Secure aggregation" section, and "A round" in the project's design document,
which lives beside the repository rather than in it) runs in five stages, named in
:data:`STAGES`. The clinic side is :class:`clinic_agent.secagg_client.SecAggClient`, the
aggregator side :class:`aggregator.secagg_server.SecAggServer`; both exchange the plain
dataclasses below, which the gRPC layer maps one-to-one onto protobuf messages.

Every byte string that is signed or encrypted is built here with
:func:`~common.secagg.context.encode_fields` (type-tagged, length-prefixed, so injective)
and starts with the domain label ``"dermafed-secagg-v1"`` and a purpose word, so a
signature made for one purpose, round or federation is worthless for any other:

* key advertisement: ``("dermafed-secagg-v1", "advertise", federation, round, clinic,
  c_pk, s_pk)`` signed with the clinic's mTLS certificate key (ECDSA P-256);
* survivor set: ``("dermafed-secagg-v1", "survivors", federation, round, *sorted(U3))``
  signed the same way;
* share plaintext (sealed with ChaCha20-Poly1305 under the pair's share-encryption key,
  associated data :func:`~common.secagg.context.share_aad`): ``("dermafed-secagg-v1",
  "share", federation, round, sender, recipient, b-share, s-share)``.

Messages carry their ``round_number`` so that a stale message gets a clear error early;
the protection itself is cryptographic (the round is inside every signed payload, AAD and
key derivation), so rewriting the field does not help an attacker.

Round parameters: :func:`plan_quantization` picks the ring encoding for a round and
refuses unsafe settings; :func:`check_threshold` enforces the threshold rule
(``2t > |cohort|`` and ``t >= 2``) that both sides apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import DermafedError
from common.secagg.aead import OVERHEAD_BYTES
from common.secagg.context import PROTOCOL_LABEL, Field, encode_fields
from common.secagg.errors import InvalidParameterError
from common.secagg.quantize import (
    NORM_TOLERANCE,
    QuantizationPlan,
    rounding_error_bound,
)
from common.secagg.shamir import SHARE_BYTES

DOMAIN = "dermafed-secagg-v1"
"""First field of every signed or sealed payload of the round protocol."""

STAGE_ADVERTISE = "advertise"
STAGE_SHARE_KEYS = "share_keys"
STAGE_MASKED_INPUT = "masked_input"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"
STAGES: tuple[str, ...] = (
    STAGE_ADVERTISE,
    STAGE_SHARE_KEYS,
    STAGE_MASKED_INPUT,
    STAGE_CONSISTENCY,
    STAGE_UNMASK,
)
"""The stages of a secure round, in order (use these names for the round state machine)."""

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
"""Length of the self-mask seed b_i and of an X25519 private key (the two shared secrets)."""
RING_ELEMENT_BYTES = 4
"""Masked vectors travel as little-endian uint32."""
UPLOAD_CHUNK_ELEMENTS = 1 << 18
"""Elements per streamed chunk of a masked vector: 1 MiB, as the design document asks."""


# --------------------------------------------------------------------------- errors


class SecAggProtocolError(DermafedError):
    """A secure-aggregation message breaks the protocol: the clinic refuses the round.

    Raised by the clinic side when what the aggregator relays could be an attack (a
    substituted key, a bad signature, inconsistent participant sets, ...). Once raised,
    the :class:`~clinic_agent.secagg_client.SecAggClient` refuses every further call of
    that round.
    """


class ProtocolStateError(SecAggProtocolError):
    """A stage was called out of order, twice with different inputs, or after a refusal."""


class StaleMessageError(SecAggProtocolError):
    """A relayed message names another round (a replay, or a confused aggregator)."""


class MalformedMessageError(SecAggProtocolError):
    """A relayed message has the wrong shape (lengths, types, encoding)."""


class BadSignatureError(SecAggProtocolError):
    """A certificate or signature does not verify for the clinic it claims to be from."""


class KeySubstitutionError(SecAggProtocolError):
    """The clinic's own advertisement came back with different keys: an active attack."""


class ParticipantSetError(SecAggProtocolError):
    """A participant set is wrong: duplicates, outsiders, or not a subset of the last one."""


class TooFewParticipantsError(ParticipantSetError):
    """Fewer than ``t`` clinics (or valid signatures) remain; nothing may be revealed."""


class ShareDecryptionError(SecAggProtocolError):
    """An encrypted share failed authentication or does not decode (tampered or replayed)."""


class InconsistentUnmaskRequestError(SecAggProtocolError):
    """The unmask request does not match what the clinic signed and knows (U3, D)."""


class RevealRefusedError(SecAggProtocolError):
    """The aggregator asked a second time with different sets; a clinic reveals once."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage ``advertise``, clinic -> aggregator: the clinic's two fresh X25519 public keys."""

    round_number: int
    clinic_id: str
    cipher_public_key: bytes
    """c_pk: agreement with it gives the AEAD keys of the encrypted shares."""
    mask_public_key: bytes
    """s_pk: agreement with it gives the pairwise-mask seeds."""
    signature: bytes
    """ECDSA over :func:`advertise_payload`, by the clinic's mTLS certificate key."""


@dataclass(frozen=True)
class RelayedAdvertisement:
    """Stage ``share_keys``, aggregator -> clinics: an advertisement with its signer's
    certificate (PEM, as presented on the advertiser's mTLS connection)."""

    advertisement: KeyAdvertisement
    certificate_pem: bytes

    @property
    def clinic_id(self) -> str:
        return self.advertisement.clinic_id


@dataclass(frozen=True)
class ShareSubmission:
    """Stage ``share_keys``, clinic -> aggregator: one sealed share pair per other clinic."""

    round_number: int
    sender: str
    ciphertexts: Mapping[str, bytes]
    """recipient clinic id -> sealed :func:`share_plaintext`."""


@dataclass(frozen=True)
class SharesForRecipient:
    """Stage ``masked_input``, aggregator -> clinic: the sealed shares addressed to it."""

    round_number: int
    recipient: str
    ciphertexts: Mapping[str, bytes]
    """sender clinic id -> sealed :func:`share_plaintext` (senders still alive: U2)."""


@dataclass(frozen=True)
class SurvivorSet:
    """Stage ``consistency``, aggregator -> clinic: U3, whose masked input was received."""

    round_number: int
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class SurvivorSignature:
    """Stage ``consistency``, clinic -> aggregator: its signature over U3."""

    round_number: int
    clinic_id: str
    signature: bytes
    """ECDSA over :func:`survivors_payload`."""


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage ``unmask``, aggregator -> clinic: what to reveal, and the proof of consistency."""

    round_number: int
    survivors: tuple[str, ...]
    """U3: reveal shares of these clinics' self-mask seeds."""
    dropped: tuple[str, ...]
    """D = U2 \\ U3: reveal shares of these clinics' mask-agreement private keys."""
    signatures: Mapping[str, bytes] = field(default_factory=dict)
    """signer clinic id -> its signature over :func:`survivors_payload` of ``survivors``."""


@dataclass(frozen=True)
class Reveal:
    """Stage ``unmask``, clinic -> aggregator: the shares needed to remove the masks.

    The share id of every share is the revealer's 1-based position in ``sorted(U1)``,
    which the aggregator knows, so it is not repeated here.
    """

    round_number: int
    clinic_id: str
    self_mask_shares: Mapping[str, bytes]
    """j in U3 -> this clinic's Shamir share of b_j."""
    key_shares: Mapping[str, bytes]
    """j in D -> this clinic's Shamir share of s_j's private key."""


# --------------------------------------------------------------------------- payloads


def advertise_payload(
    *,
    federation: str,
    round_number: int,
    clinic_id: str,
    cipher_public_key: bytes,
    mask_public_key: bytes,
) -> bytes:
    """The bytes a clinic signs to advertise its two public keys for one round."""
    return encode_fields(
        DOMAIN,
        STAGE_ADVERTISE,
        federation,
        round_number,
        clinic_id,
        cipher_public_key,
        mask_public_key,
    )


def survivors_payload(*, federation: str, round_number: int, survivors: Sequence[str]) -> bytes:
    """The bytes a clinic signs to state which clinics' masked inputs were received (U3).

    The set is sorted first, so every clinic that saw the same set signs the same bytes.
    """
    if len(set(survivors)) != len(survivors):
        raise InvalidParameterError("the survivor set contains a clinic id twice")
    return encode_fields(DOMAIN, "survivors", federation, round_number, *sorted(survivors))


def share_plaintext(
    *,
    federation: str,
    round_number: int,
    sender: str,
    recipient: str,
    self_mask_share: bytes,
    key_share: bytes,
) -> bytes:
    """What ``sender`` seals for ``recipient``: its shares of b_sender and s_sender's key."""
    _check_share("self_mask_share", self_mask_share)
    _check_share("key_share", key_share)
    return encode_fields(
        DOMAIN, "share", federation, round_number, sender, recipient, self_mask_share, key_share
    )


def parse_share_plaintext(
    plaintext: bytes, *, federation: str, round_number: int, sender: str, recipient: str
) -> tuple[bytes, bytes]:
    """``(self_mask_share, key_share)`` from a plaintext that must name exactly this
    federation, round, sender and recipient (:class:`ShareDecryptionError` otherwise)."""
    try:
        fields = decode_fields(plaintext)
    except MalformedMessageError as exc:
        raise ShareDecryptionError(f"share from {sender!r} does not decode: {exc}") from None
    expected_head: list[Field] = [DOMAIN, "share", federation, round_number, sender, recipient]
    if len(fields) != 8 or fields[:6] != expected_head:
        raise ShareDecryptionError(
            f"share from {sender!r} is not bound to this round, sender and recipient"
        )
    b_share, s_share = fields[6], fields[7]
    if not (
        isinstance(b_share, bytes)
        and isinstance(s_share, bytes)
        and len(b_share) == SHARE_BYTES
        and len(s_share) == SHARE_BYTES
    ):
        raise ShareDecryptionError(
            f"share from {sender!r} does not carry two {SHARE_BYTES}-byte shares"
        )
    return b_share, s_share


def share_ciphertext_length(
    *, federation: str, round_number: int, sender: str, recipient: str
) -> int:
    """Exact length of a sealed share, so the aggregator can refuse garbage up front."""
    zero = bytes(SHARE_BYTES)
    plaintext = share_plaintext(
        federation=federation,
        round_number=round_number,
        sender=sender,
        recipient=recipient,
        self_mask_share=zero,
        key_share=zero,
    )
    return len(plaintext) + OVERHEAD_BYTES


def decode_fields(data: bytes) -> list[Field]:
    """Inverse of :func:`~common.secagg.context.encode_fields` (strict: no trailing bytes)."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedMessageError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(PROTOCOL_LABEL):
        raise MalformedMessageError("missing protocol label")
    pos = len(PROTOCOL_LABEL)
    fields: list[Field] = []
    while pos < len(data):
        tag = data[pos : pos + 1]
        pos += 1
        if tag == b"I":
            if pos + 8 > len(data):
                raise MalformedMessageError("truncated integer field")
            fields.append(int.from_bytes(data[pos : pos + 8], "big"))
            pos += 8
        elif tag in (b"S", b"B"):
            if pos + 4 > len(data):
                raise MalformedMessageError("truncated length prefix")
            length = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
            if pos + length > len(data):
                raise MalformedMessageError("truncated field")
            raw = data[pos : pos + length]
            pos += length
            if tag == b"B":
                fields.append(raw)
            else:
                try:
                    fields.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise MalformedMessageError("string field is not UTF-8") from None
        else:
            raise MalformedMessageError(f"unknown field tag {tag!r}")
    return fields


def _check_share(name: str, value: object) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != SHARE_BYTES:
        raise InvalidParameterError(f"{name} must be {SHARE_BYTES} bytes")


# --------------------------------------------------------------------------- round parameters


def minimum_threshold(cohort_size: int) -> int:
    """The smallest threshold the protocol accepts for a cohort: ``max(2, n // 2 + 1)``."""
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 2:
        raise InvalidParameterError(
            f"secure aggregation needs a cohort of at least 2 clinics, got {cohort_size!r}"
        )
    return max(2, cohort_size // 2 + 1)


def check_threshold(threshold: int, cohort_size: int) -> None:
    """Refuse a threshold that would let a malicious aggregator unmask a single clinic.

    * ``2t > n``: the aggregator could otherwise announce two different survivor sets to
      two disjoint groups of ``t`` clinics, collect a valid quorum of signatures for each,
      and obtain a clinic's self-mask seed from one group and its mask key from the other.
    * ``t >= 2``: with ``t = 1`` a "sum" can be a single clinic's input, and each Shamir
      share is the secret itself.
    * ``t <= n``: otherwise no round could ever finish.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise InvalidParameterError(f"threshold must be an int, got {threshold!r}")
    lowest = minimum_threshold(cohort_size)
    if not lowest <= threshold <= cohort_size:
        raise InvalidParameterError(
            f"threshold t={threshold} is unsafe or unreachable for a cohort of {cohort_size}: "
            f"need {lowest} <= t <= {cohort_size} (2t > n stops a malicious aggregator from "
            "splitting the cohort into two quorums)"
        )


DEFAULT_MAX_RELATIVE_ERROR = 1e-3


def plan_quantization(
    clip_norm: float,
    max_clinics: int,
    *,
    weight_max: float,
    loss_max: float | None = None,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> QuantizationPlan:
    """The ring encoding of a secure round: the finest power-of-two scales that cannot wrap.

    ``clip_norm`` is the L2 bound every clinic clips its (noised) delta to; it must be > 0
    in secure mode, because it is what bounds the quantization range. ``weight_max`` caps
    the FedAvg weight a clinic may claim (normalise example counts so real weights are not
    far below it: the error of the weighted mean grows with ``weight_max / mean weight``).
    ``max_clinics`` is the largest cohort the plan must cover (use the cohort size).

    Overflow is impossible by construction: the plan proves ``max_clinics * ceil(bound *
    scale) <= 2^31 - 1`` for every segment (see :mod:`common.secagg.quantize`).

    **Error bound.** For ``n`` contributors, each coordinate of the decoded weighted-delta
    sum is within ``n / delta_scale`` of the exact ``sum_i w_i * delta_i``, and the decoded
    weight sum within ``n / weight_scale`` of ``sum_i w_i`` (exact for integer weights).
    :func:`mean_error_bound` turns this into a bound on the weighted mean.

    Refuses (:class:`~common.secagg.errors.InvalidParameterError`) a non-positive clip
    norm, weight cap or cohort below 2, and a cohort so large that the rounding error of
    the summed delta would exceed ``max_relative_error`` of one clinic's largest possible
    coordinate ``weight_max * clip_norm``.
    """
    for name, value in (("clip_norm", clip_norm), ("weight_max", weight_max)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParameterError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise InvalidParameterError(
                f"{name} must be finite and > 0 for secure aggregation, got {value!r} "
                "(the clip norm bounds the quantization range)"
            )
    minimum_threshold(max_clinics)  # validates max_clinics >= 2
    if not (math.isfinite(max_relative_error) and max_relative_error > 0):
        raise InvalidParameterError(
            f"max_relative_error must be finite and > 0, got {max_relative_error!r}"
        )
    plan = QuantizationPlan.choose(
        clip_norm=float(clip_norm),
        weight_max=float(weight_max),
        max_clinics=max_clinics,
        loss_max=loss_max,
    )
    delta_error = rounding_error_bound(contributors=max_clinics, scale=plan.delta_scale)
    weight_error = rounding_error_bound(contributors=max_clinics, scale=plan.weight_scale)
    relative = max(delta_error / plan.delta_bound, weight_error / plan.weight_max)
    if relative > max_relative_error:
        raise InvalidParameterError(
            f"a cohort of {max_clinics} leaves a 32-bit ring a rounding error of "
            f"{relative:.3g} of one clinic's largest contribution, above the allowed "
            f"{max_relative_error:g}; use a smaller cohort"
        )
    return plan


def mean_error_bound(plan: QuantizationPlan, *, contributors: int, weight_sum: float) -> float:
    """Per-coordinate bound on |securely aggregated weighted mean - exact weighted mean|.

    With ``S``, ``W`` the exact weighted-delta sum and weight sum, ``S'``, ``W'`` the decoded
    ones (``|S' - S| < n/s_delta``, ``|W' - W| < n/s_w``) and ``m = S/W`` (every coordinate
    ``|m_j| <= B = clip_norm * (1 + tol)`` since m is a convex combination of clipped
    deltas): ``S'/W' - m = ((S' - S) + m (W - W')) / W'``, so the error is below
    ``(n/s_delta + B n/s_w) / W'``, plus ``B * 2^-24`` for the final rounding to float32.
    ``weight_sum`` is the decoded ``W'`` the aggregator reports.
    """
    if not (math.isfinite(weight_sum) and weight_sum > 0):
        raise InvalidParameterError(f"weight_sum must be finite and > 0, got {weight_sum!r}")
    bound = plan.clip_norm * (1 + NORM_TOLERANCE)
    delta_error = rounding_error_bound(contributors=contributors, scale=plan.delta_scale)
    weight_error = rounding_error_bound(contributors=contributors, scale=plan.weight_scale)
    return (delta_error + bound * weight_error) / weight_sum + bound * 2.0**-24

"""Canonical, injective encodings of the protocol contexts that keys and ciphertexts bind.

Every derived key and every AEAD ciphertext is bound to *where* it may be used:
federation, round number and the clinic ids involved. The encoding is type-tagged and
length-prefixed, so no two different field lists encode to the same bytes (``("ab", "c")``
and ``("a", "bc")`` differ), which is what makes the binding sound.

Field encoding (all lengths and integers big-endian):

* ``str``   -> ``b"S" || u32 len || UTF-8 bytes``
* ``bytes`` -> ``b"B" || u32 len || bytes``
* ``int``   -> ``b"I" || u64`` (``0 <= value < 2**64``; ``bool`` is refused)

The whole context is ``PROTOCOL_LABEL`` followed by the encoded fields, so keys derived for
another protocol or another version of this one can never collide with ours.
"""

from __future__ import annotations

from common.secagg.errors import InvalidParameterError

PROTOCOL_LABEL = b"dermafed/secagg/v1"

_U32_MAX = 2**32 - 1
_U64_LIMIT = 2**64

Field = str | bytes | int


def encode_fields(*fields: Field) -> bytes:
    """Concatenate ``fields`` with type tags and length prefixes (see module docstring)."""
    parts = [PROTOCOL_LABEL]
    for field in fields:
        if isinstance(field, bool):
            raise InvalidParameterError("context fields may not be bool")
        if isinstance(field, str):
            data = field.encode("utf-8")
            parts.append(b"S" + _u32(len(data)) + data)
        elif isinstance(field, bytes | bytearray):
            parts.append(b"B" + _u32(len(field)) + bytes(field))
        elif isinstance(field, int):
            if not 0 <= field < _U64_LIMIT:
                raise InvalidParameterError(f"integer context field {field} is not in [0, 2**64)")
            parts.append(b"I" + field.to_bytes(8, "big"))
        else:
            raise InvalidParameterError(
                f"context field of type {type(field).__name__} is not str, bytes or int"
            )
    return b"".join(parts)


def canonical_pair(clinic_a: str, clinic_b: str) -> tuple[str, str]:
    """The two distinct clinic ids in canonical (ascending UTF-8 byte) order."""
    _check_id("clinic_a", clinic_a)
    _check_id("clinic_b", clinic_b)
    if clinic_a == clinic_b:
        raise InvalidParameterError(f"a clinic cannot pair with itself ({clinic_a!r})")
    a, b = clinic_a.encode("utf-8"), clinic_b.encode("utf-8")
    return (clinic_a, clinic_b) if a < b else (clinic_b, clinic_a)


def pairwise_sign(self_id: str, peer_id: str) -> int:
    """Sign of the pairwise mask that ``self_id`` applies for ``peer_id``.

    The clinic whose id comes first in canonical order adds the mask (+1), the other
    subtracts it (-1), so the two masks cancel in the sum.
    """
    first, _ = canonical_pair(self_id, peer_id)
    return 1 if first == self_id else -1


def pair_context(*, federation: str, round_number: int, clinic_a: str, clinic_b: str) -> bytes:
    """Context of a secret shared by two clinics in one round (order of ids is irrelevant).

    Used for the pairwise-mask seed and for the share-encryption key, which both clinics
    must derive identically.
    """
    _check_id("federation", federation)
    _check_round(round_number)
    lo, hi = canonical_pair(clinic_a, clinic_b)
    return encode_fields("pair", federation, round_number, lo, hi)


def clinic_context(*, federation: str, round_number: int, clinic_id: str) -> bytes:
    """Context of a secret owned by one clinic in one round (its self-mask)."""
    _check_id("federation", federation)
    _check_round(round_number)
    _check_id("clinic_id", clinic_id)
    return encode_fields("clinic", federation, round_number, clinic_id)


def share_aad(*, federation: str, round_number: int, sender: str, recipient: str) -> bytes:
    """Associated data of an encrypted share: directional (sender, recipient) on purpose.

    The share-encryption key is symmetric between the two clinics; binding the direction
    here stops an aggregator from reflecting A's ciphertext back to A as if B had sent it.
    """
    _check_id("federation", federation)
    _check_round(round_number)
    _check_id("sender", sender)
    _check_id("recipient", recipient)
    if sender == recipient:
        raise InvalidParameterError(f"sender and recipient are both {sender!r}")
    return encode_fields("share", federation, round_number, sender, recipient)


def _u32(n: int) -> bytes:
    if n > _U32_MAX:
        raise InvalidParameterError(f"context field of {n} bytes is too long")
    return n.to_bytes(4, "big")


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"{name} must be a non-empty str, got {value!r}")


def _check_round(round_number: object) -> None:
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise InvalidParameterError(
            f"round_number must be a non-negative int, got {round_number!r}"
        )

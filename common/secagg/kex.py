"""X25519 key agreement and HKDF-SHA256 key derivation with a context binding.

Each clinic makes two X25519 key pairs per round: one whose agreement yields pairwise-mask
seeds, one whose agreement yields share-encryption keys. A raw X25519 output is never used
as a key: :func:`derive_key` runs it through HKDF-SHA256 with ``info`` binding a purpose
string and the round context (federation, round, both clinic ids in canonical order), so a
secret from one round, pair or purpose is useless in any other.

Private keys are the 32 raw bytes drawn from ``rand`` (X25519 clamps them on use, RFC 7748
§5); they are returned unclamped so that they can be Shamir-shared and reconstructed
byte-for-byte.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.secagg.context import encode_fields, pair_context
from common.secagg.errors import InvalidKeyError, InvalidParameterError, LowOrderPointError
from common.secagg.randomness import RandomSource, read_random

KEY_BYTES = 32
"""Length of X25519 private keys, public keys, shared secrets and derived keys."""

PURPOSE_PAIRWISE_MASK = "pairwise-mask-seed"
PURPOSE_SHARE_ENCRYPTION = "share-encryption"

_HKDF_MAX_LENGTH = 255 * 32
_ALL_ZERO = bytes(KEY_BYTES)


def generate_keypair(rand: RandomSource) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private32, public32)`` from 32 bytes of ``rand``."""
    private = read_random(rand, KEY_BYTES)
    return private, public_key(private)


def public_key(private: bytes) -> bytes:
    """The X25519 public key (``X25519(private, 9)``) of a 32-byte private key."""
    key = X25519PrivateKey.from_private_bytes(_key_bytes("private key", private))
    return key.public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret between ``private`` and ``peer_public``.

    Raises :class:`InvalidKeyError` for keys of the wrong type or length and
    :class:`LowOrderPointError` when the peer key is a low-order point (all-zero shared
    secret, RFC 7748 §6.1). Non-canonical u-coordinates are accepted as RFC 7748 requires.
    """
    own = X25519PrivateKey.from_private_bytes(_key_bytes("private key", private))
    peer = X25519PublicKey.from_public_bytes(_key_bytes("peer public key", peer_public))
    try:
        shared = own.exchange(peer)
    except ValueError:
        # OpenSSL refuses to return the all-zero output of a low-order point.
        raise LowOrderPointError(
            "peer public key is a low-order X25519 point (all-zero shared secret)"
        ) from None
    # Defence in depth in case a backend ever returns the zero secret instead of failing.
    if hmac.compare_digest(shared, _ALL_ZERO):
        raise LowOrderPointError(
            "peer public key is a low-order X25519 point (all-zero shared secret)"
        )
    return shared


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """Plain HKDF-SHA256 (RFC 5869): extract with ``salt`` (``None`` = 32 zero bytes), then
    expand ``info`` to ``length`` bytes."""
    if not isinstance(ikm, bytes | bytearray):
        raise InvalidKeyError(f"HKDF input keying material must be bytes, got {type(ikm).__name__}")
    if salt is not None and not isinstance(salt, bytes | bytearray):
        raise InvalidParameterError(f"HKDF salt must be bytes or None, got {type(salt).__name__}")
    if not isinstance(info, bytes | bytearray):
        raise InvalidParameterError(f"HKDF info must be bytes, got {type(info).__name__}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise InvalidParameterError(f"HKDF length must be an int, got {length!r}")
    if not 1 <= length <= _HKDF_MAX_LENGTH:
        raise InvalidParameterError(f"HKDF length must be in [1, {_HKDF_MAX_LENGTH}], got {length}")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=None if salt is None else bytes(salt),
        info=bytes(info),
    )
    return hkdf.derive(bytes(ikm))


def derive_key(secret: bytes, *, purpose: str, context: bytes, length: int = KEY_BYTES) -> bytes:
    """A ``length``-byte key from a 32-byte secret, bound to ``purpose`` and ``context``.

    ``HKDF-SHA256(ikm=secret, salt=None, info=encode_fields(purpose, context))`` where
    :func:`~common.secagg.context.encode_fields` prefixes the protocol label and makes the
    (purpose, context) pair unambiguous. ``context`` is normally one of
    :func:`~common.secagg.context.pair_context` or
    :func:`~common.secagg.context.clinic_context`.
    """
    secret = _key_bytes("secret", secret)
    if not isinstance(purpose, str) or not purpose:
        raise InvalidParameterError(f"purpose must be a non-empty str, got {purpose!r}")
    if not isinstance(context, bytes | bytearray) or not context:
        raise InvalidParameterError("context must be non-empty bytes")
    info = encode_fields(purpose, bytes(context))
    return hkdf_sha256(secret, salt=None, info=info, length=length)


def pairwise_mask_seed(
    shared: bytes, *, federation: str, round_number: int, clinic_a: str, clinic_b: str
) -> bytes:
    """The 32-byte pairwise-mask seed both clinics derive from their mask-agreement secret."""
    context = pair_context(
        federation=federation, round_number=round_number, clinic_a=clinic_a, clinic_b=clinic_b
    )
    return derive_key(shared, purpose=PURPOSE_PAIRWISE_MASK, context=context)


def share_encryption_key(
    shared: bytes, *, federation: str, round_number: int, clinic_a: str, clinic_b: str
) -> bytes:
    """The 32-byte AEAD key both clinics derive from their share-encryption secret."""
    context = pair_context(
        federation=federation, round_number=round_number, clinic_a=clinic_a, clinic_b=clinic_b
    )
    return derive_key(shared, purpose=PURPOSE_SHARE_ENCRYPTION, context=context)


def _key_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise InvalidKeyError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != KEY_BYTES:
        raise InvalidKeyError(f"{name} must be {KEY_BYTES} bytes, got {len(value)}")
    return bytes(value)

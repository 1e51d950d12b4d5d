"""Authenticated encryption of Shamir shares: ChaCha20-Poly1305 (RFC 8439).

A sealed share is ``nonce (12) || ciphertext || tag (16)``. The key comes from
:func:`~common.secagg.kex.share_encryption_key` (fresh per round and pair); the associated
data from :func:`~common.secagg.context.share_aad` binds federation, round, sender and
recipient, so the aggregator, which only routes ciphertexts, can neither read them nor
replay one in another round or to another clinic without :class:`DecryptionError`.

Nonces are 96 random bits. Each key encrypts only the handful of messages of one pair in
one round, so the collision probability is negligible (~ m^2 / 2^97 for m messages).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from common.secagg.errors import DecryptionError, InvalidKeyError, InvalidParameterError
from common.secagg.randomness import RandomSource, read_random

AEAD_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
"""How much longer a sealed message is than its plaintext."""


def seal(key: bytes, plaintext: bytes, *, aad: bytes, rand: RandomSource) -> bytes:
    """Encrypt and authenticate ``plaintext`` and ``aad``; returns nonce || ct || tag."""
    aead = ChaCha20Poly1305(_key(key))
    plaintext = _bytes("plaintext", plaintext)
    aad = _bytes("aad", aad)
    nonce = read_random(rand, NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def open_(key: bytes, sealed: bytes, *, aad: bytes) -> bytes:
    """The plaintext of ``sealed``; :class:`DecryptionError` if anything does not match."""
    aead = ChaCha20Poly1305(_key(key))
    sealed = _bytes("sealed message", sealed)
    aad = _bytes("aad", aad)
    if len(sealed) < OVERHEAD_BYTES:
        raise DecryptionError("sealed message failed authentication")
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        # One opaque error: which part was wrong must not be observable.
        raise DecryptionError("sealed message failed authentication") from None


def _key(key: object) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != AEAD_KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise InvalidKeyError(f"AEAD key must be {AEAD_KEY_BYTES} bytes, got {size}")
    return bytes(key)


def _bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise InvalidParameterError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)

"""Errors raised by the secure-aggregation primitives.

One class per failure so callers (and the gRPC servicers, through the
:class:`~common.errors.DermafedError` base) can react precisely without parsing
messages. Messages never contain key material, shares or plaintexts.
"""

from __future__ import annotations

from common.errors import DermafedError


class SecAggCryptoError(DermafedError):
    """Base class of every error raised by :mod:`common.secagg`."""


class InvalidParameterError(SecAggCryptoError):
    """An argument is of the wrong type, length or range (a caller bug, not an attack)."""


class RandomnessError(SecAggCryptoError):
    """The injected randomness source returned something other than the bytes asked for."""


class InvalidKeyError(SecAggCryptoError):
    """A key, seed or shared secret has the wrong type or length."""


class LowOrderPointError(InvalidKeyError):
    """An X25519 peer public key is a low-order point: the shared secret would be all zero.

    A peer (or an aggregator substituting keys) could use such a point to force a known
    shared secret; the round must be refused.
    """


class DecryptionError(SecAggCryptoError):
    """An AEAD ciphertext failed authentication.

    Deliberately opaque: wrong key, wrong associated data (round, sender, recipient) and a
    modified ciphertext are indistinguishable, as they must be.
    """


class ShareError(SecAggCryptoError):
    """Base class of Shamir secret-sharing failures."""


class InvalidThresholdError(ShareError):
    """The threshold ``t`` is not an integer with ``1 <= t <= n``."""


class InvalidShareIdError(ShareError):
    """A share id is zero, negative, too large, not an integer, or repeated."""


class InsufficientSharesError(ShareError):
    """Fewer than ``t`` shares were given to :func:`~common.secagg.shamir.combine`."""


class MalformedShareError(ShareError):
    """A share value has the wrong length or is not a field element."""


class InconsistentSharesError(ShareError):
    """The shares do not lie on one polynomial, or the secret they give does not fit.

    Raised when more than ``t`` shares were supplied and the extra ones disagree with the
    polynomial through the first ``t``, or when the reconstructed value is longer than
    the declared secret length (with ``t`` corrupted/mismatched shares this happens with
    overwhelming probability). It is an integrity check, not an authentication mechanism.
    """


class QuantizationError(SecAggCryptoError):
    """Base class of quantization failures."""


class QuantizationRangeError(QuantizationError):
    """A value is outside the admissible set (non-finite, above the clip bound or weight cap),
    or a decoded ring sum is outside what any admissible cohort could produce."""


class QuantizationOverflowError(QuantizationError):
    """The ring, scale, bound and cohort size cannot guarantee that the sum does not wrap."""

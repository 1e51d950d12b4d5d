"""Cryptographic primitives for secure aggregation (Bonawitz et al., CCS 2017), as pure functions.

Nothing here keeps state, reads a clock or draws its own randomness: every function that
needs random bytes takes ``rand`` (``os.urandom`` in production, a fixed stream in tests),
and the stochastic-rounding generator is passed in. The round protocol (``aggregator/`` and
``clinic_agent/``) composes these; this package knows nothing about gRPC or rounds beyond
the context bytes it binds. Every error is a :class:`SecAggCryptoError`
(a :class:`~common.errors.DermafedError`), one class per failure; see :mod:`.errors`.

Primitives
----------

``context`` — canonical, injective encodings of what a key is bound to.
    :func:`pair_context` (federation, round, two clinic ids in canonical order),
    :func:`clinic_context` (federation, round, one clinic), :func:`share_aad`
    (federation, round, sender -> recipient), :func:`pairwise_sign` (+1 for the clinic
    whose id sorts first, -1 for the other, so pairwise masks cancel).
    Errors: :class:`InvalidParameterError`.

``kex`` — X25519 (RFC 7748) and HKDF-SHA256 (RFC 5869).
    :func:`generate_keypair`, :func:`public_key`, :func:`agree`, :func:`hkdf_sha256`,
    :func:`derive_key` (HKDF with info = protocol label + purpose + context) and the two
    per-pair keys :func:`pairwise_mask_seed` and :func:`share_encryption_key`.
    Security role: the mask-agreement pair gives each pair of clinics a common mask seed
    only they know; the encryption pair gives the AEAD key for shares. A low-order peer key
    (which would force a known all-zero secret) is refused.
    Errors: :class:`InvalidKeyError` (wrong type/length), :class:`LowOrderPointError`.

``aead`` — ChaCha20-Poly1305 (RFC 8439) for Shamir shares in transit through the aggregator.
    :func:`seal` / :func:`open_`; output is ``nonce || ciphertext || tag``; associated data
    from :func:`share_aad` binds round, sender and recipient.
    Security role: the aggregator routes shares but can neither read, alter, replay across
    rounds nor redirect them.
    Errors: :class:`InvalidKeyError`, :class:`DecryptionError` (one opaque error).

``shamir`` — t-of-n secret sharing over GF(2^521 - 1), 66-byte shares, ids 1..2^32-1.
    :func:`split` / :func:`combine`.
    Security role: lets ``t`` survivors recover a dropped clinic's mask-agreement key (to
    cancel its pairwise masks) or a survivor's self-mask seed, while ``t - 1`` colluders
    learn nothing.
    Errors (all :class:`ShareError`): :class:`InvalidThresholdError`,
    :class:`InvalidShareIdError`, :class:`InsufficientSharesError`,
    :class:`MalformedShareError`, :class:`InconsistentSharesError`.

``prg`` — mask expansion with the ChaCha20 keystream (the hot path).
    :func:`expand_mask` (``mask[offset:offset+n]``), :func:`accumulate_mask`
    (``acc += sign * mask[offset:offset+len(acc)]`` in place, constant memory),
    :func:`mask_key`; the raw keystream as :func:`keystream_words` /
    :func:`accumulate_keystream`. Key = HKDF(seed, "mask-keystream", context), zero nonce,
    block counter seeked to the offset, keystream read as little-endian uint32.
    Security role: masks are computationally indistinguishable from uniform, so a masked
    vector reveals nothing; a non-cryptographic PRG would not give that.
    Errors: :class:`InvalidKeyError`, :class:`InvalidParameterError`.

``quantize`` — clipped float vectors <-> the ring Z_{2^32}.
    :func:`quantize`, :func:`dequantize_sum`, :func:`choose_scale`,
    :func:`check_no_overflow`, :func:`check_sum_in_range`, :func:`rounding_rng`,
    :func:`noised_norm_bound` (the clip norm to plan for when noise follows clipping), and
    :class:`QuantizationPlan` (layout ``[q(w*delta), q(w), q(w*loss)?]``, ``encode`` /
    ``decode_sum``).
    Security role: masking needs ring elements; the plan proves the cohort's sum cannot
    wrap and each decoded coordinate is within ``n/s`` of the exact weighted sum.
    Errors: :class:`QuantizationRangeError`, :class:`QuantizationOverflowError`.

Randomness sources are checked (:class:`RandomnessError` on a short read).
"""

from common.secagg.aead import OVERHEAD_BYTES, open_, seal
from common.secagg.context import (
    PROTOCOL_LABEL,
    canonical_pair,
    clinic_context,
    encode_fields,
    pair_context,
    pairwise_sign,
    share_aad,
)
from common.secagg.errors import (
    DecryptionError,
    InconsistentSharesError,
    InsufficientSharesError,
    InvalidKeyError,
    InvalidParameterError,
    InvalidShareIdError,
    InvalidThresholdError,
    LowOrderPointError,
    MalformedShareError,
    QuantizationError,
    QuantizationOverflowError,
    QuantizationRangeError,
    RandomnessError,
    SecAggCryptoError,
    ShareError,
)
from common.secagg.kex import (
    KEY_BYTES,
    PURPOSE_PAIRWISE_MASK,
    PURPOSE_SHARE_ENCRYPTION,
    agree,
    derive_key,
    generate_keypair,
    hkdf_sha256,
    pairwise_mask_seed,
    public_key,
    share_encryption_key,
)
from common.secagg.prg import (
    MAX_MASK_ELEMENTS,
    accumulate_keystream,
    accumulate_mask,
    expand_mask,
    keystream_words,
    mask_key,
)
from common.secagg.quantize import (
    DecodedSum,
    QuantizationPlan,
    check_no_overflow,
    check_sum_in_range,
    choose_scale,
    dequantize_sum,
    noised_norm_bound,
    quantize,
    rounding_error_bound,
    rounding_rng,
)
from common.secagg.randomness import RandomSource
from common.secagg.shamir import SHARE_BYTES, combine, split

__all__ = [
    "KEY_BYTES",
    "MAX_MASK_ELEMENTS",
    "OVERHEAD_BYTES",
    "PROTOCOL_LABEL",
    "PURPOSE_PAIRWISE_MASK",
    "PURPOSE_SHARE_ENCRYPTION",
    "SHARE_BYTES",
    "DecodedSum",
    "DecryptionError",
    "InconsistentSharesError",
    "InsufficientSharesError",
    "InvalidKeyError",
    "InvalidParameterError",
    "InvalidShareIdError",
    "InvalidThresholdError",
    "LowOrderPointError",
    "MalformedShareError",
    "QuantizationError",
    "QuantizationOverflowError",
    "QuantizationPlan",
    "QuantizationRangeError",
    "RandomSource",
    "RandomnessError",
    "SecAggCryptoError",
    "ShareError",
    "accumulate_keystream",
    "accumulate_mask",
    "agree",
    "canonical_pair",
    "check_no_overflow",
    "check_sum_in_range",
    "choose_scale",
    "clinic_context",
    "combine",
    "dequantize_sum",
    "derive_key",
    "encode_fields",
    "expand_mask",
    "generate_keypair",
    "hkdf_sha256",
    "keystream_words",
    "mask_key",
    "noised_norm_bound",
    "open_",
    "pair_context",
    "pairwise_mask_seed",
    "pairwise_sign",
    "public_key",
    "quantize",
    "rounding_error_bound",
    "rounding_rng",
    "seal",
    "share_aad",
    "share_encryption_key",
    "split",
]

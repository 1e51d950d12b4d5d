"""Known-answer and property tests for the secure-aggregation primitives (common.secagg).

Standard vectors (RFC 7748, RFC 5869, RFC 8439) pin the primitives we take from
``cryptography`` and the way we drive them; dermafed-defined vectors pin our own encodings
(contexts, Shamir shares, masks) so an accidental protocol change fails loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DermafedError
from common.secagg import (
    DecryptionError,
    InconsistentSharesError,
    InsufficientSharesError,
    InvalidKeyError,
    InvalidParameterError,
    InvalidShareIdError,
    InvalidThresholdError,
    LowOrderPointError,
    MalformedShareError,
    RandomnessError,
    SecAggCryptoError,
    ShareError,
    accumulate_keystream,
    accumulate_mask,
    agree,
    clinic_context,
    combine,
    derive_key,
    encode_fields,
    expand_mask,
    generate_keypair,
    hkdf_sha256,
    keystream_words,
    mask_key,
    open_,
    pair_context,
    pairwise_mask_seed,
    pairwise_sign,
    prg,
    public_key,
    seal,
    shamir,
    share_aad,
    share_encryption_key,
    split,
)
from common.secagg.aead import OVERHEAD_BYTES

VECTORS = Path(__file__).resolve().parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


class ShakeRand:
    """Deterministic ``rand``: successive bytes of SHAKE-256(label), as the vector files say."""

    def __init__(self, label: bytes) -> None:
        self.label = label
        self.pos = 0

    def __call__(self, n: int) -> bytes:
        out = hashlib.shake_256(self.label).digest(self.pos + n)[self.pos :]
        self.pos += n
        return out


def fixed_rand(data: bytes):
    """A ``rand`` that returns ``data`` for its one expected call."""

    def rand(n: int) -> bytes:
        assert n == len(data), f"unexpected request for {n} random bytes"
        return data

    return rand


h = bytes.fromhex
CTX = pair_context(federation="derm-eu", round_number=3, clinic_a="clinic-a", clinic_b="clinic-b")


# --------------------------------------------------------------------------- errors


def test_error_hierarchy_is_rooted_in_domain_errors() -> None:
    assert issubclass(SecAggCryptoError, DermafedError)
    assert issubclass(LowOrderPointError, InvalidKeyError)
    for cls in (
        InvalidThresholdError,
        InvalidShareIdError,
        InsufficientSharesError,
        MalformedShareError,
        InconsistentSharesError,
    ):
        assert issubclass(cls, ShareError)


# --------------------------------------------------------------------------- context


def test_context_vectors() -> None:
    vectors = load("secagg_kdf.json")
    for case in vectors["derive_key"]:
        args = case["context_args"]
        ctx = pair_context(**args) if case["context_kind"] == "pair" else clinic_context(**args)
        assert ctx.hex() == case["context"]
        key = derive_key(
            h(case["secret"]), purpose=case["purpose"], context=ctx, length=case["length"]
        )
        assert key.hex() == case["key"]
    assert share_aad(**vectors["share_aad"]["args"]).hex() == vectors["share_aad"]["aad"]


def test_encode_fields_is_injective_on_tricky_pairs() -> None:
    assert encode_fields("ab", "c") != encode_fields("a", "bc")
    assert encode_fields("1") != encode_fields(1)
    assert encode_fields(b"x") != encode_fields("x")
    assert encode_fields("a", "") != encode_fields("a")


@pytest.mark.parametrize("bad", [True, -1, 2**64, 1.5, None])
def test_encode_fields_refuses_bad_fields(bad: object) -> None:
    with pytest.raises(InvalidParameterError):
        encode_fields(bad)  # type: ignore[arg-type]


def test_pair_context_is_order_free_and_binds_everything() -> None:
    base: dict[str, Any] = dict(federation="f", round_number=1, clinic_a="a", clinic_b="b")
    ctx = pair_context(**base)
    assert ctx == pair_context(federation="f", round_number=1, clinic_a="b", clinic_b="a")
    for change in ({"federation": "g"}, {"round_number": 2}, {"clinic_b": "c"}):
        assert pair_context(**{**base, **change}) != ctx


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(federation="f", round_number=1, clinic_a="a", clinic_b="a"),
        dict(federation="", round_number=1, clinic_a="a", clinic_b="b"),
        dict(federation="f", round_number=-1, clinic_a="a", clinic_b="b"),
        dict(federation="f", round_number=True, clinic_a="a", clinic_b="b"),
        dict(federation="f", round_number=1, clinic_a="", clinic_b="b"),
    ],
)
def test_pair_context_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError):
        pair_context(**kwargs)


def test_share_aad_is_directional() -> None:
    ab = share_aad(federation="f", round_number=1, sender="a", recipient="b")
    ba = share_aad(federation="f", round_number=1, sender="b", recipient="a")
    assert ab != ba
    with pytest.raises(InvalidParameterError):
        share_aad(federation="f", round_number=1, sender="a", recipient="a")


def test_pairwise_sign_is_antisymmetric() -> None:
    ids = ["clinic-10", "clinic-2", "zürich", "Basel"]
    for a, b in itertools.permutations(ids, 2):
        assert pairwise_sign(a, b) == -pairwise_sign(b, a)
    assert pairwise_sign("a", "b") == 1


# --------------------------------------------------------------------------- X25519


def test_x25519_rfc7748_scalar_mult() -> None:
    for case in load("x25519_rfc7748.json")["scalar_mult"]:
        assert agree(h(case["scalar"]), h(case["u"])).hex() == case["output"]


def test_x25519_rfc7748_iterated() -> None:
    vectors = load("x25519_rfc7748.json")["iterated"]
    k = u = h(vectors["start"])
    for i in range(1, 1001):
        k, u = agree(k, u), k
        if str(i) in vectors["after"]:
            assert k.hex() == vectors["after"][str(i)], f"after {i} iterations"


def test_x25519_rfc7748_diffie_hellman() -> None:
    v = load("x25519_rfc7748.json")["diffie_hellman"]
    alice, bob = h(v["alice_private"]), h(v["bob_private"])
    assert public_key(alice).hex() == v["alice_public"]
    assert generate_keypair(fixed_rand(bob)) == (bob, h(v["bob_public"]))
    assert agree(alice, h(v["bob_public"])).hex() == v["shared"]
    assert agree(bob, h(v["alice_public"])).hex() == v["shared"]


@pytest.mark.parametrize("point", load("x25519_rfc7748.json")["low_order_points"]["points"])
@pytest.mark.parametrize("top_bit", [False, True])
def test_agree_refuses_low_order_points(point: str, top_bit: bool) -> None:
    encoded = bytearray(h(point))
    if top_bit:
        encoded[31] |= 0x80  # ignored by X25519: still the same low-order point
    private, _ = generate_keypair(ShakeRand(b"low-order"))
    with pytest.raises(LowOrderPointError):
        agree(private, bytes(encoded))


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "00" * 32, None])
def test_agree_refuses_wrong_lengths_and_types(bad: object) -> None:
    good = generate_keypair(ShakeRand(b"k"))[1]
    with pytest.raises(InvalidKeyError) as info:
        agree(bad, good)  # type: ignore[arg-type]
    assert not isinstance(info.value, LowOrderPointError)
    with pytest.raises(InvalidKeyError):
        agree(bytes(32), bad)  # type: ignore[arg-type]


def test_generate_keypair_refuses_short_randomness() -> None:
    with pytest.raises(RandomnessError):
        generate_keypair(lambda n: bytes(n - 1))


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_agreement_is_symmetric(a: bytes, b: bytes) -> None:
    a_pub, b_pub = public_key(a), public_key(b)
    assert agree(a, b_pub) == agree(b, a_pub)


# --------------------------------------------------------------------------- HKDF


@pytest.mark.parametrize("case", load("hkdf_sha256_rfc5869.json")["cases"], ids=lambda c: c["name"])
def test_hkdf_sha256_rfc5869(case: dict[str, Any]) -> None:
    okm = hkdf_sha256(
        h(case["ikm"]), salt=h(case["salt"]), info=h(case["info"]), length=case["length"]
    )
    assert okm.hex() == case["okm"]


def test_hkdf_absent_salt_equals_empty_salt() -> None:
    # RFC 5869: "if not provided, [salt] is set to a string of HashLen zeros" (test case 3).
    case = load("hkdf_sha256_rfc5869.json")["cases"][2]
    assert hkdf_sha256(h(case["ikm"]), salt=None, info=b"", length=42).hex() == case["okm"]


def test_derive_key_separates_purposes_and_contexts() -> None:
    secret = bytes(range(32))
    other_ctx = pair_context(
        federation="derm-eu", round_number=4, clinic_a="clinic-a", clinic_b="clinic-b"
    )
    keys = {
        derive_key(secret, purpose="p1", context=CTX),
        derive_key(secret, purpose="p2", context=CTX),
        derive_key(secret, purpose="p1", context=other_ctx),
        derive_key(bytes(32), purpose="p1", context=CTX),
    }
    assert len(keys) == 4
    assert len(derive_key(secret, purpose="p1", context=CTX, length=64)) == 64


@pytest.mark.parametrize(
    ("secret", "kwargs", "error"),
    [
        (bytes(31), dict(purpose="p", context=b"c"), InvalidKeyError),
        (bytes(32), dict(purpose="", context=b"c"), InvalidParameterError),
        (bytes(32), dict(purpose="p", context=b""), InvalidParameterError),
        (bytes(32), dict(purpose="p", context=b"c", length=0), InvalidParameterError),
        (bytes(32), dict(purpose="p", context=b"c", length=255 * 32 + 1), InvalidParameterError),
    ],
)
def test_derive_key_refuses_bad_arguments(
    secret: bytes, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        derive_key(secret, **kwargs)


def test_pairwise_keys_agree_between_clinics_and_differ_by_purpose() -> None:
    a_priv, a_pub = generate_keypair(ShakeRand(b"clinic-a"))
    b_priv, b_pub = generate_keypair(ShakeRand(b"clinic-b"))
    where: dict[str, Any] = dict(federation="derm-eu", round_number=9)
    seed_a = pairwise_mask_seed(
        agree(a_priv, b_pub), clinic_a="clinic-a", clinic_b="clinic-b", **where
    )
    seed_b = pairwise_mask_seed(
        agree(b_priv, a_pub), clinic_a="clinic-b", clinic_b="clinic-a", **where
    )
    assert seed_a == seed_b
    key = share_encryption_key(
        agree(a_priv, b_pub), clinic_a="clinic-a", clinic_b="clinic-b", **where
    )
    assert key != seed_a


# --------------------------------------------------------------------------- AEAD


def test_chacha20poly1305_rfc8439() -> None:
    case = load("chacha20poly1305_rfc8439.json")["cases"][0]
    key, nonce, aad = h(case["key"]), h(case["nonce"]), h(case["aad"])
    plaintext = case["plaintext_utf8"].encode()
    sealed = seal(key, plaintext, aad=aad, rand=fixed_rand(nonce))
    assert sealed == nonce + h(case["ciphertext"]) + h(case["tag"])
    assert open_(key, sealed, aad=aad) == plaintext


def _sealed_share() -> tuple[bytes, bytes, bytes]:
    key = derive_key(bytes(range(32)), purpose="share-encryption", context=CTX)
    aad = share_aad(federation="derm-eu", round_number=3, sender="clinic-a", recipient="clinic-b")
    return key, aad, seal(key, b"share bytes" * 7, aad=aad, rand=ShakeRand(b"nonce"))


def test_seal_round_trip_and_overhead() -> None:
    key, aad, sealed = _sealed_share()
    assert len(sealed) == len(b"share bytes" * 7) + OVERHEAD_BYTES
    assert open_(key, sealed, aad=aad) == b"share bytes" * 7


def test_any_flipped_bit_is_detected() -> None:
    key, aad, sealed = _sealed_share()
    for position in range(len(sealed)):  # nonce, ciphertext and tag
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(DecryptionError):
            open_(key, bytes(tampered), aad=aad)


@pytest.mark.parametrize(
    "aad_kwargs",
    [
        dict(federation="derm-eu", round_number=4, sender="clinic-a", recipient="clinic-b"),
        dict(federation="derm-eu", round_number=3, sender="clinic-b", recipient="clinic-a"),
        dict(federation="derm-us", round_number=3, sender="clinic-a", recipient="clinic-b"),
        dict(federation="derm-eu", round_number=3, sender="clinic-a", recipient="clinic-c"),
    ],
)
def test_share_cannot_be_replayed_or_redirected(aad_kwargs: dict[str, Any]) -> None:
    key, _, sealed = _sealed_share()
    with pytest.raises(DecryptionError):
        open_(key, sealed, aad=share_aad(**aad_kwargs))


def test_open_refuses_wrong_key_and_truncation() -> None:
    key, aad, sealed = _sealed_share()
    with pytest.raises(DecryptionError):
        open_(bytes(32), sealed, aad=aad)
    for length in (0, OVERHEAD_BYTES - 1, OVERHEAD_BYTES, len(sealed) - 1):
        with pytest.raises(DecryptionError):
            open_(key, sealed[:length], aad=aad)
    with pytest.raises(InvalidKeyError):
        open_(key[:16], sealed, aad=aad)
    with pytest.raises(InvalidKeyError):
        seal(key + b"x", b"p", aad=aad, rand=ShakeRand(b"n"))


# --------------------------------------------------------------------------- Shamir


@pytest.mark.parametrize("case", load("secagg_shamir.json")["cases"], ids=lambda c: c["rand_label"])
def test_shamir_vectors(case: dict[str, Any]) -> None:
    secret = h(case["secret"])
    shares = split(secret, case["t"], case["share_ids"], ShakeRand(case["rand_label"].encode()))
    assert {str(k): v.hex() for k, v in shares.items()} == case["shares"]
    assert all(len(v) == shamir.SHARE_BYTES for v in shares.values())
    for subset in itertools.combinations(sorted(shares), case["t"]):
        assert combine({i: shares[i] for i in subset}, case["t"], len(secret)) == secret


def test_shamir_prime_is_prime() -> None:
    p = shamir.PRIME
    assert p == 2**521 - 1 and p.bit_length() == 521
    # Miller-Rabin with fixed bases: a composite passes each base with probability <= 1/4.
    d, r = p - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, p)
            if x == p - 1:
                break
        else:
            pytest.fail(f"{a} witnesses that p is composite")


def test_rejection_sampling_discards_out_of_field_draws() -> None:
    # 66 bytes of 0xff mask to 2^521 - 1 = p, which is not a field element: it must be
    # thrown away and the next draw used, giving exactly the shares of a source that
    # never produced it.
    good = ShakeRand(b"coefficient")(shamir.SHARE_BYTES)
    draws = iter([b"\xff" * shamir.SHARE_BYTES, good])
    shares = split(b"s" * 32, 2, [1, 2, 3], lambda n: next(draws))
    assert shares == split(b"s" * 32, 2, [1, 2, 3], fixed_rand(good))


@st.composite
def sharing(
    draw: st.DrawFn, min_t: int = 1, spare: int = 0, max_secret: int = shamir.MAX_SECRET_BYTES
) -> tuple[bytes, int, list[int], bytes]:
    """(secret, t, share ids, rand seed) with ``t >= min_t`` and ``n >= t + spare``."""
    secret = draw(st.binary(min_size=1, max_size=max_secret))
    ids = draw(
        st.lists(
            st.integers(1, shamir.MAX_SHARE_ID), min_size=min_t + spare, max_size=7, unique=True
        )
    )
    t = draw(st.integers(min_t, len(ids) - spare))
    return secret, t, ids, draw(st.binary(min_size=8, max_size=8))


@settings(max_examples=60, deadline=None)
@given(sharing(), st.data())
def test_any_t_shares_reconstruct(
    params: tuple[bytes, int, list[int], bytes], data: st.DataObject
) -> None:
    secret, t, ids, seed = params
    shares = split(secret, t, ids, ShakeRand(seed))
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=t, unique=True))
    assert combine({i: shares[i] for i in chosen}, t, len(secret)) == secret


@settings(max_examples=40, deadline=None)
@given(sharing(min_t=2))
def test_t_minus_one_shares_do_not_reconstruct(
    params: tuple[bytes, int, list[int], bytes],
) -> None:
    secret, t, ids, seed = params
    shares = split(secret, t, ids, ShakeRand(seed))
    fewer = {i: shares[i] for i in ids[: t - 1]}
    with pytest.raises(InsufficientSharesError):
        combine(fewer, t, len(secret))
    # Interpolating the t-1 shares as if the threshold were t-1 gives an unrelated value.
    with contextlib.suppress(InconsistentSharesError):
        assert combine(fewer, t - 1, len(secret)) != secret


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    """Independent textbook interpolation (for the secrecy test)."""
    p, total = shamir.PRIME, 0
    for j, (xj, yj) in enumerate(points):
        term = yj
        for m, (xm, _) in enumerate(points):
            if m != j:
                term = term * (x - xm) * pow(xj - xm, -1, p) % p
        total = (total + term) % p
    return total


@settings(max_examples=30, deadline=None)
@given(sharing(min_t=2, spare=1, max_secret=32), st.binary(min_size=32, max_size=32))
def test_t_minus_one_shares_are_consistent_with_every_secret(
    params: tuple[bytes, int, list[int], bytes], other: bytes
) -> None:
    # Perfect secrecy in its combinatorial form: for any t-1 shares and ANY candidate
    # secret there is exactly one completing share, so the t-1 shares rule nothing out.
    secret, t, ids, seed = params
    shares = split(secret, t, ids, ShakeRand(seed))
    known = [(i, int.from_bytes(shares[i], "big")) for i in ids[: t - 1]]
    last = ids[t - 1]
    forged = _lagrange_at([(0, int.from_bytes(other, "big")), *known], last)
    completed = {i: shares[i] for i in ids[: t - 1]} | {last: forged.to_bytes(66, "big")}
    assert combine(completed, t, 32) == other


@pytest.mark.parametrize(
    ("t", "ids", "error"),
    [
        (0, [1, 2, 3], InvalidThresholdError),
        (4, [1, 2, 3], InvalidThresholdError),
        (True, [1, 2, 3], InvalidThresholdError),
        (2, [1, 2, 2], InvalidShareIdError),
        (2, [0, 1, 2], InvalidShareIdError),
        (2, [-1, 1, 2], InvalidShareIdError),
        (2, [1, 2, shamir.MAX_SHARE_ID + 1], InvalidShareIdError),
        (2, [1, 2, "3"], InvalidShareIdError),
        (2, [1, True], InvalidShareIdError),
        (1, [], InvalidThresholdError),
    ],
)
def test_split_refuses_bad_parameters(t: Any, ids: list[Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        split(b"k" * 32, t, ids, ShakeRand(b"r"))


@pytest.mark.parametrize("secret", [b"", b"x" * (shamir.MAX_SECRET_BYTES + 1), "text"])
def test_split_refuses_bad_secrets(secret: Any) -> None:
    with pytest.raises(InvalidParameterError):
        split(secret, 1, [1], ShakeRand(b"r"))


def test_combine_refuses_malformed_and_inconsistent_shares() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5], ShakeRand(b"combine"))
    subset = {i: shares[i] for i in (1, 2, 3)}
    with pytest.raises(InsufficientSharesError):
        combine({1: shares[1], 2: shares[2]}, 3, 32)
    with pytest.raises(MalformedShareError):
        combine({**subset, 3: shares[3][:-1]}, 3, 32)
    with pytest.raises(MalformedShareError):
        combine({**subset, 3: b"\xff" * shamir.SHARE_BYTES}, 3, 32)
    with pytest.raises(InvalidShareIdError):
        combine({**subset, 0: shares[1]}, 3, 32)
    with pytest.raises(InvalidThresholdError):
        combine(subset, 0, 32)
    with pytest.raises(InvalidParameterError):
        combine(subset, 3, 0)
    corrupted = bytearray(shares[5])
    corrupted[-1] ^= 1
    # An extra share off the polynomial is caught...
    with pytest.raises(InconsistentSharesError):
        combine({**shares, 5: bytes(corrupted)}, 3, 32)
    # ...and so is a corrupted share among exactly t (the value no longer fits 32 bytes).
    with pytest.raises(InconsistentSharesError):
        combine({1: shares[1], 2: shares[2], 5: bytes(corrupted)}, 3, 32)
    assert combine(shares, 3, 32) == secret


# --------------------------------------------------------------------------- mask PRG


def _words(hex_block: str) -> list[int]:
    return [int(x) for x in np.frombuffer(h(hex_block), dtype="<u4")]


def test_cryptography_chacha20_nonce_layout_is_counter_then_nonce() -> None:
    # prg seeks by writing the block counter into the first 4 bytes of cryptography's
    # 16-byte ChaCha20 nonce; RFC 8439 §2.3.2 pins that this is what the library expects.
    block = load("chacha20_rfc8439.json")["blocks"][0]
    nonce16 = block["counter"].to_bytes(4, "little") + h(block["nonce"])
    encryptor = Cipher(algorithms.ChaCha20(h(block["key"]), nonce16), mode=None).encryptor()
    assert encryptor.update(bytes(64)).hex() == block["keystream"]


def test_keystream_words_rfc8439_and_seek() -> None:
    blocks = load("chacha20_rfc8439.json")["blocks"]
    zero_key = bytes(32)
    expected = _words(blocks[1]["keystream"]) + _words(blocks[2]["keystream"])
    assert keystream_words(zero_key, 32).tolist() == expected
    assert keystream_words(zero_key, 16, offset=16).tolist() == expected[16:]
    assert keystream_words(zero_key, 9, offset=5).tolist() == expected[5:14]
    acc = np.zeros(20, dtype=np.uint32)
    accumulate_keystream(acc, zero_key, 1, offset=7)
    assert acc.tolist() == expected[7:27]


def test_mask_vectors() -> None:
    for case in load("secagg_mask.json")["cases"]:
        seed, ctx = h(case["seed"]), h(case["context"])
        assert mask_key(seed, context=ctx).hex() == case["mask_key"]
        first = case["first"]
        assert expand_mask(seed, len(first), context=ctx).tolist() == first
        got = expand_mask(seed, len(case["at_offset"]), context=ctx, offset=case["offset"])
        assert got.tolist() == case["at_offset"]
        assert expand_mask(seed, 0, context=ctx).size == 0


def test_chunked_generation_equals_one_shot_across_internal_chunks() -> None:
    seed = bytes(range(32))
    n = 3 * prg.CHUNK_ELEMENTS + 1234
    full = expand_mask(seed, n, context=CTX)
    cuts = [
        0,
        1,
        17,
        64,
        prg.CHUNK_ELEMENTS - 3,
        prg.CHUNK_ELEMENTS + 5,
        2 * prg.CHUNK_ELEMENTS,
        n - 1,
        n,
    ]
    pieces = [expand_mask(seed, b - a, context=CTX, offset=a) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(np.concatenate(pieces), full)
    # The streaming pattern: a 1 MiB chunk at a time into the right slice of the accumulator.
    acc = np.zeros(n, dtype=np.uint32)
    chunk = (1 << 20) // 4
    for start in range(0, n, chunk):
        accumulate_mask(acc[start : start + chunk], seed, 1, context=CTX, offset=start)
    np.testing.assert_array_equal(acc, full)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=6))
def test_any_split_of_the_mask_matches_one_shot(cuts: list[int]) -> None:
    seed = b"\x07" * 32
    n = 3000
    full = expand_mask(seed, n, context=CTX)
    bounds = sorted({0, n, *cuts})
    for a, b in itertools.pairwise(bounds):
        np.testing.assert_array_equal(expand_mask(seed, b - a, context=CTX, offset=a), full[a:b])
        acc = np.full(b - a, 5, dtype=np.uint32)
        accumulate_mask(acc, seed, -1, context=CTX, offset=a)
        np.testing.assert_array_equal(acc, np.uint32(5) - full[a:b])


def test_accumulate_wraps_modulo_2_32_and_signs_cancel() -> None:
    seed = b"\x01" * 32
    start = np.array([0, 1, 2**31, 2**32 - 1] * 50, dtype=np.uint32)
    mask = expand_mask(seed, start.size, context=CTX)
    acc = start.copy()
    accumulate_mask(acc, seed, 1, context=CTX)
    expected = (start.astype(np.uint64) + mask) % 2**32
    np.testing.assert_array_equal(acc, expected.astype(np.uint32))
    accumulate_mask(acc, seed, -1, context=CTX)
    np.testing.assert_array_equal(acc, start)


def test_pairwise_masks_cancel_in_the_sum() -> None:
    clinics = ["clinic-a", "clinic-b", "clinic-c"]
    keys = {c: generate_keypair(ShakeRand(c.encode())) for c in clinics}
    n = 1000
    total = np.zeros(n, dtype=np.uint32)
    for me in clinics:
        mine = np.zeros(n, dtype=np.uint32)
        for peer in clinics:
            if peer == me:
                continue
            shared = agree(keys[me][0], keys[peer][1])
            where: dict[str, Any] = dict(
                federation="derm-eu", round_number=1, clinic_a=me, clinic_b=peer
            )
            seed = pairwise_mask_seed(shared, **where)
            ctx = pair_context(**where)
            accumulate_mask(mine, seed, pairwise_sign(me, peer), context=ctx)
        assert mine.any()  # each clinic's own vector is masked...
        total += mine
    assert not total.any()  # ...but the masks cancel in the sum


def test_masks_differ_by_seed_and_context() -> None:
    a = expand_mask(b"\x01" * 32, 64, context=b"one")
    assert not np.array_equal(a, expand_mask(b"\x02" * 32, 64, context=b"one"))
    assert not np.array_equal(a, expand_mask(b"\x01" * 32, 64, context=b"two"))


@pytest.mark.parametrize("sign", [0, 2, -2, True, 1.0])
def test_accumulate_refuses_bad_sign(sign: Any) -> None:
    with pytest.raises(InvalidParameterError):
        accumulate_mask(np.zeros(4, dtype=np.uint32), bytes(32), sign, context=b"c")


def test_mask_functions_refuse_bad_arguments() -> None:
    seed = bytes(32)
    with pytest.raises(InvalidParameterError):
        accumulate_mask(np.zeros(4, dtype=np.int32), seed, 1, context=b"c")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        accumulate_mask(np.zeros((2, 2), dtype=np.uint32), seed, 1, context=b"c")
    frozen = np.zeros(4, dtype=np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(InvalidParameterError):
        accumulate_mask(frozen, seed, 1, context=b"c")
    with pytest.raises(InvalidParameterError):
        expand_mask(seed, 4, context=b"c", offset=-1)
    with pytest.raises(InvalidParameterError):
        expand_mask(seed, 1, context=b"c", offset=prg.MAX_MASK_ELEMENTS)
    with pytest.raises(InvalidParameterError):
        expand_mask(seed, 4, context=b"")
    with pytest.raises(InvalidKeyError):
        expand_mask(bytes(16), 4, context=b"c")
    with pytest.raises(InvalidKeyError):
        keystream_words(bytes(31), 4)

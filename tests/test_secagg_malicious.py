"""A malicious aggregator against real clinics: every attack is detected and refused.

:class:`TamperingAggregator` speaks the real protocol: it drives real
:class:`~clinic_agent.secagg_client.SecAggClient` objects (real certificates, real keys)
and keeps its books with the real :class:`~aggregator.secagg_server.SecAggServer`, but
rewrites what it relays through hooks, or steps outside the honest flow entirely. The
attacks are those a malicious aggregator has against Bonawitz et al. (CCS 2017):

(a) substitute a clinic's public key in the relayed advertisements (with and without
    re-signing, including with a certificate from a foreign CA);
(b) announce different survivor sets to different clinics;
(c) ask for both kinds of share of one clinic (in one request, or in a second request
    after collecting the first);
(d) replay messages of an earlier round;
(e) tamper with, redirect or reflect an encrypted share.

Then the privacy claims: no masked upload resembles its input, and the reveals of the
survivors never let the aggregator strip one clinic's masks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_secagg_protocol import (
    AFTER_SHARING,
    ALL_CLINICS,
    CLIP_NORM,
    RoundDriver,
    SecAggFederation,
    build_federation,
    grid_contributions,
    make_contributions,
)

from aggregator.secagg_server import InvalidSecAggMessageError, SecAggAbortedError
from common import pki
from common.errors import StaleRoundError
from common.secagg import (
    accumulate_mask,
    agree,
    clinic_context,
    combine,
    generate_keypair,
    pair_context,
    pairwise_mask_seed,
    pairwise_sign,
)
from common.secagg.messages import (
    BadSignatureError,
    InconsistentUnmaskRequestError,
    KeySubstitutionError,
    MalformedMessageError,
    ParticipantSetError,
    ProtocolStateError,
    RelayedAdvertisement,
    RevealRefusedError,
    ShareDecryptionError,
    SharesForRecipient,
    StaleMessageError,
    SurvivorSet,
    SurvivorSignature,
    TooFewParticipantsError,
    UnmaskRequest,
    advertise_payload,
)

COHORT = ALL_CLINICS[:5]
THRESHOLD = 3
ROUND = 7

AdvertisementHook = Callable[
    [str, tuple[RelayedAdvertisement, ...]], Sequence[RelayedAdvertisement]
]
SharesHook = Callable[[str, SharesForRecipient], SharesForRecipient]


@pytest.fixture(scope="module")
def secagg_fed(tmp_path_factory: pytest.TempPathFactory) -> SecAggFederation:
    return build_federation(tmp_path_factory.mktemp("secagg-malicious-pki"))


@dataclasses.dataclass
class TamperingAggregator(RoundDriver):
    """An aggregator that relays through ``on_*`` hooks, which may rewrite anything."""

    on_advertisements: AdvertisementHook | None = None
    on_shares: SharesHook | None = None

    def relay_advertisements(
        self, recipient: str, advertisements: tuple[RelayedAdvertisement, ...]
    ) -> Sequence[RelayedAdvertisement]:
        if self.on_advertisements is None:
            return advertisements
        return self.on_advertisements(recipient, advertisements)

    def relay_shares(self, recipient: str, delivery: SharesForRecipient) -> SharesForRecipient:
        return delivery if self.on_shares is None else self.on_shares(recipient, delivery)

    # Steps outside the honest flow -------------------------------------------------------

    def until_inputs(self, drop_at: dict[str, int] | None = None) -> frozenset[str]:
        """Run advertise, share_keys and masked_input honestly; return U3."""
        drops = drop_at or {}
        u1 = self.advertise(drops)
        u2 = self.share_keys(u1, drops)
        return self.masked_input(u2, grid_contributions(self.cohort, self.dim), drops, set())

    def sign(self, clinic: str, survivors: Sequence[str]) -> SurvivorSignature:
        return self.clients[clinic].consistency(SurvivorSet(self.round_number, tuple(survivors)))


def tampering(
    fed: SecAggFederation,
    *,
    on_advertisements: AdvertisementHook | None = None,
    on_shares: SharesHook | None = None,
) -> TamperingAggregator:
    return TamperingAggregator(
        fed,
        COHORT,
        THRESHOLD,
        dim=8,
        round_number=ROUND,
        on_advertisements=on_advertisements,
        on_shares=on_shares,
    )


def forge(
    relayed: RelayedAdvertisement,
    *,
    cipher_key: bytes | None = None,
    mask_key: bytes | None = None,
    signer: tuple[ec.EllipticCurvePrivateKey, bytes] | None = None,
    round_number: int | None = None,
) -> RelayedAdvertisement:
    """``relayed`` with keys replaced and, when ``signer = (key, cert_pem)``, re-signed."""
    adv = relayed.advertisement
    adv = dataclasses.replace(
        adv,
        cipher_public_key=cipher_key or adv.cipher_public_key,
        mask_public_key=mask_key or adv.mask_public_key,
        round_number=adv.round_number if round_number is None else round_number,
    )
    pem = relayed.certificate_pem
    if signer is not None:
        key, pem = signer
        payload = advertise_payload(
            federation="testfed",
            round_number=adv.round_number,
            clinic_id=adv.clinic_id,
            cipher_public_key=adv.cipher_public_key,
            mask_public_key=adv.mask_public_key,
        )
        adv = dataclasses.replace(adv, signature=pki.sign(key, payload))
    return RelayedAdvertisement(adv, pem)


def replace_for(
    victim: str, change: Callable[[RelayedAdvertisement], RelayedAdvertisement]
) -> AdvertisementHook:
    return lambda _recipient, advs: tuple(change(a) if a.clinic_id == victim else a for a in advs)


# --------------------------------------------------------------------------- (a) keys


def _signer(fed: SecAggFederation, who: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    if who == "foreign CA":  # a certificate naming clinic-a, issued by another CA
        pair = fed.pki.foreign_clinic
    elif who == "aggregator":
        pair = fed.pki.aggregator
    else:
        pair = fed.pki.clinics[who]
    return pki.load_private_key(pair.key), pair.cert.read_bytes()


@pytest.mark.parametrize("which", ["cipher", "mask"])
@pytest.mark.parametrize(
    "resigned_by", [None, "foreign CA", "aggregator", "clinic-e"], ids=lambda r: f"resigned-{r}"
)
def test_a_substituted_public_key_is_detected_by_every_clinic(
    secagg_fed: SecAggFederation, which: str, resigned_by: str | None
) -> None:
    victim = "clinic-a"  # the foreign CA's certificate names clinic-a
    _, attacker_public = generate_keypair(os.urandom)
    signer = None if resigned_by is None else _signer(secagg_fed, resigned_by)
    key_arg = {"cipher_key" if which == "cipher" else "mask_key": attacker_public}
    driver = tampering(
        secagg_fed,
        on_advertisements=replace_for(victim, lambda a: forge(a, signer=signer, **key_arg)),
    )
    with pytest.raises(SecAggAbortedError, match="only 0 clinic"):
        driver.run(grid_contributions(COHORT, 8))

    assert set(driver.refusals) == set(COHORT)  # every clinic refused the round
    assert isinstance(driver.refusals[victim], KeySubstitutionError)
    for clinic in COHORT[1:]:
        error = driver.refusals[clinic]
        assert isinstance(error, BadSignatureError), error
        assert "'clinic-a'" in str(error)
    if resigned_by == "foreign CA":
        assert "not issued by the federation CA" in str(driver.refusals["clinic-b"])
    elif resigned_by is not None:
        assert "does not name spiffe://testfed/clinic/clinic-a" in str(driver.refusals["clinic-b"])
    # Nobody sent a single share, so nothing about anyone's secrets left any clinic.
    assert driver.deliveries == {}


def test_a_key_substituted_for_one_victim_only_excludes_just_that_victim(
    secagg_fed: SecAggFederation,
) -> None:
    """Man in the middle against clinic-d alone: clinic-d refuses; the others, who saw the
    genuine keys, finish the round without it."""
    _, attacker_public = generate_keypair(os.urandom)
    swap = replace_for("clinic-b", lambda a: forge(a, mask_key=attacker_public))

    def only_towards_d(recipient: str, advs: tuple[RelayedAdvertisement, ...]):
        return swap(recipient, advs) if recipient == "clinic-d" else advs

    driver = tampering(secagg_fed, on_advertisements=only_towards_d)
    result = driver.run(grid_contributions(COHORT, 8))
    assert set(driver.refusals) == {"clinic-d"}
    assert isinstance(driver.refusals["clinic-d"], BadSignatureError)
    assert result.contributors == ("clinic-a", "clinic-b", "clinic-c", "clinic-e")
    with pytest.raises(ProtocolStateError, match="refused round 7"):
        driver.clients["clinic-d"].share_keys(driver.advertisements)


def test_the_server_itself_refuses_a_foreign_ca_advertisement(secagg_fed: SecAggFederation) -> None:
    driver = tampering(secagg_fed)
    advertisement = driver.clients["clinic-a"].advertise()
    foreign_pem = secagg_fed.pki.foreign_clinic.cert.read_bytes()
    with pytest.raises(InvalidSecAggMessageError, match="not issued by the federation CA"):
        driver.server.advertise("clinic-a", advertisement, foreign_pem)


def test_missing_extra_or_duplicate_advertisements_are_refused(
    secagg_fed: SecAggFederation,
) -> None:
    driver = tampering(secagg_fed)
    driver.advertise({})
    genuine = driver.server.advertisements()
    outsider = driver.make_client("clinic-h", cohort=(*COHORT[:4], "clinic-h"))
    outsider_adv = RelayedAdvertisement(
        outsider.advertise(), secagg_fed.parties["clinic-h"].cert_pem
    )
    cases: dict[str, tuple[Sequence[RelayedAdvertisement], type[Exception], str]] = {
        "clinic-a": (genuine[1:], ParticipantSetError, "own advertisement is missing"),
        "clinic-b": ((*genuine, outsider_adv), ParticipantSetError, "not in the cohort"),
        "clinic-c": ((*genuine, genuine[0]), ParticipantSetError, "advertised twice"),
        "clinic-d": (genuine[3:], TooFewParticipantsError, "only 2 clinics advertised"),
    }
    for clinic, (relayed, error, message) in cases.items():
        with pytest.raises(error, match=message):
            driver.clients[clinic].share_keys(relayed)
    # A clinic that passed the checks proceeds normally.
    assert set(driver.clients["clinic-e"].share_keys(genuine).ciphertexts) == set(COHORT) - {
        "clinic-e"
    }


def test_a_validly_signed_low_order_key_is_refused(secagg_fed: SecAggFederation) -> None:
    """Even a genuine (colluding) clinic cannot force a known shared secret."""
    low_order = bytes(32)  # the point 0: X25519 with it is all zeros
    signer = _signer(secagg_fed, "clinic-e")
    driver = tampering(
        secagg_fed,
        on_advertisements=replace_for(
            "clinic-e", lambda a: forge(a, mask_key=low_order, signer=signer)
        ),
    )
    with pytest.raises(SecAggAbortedError):
        driver.run(grid_contributions(COHORT, 8))
    for clinic in COHORT[:4]:
        assert isinstance(driver.refusals[clinic], MalformedMessageError)
        assert "unusable key" in str(driver.refusals[clinic])


# --------------------------------------------------------------------------- (b) split views


def test_different_survivor_sets_for_different_clinics_get_no_reveal(
    secagg_fed: SecAggFederation,
) -> None:
    """The aggregator tells {a, b} that U3 = {a, b, c} (so d and e "dropped") and tells
    {c, d, e} that U3 = {c, d, e}: it hopes for d's mask key from the first group and d's
    self-mask seed from the second. With 2t > n the first group has fewer than t signers
    over its set, so it reveals nothing."""
    driver = tampering(secagg_fed)
    driver.until_inputs()
    view_a = ("clinic-a", "clinic-b", "clinic-c")
    view_b = ("clinic-c", "clinic-d", "clinic-e")
    signatures_a = {c: driver.sign(c, view_a).signature for c in ("clinic-a", "clinic-b")}
    signatures_b = {c: driver.sign(c, view_b).signature for c in view_b}

    # Only the valid signatures over their set: two, below t = 3.
    request_a = UnmaskRequest(ROUND, view_a, ("clinic-d", "clinic-e"), signatures_a)
    with pytest.raises(TooFewParticipantsError, match="only 2 valid signatures"):
        driver.clients["clinic-a"].unmask(request_a)
    # Padding with the other group's signatures: they are over another set, so refused.
    mixed = UnmaskRequest(ROUND, view_a, ("clinic-d", "clinic-e"), {**signatures_a, **signatures_b})
    with pytest.raises(BadSignatureError, match=r"survivor signature of 'clinic-[cde]'"):
        driver.clients["clinic-b"].unmask(mixed)
    # Both refusals are final for the round.
    with pytest.raises(ProtocolStateError):
        driver.clients["clinic-a"].unmask(request_a)
    # The second group's view is consistent (3 signatures): it reveals, but only b-shares
    # for its own survivors and key shares for a and b - never a key share of c, d or e.
    reveal = driver.clients["clinic-d"].unmask(
        UnmaskRequest(ROUND, view_b, ("clinic-a", "clinic-b"), signatures_b)
    )
    assert set(reveal.self_mask_shares) == set(view_b)
    assert set(reveal.key_shares) == {"clinic-a", "clinic-b"}


def test_a_clinic_signs_only_one_survivor_set(secagg_fed: SecAggFederation) -> None:
    driver = tampering(secagg_fed)
    u3 = driver.until_inputs()
    first = driver.sign("clinic-a", sorted(u3))
    assert driver.sign("clinic-a", sorted(u3)) == first  # a retry gets the same signature
    with pytest.raises(ProtocolStateError, match="different input"):
        driver.sign("clinic-a", ("clinic-a", "clinic-b", "clinic-c"))


@pytest.mark.parametrize(
    ("announced", "error", "message"),
    [
        (("clinic-a", "clinic-b", "clinic-h"), ParticipantSetError, "not in U2"),
        (("clinic-b", "clinic-c", "clinic-d"), ParticipantSetError, "not in the announced"),
        (("clinic-a", "clinic-b"), TooFewParticipantsError, "only 2 survivors"),
        (("clinic-a", "clinic-b", "clinic-b"), ParticipantSetError, "twice"),
    ],
)
def test_an_impossible_survivor_set_is_not_signed(
    secagg_fed: SecAggFederation, announced: tuple[str, ...], error: type[Exception], message: str
) -> None:
    driver = tampering(secagg_fed)
    driver.until_inputs()
    with pytest.raises(error, match=message):
        driver.sign("clinic-a", announced)


# --------------------------------------------------------------------------- (c) both shares


def _signed_round(
    fed: SecAggFederation,
) -> tuple[TamperingAggregator, tuple[str, ...], dict[str, bytes]]:
    """All five advertise and share; clinic-e sends no input (D = {e}); U3 signed by all."""
    driver = tampering(fed)
    u3 = tuple(sorted(driver.until_inputs({"clinic-e": AFTER_SHARING})))
    signatures = {c: driver.sign(c, u3).signature for c in u3}
    return driver, u3, signatures


def test_a_clinic_listed_as_survivor_and_dropped_gets_no_reveal(
    secagg_fed: SecAggFederation,
) -> None:
    driver, u3, signatures = _signed_round(secagg_fed)
    both = UnmaskRequest(ROUND, u3, ("clinic-c", "clinic-e"), signatures)
    with pytest.raises(InconsistentUnmaskRequestError, match="both as survivors and as dropped"):
        driver.clients["clinic-a"].unmask(both)
    wrong_dropped = UnmaskRequest(ROUND, u3, (), signatures)  # hides that e dropped
    with pytest.raises(InconsistentUnmaskRequestError, match="not U2"):
        driver.clients["clinic-b"].unmask(wrong_dropped)


def test_a_second_request_moving_a_survivor_to_dropped_is_refused(
    secagg_fed: SecAggFederation,
) -> None:
    driver, u3, signatures = _signed_round(secagg_fed)
    honest = UnmaskRequest(ROUND, u3, ("clinic-e",), signatures)
    reveal = driver.clients["clinic-a"].unmask(honest)
    assert "clinic-c" in reveal.self_mask_shares and "clinic-c" not in reveal.key_shares
    assert driver.clients["clinic-a"].unmask(honest) == reveal  # a retry: same answer

    moved = tuple(c for c in u3 if c != "clinic-c")
    second = UnmaskRequest(ROUND, moved, ("clinic-c", "clinic-e"), signatures)
    with pytest.raises(RevealRefusedError, match="reveals at most once"):
        driver.clients["clinic-a"].unmask(second)
    # A clinic that has not revealed yet refuses the moved set too: it signed another.
    with pytest.raises(InconsistentUnmaskRequestError, match="differs from the one we signed"):
        driver.clients["clinic-b"].unmask(second)
    # Nor can the aggregator get fresh signatures for the moved set.
    with pytest.raises(ProtocolStateError):
        driver.sign("clinic-d", moved)


# --------------------------------------------------------------------------- (d) replays


@pytest.fixture(scope="module")
def earlier_round(secagg_fed: SecAggFederation) -> TamperingAggregator:
    """A complete round 6 with the same clinics, whose messages the aggregator recorded."""
    driver = TamperingAggregator(
        secagg_fed, COHORT, THRESHOLD, dim=8, round_number=ROUND - 1, seed=b"earlier"
    )
    driver.run(grid_contributions(COHORT, 8), {"clinic-e": AFTER_SHARING})
    return driver


@pytest.mark.parametrize("rewrite_round", [False, True], ids=["as-recorded", "round-rewritten"])
def test_replayed_advertisements_are_refused(
    secagg_fed: SecAggFederation, earlier_round: TamperingAggregator, rewrite_round: bool
) -> None:
    old = {a.clinic_id: a for a in earlier_round.advertisements}
    stale = {c: forge(a, round_number=ROUND) if rewrite_round else a for c, a in old.items()}
    driver = tampering(
        secagg_fed, on_advertisements=replace_for("clinic-b", lambda _: stale["clinic-b"])
    )
    with pytest.raises(SecAggAbortedError):
        driver.run(grid_contributions(COHORT, 8))
    assert set(driver.refusals) == set(COHORT)
    for clinic, error in driver.refusals.items():
        if not rewrite_round:
            assert isinstance(error, StaleMessageError) and "round 6" in str(error)
        elif clinic == "clinic-b":  # its own advertisement came back with last round's keys
            assert isinstance(error, KeySubstitutionError)
        else:  # the signature covers round 6, not round 7
            assert isinstance(error, BadSignatureError)
    # The server, too, refuses an old advertisement (stale round or bad signature).
    server_driver = tampering(secagg_fed)
    replayed = old["clinic-c"].advertisement
    if rewrite_round:
        with pytest.raises(InvalidSecAggMessageError, match="does not verify"):
            server_driver.server.advertise(
                "clinic-c",
                dataclasses.replace(replayed, round_number=ROUND),
                old["clinic-c"].certificate_pem,
            )
    else:
        with pytest.raises(StaleRoundError, match="round 6"):
            server_driver.server.advertise("clinic-c", replayed, old["clinic-c"].certificate_pem)


def test_replayed_shares_are_refused(
    secagg_fed: SecAggFederation, earlier_round: TamperingAggregator
) -> None:
    def replay(recipient: str, delivery: SharesForRecipient) -> SharesForRecipient:
        if recipient not in earlier_round.deliveries:  # clinic-e took no input last round
            return delivery
        old = earlier_round.deliveries[recipient].ciphertexts
        ciphertexts = dict(delivery.ciphertexts, **{"clinic-c": old["clinic-c"]})
        return SharesForRecipient(ROUND, recipient, ciphertexts)

    driver = tampering(secagg_fed, on_shares=lambda r, d: replay(r, d) if r != "clinic-c" else d)
    with pytest.raises(SecAggAbortedError):
        driver.run(grid_contributions(COHORT, 8))
    assert set(driver.refusals) == {"clinic-a", "clinic-b", "clinic-d"}
    for clinic in ("clinic-a", "clinic-b", "clinic-d"):
        error = driver.refusals[clinic]
        assert isinstance(error, ShareDecryptionError) and "'clinic-c'" in str(error)


def test_replayed_signatures_do_not_count(
    secagg_fed: SecAggFederation, earlier_round: TamperingAggregator
) -> None:
    driver, u3, signatures = _signed_round(secagg_fed)
    assert tuple(sorted(earlier_round.signatures)) == u3  # same survivor set last round
    old = {c: s.signature for c, s in earlier_round.signatures.items()}
    # Round 6's signatures over the very same set, instead of (or besides) round 7's.
    replayed = UnmaskRequest(ROUND, u3, ("clinic-e",), old)
    with pytest.raises(BadSignatureError, match="survivor signature"):
        driver.clients["clinic-a"].unmask(replayed)
    mixed = UnmaskRequest(ROUND, u3, ("clinic-e",), {**signatures, "clinic-d": old["clinic-d"]})
    with pytest.raises(BadSignatureError, match="'clinic-d'"):
        driver.clients["clinic-b"].unmask(mixed)
    # And the server refuses to store one.
    honest = tampering(secagg_fed)
    honest.until_inputs({"clinic-e": AFTER_SHARING})
    with pytest.raises(InvalidSecAggMessageError, match="does not verify"):
        honest.server.submit_signature(
            "clinic-a", SurvivorSignature(ROUND, "clinic-a", old["clinic-a"])
        )
    with pytest.raises(StaleRoundError):
        honest.server.submit_signature("clinic-a", earlier_round.signatures["clinic-a"])


def test_a_stale_unmask_request_is_refused(secagg_fed: SecAggFederation) -> None:
    driver, u3, signatures = _signed_round(secagg_fed)
    with pytest.raises(StaleMessageError, match="round 6"):
        driver.clients["clinic-a"].unmask(UnmaskRequest(ROUND - 1, u3, ("clinic-e",), signatures))


# --------------------------------------------------------------------------- (e) ciphertexts


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("where", [0, 20, -1], ids=["nonce", "body", "tag"])
def test_a_tampered_share_is_refused(secagg_fed: SecAggFederation, where: int) -> None:
    def tamper(recipient: str, delivery: SharesForRecipient) -> SharesForRecipient:
        if recipient != "clinic-a":
            return delivery
        sealed = delivery.ciphertexts["clinic-b"]
        return dataclasses.replace(
            delivery,
            ciphertexts=dict(
                delivery.ciphertexts, **{"clinic-b": _flip(sealed, where % len(sealed))}
            ),
        )

    driver = tampering(secagg_fed, on_shares=tamper)
    result = driver.run(grid_contributions(COHORT, 8))
    assert set(driver.refusals) == {"clinic-a"}
    assert isinstance(driver.refusals["clinic-a"], ShareDecryptionError)
    assert "clinic-a" not in result.contributors


@pytest.mark.parametrize("attack", ["redirected", "reflected"])
def test_a_redirected_or_reflected_share_is_refused(
    secagg_fed: SecAggFederation, attack: str
) -> None:
    driver = tampering(secagg_fed)
    driver.advertise({})
    driver.share_keys(driver.sets["advertise"], {})
    sent = {c: submission.ciphertexts for c, submission in driver.submissions.items()}
    delivery = driver.server.shares_for("clinic-c")
    if attack == "redirected":  # a's share for b, handed to c as if a had sealed it for c
        forged = dict(delivery.ciphertexts, **{"clinic-a": sent["clinic-a"]["clinic-b"]})
    else:  # c's own share for b, handed back to c as if b had sealed it
        forged = dict(delivery.ciphertexts, **{"clinic-b": sent["clinic-c"]["clinic-b"]})
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        driver.clients["clinic-c"].masked_input(
            SharesForRecipient(ROUND, "clinic-c", forged),
            np.zeros(8, dtype=np.float32),
            weight=1.0,
            plan=driver.plan,
            loss=0.0,
        )


def test_a_withheld_share_cannot_be_turned_into_a_leak(secagg_fed: SecAggFederation) -> None:
    """Withholding b's share from a gives a a smaller U2; the aggregator then cannot get a
    to sign a survivor set containing b, so the mismatch ends in a refusal, not a leak."""

    def withhold(recipient: str, delivery: SharesForRecipient) -> SharesForRecipient:
        if recipient != "clinic-a":
            return delivery
        kept = {s: c for s, c in delivery.ciphertexts.items() if s != "clinic-b"}
        return dataclasses.replace(delivery, ciphertexts=kept)

    driver = tampering(secagg_fed, on_shares=withhold)
    u3 = driver.until_inputs()
    assert driver.clients["clinic-a"].participants["U2"] == set(COHORT) - {"clinic-b"}
    with pytest.raises(ParticipantSetError, match=r"\['clinic-b'\].*not in U2"):
        driver.sign("clinic-a", sorted(u3))


# --------------------------------------------------------------------------- privacy


def _centered(v: np.ndarray) -> np.ndarray:
    return v.view(np.int32).astype(np.float64)


def _approx_plaintext(driver: RoundDriver, delta: np.ndarray, weight: float) -> np.ndarray:
    """The quantized input up to the +-1 of stochastic rounding (the delta coordinates)."""
    return np.rint(delta.astype(np.float64) * weight * driver.plan.delta_scale)


def test_no_masked_upload_resembles_its_input(secagg_fed: SecAggFederation) -> None:
    dim = 4096
    contributions = make_contributions(COHORT, dim, seed=11, spread=50.0)
    driver = TamperingAggregator(secagg_fed, COHORT, THRESHOLD, dim=dim, chunk_elements=1000)
    driver.run(contributions, {"clinic-e": AFTER_SHARING})
    assert set(driver.uploads) == set(COHORT) - {"clinic-e"}
    for clinic, raw in driver.uploads.items():
        y = np.frombuffer(raw, dtype="<u4").astype(np.uint32)[:dim]
        x = _approx_plaintext(driver, contributions[clinic].delta, contributions[clinic].weight)
        # The input is concentrated near 0; the upload is uniform over the whole ring.
        assert np.abs(x).max() < 2**31 and np.abs(x).mean() > 1000
        assert np.mean(np.abs(_centered(y) - x) <= 1) < 1e-3
        assert abs(np.corrcoef(_centered(y), x)[0, 1]) < 0.1
        assert 0.45 < float(np.mean(y >= 2**31)) < 0.55
        assert abs(float(np.mean(y / 2.0**32)) - 0.5) < 0.02


def test_survivor_reveals_cannot_unmask_a_single_clinic(secagg_fed: SecAggFederation) -> None:
    """Everything the aggregator legitimately learns - every upload and every reveal,
    here with a dropout so key shares are revealed too - strips the self masks and the
    dropped clinic's pairwise masks, and no more: each survivor's vector stays masked by
    its pairwise masks with the other survivors, whose mask keys are never revealed."""
    dim = 2048
    contributions = make_contributions(COHORT, dim, seed=3, spread=50.0)
    driver = TamperingAggregator(secagg_fed, COHORT, THRESHOLD, dim=dim, chunk_elements=500)
    result = driver.run(contributions, {"clinic-e": AFTER_SHARING})
    survivors = sorted(driver.uploads)
    dropped = ["clinic-e"]
    assert all(set(r.key_shares) == set(dropped) for r in driver.reveals.values())
    assert not any(set(r.key_shares) & set(survivors) for r in driver.reveals.values())

    share_ids = {c: i for i, c in enumerate(sorted(driver.sets["advertise"]), start=1)}
    advertised = {a.clinic_id: a.advertisement for a in driver.advertisements}

    def reconstruct(owner: str, kind: str) -> bytes:
        shares = {
            share_ids[r]: (rev.self_mask_shares if kind == "b" else rev.key_shares)[owner]
            for r, rev in driver.reveals.items()
        }
        return combine(shares, THRESHOLD, 32)

    context = {"federation": "testfed", "round_number": ROUND}
    stripped = {}
    for j in survivors:
        y = np.frombuffer(driver.uploads[j], dtype="<u4").astype(np.uint32)
        accumulate_mask(y, reconstruct(j, "b"), -1, context=clinic_context(**context, clinic_id=j))
        for e in dropped:
            seed = pairwise_mask_seed(
                agree(reconstruct(e, "s"), advertised[j].mask_public_key),
                **context,
                clinic_a=e,
                clinic_b=j,
            )
            sign = pairwise_sign(j, e)
            accumulate_mask(y, seed, -sign, context=pair_context(**context, clinic_a=e, clinic_b=j))
        stripped[j] = y
        x = _approx_plaintext(driver, contributions[j].delta, contributions[j].weight)
        # Still masked: uniform and uncorrelated with the input.
        assert np.mean(np.abs(_centered(y[:dim]) - x) <= 1) < 1e-3
        assert abs(np.corrcoef(_centered(y[:dim]), x)[0, 1]) < 0.1

    # The stripping itself is right: summed, the survivors' pairwise masks cancel and the
    # aggregate comes out exactly as the server computed it.
    total = np.zeros(driver.plan.vector_length(dim), dtype=np.uint32)
    for y in stripped.values():
        np.add(total, y, out=total)
    decoded = driver.plan.decode_sum(total, contributors=len(survivors))
    np.testing.assert_array_equal(decoded.mean_delta().astype(np.float32), result.delta)
    assert np.abs(result.delta).max() <= CLIP_NORM * (1 + 1e-6)

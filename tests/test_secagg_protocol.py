"""The secure-aggregation round protocol, end to end in memory: real clients, real server.

:class:`RoundDriver` plays the coordinator: it walks real
:class:`~clinic_agent.secagg_client.SecAggClient` objects (one per clinic, each with its
real certificate and key from a throwaway federation CA) through the five stages against a
real :class:`~aggregator.secagg_server.SecAggServer`, deciding who drops out where, exactly
as the round state machine would. ``tests/test_secagg_malicious.py`` subclasses it to
tamper with what the aggregator relays.

What is proven here:

* equivalence (property test): the securely aggregated weighted mean equals plain
  weighted FedAvg of the survivors' clipped deltas within the documented rounding bound,
  for random cohorts, thresholds, weights, vectors and dropouts at any stage; below the
  threshold the round fails cleanly;
* one test per dropout stage, with inputs on the quantization grid so the survivor sum
  must come out *exactly*;
* a known-answer round with fixed randomness (masked uploads and aggregate pinned);
* the server's domain errors, its memory discipline (one accumulator plus in-flight
  uploads) and the quantization planning rules.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pki_fixtures import FederationPKI, make_federation

from aggregator.fedavg import AggregateResult
from aggregator.secagg_server import (
    SecAggAbortedError,
    SecAggServer,
    UnmaskFailedError,
)
from clinic_agent.secagg_client import MaskedInput, SecAggClient
from common import pki
from common.clipping import clip_l2
from common.errors import (
    ConfigError,
    DuplicateSubmissionError,
    InvalidUpdateError,
    NotInCohortError,
    PayloadTooLargeError,
    PreconditionError,
    StaleRoundError,
)
from common.secagg import InvalidParameterError, QuantizationPlan
from common.secagg.messages import (
    STAGES,
    KeyAdvertisement,
    ProtocolStateError,
    RelayedAdvertisement,
    Reveal,
    SecAggProtocolError,
    SharesForRecipient,
    ShareSubmission,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    check_threshold,
    decode_fields,
    mean_error_bound,
    minimum_threshold,
    plan_quantization,
    share_ciphertext_length,
    share_plaintext,
)

FEDERATION = "testfed"
ALL_CLINICS = tuple(f"clinic-{c}" for c in "abcdefgh")
CLIP_NORM = 1.0
WEIGHT_MAX = 1000.0
LOSS_MAX = 10.0

# Dropout stage index k: the clinic answers stages < k and is silent from stage k on.
BEFORE_ADVERTISING, AFTER_ADVERTISING, AFTER_SHARING, AFTER_INPUT, DURING_UNMASK = range(5)


# --------------------------------------------------------------------------- fixtures


class StreamRand:
    """Deterministic ``rand``: the ChaCha20 keystream under SHA-256(label)."""

    def __init__(self, label: bytes) -> None:
        key = hashlib.sha256(label).digest()
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def __call__(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


@dataclass(frozen=True)
class Party:
    clinic_id: str
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes


@dataclass(frozen=True)
class SecAggFederation:
    name: str
    pki: FederationPKI = field(repr=False)
    ca_cert: x509.Certificate = field(repr=False)
    parties: dict[str, Party] = field(repr=False)
    now: datetime

    def clock(self) -> datetime:
        return self.now


def build_federation(tmp: Path) -> SecAggFederation:
    fed = make_federation(tmp, federation=FEDERATION, clinics=ALL_CLINICS)
    parties = {
        name: Party(name, pki.load_private_key(pair.key), pair.cert.read_bytes())
        for name, pair in fed.clinics.items()
    }
    return SecAggFederation(
        name=FEDERATION,
        pki=fed,
        ca_cert=pki.load_certificate(fed.ca_cert),
        parties=parties,
        now=datetime.now(UTC),
    )


@pytest.fixture(scope="module")
def secagg_fed(tmp_path_factory: pytest.TempPathFactory) -> SecAggFederation:
    return build_federation(tmp_path_factory.mktemp("secagg-pki"))


@dataclass
class Contribution:
    """One clinic's already clipped input."""

    delta: np.ndarray
    weight: float
    loss: float


def make_contributions(
    cohort: Sequence[str], dim: int, seed: int, *, spread: float = 1.0
) -> dict[str, Contribution]:
    rng = np.random.default_rng(seed)
    out = {}
    for clinic in cohort:
        raw = (rng.standard_normal(dim) * spread / math.sqrt(dim)).astype(np.float32)
        delta, _ = clip_l2(raw, CLIP_NORM)
        out[clinic] = Contribution(
            delta, float(rng.integers(1, int(WEIGHT_MAX) + 1)), float(rng.uniform(0, LOSS_MAX))
        )
    return out


def plain_fedavg(contributions: Mapping[str, Contribution], survivors: Sequence[str]) -> tuple:
    """Exact (float64) weighted FedAvg of the survivors: mean delta, weight sum, mean loss."""
    weight = sum(contributions[c].weight for c in survivors)
    total = sum(
        contributions[c].weight * contributions[c].delta.astype(np.float64) for c in survivors
    )
    loss = sum(contributions[c].weight * contributions[c].loss for c in survivors) / weight
    return total / weight, weight, loss


# --------------------------------------------------------------------------- the driver


@dataclass
class RoundDriver:
    """Plays the coordinator for one secure round, in memory.

    ``drop_at[c] = k`` makes clinic ``c`` silent from stage ``k`` on (see the constants
    above); ``partial_upload`` clinics start their upload and vanish half-way. A clinic
    whose client refuses (raises :class:`SecAggProtocolError`) is recorded in ``refusals``
    and treated like one that went silent. The ``relay_*`` hooks are where a malicious
    aggregator tampers; here they relay faithfully.
    """

    fed: SecAggFederation
    cohort: tuple[str, ...]
    threshold: int
    dim: int
    round_number: int = 7
    seed: bytes = b"seed"
    chunk_elements: int = 97  # odd and small, so uploads span several uneven chunks
    loss_max: float | None = LOSS_MAX
    plan: QuantizationPlan = field(init=False)
    server: SecAggServer = field(init=False)
    clients: dict[str, SecAggClient] = field(init=False)
    refusals: dict[str, SecAggProtocolError] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    masked: dict[str, MaskedInput] = field(default_factory=dict)
    reveals: dict[str, Reveal] = field(default_factory=dict)
    sets: dict[str, frozenset[str]] = field(default_factory=dict)
    # What crossed the wire, for replay attacks and privacy checks.
    advertisements: tuple[RelayedAdvertisement, ...] = ()
    submissions: dict[str, ShareSubmission] = field(default_factory=dict)
    deliveries: dict[str, SharesForRecipient] = field(default_factory=dict)
    signatures: dict[str, SurvivorSignature] = field(default_factory=dict)
    requests: dict[str, UnmaskRequest] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plan = plan_quantization(
            CLIP_NORM, len(self.cohort), weight_max=WEIGHT_MAX, loss_max=self.loss_max
        )
        self.server = SecAggServer(
            self.fed.name,
            self.round_number,
            self.cohort,
            self.threshold,
            self.plan.vector_length(self.dim),
            self.plan,
            self.fed.ca_cert,
            now=self.fed.clock,
        )
        self.clients = {c: self.make_client(c) for c in self.cohort}

    def make_client(self, clinic: str, *, cohort: Sequence[str] | None = None) -> SecAggClient:
        party = self.fed.parties[clinic]
        return SecAggClient(
            self.fed.name,
            self.round_number,
            clinic,
            tuple(cohort or self.cohort),
            self.threshold,
            party.key,
            party.cert_pem,
            self.fed.ca_cert,
            rand=StreamRand(self.seed + b"/" + clinic.encode()),
            now=self.fed.clock,
        )

    # -- relay hooks (identity: an honest aggregator) ------------------------------------

    def relay_advertisements(
        self, recipient: str, advertisements: tuple[RelayedAdvertisement, ...]
    ) -> Sequence[RelayedAdvertisement]:
        return advertisements

    def relay_shares(self, recipient: str, delivery: SharesForRecipient) -> SharesForRecipient:
        return delivery

    def relay_survivors(self, recipient: str, announcement: SurvivorSet) -> SurvivorSet:
        return announcement

    def relay_unmask(self, recipient: str, request: UnmaskRequest) -> UnmaskRequest:
        return request

    # -- stages ---------------------------------------------------------------------------

    def _answering(self, stage: int, members: frozenset[str] | None, drop_at: Mapping[str, int]):
        pool = self.cohort if members is None else sorted(members)
        return [c for c in pool if drop_at.get(c, len(STAGES)) > stage and c not in self.refusals]

    def _ask(self, clinic: str, call: Any) -> Any:
        try:
            return call()
        except SecAggProtocolError as exc:
            self.refusals[clinic] = exc
            return None

    def _close(self, stage: str, alive: set[str]) -> frozenset[str]:
        self.sets[stage] = self.server.close_stage(stage, alive)
        return self.sets[stage]

    def advertise(self, drop_at: Mapping[str, int]) -> frozenset[str]:
        alive = set()
        for c in self._answering(0, None, drop_at):
            self.server.advertise(c, self.clients[c].advertise(), self.fed.parties[c].cert_pem)
            alive.add(c)
        return self._close("advertise", alive)

    def share_keys(self, u1: frozenset[str], drop_at: Mapping[str, int]) -> frozenset[str]:
        advertisements = self.server.advertisements()
        self.advertisements = advertisements
        alive = set()
        for c in self._answering(1, u1, drop_at):
            relayed = self.relay_advertisements(c, advertisements)
            submission = self._ask(c, lambda c=c, r=relayed: self.clients[c].share_keys(r))
            if submission is not None:
                self.server.submit_shares(c, submission)
                self.submissions[c] = submission
                alive.add(c)
        return self._close("share_keys", alive)

    def masked_input(
        self,
        u2: frozenset[str],
        contributions: Mapping[str, Contribution],
        drop_at: Mapping[str, int],
        partial_upload: set[str],
    ) -> frozenset[str]:
        alive = set()
        for c in sorted(u2):
            if c in partial_upload and drop_at.get(c) == AFTER_SHARING:
                self._upload(c, contributions[c], partial=True)
        for c in self._answering(2, u2, drop_at):
            if self._upload(c, contributions[c]):
                alive.add(c)
        return self._close("masked_input", alive)

    def _upload(self, clinic: str, contribution: Contribution, *, partial: bool = False) -> bool:
        delivery = self.relay_shares(clinic, self.server.shares_for(clinic))
        self.deliveries[clinic] = delivery
        masked = self._ask(
            clinic,
            lambda: self.clients[clinic].masked_input(
                delivery,
                contribution.delta,
                weight=contribution.weight,
                plan=self.plan,
                loss=None if self.loss_max is None else contribution.loss,
            ),
        )
        if masked is None:
            return False
        upload = self.server.begin_upload(clinic)
        stream = b"".join(masked.chunk_bytes(self.chunk_elements))
        if partial:
            # The clinic vanishes half-way through its stream; the stage close discards it.
            upload.write(stream[: 4 * (masked.numel // 2)])
            return False
        for chunk in masked.chunk_bytes(self.chunk_elements):
            upload.write(chunk)
        self.server.commit(upload)
        self.uploads[clinic] = stream
        self.masked[clinic] = masked
        return True

    def consistency(self, u3: frozenset[str], drop_at: Mapping[str, int]) -> frozenset[str]:
        announcement = self.server.survivors()
        alive = set()
        for c in self._answering(3, u3, drop_at):
            relayed = self.relay_survivors(c, announcement)
            signature = self._ask(c, lambda c=c, a=relayed: self.clients[c].consistency(a))
            if signature is not None:
                self.server.submit_signature(c, signature)
                self.signatures[c] = signature
                alive.add(c)
        return self._close("consistency", alive)

    def unmask(self, u4: frozenset[str], drop_at: Mapping[str, int]) -> frozenset[str]:
        alive = set()
        for c in self._answering(4, u4, drop_at):
            request = self.relay_unmask(c, self.server.unmask_request_for(c))
            self.requests[c] = request
            reveal = self._ask(c, lambda c=c, r=request: self.clients[c].unmask(r))
            if reveal is not None:
                self.server.reveal(c, reveal)
                self.reveals[c] = reveal
                alive.add(c)
        return self._close("unmask", alive)

    def run(
        self,
        contributions: Mapping[str, Contribution],
        drop_at: Mapping[str, int] | None = None,
        partial_upload: set[str] | None = None,
    ) -> AggregateResult:
        drops = dict(drop_at or {})
        u1 = self.advertise(drops)
        u2 = self.share_keys(u1, drops)
        u3 = self.masked_input(u2, contributions, drops, partial_upload or set())
        u4 = self.consistency(u3, drops)
        self.unmask(u4, drops)
        return self.server.finalize()


def expected_sets(cohort: Sequence[str], drop_at: Mapping[str, int]) -> list[set[str]]:
    """U1..U5 for a dropout pattern."""
    return [{c for c in cohort if drop_at.get(c, 5) > k} for k in range(5)]


def assert_matches_plain_fedavg(
    result: AggregateResult,
    driver: RoundDriver,
    contributions: Mapping[str, Contribution],
    survivors: Sequence[str],
) -> None:
    mean, weight, loss = plain_fedavg(contributions, survivors)
    assert result.contributors == tuple(sorted(survivors))
    assert result.delta.dtype == np.float32
    assert result.delta.shape == (driver.dim,)
    # Integer weights ride the ring exactly.
    assert result.total_weight == weight
    bound = mean_error_bound(driver.plan, contributors=len(survivors), weight_sum=weight)
    error = np.abs(result.delta.astype(np.float64) - mean)
    assert float(error.max()) <= bound
    assert driver.plan.loss_scale is not None
    n = len(survivors)
    loss_bound = (n / driver.plan.loss_scale + LOSS_MAX * n / driver.plan.weight_scale) / weight
    assert result.mean_loss is not None
    assert abs(result.mean_loss - loss) <= loss_bound


# --------------------------------------------------------------------------- equivalence


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(3, 8))
    threshold = draw(st.integers(minimum_threshold(n), n))
    cohort = tuple(sorted(draw(st.permutations(ALL_CLINICS))[:n]))
    dim = draw(st.integers(1, 300))
    drop_choices = st.one_of(st.none(), st.integers(0, 4))
    drops = {c: k for c in cohort if (k := draw(drop_choices)) is not None}
    partial = {c for c in drops if drops[c] == AFTER_SHARING and draw(st.booleans())}
    return {
        "cohort": cohort,
        "threshold": threshold,
        "dim": dim,
        "drops": drops,
        "partial": partial,
        "data_seed": draw(st.integers(0, 2**32 - 1)),
        "spread": draw(st.sampled_from([1e-3, 0.5, 1.0, 30.0])),
    }


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_secure_aggregate_equals_plain_fedavg_of_the_survivors(
    secagg_fed: SecAggFederation, scenario: dict[str, Any]
) -> None:
    cohort, threshold, drops = scenario["cohort"], scenario["threshold"], scenario["drops"]
    contributions = make_contributions(
        cohort, scenario["dim"], scenario["data_seed"], spread=scenario["spread"]
    )
    driver = RoundDriver(secagg_fed, cohort, threshold, scenario["dim"])
    sets = expected_sets(cohort, drops)
    event(f"dropouts: {len(drops)}")
    if min(len(s) for s in sets) < threshold:
        event("below threshold: aborted")
        with pytest.raises(SecAggAbortedError, match="threshold"):
            driver.run(contributions, drops, scenario["partial"])
        assert driver.server.stage == "aborted"
        with pytest.raises(SecAggAbortedError):
            driver.server.finalize()
        return
    event("completed")
    result = driver.run(contributions, drops, scenario["partial"])
    assert driver.refusals == {}
    survivors = sorted(sets[AFTER_SHARING])  # U3: committed a masked input
    assert driver.server.participants == {f"U{k + 1}": frozenset(s) for k, s in enumerate(sets)}
    assert_matches_plain_fedavg(result, driver, contributions, survivors)


# --------------------------------------------------------------------------- dropouts


def grid_contributions(cohort: Sequence[str], dim: int) -> dict[str, Contribution]:
    """Inputs whose weighted values are multiples of 2^-12: stochastic rounding is exact
    at any delta scale >= 2^12, so the secure sum must equal the plain sum bit for bit."""
    rng = np.random.default_rng(5)
    out = {}
    for i, clinic in enumerate(cohort):
        ticks = rng.integers(-40, 41, size=dim)
        delta = (ticks * 2.0**-12).astype(np.float32)
        out[clinic] = Contribution(delta, float(i + 1), float(i) / 2)
    return out


DROPOUT_CASES = {
    "before advertising": BEFORE_ADVERTISING,
    "after advertising": AFTER_ADVERTISING,
    "after sharing": AFTER_SHARING,
    "after sending its masked input": AFTER_INPUT,
    "during unmasking": DURING_UNMASK,
}


@pytest.mark.parametrize("stage", DROPOUT_CASES.values(), ids=DROPOUT_CASES.keys())
def test_a_clinic_vanishing_at_any_stage_still_gives_the_exact_survivor_sum(
    secagg_fed: SecAggFederation, stage: int
) -> None:
    cohort = ALL_CLINICS[:5]
    contributions = grid_contributions(cohort, dim=64)
    driver = RoundDriver(secagg_fed, cohort, threshold=3, dim=64)
    assert driver.plan.delta_scale >= 2**12 and driver.plan.loss_scale is not None
    drops = {"clinic-c": stage}
    result = driver.run(contributions, drops)

    # A clinic that sent its input is a survivor whatever happens to it afterwards.
    survivors = [c for c in cohort if c != "clinic-c" or stage >= AFTER_INPUT]
    mean, weight, loss = plain_fedavg(contributions, survivors)
    assert result.contributors == tuple(survivors)
    np.testing.assert_array_equal(result.delta, mean.astype(np.float32))
    assert result.total_weight == weight
    assert result.mean_loss == pytest.approx(loss, abs=1e-9)
    if stage == AFTER_SHARING:
        # Its pairwise masks were removed through its reconstructed mask key.
        assert set(driver.reveals["clinic-a"].key_shares) == {"clinic-c"}


def test_a_clinic_vanishing_mid_upload_is_a_dropout_after_sharing(
    secagg_fed: SecAggFederation,
) -> None:
    cohort = ALL_CLINICS[:4]
    contributions = grid_contributions(cohort, dim=300)
    driver = RoundDriver(secagg_fed, cohort, threshold=3, dim=300)
    result = driver.run(contributions, {"clinic-b": AFTER_SHARING}, partial_upload={"clinic-b"})
    survivors = ["clinic-a", "clinic-c", "clinic-d"]
    mean, _, _ = plain_fedavg(contributions, survivors)
    np.testing.assert_array_equal(result.delta, mean.astype(np.float32))
    assert driver.sets["masked_input"] == frozenset(survivors)
    assert driver.server.uploads_in_flight == 0


def test_a_round_without_a_loss_coordinate(secagg_fed: SecAggFederation) -> None:
    cohort = ALL_CLINICS[:3]
    contributions = grid_contributions(cohort, dim=20)
    driver = RoundDriver(secagg_fed, cohort, threshold=2, dim=20, loss_max=None)
    assert driver.plan.vector_length(20) == 21
    result = driver.run(contributions, {"clinic-a": AFTER_SHARING})
    mean, weight, _ = plain_fedavg(contributions, ["clinic-b", "clinic-c"])
    np.testing.assert_array_equal(result.delta, mean.astype(np.float32))
    assert result.total_weight == weight and result.mean_loss is None


def test_several_dropouts_across_stages_at_the_threshold(secagg_fed: SecAggFederation) -> None:
    cohort = ALL_CLINICS[:8]
    contributions = grid_contributions(cohort, dim=40)
    # U1 = U2 = 7, U3 = 6 (clinic-b shared but sent no input; clinic-c sent its input
    # and vanished), U4 = U5 = 5 = t.
    drops = {"clinic-a": BEFORE_ADVERTISING, "clinic-b": AFTER_SHARING, "clinic-c": AFTER_INPUT}
    driver = RoundDriver(secagg_fed, cohort, threshold=5, dim=40)
    result = driver.run(contributions, drops)
    survivors = ["clinic-c", "clinic-d", "clinic-e", "clinic-f", "clinic-g", "clinic-h"]
    mean, _, _ = plain_fedavg(contributions, survivors)
    np.testing.assert_array_equal(result.delta, mean.astype(np.float32))
    assert len(driver.reveals) == 5
    assert all(set(r.key_shares) == {"clinic-b"} for r in driver.reveals.values())

    # One more clinic lost during unmasking leaves 4 < t reveals: the round aborts.
    driver = RoundDriver(secagg_fed, cohort, threshold=5, dim=40)
    with pytest.raises(SecAggAbortedError, match="only 4 clinic"):
        driver.run(contributions, {**drops, "clinic-d": DURING_UNMASK})


def test_below_the_threshold_the_round_aborts_and_returns_nothing(
    secagg_fed: SecAggFederation,
) -> None:
    cohort = ALL_CLINICS[:5]
    contributions = grid_contributions(cohort, dim=16)
    driver = RoundDriver(secagg_fed, cohort, threshold=4, dim=16)
    with pytest.raises(SecAggAbortedError, match="only 3 clinic"):
        driver.run(contributions, {"clinic-a": AFTER_INPUT, "clinic-b": DURING_UNMASK})
    assert driver.server.stage == "aborted"
    with pytest.raises(SecAggAbortedError):
        driver.server.finalize()
    with pytest.raises(StaleRoundError):
        driver.server.reveal("clinic-c", driver.reveals["clinic-c"])


def test_worst_case_admissible_cohort_does_not_wrap(secagg_fed: SecAggFederation) -> None:
    """Every clinic at the weight cap with its whole clip norm on one coordinate, same
    sign: the largest sum the plan admits still decodes (overflow is impossible)."""
    cohort = ALL_CLINICS[:6]
    dim = 5
    contributions = {}
    for c in cohort:
        delta = np.zeros(dim, dtype=np.float32)
        delta[0], delta[1] = CLIP_NORM, 0.0
        contributions[c] = Contribution(delta, WEIGHT_MAX, LOSS_MAX)
    contributions["clinic-f"].delta[0] = -CLIP_NORM  # and the most negative as well
    driver = RoundDriver(secagg_fed, cohort, threshold=4, dim=dim)
    result = driver.run(contributions)
    assert_matches_plain_fedavg(result, driver, contributions, cohort)


# --------------------------------------------------------------------------- known answer

KAT_COHORT = ("clinic-a", "clinic-b", "clinic-c")
KAT_UPLOAD_SHA256 = {
    "clinic-a": "1d936c721c100b830dc10e64e097e0abc3db3d40e35b8a73b1e3191eee47c7d7",
    "clinic-b": "cb5d3e5c0e050d74dc42f1a374becf0a0711d4216d348dd3bc8b2854359d8a25",
    "clinic-c": "09a5b8830b7677b9b142e3de58881911e25b8a8369db7f9d2fd25f6945636e59",
}
# float32 values of the weighted mean delta, as float.hex() of their float64 widening.
KAT_DELTA_HEX = [
    "0x1.5cccd00000000p-2",
    "0x1.1000000000000p-3",
    "0x1.6667800000000p-6",
    "0x1.a666600000000p-4",
    "0x1.3333400000000p-4",
    "0x1.5999800000000p-4",
    "0x1.999a000000000p-8",
    "0x1.1999900000000p-3",
]
KAT_TOTAL_WEIGHT = 16.0
KAT_MEAN_LOSS = 1.484375  # (3 * 0.5 + 5 * 1.25 + 8 * 2.0) / 16, exact on the loss grid


def kat_contributions() -> dict[str, Contribution]:
    values = {
        "clinic-a": [0.25, -0.125, 0.1, 0.3, -0.2, 0.05, 0.0, 0.7],
        "clinic-b": [-0.5, 0.5, 0.33, -0.01, 0.2, 0.4, -0.3, 0.1],
        "clinic-c": [0.9, 0.0, -0.2, 0.1, 0.1, -0.1, 0.2, -0.05],
    }
    return {
        c: Contribution(np.array(v, dtype=np.float32), float(w), loss)
        for (c, v), w, loss in zip(values.items(), (3, 5, 8), (0.5, 1.25, 2.0), strict=True)
    }


def test_known_answer_round_with_fixed_randomness(secagg_fed: SecAggFederation) -> None:
    """Pins the exact bytes of every masked upload and the aggregate of a small round with
    fixed randomness and one dropout after sharing; any change to key derivation, masking,
    sharing, quantization or unmasking shows up here."""
    cohort = (*KAT_COHORT, "clinic-d")
    contributions = kat_contributions()
    contributions["clinic-d"] = Contribution(np.zeros(8, dtype=np.float32), 1.0, 0.0)
    driver = RoundDriver(secagg_fed, cohort, threshold=3, dim=8, round_number=42, seed=b"kat")
    assert (driver.plan.delta_scale, driver.plan.weight_scale, driver.plan.loss_scale) == (
        2.0**19,
        2.0**19,
        2.0**15,
    )
    result = driver.run(contributions, {"clinic-d": AFTER_SHARING})
    digests = {c: hashlib.sha256(u).hexdigest() for c, u in sorted(driver.uploads.items())}
    assert digests == KAT_UPLOAD_SHA256
    assert [float(v).hex() for v in result.delta] == KAT_DELTA_HEX
    assert result.total_weight == KAT_TOTAL_WEIGHT
    assert result.mean_loss == KAT_MEAN_LOSS
    assert result.contributors == KAT_COHORT
    assert_matches_plain_fedavg(result, driver, contributions, KAT_COHORT)


# --------------------------------------------------------------------------- server rules


def started(fed: SecAggFederation, cohort: tuple[str, ...] = ALL_CLINICS[:4], dim: int = 10):
    """A driver whose round has been advertised by every clinic and closed."""
    driver = RoundDriver(fed, cohort, threshold=3, dim=dim)
    driver.advertise({})
    return driver


def test_server_maps_every_refusal_to_a_domain_error(secagg_fed: SecAggFederation) -> None:
    driver = RoundDriver(secagg_fed, ALL_CLINICS[:4], threshold=3, dim=10)
    server, clients = driver.server, driver.clients
    pem = {c: secagg_fed.parties[c].cert_pem for c in ALL_CLINICS}
    adv_a = clients["clinic-a"].advertise()

    with pytest.raises(NotInCohortError):
        server.advertise(
            "clinic-h",
            driver.make_client("clinic-h", cohort=[*ALL_CLINICS[:4], "clinic-h"][:5]).advertise(),
            pem["clinic-h"],
        )
    with pytest.raises(StaleRoundError, match="round 6"):
        server.advertise("clinic-a", KeyAdvertisement(6, *_fields(adv_a)), pem["clinic-a"])
    with pytest.raises(InvalidUpdateError, match="comes from 'clinic-b'"):
        server.advertise("clinic-b", adv_a, pem["clinic-b"])
    with pytest.raises(InvalidUpdateError, match="does not verify"):
        server.advertise("clinic-a", adv_a, pem["clinic-b"])  # someone else's certificate
    foreign = secagg_fed.pki.foreign_clinic.cert.read_bytes()  # names clinic-a, other CA
    with pytest.raises(InvalidUpdateError, match="not issued by the federation CA"):
        server.advertise("clinic-a", adv_a, foreign)
    with pytest.raises(InvalidUpdateError, match="PEM"):
        server.advertise("clinic-a", adv_a, b"garbage")
    short = KeyAdvertisement(7, "clinic-a", b"x" * 31, adv_a.mask_public_key, adv_a.signature)
    with pytest.raises(InvalidUpdateError, match="32 bytes"):
        server.advertise("clinic-a", short, pem["clinic-a"])
    server.advertise("clinic-a", adv_a, pem["clinic-a"])
    with pytest.raises(DuplicateSubmissionError):
        server.advertise("clinic-a", adv_a, pem["clinic-a"])
    with pytest.raises(StaleRoundError, match="has not started"):
        server.advertisements()
    with pytest.raises(StaleRoundError, match="not 'share_keys'"):
        server.submit_shares("clinic-a", ShareSubmission(7, "clinic-a", {}))
    for c in ("clinic-b", "clinic-c"):
        server.advertise(c, clients[c].advertise(), pem[c])
    with pytest.raises(StaleRoundError, match="not 'unmask'"):
        server.close_stage("unmask", set())
    server.close_stage("advertise", {"clinic-a", "clinic-b", "clinic-c"})
    advertisements = server.advertisements()
    assert [a.clinic_id for a in advertisements] == ["clinic-a", "clinic-b", "clinic-c"]

    # clinic-d never advertised: it is out of the round from now on.
    with pytest.raises(StaleRoundError, match="no longer part"):
        server.submit_shares("clinic-d", ShareSubmission(7, "clinic-d", {}))
    submission = clients["clinic-a"].share_keys(advertisements)
    assert set(submission.ciphertexts) == {"clinic-b", "clinic-c"}
    missing = ShareSubmission(7, "clinic-a", {"clinic-b": submission.ciphertexts["clinic-b"]})
    with pytest.raises(InvalidUpdateError, match="missing \\['clinic-c'\\]"):
        server.submit_shares("clinic-a", missing)
    truncated = dict(submission.ciphertexts, **{"clinic-c": b"short"})
    with pytest.raises(InvalidUpdateError, match=r"must be \d+ bytes"):
        server.submit_shares("clinic-a", ShareSubmission(7, "clinic-a", truncated))
    server.submit_shares("clinic-a", submission)
    with pytest.raises(DuplicateSubmissionError):
        server.submit_shares("clinic-a", submission)


def _fields(adv: KeyAdvertisement) -> tuple[str, bytes, bytes, bytes]:
    return adv.clinic_id, adv.cipher_public_key, adv.mask_public_key, adv.signature


def test_uploads_stream_into_one_accumulator(secagg_fed: SecAggFederation) -> None:
    cohort = ALL_CLINICS[:4]
    contributions = grid_contributions(cohort, dim=10)
    driver = started(secagg_fed, cohort)
    u2 = driver.share_keys(driver.sets["advertise"], {})
    server = driver.server
    masked = driver.clients["clinic-a"].masked_input(
        server.shares_for("clinic-a"),
        contributions["clinic-a"].delta,
        weight=contributions["clinic-a"].weight,
        plan=driver.plan,
        loss=contributions["clinic-a"].loss,
    )
    chunks = list(masked.chunk_bytes(5))
    assert [len(c) for c in chunks] == [20, 20, 8]  # 10 deltas + weight + loss = 12 elements
    assert list(masked.chunk_bytes(5)) == chunks  # re-streaming yields the same bytes

    upload = server.begin_upload("clinic-a")
    upload.write(chunks[0])
    with pytest.raises(InvalidUpdateError, match="incomplete: 5 of 12"):
        server.commit(upload)
    with pytest.raises(InvalidUpdateError, match="whole uint32"):
        upload.write(b"abc")
    retry = server.begin_upload("clinic-a")  # a broken stream is retried from the start
    assert upload.state == "discarded" and server.uploads_in_flight == 1
    with pytest.raises(StaleRoundError):
        upload.write(chunks[1])
    for chunk in chunks:
        retry.write(chunk)
    with pytest.raises(PayloadTooLargeError):
        retry.write(chunks[0])
    server.commit(retry)
    assert retry.state == "committed" and server.uploads_in_flight == 0
    with pytest.raises(DuplicateSubmissionError):
        server.begin_upload("clinic-a")
    with pytest.raises(StaleRoundError):
        server.commit(retry)

    # Array chunks are accepted too; a clinic outside U2 cannot upload.
    masked_b = driver.clients["clinic-b"].masked_input(
        server.shares_for("clinic-b"),
        contributions["clinic-b"].delta,
        weight=contributions["clinic-b"].weight,
        plan=driver.plan,
        loss=contributions["clinic-b"].loss,
    )
    upload_b = server.begin_upload("clinic-b")
    for chunk_array in masked_b.chunks(5):
        upload_b.write(chunk_array)
    server.commit(upload_b)
    assert u2 == frozenset(cohort)
    pending = server.begin_upload("clinic-c")
    pending.write(next(iter(masked_b.chunk_bytes(2))))
    # The stage closes with two committed inputs (< t = 3): the round aborts and frees all.
    with pytest.raises(SecAggAbortedError, match="only 2 clinic"):
        server.close_stage("masked_input", {"clinic-a", "clinic-b"})
    assert pending.state == "discarded" and server.uploads_in_flight == 0


def test_server_checks_signatures_and_reveals(secagg_fed: SecAggFederation) -> None:
    cohort = ALL_CLINICS[:4]
    contributions = grid_contributions(cohort, dim=6)
    driver = started(secagg_fed, cohort, dim=6)
    u2 = driver.share_keys(driver.sets["advertise"], {})
    u3 = driver.masked_input(u2, contributions, {"clinic-d": AFTER_SHARING}, set())
    server, clients = driver.server, driver.clients
    assert u3 == {"clinic-a", "clinic-b", "clinic-c"}
    with pytest.raises(StaleRoundError):
        server.shares_for("clinic-a")
    announcement = server.survivors()
    signature_a = clients["clinic-a"].consistency(announcement)
    with pytest.raises(InvalidUpdateError, match="comes from 'clinic-b'"):
        server.submit_signature("clinic-b", signature_a)
    with pytest.raises(StaleRoundError, match="no longer part"):
        server.submit_signature("clinic-d", signature_a)
    forged = type(signature_a)(7, "clinic-b", signature_a.signature)
    with pytest.raises(InvalidUpdateError, match="does not verify"):
        server.submit_signature("clinic-b", forged)
    for c in ("clinic-a", "clinic-b", "clinic-c"):
        server.submit_signature(c, clients[c].consistency(announcement))
    server.close_stage("consistency", {"clinic-a", "clinic-b", "clinic-c"})

    request = server.unmask_request_for("clinic-a")
    assert request.survivors == ("clinic-a", "clinic-b", "clinic-c")
    assert request.dropped == ("clinic-d",)
    assert set(request.signatures) == {"clinic-a", "clinic-b", "clinic-c"}
    reveal_a = clients["clinic-a"].unmask(request)
    assert set(reveal_a.self_mask_shares) == set(request.survivors)
    assert set(reveal_a.key_shares) == {"clinic-d"}
    both = Reveal(
        7,
        "clinic-a",
        reveal_a.self_mask_shares,
        {**reveal_a.key_shares, "clinic-b": reveal_a.self_mask_shares["clinic-b"]},
    )
    with pytest.raises(InvalidUpdateError, match="mask-key shares must be given for exactly"):
        server.reveal("clinic-a", both)
    bad_length = Reveal(
        7, "clinic-a", {**reveal_a.self_mask_shares, "clinic-a": b"x"}, reveal_a.key_shares
    )
    with pytest.raises(InvalidUpdateError, match="66 bytes"):
        server.reveal("clinic-a", bad_length)
    server.reveal("clinic-a", reveal_a)
    with pytest.raises(DuplicateSubmissionError):
        server.reveal("clinic-a", reveal_a)
    reveal_b = clients["clinic-b"].unmask(server.unmask_request_for("clinic-b"))
    server.reveal("clinic-b", reveal_b)
    # Two reveals, threshold three: nothing can be reconstructed, nothing is returned.
    with pytest.raises(UnmaskFailedError, match="only 2 clinic"):
        server.finalize()
    assert server.stage == "aborted"


def _round_until_reveals(
    fed: SecAggFederation, dim: int = 6
) -> tuple[RoundDriver, dict[str, Reveal]]:
    cohort = ALL_CLINICS[:5]
    contributions = grid_contributions(cohort, dim=dim)
    driver = RoundDriver(fed, cohort, threshold=3, dim=dim)
    drops = {"clinic-e": AFTER_SHARING}
    u1 = driver.advertise(drops)
    u2 = driver.share_keys(u1, drops)
    u3 = driver.masked_input(u2, contributions, drops, set())
    u4 = driver.consistency(u3, drops)
    reveals = {c: driver.clients[c].unmask(driver.server.unmask_request_for(c)) for c in sorted(u4)}
    return driver, reveals


def _corrupt(share: bytes) -> bytes:
    return share[:-1] + bytes([share[-1] ^ 1])


@pytest.mark.parametrize("kind", ["self-mask", "mask-key"])
def test_a_corrupted_share_aborts_the_round_without_a_result(
    secagg_fed: SecAggFederation, kind: str
) -> None:
    driver, reveals = _round_until_reveals(secagg_fed)
    bad = reveals["clinic-b"]
    if kind == "self-mask":
        shares = dict(
            bad.self_mask_shares, **{"clinic-c": _corrupt(bad.self_mask_shares["clinic-c"])}
        )
        reveals["clinic-b"] = Reveal(7, "clinic-b", shares, bad.key_shares)
    else:
        shares = dict(bad.key_shares, **{"clinic-e": _corrupt(bad.key_shares["clinic-e"])})
        reveals["clinic-b"] = Reveal(7, "clinic-b", bad.self_mask_shares, shares)
    for c, reveal in reveals.items():
        driver.server.reveal(c, reveal)
    with pytest.raises(UnmaskFailedError, match=r"do not reconstruct|does not match"):
        driver.server.finalize()
    with pytest.raises(UnmaskFailedError):
        driver.server.finalize()  # stays failed; never a partial result


def test_with_exactly_t_reveals_a_bad_mask_key_share_is_caught_by_its_public_key(
    secagg_fed: SecAggFederation,
) -> None:
    driver, reveals = _round_until_reveals(secagg_fed)
    chosen = dict(list(sorted(reveals.items()))[:3])
    bad = chosen["clinic-a"]
    shares = {"clinic-e": _corrupt(bad.key_shares["clinic-e"])}
    chosen["clinic-a"] = Reveal(7, "clinic-a", bad.self_mask_shares, shares)
    for c, reveal in chosen.items():
        driver.server.reveal(c, reveal)
    with pytest.raises(UnmaskFailedError):
        driver.server.finalize()


def test_finalize_is_idempotent_and_the_round_then_closes(secagg_fed: SecAggFederation) -> None:
    driver, reveals = _round_until_reveals(secagg_fed)
    for c, reveal in reveals.items():
        driver.server.reveal(c, reveal)
    first = driver.server.finalize()
    assert driver.server.finalize() is first
    assert first.contributors == ("clinic-a", "clinic-b", "clinic-c", "clinic-d")
    with pytest.raises(StaleRoundError):
        driver.server.unmask_request_for("clinic-a")


def test_server_refuses_unsafe_round_settings(secagg_fed: SecAggFederation) -> None:
    plan = plan_quantization(CLIP_NORM, 4, weight_max=WEIGHT_MAX)
    args = (secagg_fed.name, 1)
    with pytest.raises(InvalidParameterError, match="2t > n"):
        SecAggServer(*args, ALL_CLINICS[:4], 2, 12, plan, secagg_fed.ca_cert, now=secagg_fed.clock)
    with pytest.raises(PreconditionError, match="covers 4 clinics"):
        SecAggServer(*args, ALL_CLINICS[:5], 3, 12, plan, secagg_fed.ca_cert, now=secagg_fed.clock)
    with pytest.raises(PreconditionError, match="numel_ring"):
        SecAggServer(*args, ALL_CLINICS[:4], 3, 1, plan, secagg_fed.ca_cert, now=secagg_fed.clock)
    with pytest.raises(PreconditionError, match="distinct"):
        SecAggServer(
            *args,
            ("clinic-a", "clinic-a", "clinic-b"),
            2,
            12,
            plan,
            secagg_fed.ca_cert,
            now=secagg_fed.clock,
        )


# --------------------------------------------------------------------------- client rules


def test_client_refuses_a_wrong_identity_or_an_unsafe_plan(secagg_fed: SecAggFederation) -> None:
    party_a, party_b = secagg_fed.parties["clinic-a"], secagg_fed.parties["clinic-b"]
    cohort = ALL_CLINICS[:4]

    def client(**overrides: Any) -> SecAggClient:
        kwargs: dict[str, Any] = {
            "federation": secagg_fed.name,
            "round_number": 1,
            "clinic_id": "clinic-a",
            "cohort": cohort,
            "threshold": 3,
            "signing_key": party_a.key,
            "certificate_pem": party_a.cert_pem,
            "ca_cert": secagg_fed.ca_cert,
        }
        kwargs.update(overrides)
        return SecAggClient(**kwargs, rand=StreamRand(b"x"), now=secagg_fed.clock)

    client()
    with pytest.raises(ConfigError, match="does not name spiffe://testfed/clinic/clinic-a"):
        client(certificate_pem=party_b.cert_pem, signing_key=party_b.key)
    with pytest.raises(ConfigError, match="does not belong"):
        client(signing_key=party_b.key)
    with pytest.raises(ConfigError, match="2t > n"):
        client(threshold=2)
    with pytest.raises(ConfigError, match="not in the round's cohort"):
        client(cohort=ALL_CLINICS[1:5])
    with pytest.raises(ConfigError, match="twice"):
        client(cohort=("clinic-a", "clinic-a", "clinic-b"), threshold=2)


def test_client_stages_run_in_order_and_retries_get_the_same_answer(
    secagg_fed: SecAggFederation,
) -> None:
    driver = RoundDriver(secagg_fed, ALL_CLINICS[:3], threshold=2, dim=4)
    client = driver.clients["clinic-a"]
    with pytest.raises(ProtocolStateError, match="out of order"):
        client.consistency(SurvivorSet(7, ("clinic-a", "clinic-b")))
    assert client.refused is None  # a local ordering bug is not a refusal of the round
    first = client.advertise()
    assert client.advertise() == first  # a lost reply is retried without new keys
    for c in ("clinic-b", "clinic-c"):
        driver.server.advertise(c, driver.clients[c].advertise(), secagg_fed.parties[c].cert_pem)
    driver.server.advertise("clinic-a", first, secagg_fed.parties["clinic-a"].cert_pem)
    driver.server.close_stage("advertise", set(ALL_CLINICS[:3]))
    advertisements = driver.server.advertisements()
    submission = client.share_keys(advertisements)
    assert client.share_keys(advertisements) is submission
    with pytest.raises(ProtocolStateError, match="different input"):
        client.share_keys(advertisements[:2])
    assert client.refused is not None
    with pytest.raises(ProtocolStateError, match="refused round 7"):
        client.masked_input(
            SharesForRecipient(7, "clinic-a", {}),
            np.zeros(4, np.float32),
            weight=1.0,
            plan=driver.plan,
        )


# --------------------------------------------------------------------------- planning


def test_plan_quantization_is_safe_for_the_whole_cohort() -> None:
    plan = plan_quantization(2.5, 50, weight_max=100.0, loss_max=20.0)
    assert plan.max_clinics == 50 and plan.clip_norm == 2.5
    # The finest power-of-two scale that cannot overflow: doubling it would.
    worst = 50 * math.ceil(plan.delta_bound * plan.delta_scale)
    assert worst <= 2**31 - 1 < 50 * math.ceil(plan.delta_bound * plan.delta_scale * 2)
    with pytest.raises(InvalidParameterError, match="clip_norm must be finite and > 0"):
        plan_quantization(0.0, 10, weight_max=1.0)
    with pytest.raises(InvalidParameterError, match="clip_norm"):
        plan_quantization(float("nan"), 10, weight_max=1.0)
    with pytest.raises(InvalidParameterError, match="weight_max"):
        plan_quantization(1.0, 10, weight_max=-1.0)
    with pytest.raises(InvalidParameterError, match="at least 2"):
        plan_quantization(1.0, 1, weight_max=1.0)
    with pytest.raises(InvalidParameterError, match="use a smaller cohort"):
        plan_quantization(1.0, 10_000, weight_max=1.0)
    assert plan_quantization(1.0, 10_000, weight_max=1.0, max_relative_error=1.0).max_clinics


def test_threshold_rule() -> None:
    assert [minimum_threshold(n) for n in (2, 3, 4, 5, 10, 50)] == [2, 2, 3, 3, 6, 26]
    check_threshold(3, 4)
    for t, n in ((2, 4), (1, 2), (5, 4), (26, 52)):
        with pytest.raises(InvalidParameterError):
            check_threshold(t, n)


def test_mean_error_bound_formula() -> None:
    plan = plan_quantization(1.0, 4, weight_max=10.0)
    bound = mean_error_bound(plan, contributors=3, weight_sum=6.0)
    expected = (3 / plan.delta_scale + (1 + 1e-6) * 3 / plan.weight_scale) / 6 + (1 + 1e-6) * 2**-24
    assert bound == pytest.approx(expected, rel=1e-12)


def test_share_plaintext_encoding_is_bound_and_fixed_length() -> None:
    share = bytes(range(66))
    plaintext = share_plaintext(
        federation="f",
        round_number=3,
        sender="a",
        recipient="b",
        self_mask_share=share,
        key_share=share[::-1],
    )
    assert decode_fields(plaintext) == [
        "dermafed-secagg-v1",
        "share",
        "f",
        3,
        "a",
        "b",
        share,
        share[::-1],
    ]
    assert (
        share_ciphertext_length(federation="f", round_number=3, sender="a", recipient="b")
        == len(plaintext) + 28
    )

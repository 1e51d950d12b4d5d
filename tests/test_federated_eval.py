"""The pure parts of secure federated evaluation: session numbers, the count vector and
the checks on its sum, an integer secure-aggregation session with a dropout, and the
aggregator's helpers that turn the sum into gate evidence."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pki_fixtures import make_federation

from aggregator.federated_evaluation import evaluation_threshold, evidence_of, summary
from aggregator.gate import GateSettings, PairedEvidence, compares
from aggregator.secagg_server import SecAggServer
from clinic_agent.secagg_client import SecAggClient
from common import pki
from common.datasets import CLASSES
from common.federated_eval import (
    COUNT_SPEC,
    CountCheckError,
    EvaluationCounts,
    count_length,
    decode_sum,
    evaluated_round,
    evaluation_session,
)
from common.secagg.messages import STAGES, SurvivorSet

K = len(CLASSES)


# -- session numbers ----------------------------------------------------------------------


def test_an_evaluation_session_number_is_apart_from_every_round_and_maps_back():
    for number in (1, 2, 17, 2**40):
        session = evaluation_session(number)
        assert session != number and session > 2**62
        assert evaluated_round(session) == number
        assert evaluated_round(number) is None
    with pytest.raises(ValueError):
        evaluation_session(0)
    with pytest.raises(ValueError):
        evaluation_session(2**62)


# -- the count vector ---------------------------------------------------------------------


def test_counts_of_predictions_known_answer():
    labels = [0, 0, 0, 1, 1, 2]
    candidate = [0, 0, 1, 1, 0, 2]
    published = [0, 1, 0, 0, 0, 2]
    counts = EvaluationCounts.of(labels, candidate, published, 3)
    # class 0: both right once, candidate only once, published only once.
    assert [tuple(vars(c).values()) for c in counts.paired] == [
        (3, 1, 1, 1),
        (2, 0, 1, 0),
        (1, 1, 0, 0),
    ]
    assert counts.candidate_confusion.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert counts.published_confusion.tolist() == [[2, 1, 0], [2, 0, 0], [0, 0, 1]]
    vector = counts.to_vector()
    assert vector.dtype == np.uint32 and vector.shape == (count_length(3),)
    assert vector[:12].tolist() == [3, 1, 1, 1, 2, 0, 1, 0, 1, 1, 0, 0]
    assert counts.cases == 6
    assert COUNT_SPEC.shape == (count_length(K),)


def test_counts_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside"):
        EvaluationCounts.of([0, 3], [0, 0], [0, 0], 3)
    with pytest.raises(ValueError, match="equal length"):
        EvaluationCounts.of([0, 1], [0], [0, 0], 3)


def _honest(seed: int, cases: int) -> EvaluationCounts:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, cases)
    return EvaluationCounts.of(labels, rng.integers(0, K, cases), rng.integers(0, K, cases), K)


def test_a_sum_of_honest_vectors_decodes_to_the_pooled_counts():
    parts = [_honest(s, 40 + s) for s in range(3)]
    summed = np.sum([p.to_vector() for p in parts], axis=0, dtype=np.uint32)
    decoded = decode_sum(summed, classes=K, contributors=3, max_cases=50)
    assert decoded.cases == sum(p.cases for p in parts)
    assert np.array_equal(decoded.candidate_confusion, sum(p.candidate_confusion for p in parts))
    for c in range(K):
        assert decoded.paired[c].n == sum(p.paired[c].n for p in parts)


def test_a_negative_count_that_wraps_fails_the_bound_check():
    honest = _honest(1, 30).to_vector()
    liar = np.zeros_like(honest)
    liar[0] = np.uint32(2**32 - 1000)  # "minus 1000" in the ring
    summed = honest + liar
    with pytest.raises(CountCheckError) as info:
        decode_sum(summed, classes=K, contributors=2, max_cases=100)
    assert info.value.check == "bound"


def test_more_cases_than_the_slices_allow_fails_the_total_check():
    summed = _honest(2, 60).to_vector()  # 60 cases from "one" clinic allowed 50
    with pytest.raises(CountCheckError) as info:
        decode_sum(summed, classes=K, contributors=1, max_cases=50)
    assert info.value.check == "total"


def test_counts_that_describe_different_cases_fail_the_consistency_check():
    vector = _honest(3, 30).to_vector().copy()
    vector[1] += 1  # one more "both right" than the confusion diagonals say
    with pytest.raises(CountCheckError) as info:
        decode_sum(vector, classes=K, contributors=1, max_cases=100)
    assert info.value.check == "consistency"
    with pytest.raises(CountCheckError) as info:
        decode_sum(vector[:-1], classes=K, contributors=1, max_cases=100)
    assert info.value.check == "shape"


# -- an integer secure-aggregation session --------------------------------------------------


def test_an_integer_session_sums_the_survivors_counts_exactly(tmp_path: Path):
    """Fresh keys, masks over uint32 counts, one clinic vanishing after sharing keys."""
    clinics = ("c1", "c2", "c3", "c4")
    fed = make_federation(tmp_path, clinics=clinics)
    ca = pki.load_certificate(fed.ca_cert)
    session = evaluation_session(5)

    def now() -> datetime:
        return datetime.now(UTC)

    server = SecAggServer(fed.federation, session, clinics, 3, COUNT_SPEC.numel, None, ca, now=now)
    clients = {
        c: SecAggClient(
            fed.federation,
            session,
            c,
            clinics,
            3,
            pki.load_private_key(fed.clinics[c].key),
            fed.clinics[c].cert.read_bytes(),
            ca,
            rand=os.urandom,
            now=now,
        )
        for c in clinics
    }
    counts = {c: _honest(i, 20 + i) for i, c in enumerate(clinics)}
    for c, client in clients.items():
        server.advertise(c, client.advertise(), fed.clinics[c].cert.read_bytes())
    u1 = server.close_stage(STAGES[0], clinics)
    for c in u1:
        server.submit_shares(c, clients[c].share_keys(server.advertisements()))
    server.close_stage(STAGES[1], u1)
    survivors = ("c1", "c2", "c3")  # c4 vanishes before its masked input
    for c in survivors:
        masked = clients[c].masked_integers(server.shares_for(c), counts[c].to_vector())
        upload = server.begin_upload(c)
        upload.write(masked.vector())
        server.commit(upload)
    u3 = server.close_stage(STAGES[2], survivors)
    for c in u3:
        signature = clients[c].consistency(SurvivorSet(session, tuple(sorted(u3))))
        server.submit_signature(c, signature)
    u4 = server.close_stage(STAGES[3], u3)
    for c in u4:
        server.reveal(c, clients[c].unmask(server.unmask_request_for(c)))
    server.close_stage(STAGES[4], u4)
    summed = server.finalize_ring()
    expected = np.sum([counts[c].to_vector() for c in survivors], axis=0, dtype=np.uint32)
    assert np.array_equal(summed, expected)
    decoded = decode_sum(summed, classes=K, contributors=3, max_cases=30)
    assert decoded.cases == sum(counts[c].cases for c in survivors)
    with pytest.raises(Exception, match="finalize_ring"):
        server.finalize()


# -- the aggregator's helpers -------------------------------------------------------------


def test_the_evaluation_threshold_needs_a_secure_majority():
    assert evaluation_threshold(1, 2) is None
    assert evaluation_threshold(2, 2) == 2
    assert evaluation_threshold(3, 2) == 2
    assert evaluation_threshold(10, 2) == 6
    assert evaluation_threshold(3, 4) is None  # the federation's own minimum is higher


def test_federated_counts_pool_with_held_out_tables():
    fed = _honest(4, 50)
    labels = np.array([0, 1, 1])
    held = PairedEvidence.from_predictions(labels, labels, np.array([0, 0, 1]), CLASSES)
    pooled = held + evidence_of(fed)
    assert pooled.tables[CLASSES[1]].n == 2 + fed.paired[1].n
    assert pooled.tables[CLASSES[1]].candidate_only == 1 + fed.paired[1].candidate_only
    ledger = summary(fed, ["a", "b"], "")
    assert ledger["contributors"] == 2 and ledger["cases"] == 50
    assert set(ledger["sensitivity"]) <= set(CLASSES)


def test_the_gate_compares_only_against_a_real_published_model():
    settings = GateSettings()
    good = {"balanced_accuracy": 0.6, "sensitivity": {c: 0.6 for c in CLASSES}}
    chance = {"balanced_accuracy": 0.15, "sensitivity": {c: 0.15 for c in CLASSES}}
    assert compares(good, settings, published_is_initial=False)
    assert not compares(good, settings, published_is_initial=True)
    assert not compares(chance, settings, published_is_initial=False)
    assert not compares(None, settings, published_is_initial=False)

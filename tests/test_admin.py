"""Admin API and validation gate through the real services over mutual TLS."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from federation_harness import Federation, code_of, header_for, raw_clinics, upload
from pki_fixtures import make_federation

from aggregator.config import PlanSection, RoundsSection, ServerSection, ValidationSection
from aggregator.servicers import round_to_proto
from common.datasets import CLASSES
from common.pki import revoke
from common.tensors import encode_f32le
from common.tls import channel_credentials, secure_channel
from dermafed.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc

MEL = CLASSES.index("mel")
NV = CLASSES.index("nv")


@pytest.fixture
def fed(federation: Federation) -> Federation:
    # A second admin whose certificate the tests revoke.
    object.__setattr__(
        federation, "pki", make_federation(federation.tmp / "pki2", admins=("alice", "mallory"))
    )
    return federation


def _admin(fed: Federation, cert_pair, ca=None) -> admin_pb2_grpc.AdminStub:
    assert fed.service is not None
    creds = channel_credentials(ca or fed.pki.ca_cert, *cert_pair)
    return admin_pb2_grpc.AdminStub(secure_channel(f"localhost:{fed.service.port}", creds))


def _bias_delta(coord, shifts: dict[int, float]) -> bytes:
    """A delta that only moves the classifier's output biases (a crafted 'bad' update)."""
    parts = []
    for spec in coord.specs:
        block = np.zeros(spec.numel, np.float32)
        if spec.name == "classifier.bias":
            for cls, shift in shifts.items():
                block[cls] = shift
        parts.append(block)
    return encode_f32le(np.concatenate(parts))


def _start(fed: Federation, server: ServerSection | None = None, **rounds):
    # Plain rounds: these tests craft float32 deltas by hand.
    cfg = fed.aggregator_config(
        server=server or ServerSection(listen="127.0.0.1:0", max_poll_wait_s=2.0),
        rounds=RoundsSection(
            aggregation="plain",
            min_clinics=2,
            start_when_connected=2,
            train_deadline_s=120.0,
            **rounds,
        ),
        plan=PlanSection(delta_clip_norm=0.0),
        # The crafted models below are constant classifiers (chance level); compare with
        # them anyway, as an operator who sets a negative margin would.
        validation=ValidationSection(holdout=fed.holdout, chance_margin=-1.0),
    )
    service = fed.start_aggregator(cfg)
    stubs = raw_clinics(fed, ("clinic-a", "clinic-b"))
    for stub in stubs.values():
        stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    return service, stubs


def _run_round(service, stubs, number: int, payload: bytes) -> None:
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == number, 20), (
        f"round {number} did not start"
    )
    for stub in stubs.values():
        upload(stub, header_for(coord, number), payload)
    assert coord.wait_until(
        lambda: (rec := service.ledger.round(number)) is not None and rec.outcome is not None, 60
    )


def test_forced_melanoma_regression_is_rejected_and_the_published_model_stays(fed):
    service, stubs = _start(fed)
    coord = service.coordinator
    # Round 1: every lesion becomes "melanoma" -> mel sensitivity 1.0; published (the
    # baseline is the untrained model, so only the balanced-accuracy floor applies).
    _run_round(service, stubs, 1, _bias_delta(coord, {MEL: 50.0}))
    r1 = service.ledger.round(1)
    assert r1 is not None and r1.outcome == "published"
    assert r1.metrics["sensitivity"]["mel"] == pytest.approx(1.0)
    published_after_1 = coord.published[0]
    # Round 2: a candidate that never says melanoma -> rejected by the gate.
    _run_round(service, stubs, 2, _bias_delta(coord, {MEL: -100.0, NV: 100.0}))
    r2 = service.ledger.round(2)
    assert r2 is not None and r2.outcome == "rejected"
    assert "mel sensitivity fell" in (r2.reason or "")
    assert r2.metrics["gate"]["verdict"] == "reject"
    assert r2.checkpoint and r2.checkpoint != published_after_1  # kept for inspection
    assert coord.published == (published_after_1, 1)
    # The evidence behind the decision is in the ledger: the paired counts and the test.
    gate = r2.metrics["gate"]
    assert gate["rule"] == "harm"
    mel = gate["checks"]["mel"]
    assert mel["candidate_only"] == 0 and mel["published_only"] == mel["n"] > 0
    assert mel["failed"] and mel["p_value"] < mel["alpha"] and mel["upper"] < 0
    reg = service.registry
    assert reg.get_sample_value("dermafed_rollbacks_total", {"kind": "automatic"}) == 1
    assert reg.get_sample_value("dermafed_rounds_total", {"outcome": "rejected"}) == 1
    assert reg.get_sample_value("dermafed_validation_sensitivity", {"class": "mel"}) == 1.0
    assert (
        reg.get_sample_value("dermafed_gate_decisions_total", {"rule": "harm", "verdict": "reject"})
        == 1
    )
    assert reg.get_sample_value("dermafed_gate_p_value", {"check": "mel"}) == mel["p_value"]
    assert reg.get_sample_value("dermafed_gate_change_bound", {"check": "mel"}) == mel["upper"]
    # The next round starts from round 1's checkpoint: same hash.
    assert coord.wait_until(lambda: coord.running_round() == 3, 20)
    task = stubs["clinic-a"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert task.plan.round == 3 and task.plan.parent_checkpoint == published_after_1


def test_an_impossible_sum_is_rejected_before_any_model_is_formed(fed):
    # Each clinic claims half an example: the summed weight (1.0) is below what two honest
    # clinics can send (2 x validation.min_clinic_weight), whatever the deltas say.
    service, stubs = _start(fed)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 20)
    payload = _bias_delta(coord, {MEL: 1.0})
    for stub in stubs.values():
        upload(stub, header_for(coord, 1, weight=0.5), payload)
    assert coord.wait_until(
        lambda: (rec := service.ledger.round(1)) is not None and rec.outcome is not None, 60
    )
    rec = service.ledger.round(1)
    assert rec is not None and rec.outcome == "rejected"
    assert "sum check 'weight' failed" in (rec.reason or "")
    assert rec.checkpoint is None  # nothing was formed, stored or scored
    assert rec.metrics["sum_checks"]["failed"] == "weight"
    assert "gate" not in rec.metrics and "validate" not in rec.stages
    assert coord.published[1] == 0
    reg = service.registry
    assert reg.get_sample_value("dermafed_sum_check_failures_total", {"check": "weight"}) == 1
    assert round_to_proto(coord.list_rounds(1, 2)[0]).sum_check_failed == "weight"


def test_an_excluded_clinic_is_in_no_cohort_until_included_and_each_change_is_audited(fed):
    service = fed.start_aggregator(
        fed.aggregator_config(
            rounds=RoundsSection(
                aggregation="plain", min_clinics=2, start_when_connected=2, train_deadline_s=60
            ),
            plan=PlanSection(delta_clip_norm=0.0),
        )
    )
    coord = service.coordinator
    stubs = raw_clinics(fed, ("clinic-a", "clinic-b", "clinic-c"))
    stubs["clinic-c"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    admin = _admin(fed, fed.pki.admins["alice"])
    reg = service.registry
    assert reg.get_sample_value(
        "dermafed_clinic_last_seen_timestamp_seconds", {"clinic": "clinic-c"}
    )

    def exclude(clinic: str, excluded: bool, reason: str = "data under review"):
        return admin.SetClinicExcluded(
            admin_pb2.SetClinicExcludedRequest(clinic=clinic, excluded=excluded, reason=reason),
            timeout=5,
        )

    assert exclude("clinic-c", True).was_excluded is False
    # Its polls are refused with the operator's reason; it is listed as excluded.
    with pytest.raises(grpc.RpcError) as err:
        stubs["clinic-c"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "excluded from the federation by its operator (data under review)" in (
        err.value.details() or ""
    )
    clinics = {c.clinic: c for c in admin.ListClinics(admin_pb2.ListClinicsRequest()).clinics}
    assert clinics["clinic-c"].excluded and clinics["clinic-c"].excluded_reason == (
        "data under review"
    )
    # Out of the federation, not silent: its per-clinic series are gone.
    assert (
        reg.get_sample_value("dermafed_clinic_last_seen_timestamp_seconds", {"clinic": "clinic-c"})
        is None
    )
    # The first round's cohort leaves it out.
    for name in ("clinic-a", "clinic-b"):
        stubs[name].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert coord.wait_until(lambda: coord.running_round() == 1, 20)
    rec = service.ledger.round(1)
    assert rec is not None and sorted(rec.cohort) == ["clinic-a", "clinic-b"]
    clinics = {c.clinic: c for c in admin.ListClinics(admin_pb2.ListClinicsRequest()).clinics}
    assert not clinics["clinic-a"].excluded and clinics["clinic-c"].excluded
    admin.AbortRound(admin_pb2.AbortRoundRequest(round=1, reason="test"), timeout=5)
    # Mistakes get the right status and change nothing.
    for clinic, excluded, reason, code in (
        ("clinic-c", True, "again", grpc.StatusCode.FAILED_PRECONDITION),
        ("clinic-a", False, "not excluded", grpc.StatusCode.FAILED_PRECONDITION),
        ("Clinic C!", True, "bad name", grpc.StatusCode.INVALID_ARGUMENT),
        ("clinic-b", True, "  ", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            exclude(clinic, excluded, reason)
        assert err.value.code() == code, (clinic, err.value.details())
    # Included again: it polls and joins cohorts.
    assert exclude("clinic-c", False, "review done").was_excluded is True
    stubs["clinic-c"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    actions = [(e.action, e.detail) for e in service.ledger.audit_log() if "clinic" in e.action]
    assert actions[:2] == [
        ("include_clinic", {"clinic": "clinic-c", "reason": "review done"}),
        ("exclude_clinic", {"clinic": "clinic-c", "reason": "data under review"}),
    ]
    # The ledger carries the state across a restart.
    from aggregator.membership import Membership

    restored = Membership(service.ledger, time.time)
    restored.load()
    assert restored.excluded == {}
    exclude("clinic-b", True, "leaving")
    restored.load()
    assert restored.excluded == {"clinic-b": "leaving"}


def test_the_admin_api_on_its_own_listener_answers_while_clinics_hold_every_slot(fed):
    # server.max_workers = 4 gives the federation port 4 workers and 16 concurrent calls.
    server = ServerSection(
        listen="127.0.0.1:0", admin_listen="127.0.0.1:0", max_workers=4, max_poll_wait_s=15.0
    )
    service = fed.start_aggregator(
        fed.aggregator_config(
            server=server, rounds=RoundsSection(min_clinics=5, start_when_connected=5)
        )
    )
    assert service.admin_port is not None and service.admin_port != service.port
    pki = fed.pki
    creds = channel_credentials(pki.ca_cert, pki.admins["alice"].cert, pki.admins["alice"].key)
    on_admin_port = admin_pb2_grpc.AdminStub(
        secure_channel(f"localhost:{service.admin_port}", creds)
    )
    on_clinic_port = _admin(fed, pki.admins["alice"])
    assert on_admin_port.GetStatus(admin_pb2.GetStatusRequest(), timeout=5).federation
    # The clinic port no longer serves Admin, and the admin port serves nothing else.
    assert (
        code_of(lambda: on_clinic_port.GetStatus(admin_pb2.GetStatusRequest(), timeout=5))
        == grpc.StatusCode.UNIMPLEMENTED
    )
    clinic_creds = channel_credentials(
        pki.ca_cert, pki.clinics["clinic-a"].cert, pki.clinics["clinic-a"].key
    )
    clinic_on_admin_port = secure_channel(f"localhost:{service.admin_port}", clinic_creds)
    assert (
        code_of(
            lambda: federation_pb2_grpc.FederationStub(clinic_on_admin_port).Poll(
                federation_pb2.PollRequest(wait_ms=0), timeout=5
            )
        )
        == grpc.StatusCode.UNIMPLEMENTED
    )
    assert (
        code_of(
            lambda: admin_pb2_grpc.AdminStub(clinic_on_admin_port).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=5
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    # One clinic opens 20 upload streams and sends nothing: the federation port is full ...
    stub = raw_clinics(fed, ("clinic-a",))["clinic-a"]
    release = threading.Event()

    def stalled():
        release.wait(30)
        return
        yield  # a request stream that sends nothing until released

    held = [stub.UploadUpdate.future(stalled(), timeout=30) for _ in range(20)]
    try:
        assert coord_wait(lambda: any(f.done() for f in held), 10), "no stream was refused"
        refused = [f.exception() for f in held if f.done()]
        assert refused and all(
            e is not None and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused
        )
        # ... and the operator is answered all the same.
        status = on_admin_port.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert status.federation == pki.federation
        assert on_admin_port.ListClinics(admin_pb2.ListClinicsRequest(), timeout=5) is not None
    finally:
        release.set()
        for f in held:
            f.cancel()


def test_a_clinic_holds_one_poll_at_a_time_so_others_are_served(fed):
    # 4 workers on the federation port: before, 12 held polls from one clinic parked them
    # all and the other clinic waited for one to time out.
    server = ServerSection(listen="127.0.0.1:0", max_workers=4, max_poll_wait_s=20.0)
    service = fed.start_aggregator(
        fed.aggregator_config(
            server=server, rounds=RoundsSection(min_clinics=5, start_when_connected=5)
        )
    )
    stubs = raw_clinics(fed, ("clinic-a", "clinic-b"))
    held = []
    for _ in range(12):
        held.append(
            stubs["clinic-a"].Poll.future(federation_pb2.PollRequest(wait_ms=20_000), timeout=40)
        )
        time.sleep(0.05)
    try:
        # Each new poll released the one before it: all but the newest answered, empty.
        assert coord_wait(lambda: sum(f.done() for f in held) >= 11, 15)
        assert not held[-1].done()
        for f in held[:-1]:
            assert f.exception() is None and not f.result().HasField("plan")
        # The other clinic is answered (wait 0) while clinic-a still holds its newest poll.
        assert stubs["clinic-b"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
        assert service.registry.get_sample_value(
            "dermafed_clinic_limit_hits_total", {"limit": "held_polls"}
        ) == pytest.approx(11, abs=1)
    finally:
        for f in held:
            f.cancel()


def test_a_clinic_has_one_upload_in_flight_and_cannot_take_the_others_slots(fed):
    service, stubs = _start(fed)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 20)
    payload = _bias_delta(coord, {MEL: 1.0})
    header = header_for(coord, 1)
    release = threading.Event()
    first = stubs["clinic-a"].UploadUpdate.future(
        _header_then_stall(header, release, then=payload), timeout=40
    )
    assert coord_wait(lambda: "clinic-a" in coord.uploads_in_flight(), 10)
    # A second stream from the same clinic is refused at once ...
    with pytest.raises(grpc.RpcError) as err:
        upload(stubs["clinic-a"], header, payload)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has an upload in flight" in (err.value.details() or "")
    assert (
        service.registry.get_sample_value(
            "dermafed_clinic_limit_hits_total", {"limit": "uploads_in_flight"}
        )
        == 1
    )
    # ... while another clinic uploads normally, and the first stream still completes.
    upload(stubs["clinic-b"], header, payload)
    release.set()
    assert first.result(timeout=30) is not None
    assert coord.wait_until(
        lambda: (rec := service.ledger.round(1)) is not None and rec.outcome == "published", 60
    )
    assert sorted(service.ledger.round(1).contributors) == ["clinic-a", "clinic-b"]
    assert coord.uploads_in_flight() == frozenset()


def test_a_stalled_upload_is_cancelled_and_its_slot_freed(fed):
    server = ServerSection(listen="127.0.0.1:0", max_poll_wait_s=2.0, upload_stall_s=1.0)
    service, stubs = _start(fed, server=server)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 20)
    payload = _bias_delta(coord, {MEL: 1.0})
    header = header_for(coord, 1)
    release = threading.Event()
    stalled = stubs["clinic-a"].UploadUpdate.future(_header_then_stall(header, release), timeout=40)
    try:
        # Nothing after the header for upload_stall_s: the stream is cancelled ...
        assert coord_wait(stalled.done, 15), "the stalled upload was not cancelled"
        assert stalled.exception() is not None
        assert stalled.exception().code() == grpc.StatusCode.CANCELLED
        assert coord_wait(lambda: coord.uploads_in_flight() == frozenset(), 5)
        assert (
            service.registry.get_sample_value(
                "dermafed_clinic_limit_hits_total", {"limit": "stalled_upload"}
            )
            == 1
        )
        # ... its slot is free, and the same clinic's next upload goes through.
        upload(stubs["clinic-a"], header, payload)
        upload(stubs["clinic-b"], header, payload)
        assert coord.wait_until(
            lambda: (rec := service.ledger.round(1)) is not None and rec.outcome == "published",
            60,
        )
    finally:
        release.set()


def test_an_upload_in_tiny_chunks_is_refused_and_changes_nothing(fed):
    service, stubs = _start(fed)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 20)
    payload = _bias_delta(coord, {MEL: 1.0})
    header = header_for(coord, 1)
    with pytest.raises(grpc.RpcError) as err:
        upload(stubs["clinic-a"], header, payload, chunk=7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "every chunk but the last must carry at least 65536 bytes" in (err.value.details() or "")
    assert coord.uploads_in_flight() == frozenset()
    # Nothing of it reached the round: the same clinic's proper upload is its first.
    upload(stubs["clinic-a"], header, payload)
    upload(stubs["clinic-b"], header, payload)
    assert coord.wait_until(
        lambda: (rec := service.ledger.round(1)) is not None and rec.outcome == "published", 60
    )


def _header_then_stall(header, release: threading.Event, then: bytes | None = None):
    """An upload stream that sends its header, then nothing until ``release`` (then the
    payload ``then``, if given, or the end of the stream)."""
    yield federation_pb2.UpdateChunk(header=header)
    release.wait(30)
    if then is not None:
        yield federation_pb2.UpdateChunk(data=then)


def coord_wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_admin_rollback_trigger_abort_and_audit(fed):
    service, stubs = _start(fed, max_rounds=2)
    coord = service.coordinator
    _run_round(service, stubs, 1, _bias_delta(coord, {MEL: 1.0}))
    first = coord.published[0]
    _run_round(service, stubs, 2, _bias_delta(coord, {MEL: 0.5}))
    second = coord.published[0]
    assert second != first and coord.running_round() is None  # max_rounds reached
    alice = _admin(fed, fed.pki.admins["alice"])

    resp = alice.Rollback(
        admin_pb2.RollbackRequest(round=1, reason="regression at site B"), timeout=5
    )
    assert (resp.checkpoint, resp.round, resp.changed) == (first, 1, True)
    # Idempotent: the same rollback again changes nothing.
    again = alice.Rollback(admin_pb2.RollbackRequest(round=1), timeout=5)
    assert (again.checkpoint, again.changed) == (first, False)
    status = alice.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
    assert (status.published_round, status.published_checkpoint) == (1, first)
    assert service.registry.get_sample_value("dermafed_rollbacks_total", {"kind": "admin"}) == 1
    pubs = service.ledger.publications()
    assert pubs[-1].kind == "rollback" and pubs[-1].checkpoint == first

    # Trigger a round past max_rounds: it starts from the rolled-back checkpoint.
    alice.TriggerRound(admin_pb2.TriggerRoundRequest(), timeout=5)
    for stub in stubs.values():
        stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert coord.wait_until(lambda: coord.running_round() == 3, 20)
    task = stubs["clinic-a"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert task.plan.parent_checkpoint == first
    err = code_of(lambda: alice.TriggerRound(admin_pb2.TriggerRoundRequest(), timeout=5))
    assert err == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        alice.TriggerRound(admin_pb2.TriggerRoundRequest(), timeout=5)
    assert "round 3" in (info.value.details() or "")
    # Rolling back while a round runs is refused; aborting needs the right number.
    assert (
        code_of(lambda: alice.Rollback(admin_pb2.RollbackRequest(round=2), timeout=5))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        code_of(lambda: alice.AbortRound(admin_pb2.AbortRoundRequest(round=4), timeout=5))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    alice.AbortRound(admin_pb2.AbortRoundRequest(round=3, reason="maintenance"), timeout=5)
    rec = service.ledger.round(3)
    assert rec is not None and rec.outcome == "aborted" and "maintenance" in (rec.reason or "")
    assert coord.published[0] == first

    actions = [(e.actor, e.action) for e in service.ledger.audit_log()]
    uri = fed.pki.admins["alice"].uri
    for action in ("rollback", "trigger_round", "abort_round"):
        assert (uri, action) in actions
    # Listing calls reflect all of it.
    rounds = alice.ListRounds(admin_pb2.ListRoundsRequest(limit=10), timeout=5).rounds
    assert [r.round for r in rounds][:3] == [3, 2, 1]
    ckpts = alice.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=5).checkpoints
    assert {c.id for c in ckpts if c.published} == {first}
    clinics = alice.ListClinics(admin_pb2.ListClinicsRequest(), timeout=5).clinics
    by_name = {c.clinic: c for c in clinics}
    assert by_name["clinic-a"].rounds_contributed == 2 and by_name["clinic-a"].connected


def test_bad_admin_input_is_refused_and_changes_nothing(fed):
    service, stubs = _start(fed, max_rounds=2)
    coord = service.coordinator
    _run_round(service, stubs, 1, _bias_delta(coord, {MEL: 50.0}))
    _run_round(service, stubs, 2, _bias_delta(coord, {MEL: -100.0, NV: 100.0}))  # rejected
    assert service.ledger.round(2).outcome == "rejected"
    alice = _admin(fed, fed.pki.admins["alice"])
    before = (coord.published, len(service.ledger.publications()))

    def rollback(**kw):
        return lambda: alice.Rollback(admin_pb2.RollbackRequest(**kw), timeout=5)

    cases = [
        (rollback(round=99), grpc.StatusCode.NOT_FOUND),
        (rollback(round=2), grpc.StatusCode.INVALID_ARGUMENT),  # rejected candidate
        (rollback(checkpoint=service.ledger.round(2).checkpoint), grpc.StatusCode.INVALID_ARGUMENT),
        (rollback(checkpoint="f" * 64), grpc.StatusCode.NOT_FOUND),
        (rollback(checkpoint="../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT),
        (rollback(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: alice.AbortRound(admin_pb2.AbortRoundRequest(round=0), timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: alice.AbortRound(admin_pb2.AbortRoundRequest(round=1), timeout=5),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),  # nothing running
    ]
    for call, expected in cases:
        assert code_of(call) == expected
    assert (coord.published, len(service.ledger.publications())) == before


ADMIN_CALLS = {
    "GetStatus": lambda s: s.GetStatus(admin_pb2.GetStatusRequest(), timeout=5),
    "TriggerRound": lambda s: s.TriggerRound(admin_pb2.TriggerRoundRequest(), timeout=5),
    "AbortRound": lambda s: s.AbortRound(admin_pb2.AbortRoundRequest(round=1), timeout=5),
    "Rollback": lambda s: s.Rollback(admin_pb2.RollbackRequest(round=0), timeout=5),
    "ListRounds": lambda s: s.ListRounds(admin_pb2.ListRoundsRequest(), timeout=5),
    "ListCheckpoints": lambda s: s.ListCheckpoints(admin_pb2.ListCheckpointsRequest(), timeout=5),
    "ListClinics": lambda s: s.ListClinics(admin_pb2.ListClinicsRequest(), timeout=5),
    "ReloadRevocations": lambda s: s.ReloadRevocations(
        admin_pb2.ReloadRevocationsRequest(), timeout=5
    ),
    "AcknowledgePrivacyReset": lambda s: s.AcknowledgePrivacyReset(
        admin_pb2.AcknowledgePrivacyResetRequest(clinic="clinic-a", reason="test"), timeout=5
    ),
    "SetClinicExcluded": lambda s: s.SetClinicExcluded(
        admin_pb2.SetClinicExcludedRequest(clinic="clinic-z", excluded=False, reason="t"),
        timeout=5,
    ),
    "ListAudit": lambda s: s.ListAudit(admin_pb2.ListAuditRequest(), timeout=5),
}


def test_the_matrix_covers_every_admin_method():
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert set(ADMIN_CALLS) == {m.name for m in service.methods}


def test_authorisation_matrix_for_every_admin_method(fed):
    service = fed.start_aggregator(
        fed.aggregator_config(rounds=RoundsSection(min_clinics=5, start_when_connected=5))
    )
    pki = fed.pki
    revoke(pki.ca_dir, name="mallory")
    service_stubs = {
        "admin": _admin(fed, pki.admins["alice"]),
        "clinic": _admin(fed, pki.clinics["clinic-a"]),
        "aggregator": _admin(fed, pki.aggregator),
        "revoked admin": _admin(fed, pki.admins["mallory"]),
        "foreign CA": _admin(fed, pki.foreign_clinic, ca=pki.foreign_ca_cert),
    }
    expected = {
        "clinic": grpc.StatusCode.PERMISSION_DENIED,
        "aggregator": grpc.StatusCode.PERMISSION_DENIED,
        "revoked admin": grpc.StatusCode.UNAUTHENTICATED,
        "foreign CA": grpc.StatusCode.UNAVAILABLE,  # the TLS handshake itself fails
    }
    time.sleep(0.6)  # the CRL is re-read at most every 0.5 s
    for method, call in ADMIN_CALLS.items():
        for who, stub in service_stubs.items():
            try:
                call(stub)
                got = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                got = exc.code()
            if who == "admin":
                # Authorised: any answer but an authentication/authorisation failure.
                assert got not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAVAILABLE,
                ), (method, got)
            else:
                assert got == expected[who], (method, who, got)
    denied = service.registry.get_sample_value(
        "dermafed_rejected_requests_total", {"method": "Rollback", "code": "PERMISSION_DENIED"}
    )
    assert denied == 2


def test_admin_cli_tables_and_json(fed, capsys, tmp_path):
    from dermafed.cli import main

    service, stubs = _start(fed, max_rounds=1)
    _run_round(service, stubs, 1, _bias_delta(service.coordinator, {MEL: 1.0}))
    cfg = fed.write_admin_toml(tmp_path / "admin.toml")
    assert main(["admin", "--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "published          round 1" in out
    assert main(["admin", "--config", str(cfg), "rounds"]) == 0
    out = capsys.readouterr().out
    assert "round" in out.splitlines()[0] and "published" in out
    # The evidence behind a gate decision, one test per line.
    assert main(["admin", "--config", str(cfg), "gate", "1"]) == 0
    out = capsys.readouterr().out
    assert "gate               accept" in out and "balanced_accuracy" in out
    assert main(["admin", "--config", str(cfg), "gate", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gate"] == "accept"
    assert main(["admin", "--config", str(cfg), "gate", "9"]) == 2
    assert "no round 9" in capsys.readouterr().err
    assert main(["admin", "--config", str(cfg), "--json", "clinics"]) == 0
    clinics = json.loads(capsys.readouterr().out)["clinics"]
    assert {c["clinic"] for c in clinics} == {"clinic-a", "clinic-b"}
    assert main(["admin", "--config", str(cfg), "exclude", "clinic-b", "--reason", "moving"]) == 0
    assert "clinic excluded" in capsys.readouterr().out
    assert main(["admin", "--config", str(cfg), "clinics"]) == 0
    assert "EXCLUDED: moving" in capsys.readouterr().out
    assert main(["admin", "--config", str(cfg), "include", "clinic-b", "--reason", "back"]) == 0
    assert "included again" in capsys.readouterr().out
    assert main(["admin", "--config", str(cfg), "include", "clinic-b", "--reason", "x"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    # The audit log shows who did what, newest first, with the reasons.
    assert main(["admin", "--config", str(cfg), "audit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["when", "actor", "action", "detail"]
    assert "include_clinic" in lines[1] and '"reason": "back"' in lines[1]
    assert "spiffe://" in lines[1] and "/admin/alice" in lines[1]
    assert "exclude_clinic" in lines[2] and "moving" in lines[2]
    assert main(["admin", "--config", str(cfg), "audit", "--limit", "1", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert len(entries) == 1 and entries[0]["action"] == "include_clinic"
    # --json after the action, too.
    assert main(["admin", "--config", str(cfg), "clinics", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clinics"]
    # The 12 characters `rounds` shows are enough to roll back to a checkpoint.
    status = json.loads(
        (main(["admin", "--config", str(cfg), "--json", "status"]), capsys.readouterr().out)[1]
    )
    published = status["published_checkpoint"]
    assert main(["admin", "--config", str(cfg), "rollback", "--round", "0"]) == 0
    assert "again" in capsys.readouterr().out
    code = main(["admin", "--config", str(cfg), "rollback", "--checkpoint", published[:12]])
    assert code == 0
    assert f"published checkpoint {published[:16]}" in capsys.readouterr().out
    assert main(["admin", "--config", str(cfg), "rollback", "--checkpoint", "zzzz"]) == 2
    assert "no checkpoint id starts with 'zzzz'" in capsys.readouterr().err
    assert main(["admin", "--config", str(cfg), "rollback", "--round", "77"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["admin", "--config", str(cfg), "abort", "-3"]) == 2
    assert "must be" in capsys.readouterr().err


def test_a_refused_crl_reload_fails_loudly_and_keeps_the_old_list(fed, capsys, tmp_path):
    """Before, ReloadRevocations answered success when the new CRL was refused."""
    from dermafed.cli import main

    service = fed.start_aggregator()
    pki = fed.pki
    revoke(pki.ca_dir, name="mallory")
    alice = _admin(fed, pki.admins["alice"])
    assert alice.ReloadRevocations(admin_pb2.ReloadRevocationsRequest(), timeout=5).revoked == 1

    good = pki.crl.read_bytes()
    pki.crl.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    with pytest.raises(grpc.RpcError) as err:
        alice.ReloadRevocations(admin_pb2.ReloadRevocationsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the CRL was refused" in err.value.details()
    assert "the previous 1 revocation(s) stay in force" in err.value.details()
    # Still revoked: a bad file never un-revokes anyone.
    mallory = _admin(fed, pki.admins["mallory"])
    assert code_of(lambda: mallory.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    audit = [a.action for a in service.ledger.audit_log()]
    assert "reload_revocations_refused" in audit

    cfg = fed.write_admin_toml(tmp_path / "admin.toml")
    assert main(["admin", "--config", str(cfg), "reload-revocations"]) == 1
    err_line = capsys.readouterr().err.strip()
    assert err_line.startswith("dermafed admin: FAILED_PRECONDITION: the CRL was refused")
    assert "\n" not in err_line

    pki.crl.write_bytes(good)
    assert main(["admin", "--config", str(cfg), "reload-revocations"]) == 0

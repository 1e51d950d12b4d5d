"""End-to-end federation over mutual TLS: real aggregator, real agents, real images."""

from __future__ import annotations

import hashlib
import math
import time

import grpc
import numpy as np
import pytest
from federation_harness import CLINICS, Federation
from federation_harness import code_of as _code
from federation_harness import header_for as _header
from federation_harness import raw_clinics as _raw_clinics
from federation_harness import upload as _upload

from common.pki import revoke
from common.tensors import encode_f32le
from common.tls import channel_credentials, secure_channel
from dermafed.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc


def test_three_clinics_train_over_mtls_and_every_checkpoint_is_on_disk(federation: Federation):
    service = federation.start_aggregator()
    initial, _ = service.coordinator.published
    for name in CLINICS:
        federation.start_agent(name)
    federation.wait_rounds(2)
    ledger = service.ledger
    rounds = sorted(ledger.rounds(limit=10), key=lambda r: r.number)[:2]
    assert [r.outcome for r in rounds] == ["published", "published"]
    assert rounds[0].parent == initial and rounds[1].parent == rounds[0].checkpoint
    for rec in rounds:
        assert sorted(rec.contributors) == list(CLINICS)
        # Secure aggregation is the default: only the cohort's weighted mean loss is revealed.
        assert rec.mode == "secure"
        assert rec.train_loss is not None and math.isfinite(rec.train_loss)
        stages = {"advertise", "share_keys", "masked_input", "consistency", "unmask"}
        assert stages | {"local_training", "aggregate", "validate"} <= set(rec.stages)
        assert rec.metrics is not None and 0.0 <= rec.metrics["balanced_accuracy"] <= 1.0
        assert "mel" in rec.metrics["sensitivity"]
        # Content-addressed, complete, and loadable without executing anything.
        data = service.coordinator.store.read(rec.checkpoint)
        assert hashlib.sha256(data).hexdigest() == rec.checkpoint
    assert rounds[1].checkpoint != initial
    events = ledger.clinic_events(round=1)
    assert {e.clinic for e in events if e.event == "contributed"} == set(CLINICS)
    # The agents really trained on their shard and report it.
    for name in CLINICS:
        registry = federation.agents[name].registry
        assert (
            registry.get_sample_value("dermafed_agent_rounds_total", {"result": "contributed"}) >= 2
        )
        assert registry.get_sample_value("dermafed_agent_local_examples") > 0
    reg = service.registry
    assert reg.get_sample_value("dermafed_rounds_total", {"outcome": "published"}) >= 2
    assert reg.get_sample_value("dermafed_received_bytes_total", {"kind": "update"}) > 0


def test_a_vanished_agent_is_dropped_and_the_round_completes_with_the_rest(federation):
    from aggregator.config import RoundsSection

    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2,
            start_when_connected=3,
            train_deadline_s=8.0,
            max_rounds=1,
            secagg_stage_deadline_s=8.0,
        )
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        federation.start_agent(name)
    coord = service.coordinator
    # Kill clinic-c as soon as the round starts: it never uploads.
    assert coord.wait_until(lambda: coord.running_round() is not None, 30)
    federation.agents["clinic-c"].agent.stop_event.set()
    federation.agents["clinic-c"].agent.client.close()
    federation.wait_rounds(1, timeout=90)
    rec = service.ledger.round(1)
    assert rec is not None and rec.outcome in ("published",)
    events = {(e.clinic, e.event) for e in service.ledger.clinic_events(round=1)}
    if ("clinic-c", "contributed") not in events:
        assert ("clinic-c", "dropped") in events
        assert sorted(rec.contributors) == ["clinic-a", "clinic-b"]


def test_round_below_the_minimum_aborts_and_the_next_starts_from_the_last_published(federation):
    from aggregator.config import RoundsSection

    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            aggregation="plain",
            min_clinics=3,
            start_when_connected=3,
            train_deadline_s=4.0,
            connected_timeout_s=2.0,
            retry_after_abort_s=1.0,
        )
    )
    service = federation.start_aggregator(cfg)
    initial, _ = service.coordinator.published
    channels = _raw_clinics(federation, CLINICS)
    # All three poll (so a round starts), but nobody uploads: the round must abort.
    for stub in channels.values():
        stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 10)
    assert coord.wait_until(lambda: coord.status().rounds_completed >= 1, 30)
    rec = service.ledger.round(1)
    assert rec is not None and rec.outcome == "aborted" and "minimum is 3" in (rec.reason or "")
    assert coord.published[0] == initial
    # Next round: same parent as before the aborted one.
    for stub in channels.values():
        stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert coord.wait_until(lambda: coord.running_round() == 2, 10)
    task = channels["clinic-a"].Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    assert task.kind == federation_pb2.PollResponse.TRAIN
    assert task.plan.parent_checkpoint == initial


# -- malformed uploads ------------------------------------------------------------------


@pytest.fixture
def open_round(federation):
    from aggregator.config import PlanSection, RoundsSection

    cfg = federation.aggregator_config(
        # Plain rounds: these tests craft float32 uploads by hand.
        rounds=RoundsSection(
            aggregation="plain", min_clinics=2, start_when_connected=2, train_deadline_s=120.0
        ),
        plan=PlanSection(delta_clip_norm=0.0),  # unclipped: the uploads are crafted
    )
    service = federation.start_aggregator(cfg)
    stubs = _raw_clinics(federation, ("clinic-a", "clinic-b"))
    for stub in stubs.values():
        stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    coord = service.coordinator
    assert coord.wait_until(lambda: coord.running_round() == 1, 10)
    return service, stubs


def _responded(service) -> set[str]:
    with service.coordinator._cond:
        running = service.coordinator._running
        return set(running.state.responded) if running else set()


def test_malformed_uploads_get_the_right_status_and_leave_the_round_unchanged(open_round):
    service, stubs = open_round
    coord = service.coordinator
    stub = stubs["clinic-a"]
    numel = sum(s.numel for s in coord.specs)
    good = encode_f32le(np.zeros(numel, np.float32))

    bad_name = _header(coord, 1)
    bad_name.tensors[0].name = "evil"
    bad_shape = _header(coord, 1)
    bad_shape.tensors[0].shape[0] += 1
    bad_dtype = _header(coord, 1)
    bad_dtype.tensors[0].dtype = "float64"
    nan = np.zeros(numel, np.float32)
    nan[5] = np.nan
    inf = np.zeros(numel, np.float32)
    inf[-1] = np.inf
    cases = [
        ("wrong tensor name", bad_name, good, grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong shape", bad_shape, good, grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong dtype", bad_dtype, good, grpc.StatusCode.INVALID_ARGUMENT),
        ("NaN", _header(coord, 1), encode_f32le(nan), grpc.StatusCode.INVALID_ARGUMENT),
        ("Inf", _header(coord, 1), encode_f32le(inf), grpc.StatusCode.INVALID_ARGUMENT),
        ("short payload", _header(coord, 1), good[:-4], grpc.StatusCode.INVALID_ARGUMENT),
        ("long payload", _header(coord, 1), good + b"\0" * 4, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "over the size limit",
            _header(coord, 1, total_bytes=10**12),
            good,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        ("negative weight", _header(coord, 1, weight=-1.0), good, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "NaN weight",
            _header(coord, 1, weight=float("nan")),
            good,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("stale round", _header(coord, 0), good, grpc.StatusCode.FAILED_PRECONDITION),
        ("future round", _header(coord, 7), good, grpc.StatusCode.FAILED_PRECONDITION),
        (
            "wrong encoding",
            _header(coord, 1, encoding="pickle"),
            good,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for label, header, payload, expected in cases:
        got = _code(lambda h=header, p=payload: _upload(stub, h, p))
        assert got == expected, f"{label}: got {got}, expected {expected}"
        assert _responded(service) == set(), f"{label} changed the round state"

    # A stream that does not start with a header.
    got = _code(
        lambda: stub.UploadUpdate(iter([federation_pb2.UpdateChunk(data=b"x")]), timeout=10)
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT

    # The good upload is accepted once; the same clinic again is ALREADY_EXISTS.
    receipt = _upload(stub, _header(coord, 1), good)
    assert receipt.bytes_received == len(good)
    assert _responded(service) == {"clinic-a"}
    assert _code(lambda: _upload(stub, _header(coord, 1), good)) == grpc.StatusCode.ALREADY_EXISTS
    assert _responded(service) == {"clinic-a"}


def test_a_clinic_outside_the_cohort_cannot_upload(open_round, federation):
    service, _ = open_round
    outsider = _raw_clinics(federation, ("clinic-c",))["clinic-c"]
    numel = sum(s.numel for s in service.coordinator.specs)
    good = encode_f32le(np.zeros(numel, np.float32))
    got = _code(lambda: _upload(outsider, _header(service.coordinator, 1), good))
    assert got == grpc.StatusCode.PERMISSION_DENIED
    assert _responded(service) == set()


def test_plain_fedavg_is_weighted_by_sample_count(open_round):
    service, stubs = open_round
    coord = service.coordinator
    numel = sum(s.numel for s in coord.specs)
    before = coord.published_state()
    _upload(
        stubs["clinic-a"],
        _header(coord, 1, weight=30.0),
        encode_f32le(np.full(numel, 1.0, np.float32)),
    )
    _upload(
        stubs["clinic-b"],
        _header(coord, 1, weight=10.0),
        encode_f32le(np.full(numel, -1.0, np.float32)),
    )
    assert coord.wait_until(lambda: coord.published[1] == 1, 60)
    after = coord.published_state()
    for name in before:
        diff = (after[name] - before[name]).numpy()  # type: ignore[union-attr]
        np.testing.assert_allclose(diff, 0.5, atol=1e-6)  # (30*1 + 10*-1) / 40


# -- identity and authorisation against the real aggregator -------------------------------


def test_identity_checks_on_the_real_service(federation):
    service = federation.start_aggregator()
    target = f"localhost:{service.port}"
    pki = federation.pki

    def poll_as(cert, key, ca=pki.ca_cert):
        channel = secure_channel(target, channel_credentials(ca, cert, key))
        try:
            federation_pb2_grpc.FederationStub(channel).Poll(
                federation_pb2.PollRequest(wait_ms=0), timeout=5
            )
        finally:
            channel.close()

    poll_as(*pki.clinics["clinic-a"])  # works
    # No TLS at all, and TLS without a client certificate: refused at the handshake.
    plain = grpc.insecure_channel(target)
    assert (
        _code(
            lambda: federation_pb2_grpc.FederationStub(plain).Poll(
                federation_pb2.PollRequest(), timeout=5
            )
        )
        == grpc.StatusCode.UNAVAILABLE
    )
    no_cert = grpc.secure_channel(target, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes()))
    assert (
        _code(
            lambda: federation_pb2_grpc.FederationStub(no_cert).Poll(
                federation_pb2.PollRequest(), timeout=5
            )
        )
        == grpc.StatusCode.UNAVAILABLE
    )
    # A certificate from another CA, and an expired one.
    assert _code(lambda: poll_as(*pki.foreign_clinic)) == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: poll_as(*pki.expired_clinic)) == grpc.StatusCode.UNAVAILABLE
    # A clinic calling an admin method; an admin calling a clinic method.
    clinic_channel = secure_channel(
        target, channel_credentials(pki.ca_cert, *pki.clinics["clinic-b"])
    )
    assert (
        _code(
            lambda: admin_pb2_grpc.AdminStub(clinic_channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=5
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert _code(lambda: poll_as(*pki.admins["alice"])) == grpc.StatusCode.PERMISSION_DENIED
    # Revocation takes effect without a restart, even on an open connection.
    stub = federation_pb2_grpc.FederationStub(clinic_channel)
    stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
    revoke(pki.ca_dir, name="clinic-b")
    # The CRL file is re-checked at most every 0.5 s; within a few seconds calls must fail.
    deadline = time.monotonic() + 5
    got = None
    while time.monotonic() < deadline and got != grpc.StatusCode.UNAUTHENTICATED:
        try:
            stub.Poll(federation_pb2.PollRequest(wait_ms=0), timeout=5)
            time.sleep(0.1)
        except grpc.RpcError as exc:
            got = exc.code()
    assert got == grpc.StatusCode.UNAUTHENTICATED
    poll_as(*pki.clinics["clinic-a"])  # others unaffected
    assert (
        service.registry.get_sample_value(
            "dermafed_rejected_requests_total", {"method": "Poll", "code": "UNAUTHENTICATED"}
        )
        >= 1
    )


def test_download_refuses_unknown_and_malformed_checkpoint_ids(federation):
    service = federation.start_aggregator()
    stub = _raw_clinics(federation, ("clinic-a",))["clinic-a"]
    published, _ = service.coordinator.published

    def download(cid):
        return b"".join(
            c.data
            for c in stub.DownloadCheckpoint(
                federation_pb2.DownloadCheckpointRequest(checkpoint=cid), timeout=10
            )
        )

    assert hashlib.sha256(download(published)).hexdigest() == published
    assert _code(lambda: download("0" * 64)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: download("../../etc/passwd")) == grpc.StatusCode.INVALID_ARGUMENT


def test_agent_picks_up_new_cases_between_rounds_without_restart(federation, tmp_path):
    import shutil

    from aggregator.config import RoundsSection
    from clinic_agent.config import DataSection
    from common.datasets import load_records

    records = load_records(federation.shards["clinic-a"])
    folder = tmp_path / "clinic-a-images"
    first, later = records[: len(records) // 2], records[len(records) // 2 :]

    def add(batch):
        for rec in batch:
            (folder / rec.dx).mkdir(parents=True, exist_ok=True)
            shutil.copy(rec.path, folder / rec.dx / f"{rec.lesion_id}__{rec.image_id}.jpg")

    add(first)
    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            aggregation="plain", min_clinics=1, start_when_connected=1, train_deadline_s=60.0
        )
    )
    service = federation.start_aggregator(cfg)
    agent = federation.start_agent(
        "clinic-a", federation.clinic_config("clinic-a", data=DataSection(folder))
    )
    federation.wait_rounds(1)
    assert agent.registry.get_sample_value("dermafed_agent_local_examples") == len(first)
    add(later)  # new cases arrive while the agent runs
    # The round running now may have read the folder before the copy; the one after it
    # certainly starts after it.
    done = service.coordinator.status().rounds_completed
    federation.wait_rounds(done + 2)
    assert agent.registry.get_sample_value("dermafed_agent_local_examples") == len(records)


def test_certificates_rotate_without_dropping_the_federation(federation):
    """A clinic's certificate is re-issued and the old one revoked while everything runs."""
    from aggregator.config import RoundsSection
    from clinic_agent.privacy import PrivacyConfig
    from common import pki as pki_ops

    cfg = federation.aggregator_config(
        rounds=RoundsSection(
            min_clinics=2,
            start_when_connected=3,
            train_deadline_s=60.0,
            secagg_stage_deadline_s=15.0,
        )
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        # A budget that lasts: the round running when the rotation lands may go on without
        # clinic-a, and the next one must still fit the clinics' ε.
        config = federation.clinic_config(name, privacy=PrivacyConfig(epsilon_max=1000.0))
        federation.start_agent(name, config)
    federation.wait_rounds(1)
    old = federation.pki.clinics["clinic-a"]
    fresh, revoked = pki_ops.renew(federation.pki.ca_dir, "clinic", "clinic-a", old.cert.parent)
    assert fresh.serial != old.serial == revoked and fresh.cert_path == old.cert
    rotated_after = service.ledger.next_round_number() - 1
    coord = service.coordinator

    def clinic_a_contributed_again() -> bool:
        # A round that raced the rotation may go on without clinic-a (its poll was refused
        # once); what matters is that a later round publishes with clinic-a on its new key.
        return any(
            r.number > rotated_after and r.outcome == "published" and "clinic-a" in r.contributors
            for r in service.ledger.rounds(limit=10)
        )

    assert coord.wait_until(clinic_a_contributed_again, 240), [
        (r.number, r.outcome, r.contributors, r.reason) for r in service.ledger.rounds(limit=6)
    ]
    rejected = (
        service.registry.get_sample_value(
            "dermafed_rejected_requests_total", {"method": "Poll", "code": "UNAUTHENTICATED"}
        )
        or 0
    )
    # At most a poll or two raced the rotation; the agent reconnected with the new files.
    assert rejected <= 3


def test_health_reports_serving_and_reflection_is_opt_in(federation):
    """Kubernetes-style health checks, and server reflection only when configured."""
    from dataclasses import replace as dc_replace

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def channel():
        pair = federation.pki.clinics["clinic-a"]
        creds = channel_credentials(federation.pki.ca_cert, pair.cert, pair.key)
        return secure_channel(f"localhost:{federation.service.port}", creds)

    service = federation.start_aggregator()
    ch = channel()
    status = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="dermafed.v1.Federation"), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        list(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    ch.close()
    service.stop(grace=1.0)
    federation.service = None

    cfg = federation.aggregator_config()
    federation.start_aggregator(
        dc_replace(
            cfg,
            server=dc_replace(cfg.server, reflection=True),
            storage=dc_replace(cfg.storage, state_dir=federation.tmp / "second-state"),
        )
    )
    ch = channel()
    services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"dermafed.v1.Federation", "dermafed.v1.Admin", "grpc.health.v1.Health"} <= services
    ch.close()

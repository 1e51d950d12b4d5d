"""A clinic's spent epsilon can only go up, as the aggregator sees it.

Before, restarting a clinic with a new state_dir and the same certificate took the
aggregator's clinics table from epsilon spent 10.02 to 0.00, and the clinic kept training
on a budget it had already spent. Now the aggregator keeps, per certificate identity, the
highest epsilon reported, refuses a lower report with FAILED_PRECONDITION and an alert
metric, and serves the clinic again only when the report is back up (the right ledger
was restored) or an admin acknowledges the reset with a reason, which is audited.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from federation_harness import CLINICS, Federation, code_of, raw_clinics

from aggregator.config import PlanSection, RoundsSection
from common.tls import channel_credentials, secure_channel
from dermafed.v1 import admin_pb2, admin_pb2_grpc, federation_pb2


def _poll(stub, spent: float, eps_max: float = 20.0):
    report = federation_pb2.PrivacyReport(
        status="dp-sgd", epsilon_spent=spent, epsilon_max=eps_max, delta=1e-5
    )
    return stub.Poll(federation_pb2.PollRequest(wait_ms=0, privacy=report), timeout=10)


def _admin(fed: Federation) -> admin_pb2_grpc.AdminStub:
    assert fed.service is not None
    creds = channel_credentials(fed.pki.ca_cert, *fed.pki.admins["alice"])
    return admin_pb2_grpc.AdminStub(secure_channel(f"localhost:{fed.service.port}", creds))


def _clinic_row(admin, clinic: str):
    rows = admin.ListClinics(admin_pb2.ListClinicsRequest(), timeout=5).clinics
    return next(c for c in rows if c.clinic == clinic)


def _reset_gauge(fed: Federation, clinic: str) -> float | None:
    assert fed.service is not None
    return fed.service.registry.get_sample_value(
        "dermafed_clinic_privacy_reset", {"clinic": clinic}
    )


def _restart(fed: Federation) -> None:
    assert fed.service is not None
    fed.service.stop(grace=0.5)
    fed.service = None
    fed.start_aggregator(fed.aggregator_config(rounds=RoundsSection(start_when_connected=9)))


def test_a_lower_report_is_refused_across_restarts_until_an_admin_acknowledges(
    federation: Federation,
):
    federation.start_aggregator(
        federation.aggregator_config(rounds=RoundsSection(start_when_connected=9))
    )
    stubs = raw_clinics(federation, ["clinic-a", "clinic-b"])
    _poll(stubs["clinic-a"], 10.02)
    _poll(stubs["clinic-a"], 9.0 + 1.02)  # the same value again: fine
    _poll(stubs["clinic-b"], 3.5)

    _restart(federation)  # the floor is in the ledger, not in memory
    stubs = raw_clinics(federation, ["clinic-a", "clinic-b"])
    with pytest.raises(grpc.RpcError) as err:
        _poll(stubs["clinic-a"], 0.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reports epsilon spent 0, below the 10.02 it reported before" in err.value.details()
    assert "dermafed admin ack-privacy-reset clinic-a" in err.value.details()
    assert _reset_gauge(federation, "clinic-a") == 1
    service = federation.service
    assert service is not None
    assert "clinic-a" not in service.coordinator.status().connected
    events = [e.event for e in service.ledger.clinic_events(clinic="clinic-a")]
    assert events.count("privacy_reset") == 1
    # Refused again on every poll, but recorded once (a polling clinic cannot flood it).
    assert code_of(lambda: _poll(stubs["clinic-a"], 0.0)) == grpc.StatusCode.FAILED_PRECONDITION
    events = [e.event for e in service.ledger.clinic_events(clinic="clinic-a")]
    assert events.count("privacy_reset") == 1

    admin = _admin(federation)
    row = _clinic_row(admin, "clinic-a")
    assert row.privacy_reset and row.epsilon_floor == pytest.approx(10.02)
    assert not _clinic_row(admin, "clinic-b").privacy_reset

    def ack(clinic: str, reason: str):
        return admin.AcknowledgePrivacyReset(
            admin_pb2.AcknowledgePrivacyResetRequest(clinic=clinic, reason=reason), timeout=5
        )

    assert code_of(lambda: ack("clinic-a", "  ")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: ack("clinic-b", "typo")) == grpc.StatusCode.FAILED_PRECONDITION
    clinic_stub = admin_pb2_grpc.AdminStub(
        secure_channel(
            f"localhost:{service.port}",
            channel_credentials(federation.pki.ca_cert, *federation.pki.clinics["clinic-a"]),
        )
    )
    # A clinic cannot acknowledge its own reset.
    assert code_of(
        lambda: clinic_stub.AcknowledgePrivacyReset(
            admin_pb2.AcknowledgePrivacyResetRequest(clinic="clinic-a", reason="me"), timeout=5
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    assert code_of(lambda: _poll(stubs["clinic-a"], 0.0)) == grpc.StatusCode.FAILED_PRECONDITION

    resp = ack("clinic-a", "disk replaced; old ledger lost, spending 10.02 carried by hand")
    assert (resp.previous_floor, resp.new_floor) == (pytest.approx(10.02), 0.0)
    _poll(stubs["clinic-a"], 0.0)
    assert _reset_gauge(federation, "clinic-a") == 0
    audit = service.ledger.audit_log()[0]
    assert audit.action == "acknowledge_privacy_reset"
    assert audit.actor.endswith("/admin/alice")
    assert audit.detail["reason"].startswith("disk replaced")
    assert audit.detail["from"] == pytest.approx(10.02)
    # From here the floor rises again with the clinic's new reports.
    _poll(stubs["clinic-a"], 1.0)
    assert code_of(lambda: _poll(stubs["clinic-a"], 0.5)) == grpc.StatusCode.FAILED_PRECONDITION


def test_restoring_the_right_ledger_lifts_the_refusal_by_itself(federation: Federation):
    federation.start_aggregator(
        federation.aggregator_config(rounds=RoundsSection(start_when_connected=9))
    )
    stub = raw_clinics(federation, ["clinic-a"])["clinic-a"]
    _poll(stub, 4.0)
    assert code_of(lambda: _poll(stub, 1.0)) == grpc.StatusCode.FAILED_PRECONDITION
    _poll(stub, 4.0)  # the operator put the clinic's real ledger back
    assert _reset_gauge(federation, "clinic-a") == 0
    assert federation.service is not None
    assert "clinic-a" in federation.service.coordinator.status().connected


def test_a_real_agent_restarted_with_a_fresh_state_dir_stops_and_says_why(
    federation: Federation, tmp_path: Path
):
    cfg = federation.aggregator_config(
        rounds=RoundsSection(min_clinics=2, start_when_connected=3, max_rounds=1),
        plan=PlanSection(local_epochs=1, batch_size=8),
    )
    service = federation.start_aggregator(cfg)
    for name in CLINICS:
        federation.start_agent(name)
    federation.wait_rounds(1, timeout=180)
    coord = service.coordinator
    spent_key = {"clinic": "clinic-a"}
    assert coord.wait_until(
        lambda: (
            (service.registry.get_sample_value("dermafed_clinic_epsilon_spent", spent_key) or 0) > 0
        ),
        15,
    )
    spent = service.ledger.privacy_floors()["clinic-a"]
    assert spent > 0
    federation.agents.pop("clinic-a").stop()

    # The same certificate, a new state_dir: an empty privacy ledger.
    clinic_toml = federation.write_clinic_toml(
        tmp_path / "clinic-a.toml",
        "clinic-a",
        tmp_path / "clinic-a-new-state",
        address=f"localhost:{service.port}",
        network={"poll_wait_s": 1.0},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dermafed.cli", "agent", "run", "--config", str(clinic_toml)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dermafed: error: refusing to run: clinic clinic-a reports epsilon")
    assert "ack-privacy-reset clinic-a" in last and "then start the agent again" in last
    assert "Traceback" not in proc.stderr
    assert _reset_gauge(federation, "clinic-a") == 1
    assert "clinic-a" not in coord.status().connected
    row = next(v for v in coord.list_clinics() if v.clinic == "clinic-a")
    assert row.privacy_reset and row.epsilon_floor == pytest.approx(spent)


@pytest.mark.parametrize("status", ["off", "ledger_error"])
def test_reports_without_accounting_neither_trip_nor_move_the_floor(
    federation: Federation, status: str
):
    federation.start_aggregator(
        federation.aggregator_config(rounds=RoundsSection(start_when_connected=9))
    )
    stub = raw_clinics(federation, ["clinic-a"])["clinic-a"]
    _poll(stub, 4.0)
    report = federation_pb2.PrivacyReport(status=status, epsilon_spent=0.0)
    stub.Poll(federation_pb2.PollRequest(wait_ms=0, privacy=report), timeout=10)
    assert federation.service is not None
    assert federation.service.ledger.privacy_floors() == {"clinic-a": 4.0}
    assert code_of(lambda: _poll(stub, 1.0)) == grpc.StatusCode.FAILED_PRECONDITION

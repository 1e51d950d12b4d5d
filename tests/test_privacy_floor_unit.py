"""aggregator.privacy_floor on a real ledger, without gRPC: the rule and its bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from aggregator.domain import PrivacyReport
from aggregator.ledger import Ledger
from aggregator.metrics import AggregatorMetrics
from aggregator.privacy_floor import PrivacyFloor
from common.errors import InvalidArgumentError, PreconditionError, PrivacyResetError


def _report(spent: float, status: str = "dp-sgd") -> PrivacyReport:
    return PrivacyReport(status, spent, 8.0, 1e-5)


@pytest.fixture
def floor(tmp_path: Path):
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        rule = PrivacyFloor(ledger, AggregatorMetrics(CollectorRegistry()), lambda: 100.0)
        rule.load()
        yield rule, ledger


def test_the_floor_rises_with_reports_and_survives_a_reload(floor):
    rule, ledger = floor
    for spent in (1.0, 3.0, 2.9999999999):  # the last: accountant float noise, not a reset
        rule.check("clinic-a", _report(spent))
        rule.record("clinic-a", _report(spent))
    again = PrivacyFloor(ledger, AggregatorMetrics(CollectorRegistry()), lambda: 101.0)
    again.load()
    assert again.floors == {"clinic-a": 3.0}
    with pytest.raises(PrivacyResetError, match="below the 3 it reported before"):
        again.check("clinic-a", _report(0.0))
    assert again.is_refused("clinic-a")


def test_acknowledging_needs_a_reason_and_a_refused_clinic(floor):
    rule, ledger = floor
    rule.record("clinic-a", _report(3.0))
    with pytest.raises(PreconditionError, match="not refused"):
        rule.acknowledge("clinic-a", "why", "admin")
    with pytest.raises(PrivacyResetError):
        rule.check("clinic-a", _report(0.5))
    with pytest.raises(InvalidArgumentError, match="reason is required"):
        rule.acknowledge("clinic-a", " ", "admin")
    assert rule.acknowledge("clinic-a", "disk lost", "admin") == (3.0, 0.5)
    assert not rule.is_refused("clinic-a")
    rule.check("clinic-a", _report(0.5))
    assert ledger.audit_log(limit=1)[0].detail["reason"] == "disk lost"

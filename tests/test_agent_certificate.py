"""An agent whose certificate cannot work stops with one line instead of retrying forever.

Before, a revoked agent retried and logged forever, and an expired one showed only
"Socket closed"; under systemd neither ever told the operator it had given up.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from federation_harness import Federation
from prometheus_client import CollectorRegistry

from clinic_agent.config import NetworkSection
from clinic_agent.config import TlsSection as AgentTls
from clinic_agent.daemon import ClinicAgent
from clinic_agent.metrics import AgentMetrics
from common.errors import ConfigError
from common.identity import IdentityError
from common.pki import revoke


def test_an_expired_certificate_stops_the_agent_at_start(federation: Federation):
    federation.start_aggregator()
    pki = federation.pki
    expired = pki.expired_clinic
    cfg = federation.clinic_config("clinic-a")
    cfg = replace(cfg, tls=AgentTls(pki.ca_cert, expired.cert, expired.key))
    with pytest.raises(IdentityError, match=r"tls.cert .* expired at .*renew it"):
        ClinicAgent(cfg, metrics=AgentMetrics(CollectorRegistry()))


def test_a_revoked_agent_gives_up_after_the_configured_time(federation: Federation):
    federation.start_aggregator()
    pki = federation.pki
    revoke(pki.ca_dir, name="clinic-a")
    cfg = federation.clinic_config("clinic-a")
    cfg = replace(cfg, network=replace(cfg.network, give_up_unauthenticated_s=1.5))
    agent = ClinicAgent(cfg, metrics=AgentMetrics(CollectorRegistry()))
    started = time.monotonic()
    try:
        with pytest.raises(IdentityError, match="refused this clinic's certificate for 2s"):
            agent.run()
    finally:
        agent.close()
    assert time.monotonic() - started < 60


def test_the_give_up_time_must_be_positive():
    with pytest.raises(ConfigError, match="give_up_unauthenticated_s"):
        NetworkSection(give_up_unauthenticated_s=0).validate()

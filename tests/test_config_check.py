"""`dermafed config check`: README's examples against the shipped units, and TLS identity.

Before, README's agent example path was not writable under the shipped systemd unit and
its aggregator path crashed under ProtectSystem=strict, which pushed operators to change
state_dir, and with it to lose a clinic's privacy ledger.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pki_fixtures import FederationPKI, make_federation

from dermafed.cli import main
from dermafed.config_check import check_state_dir, check_tls, writable_paths
from dermafed.demo import write_toml

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
AGG_UNIT = (UNITS / "dermafed-aggregator.service").read_text()
AGENT_UNIT = (UNITS / "dermafed-agent@.service").read_text()


def _readme_tomls() -> list[dict]:
    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [tomllib.loads(b) for b in blocks]


def test_readme_examples_keep_state_where_the_shipped_units_can_write():
    examples = _readme_tomls()
    aggregator = next(e for e in examples if "server" in e)
    agent = next(e for e in examples if "aggregator" in e)
    found = check_state_dir(
        Path(aggregator["storage"]["state_dir"]), AGG_UNIT, "dermafed-aggregator.service"
    )
    assert found.ok, found.text
    found = check_state_dir(
        Path(agent["storage"]["state_dir"]), AGENT_UNIT, "dermafed-agent@.service", "clinic-7"
    )
    assert found.ok, found.text


@pytest.mark.parametrize(
    ("state_dir", "unit", "instance"),
    [
        ("/var/lib/dermafed", AGG_UNIT, ""),  # the old README value: the parent, read-only
        ("/var/lib/dermafed-agent", AGENT_UNIT, "clinic-7"),  # the old agent value
        ("/var/lib/dermafed/agent-clinic-8", AGENT_UNIT, "clinic-7"),  # another instance's
        ("/srv/dermafed", AGG_UNIT, ""),
        ("state", AGG_UNIT, ""),
    ],
)
def test_paths_the_units_cannot_write_are_named(state_dir, unit, instance):
    found = check_state_dir(Path(state_dir), unit, "the unit", instance)
    assert not found.ok
    assert state_dir in found.text


def test_unit_parsing_reads_every_writable_directory():
    unit = "[Service]\nProtectSystem=strict\nStateDirectory=a b/%i\nReadWritePaths=-/srv/x\n"
    strict, paths = writable_paths(unit, "c1")
    assert strict
    assert [str(p) for p in paths] == ["/var/lib/a", "/var/lib/b/c1", "/srv/x"]
    assert writable_paths("[Service]\nStateDirectory=a\n")[0] is False


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> FederationPKI:
    return make_federation(tmp_path_factory.mktemp("pki"))


def test_tls_checks_name_the_wrong_role_federation_key_and_ca(fed: FederationPKI):
    agg = fed.aggregator
    assert all(
        f.ok for f in check_tls(fed.ca_cert, agg.cert, agg.key, fed.federation, "aggregator")
    )
    clinic = fed.clinics["clinic-a"]
    problems = [
        f.text
        for f in check_tls(fed.ca_cert, clinic.cert, agg.key, "otherfed", "aggregator")
        if not f.ok
    ]
    assert any("otherfed" in p or "federation" in p for p in problems), problems
    assert any("is not the key of" in p for p in problems), problems
    foreign = fed.foreign_clinic
    problems = [
        f.text
        for f in check_tls(fed.ca_cert, foreign.cert, foreign.key, fed.federation, "clinic")
        if not f.ok
    ]
    assert any("is not signed by the CA" in p for p in problems), problems
    wrong_role = [
        f.text
        for f in check_tls(fed.ca_cert, clinic.cert, clinic.key, fed.federation, "aggregator")
        if not f.ok
    ]
    assert wrong_role == [
        f"{clinic.cert} is the certificate of clinic 'clinic-a'; this daemon needs one for "
        f"role 'aggregator' in federation '{fed.federation}'"
    ]


def test_the_cli_exits_1_and_names_each_problem(fed: FederationPKI, tmp_path: Path, capsys):
    agg = fed.aggregator
    cfg = tmp_path / "agent-clinic-a.toml"
    (tmp_path / "data").mkdir()
    write_toml(
        cfg,
        {
            "federation": fed.federation,
            "aggregator": {"address": "localhost:7443"},
            "tls": {"ca_cert": fed.ca_cert, "cert": agg.cert, "key": agg.key},
            "data": {"path": tmp_path / "data"},
            "storage": {"state_dir": "/var/lib/dermafed-agent"},
        },
    )
    unit = tmp_path / "dermafed-agent@.service"
    unit.write_text(AGENT_UNIT)
    code = main(["config", "check", "--role", "agent", "--config", str(cfg), "--unit", str(unit)])
    out = capsys.readouterr().out
    assert code == 1
    assert "PROBLEM  " in out and "this daemon needs one for role 'clinic'" in out
    assert "/var/lib/dermafed-agent is read-only under dermafed-agent@.service" in out
    assert "use /var/lib/dermafed/agent-clinic-a" in out  # instance from the file name

    clinic = fed.clinics["clinic-a"]
    write_toml(
        cfg,
        {
            "federation": fed.federation,
            "aggregator": {"address": "localhost:7443"},
            "tls": {"ca_cert": fed.ca_cert, "cert": clinic.cert, "key": clinic.key},
            "data": {"path": tmp_path / "data"},
            "storage": {"state_dir": "/var/lib/dermafed/agent-clinic-a"},
        },
    )
    code = main(["config", "check", "--role", "agent", "--config", str(cfg), "--unit", str(unit)])
    assert code == 0, capsys.readouterr().out

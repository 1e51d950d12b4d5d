"""A real Prometheus scrapes a real federation, with the shipped scrape config and rules.

Debian's ``prometheus`` binary runs on a free loopback port with storage in tmp and a
copy of deploy/prometheus/prometheus.yml pointed at the test's ports (1 s scrape and rule
intervals). The federation is the harness's: aggregator on port 0 with /metrics, three
agents whose registries are served over HTTP the way ``run_agent_forever`` serves them.
After two rounds the test asks Prometheus, through its HTTP API, what it recorded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from federation_harness import CLINICS, Federation
from prometheus_client import start_http_server

from common.config import MetricsSection

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dermafed.json"


def require_binary(name: str) -> str:
    """The binary's path; skip without it, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, predicate: Any, timeout: float = 90.0) -> float:
        """Poll ``expr`` until ``predicate(value)`` holds; bounded, never a sleep-and-hope."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            self.check_alive()
            value = self.value(expr)
            if value is not None and predicate(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{expr} never satisfied the condition (last value {value})")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def adapted_config(tmp: Path, aggregator_port: int, agent_ports: list[int]) -> Path:
    """deploy/prometheus/prometheus.yml with the test's targets and 1 s intervals."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    targets = {
        "dermafed-aggregator": [f"127.0.0.1:{aggregator_port}"],
        "dermafed-agent": [f"127.0.0.1:{port}" for port in agent_ports],
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    config["rule_files"] = [str(PROM_DIR / name) for name in config["rule_files"]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(tmp: Path, config: Path) -> Prometheus:
    binary = require_binary("prometheus")
    log = tmp / "prometheus.log"
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        prom = Prometheus(proc, port, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    return prom
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        prom.stop()
        if "address already in use" not in log.read_text():
            break
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text()[-3000:]}")


@pytest.fixture
def scraped_federation(
    federation: Federation, tmp_path: Path
) -> Iterator[tuple[Federation, Prometheus]]:
    base = federation.aggregator_config()
    # Rounds start only once Prometheus has seen the idle federation, so the test can
    # tell that the counters advanced under its eyes.
    service = federation.start_aggregator(
        federation.aggregator_config(
            metrics=MetricsSection(listen="127.0.0.1:0"), rounds=replace(base.rounds, max_rounds=2)
        ),
        start_rounds=False,
    )
    assert service.metrics_port is not None
    agents = [federation.start_agent(name) for name in CLINICS]
    http_servers = [start_http_server(0, addr="127.0.0.1", registry=a.registry)[0] for a in agents]
    prom = start_prometheus(
        tmp_path,
        adapted_config(tmp_path, service.metrics_port, [int(s.server_port) for s in http_servers]),
    )
    try:
        prom.wait_for('dermafed_rounds_total{outcome="published"}', lambda v: v == 0)
        prom.wait_for('sum(up{job=~"dermafed-.*"})', lambda v: v == 1 + len(CLINICS))
        service.coordinator.start()
        yield federation, prom
    finally:
        prom.stop()
        for server in http_servers:
            server.shutdown()
            server.server_close()


def test_prometheus_scrapes_a_real_federation_with_the_shipped_config(scraped_federation):
    """One federation run (rounds cost seconds), checked from three angles below."""
    federation, prom = scraped_federation
    federation.wait_rounds(2)
    assert federation.service is not None
    ledger_rounds = federation.service.ledger.rounds(limit=10)
    check_rounds_stage_timings_and_agents(prom, [r.stages for r in ledger_rounds])
    check_shipped_rules_evaluate_cleanly(prom)
    check_dashboard_queries_run(prom)


def check_rounds_stage_timings_and_agents(
    prom: Prometheus, ledger_stages: list[dict[str, float]]
) -> None:
    published = 'dermafed_rounds_total{job="dermafed-aggregator", outcome="published"}'
    prom.wait_for(published, lambda v: v >= 2)
    # It advanced while Prometheus watched: the first scrapes saw none published.
    assert prom.value(f"min_over_time({published}[10m])") == 0

    # Per-stage series are born with their first observation, so rate()/increase() see
    # them from the second sample on: wait for two scrapes of each.
    prom.wait_for(
        "min(count_over_time(dermafed_round_stage_duration_seconds_bucket"
        '{job="dermafed-aggregator", le="+Inf"}[10m]))',
        lambda v: v >= 2,
    )
    # Prometheus's stage timings agree with the ledger's record of the same rounds (the
    # ledger may hold more, e.g. clinic-reported training time, which is no stage).
    in_ledger = {
        stage: sum(stage in rec for rec in ledger_stages) for rec in ledger_stages for stage in rec
    }
    counts = prom.query(
        'max_over_time(dermafed_round_stage_duration_seconds_count{job="dermafed-aggregator"}[10m])'
    )
    seen = {c["metric"]["stage"]: float(c["value"][1]) for c in counts}
    assert {"aggregate", "validate"} < set(seen), seen
    # Stages of the other aggregation mode exist with a count of zero (label children are
    # created up front so increase() sees their first event).
    assert seen == {stage: in_ledger.get(stage, 0) for stage in seen}
    p95 = prom.query(
        "histogram_quantile(0.95, sum by (le, stage) (increase("
        "dermafed_round_stage_duration_seconds_bucket[10m])))"
    )
    assert {q["metric"]["stage"] for q in p95} >= {s for s, n in seen.items() if n}

    prom.wait_for('count(dermafed_validation_score{job="dermafed-aggregator"})', lambda v: v >= 1)
    contributed = prom.wait_for(
        'sum(dermafed_agent_rounds_total{job="dermafed-agent", result="contributed"})',
        lambda v: v >= 2 * len(CLINICS) - 1,
    )
    assert contributed <= 2 * len(CLINICS)
    targets = prom.api("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"dermafed-aggregator", "dermafed-agent"}
    assert all(t["health"] == "up" for t in targets), targets


def check_shipped_rules_evaluate_cleanly(prom: Prometheus) -> None:
    expected = sum(
        len(g["rules"]) for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    )
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        # Go's zero time marks a rule not evaluated yet.
        if len(rules) == expected and all(
            not r.get("lastEvaluation", "0001").startswith("0001") for r in rules
        ):
            break
        assert time.monotonic() < deadline, f"rules not loaded/evaluated: {rules}"
        time.sleep(0.5)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # A healthy federation raises no alert.
    firing = [a["labels"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def check_dashboard_queries_run(prom: Prometheus) -> None:
    """Every dashboard query executes here, and the core panels return data."""
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\[\$\{?\w+\}?\]", "[10m]", target["expr"])
            expr = re.sub(r"\$\{?\w+\}?", ".+", expr)
            if not prom.query(expr):
                empty.append(panel["title"])
    for title in (
        "Rounds finished by outcome",
        "Stage duration p95 by stage",
        "Round duration",
        "Cohort, contributors and connected clinics",
        "Held-out scores",
        "Per-class sensitivity (mel, bcc, akiec gate the publication)",
        "Epsilon spent and remaining, from each agent",
        "Connected to the aggregator",
        "Agent rounds by result",
        "Agents",
    ):
        assert title not in empty, f"panel {title!r} shows no data on a live federation"

"""deploy/prometheus and deploy/grafana: promtool checks, and every queried metric exists.

- ``promtool check rules`` / ``promtool test rules`` on the alert rules and their unit
  tests, and ``promtool check config`` on the scrape configuration;
- every alert has a unit-test case where it fires and one where it stays silent;
- every PromQL expression of the Grafana dashboard parses (promtool, as recording rules);
- every metric name in the dashboard and the rules is exported by a live aggregator
  (scraped over HTTP) and a live clinic agent (its registry, while it polls).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from federation_harness import Federation
from pki_fixtures import make_federation
from prometheus_client import generate_latest

from aggregator.config import ValidationSection
from common.config import MetricsSection

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dermafed.json"

# Series Prometheus itself creates for every target, not exported by our services.
PROMETHEUS_SERIES = {"up"}


def require_binary(name: str) -> str:
    """The binary's path; skip without it, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- PromQL: pulling metric names out of expressions -----------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
# Aggregation operators may be followed by "by (...)" instead of their argument list.
_AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def _strip_nested(text: str, open_: str, close: str) -> str:
    out, depth = [], 0
    for ch in text:
        if ch == open_:
            depth += 1
        elif ch == close and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression.

    Strings, label matchers and range selectors are removed first; what is left is
    functions and aggregations (followed by '('), keywords, the label lists after
    by/without/on/ignoring/group_*, and metric names.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = _strip_nested(text, "{", "}")
    text = _strip_nested(text, "[", "]")
    names: set[str] = set()
    pos = 0
    while True:
        match = _IDENT.search(text, pos)
        if match is None:
            return names
        word, pos = match.group(0), match.end()
        rest = text[pos:].lstrip()
        if word in _LABEL_LIST_KEYWORDS:
            if rest.startswith("("):
                pos = text.index(")", pos) + 1  # skip the label list
            continue
        if word in _KEYWORDS or word in _AGGREGATIONS or rest.startswith("("):
            continue
        names.add(word)


def test_metric_name_extraction_known_answers():
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(a_seconds_bucket{job=~"x|y", '
        'stage!="train"}[5m]))) / on (instance) group_left (clinic) b_total offset 1h '
        'and ignoring(x) c > bool 2e3 unless time() - d:recorded{l="sum(z)"}'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d:recorded"}
    assert metric_names("vector(6 * 3600)") == set()
    assert metric_names('up{job=~"dermafed-.*"} == 0') == {"up"}


# --- the rules ------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for group in _load_yaml(ALERTS)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def alert_names() -> list[str]:
    return [
        rule["alert"]
        for group in _load_yaml(ALERTS)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_alert_rules_pass_promtool_check():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rule_unit_tests_pass():
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent():
    cases: dict[str, dict[str, int]] = {}
    for test in _load_yaml(ALERTS_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            kinds = cases.setdefault(case["alertname"], {"firing": 0, "silent": 0})
            kinds["firing" if case.get("exp_alerts") else "silent"] += 1
    for name in alert_names():
        assert name in cases, f"alert {name} has no case in {ALERTS_TEST.name}"
        assert cases[name]["firing"], f"no test where {name} fires"
        assert cases[name]["silent"], f"no test where {name} stays silent"
    assert set(cases) <= set(alert_names()), "tests name alerts that do not exist"


def test_alerts_cover_the_operational_failure_modes():
    metrics_alerted_on = set().union(*(metric_names(e) for e in rule_expressions()))
    for metric in (
        "dermafed_rounds_total",
        "dermafed_published_timestamp_seconds",
        "dermafed_clinic_last_seen_timestamp_seconds",
        "dermafed_rollbacks_total",
        "dermafed_clinic_epsilon_remaining",
        "dermafed_agent_epsilon_remaining",
        "dermafed_certificate_expiry_timestamp_seconds",
        "dermafed_agent_connected",
    ):
        assert metric in metrics_alerted_on, f"no alert uses {metric}"
    for group in _load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_scrape_config_is_valid_and_loads_the_rules():
    result = run_promtool("check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    config = _load_yaml(SCRAPE_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"dermafed-aggregator", "dermafed-agent"}


# --- the dashboard --------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and templating query."""
    dash = _dashboard()
    out = []
    for panel in _all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            assert match, f"variable {var['name']}: unsupported query {query!r}"
            out.append((f"variable {var['name']!r}", match.group(1)))
    return out


GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana variables by values Prometheus accepts (for a syntax check)."""
    expr = re.sub(r"\[\$\{?\w+\}?\]", "[5m]", expr)  # [$window], [$__rate_interval]
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".+", expr)  # label-matcher values


def test_dashboard_queries_parse_with_promtool(tmp_path: Path):
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    panels = list(_all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
    for where, expr in dashboard_queries():
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in variables | GRAFANA_BUILTINS, f"{where}: undefined variable ${name}"


def test_dashboard_shows_what_operators_need():
    everything = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for metric in (
        "dermafed_rounds_total",
        "dermafed_round_stage_duration_seconds_bucket",
        "dermafed_round_cohort_size",
        "dermafed_clinic_dropouts_total",
        "dermafed_validation_score",
        "dermafed_validation_sensitivity",
        "dermafed_clinic_epsilon_spent",
        "dermafed_agent_epsilon_spent",
    ):
        assert metric in everything, f"the dashboard does not show {metric}"
    annotations = [ann for ann in _dashboard()["annotations"]["list"] if "expr" in ann]
    assert any(
        "dermafed_rollbacks_total" in metric_names(a["expr"]) and a["enable"] for a in annotations
    ), "rollbacks must be annotated on the graphs"


# --- every queried name exists in a live scrape ------------------------------------------


def exported_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this text exposition would store."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def live_exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a running aggregator plus the registry of an agent polling it."""
    tmp = tmp_path_factory.mktemp("live")
    data = tmp / "empty-data"
    data.mkdir()
    # No images needed: the metric families exist from start-up; no round has to run.
    fed = Federation(tmp, make_federation(tmp / "pki"), {"clinic-a": data}, data)
    try:
        service = fed.start_aggregator(
            fed.aggregator_config(
                validation=ValidationSection(), metrics=MetricsSection(listen="127.0.0.1:0")
            )
        )
        assert service.metrics_port is not None
        agent = fed.start_agent("clinic-a")
        coord = service.coordinator
        assert coord.wait_until(lambda: "clinic-a" in coord.status().connected, 60)
        # The agent marks itself connected when its (long) poll returns.
        deadline = time.monotonic() + 60
        while agent.registry.get_sample_value("dermafed_agent_connected") != 1.0:
            assert time.monotonic() < deadline, "the agent never reported a successful poll"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{service.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            aggregator_text = response.read().decode()
        agent_text = generate_latest(agent.registry).decode()
        yield aggregator_text + "\n" + agent_text
    finally:
        fed.stop()


def test_live_scrape_contains_both_services(live_exposition: str):
    names = exported_names(live_exposition)
    assert "dermafed_round_number" in names and "dermafed_agent_connected" in names
    assert re.search(
        r'^dermafed_clinic_last_seen_timestamp_seconds\{clinic="clinic-a"\} ', live_exposition, re.M
    )
    assert re.search(r"^dermafed_agent_connected 1\.0$", live_exposition, re.M)


def test_every_metric_in_dashboard_and_rules_is_exported(live_exposition: str):
    exported = exported_names(live_exposition) | PROMETHEUS_SERIES | recorded_names()
    used = [(f"rule {i}", expr) for i, expr in enumerate(rule_expressions())]
    used += dashboard_queries()
    missing = {
        f"{where}: {name}"
        for where, expr in used
        for name in metric_names(expr)
        if name not in exported
    }
    assert not missing, "queried but not exported:\n" + "\n".join(sorted(missing))
    # And the check is not vacuous: most queries do name a dermafed metric.
    assert sum(1 for _, e in used if any(n.startswith("dermafed_") for n in metric_names(e))) > 40


def test_exported_names_understand_histograms_and_counters():
    text = (
        "# TYPE x_seconds histogram\n# TYPE y_total counter\n"
        'y_total 3.0\n# TYPE z gauge\nz{a="b"} 1.0\n'
    )
    assert exported_names(text) == {
        "x_seconds_bucket",
        "x_seconds_sum",
        "x_seconds_count",
        "y_total",
        "z",
    }

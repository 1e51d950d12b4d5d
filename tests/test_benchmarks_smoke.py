"""Smoke tests of the benchmark scripts under ``benchmarks/``: tiny configurations that prove
each script runs end to end on the real code paths and reports sane values. No timing is
asserted (timings on a shared 2-core machine mean nothing in a test)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from common.secagg.messages import STAGES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` by path (``benchmarks`` is scripts, not a package)."""
    module_name = f"dermafed_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def test_secagg_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("secagg")
    params = 1000
    out = tmp_path / "secagg.json"
    code = bench.main(
        [
            "--cohorts",
            "3",
            "--params",
            str(params),
            "--dropout",
            "0,0.1",
            "--repeats",
            "1",
            "--mask-elements",
            "65536",
            "--mask-repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0  # every secure result matched plain FedAvg within the bound

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.split()[:1] == ["clinics"])
    for column in (
        "secure_s",
        "plain_s",
        "overhead_s",
        "time_x",
        "agg_cpu_sec_s",
        "agg_cpu_plain_s",
        "peak_sec_MB",
        "peak_plain_MB",
        "sent_sec_MB",
        "sent_plain_MB",
        "vec_B/param",
        "mask_GB/s",
        "err/bound",
    ):
        assert column in header.split()
    assert "targets:" in printed

    report = json.loads(out.read_text())
    results = report["results"]
    assert [(r["clinics"], r["params"], r["dropout"]) for r in results] == [
        (3, params, 0.0),
        (3, params, 0.1),
    ]
    ring_bytes = 4 * (params + 2)  # the weight and the loss ride as two extra ring elements
    for r, dropped in zip(results, (0, 1), strict=True):
        secure, plain = r["secure"], r["plain"]
        assert r["dropped"] == dropped
        assert secure["contributors"] == plain["contributors"] == 3 - dropped
        assert r["within_bound"] and r["total_weight_equal"]
        assert 0 <= r["max_abs_error"] <= r["error_bound"]

        assert set(secure["stages"]) == set(STAGES)
        for stage in secure["stages"].values():
            assert stage["server_s"] >= 0 and stage["clinic_max_s"] >= stage["clinic_mean_s"] >= 0
        assert secure["round_s"] == pytest.approx(
            sum(s["server_s"] + s["clinic_max_s"] for s in secure["stages"].values())
        )
        assert r["overhead_s"] == pytest.approx(secure["round_s"] - plain["round_s"])
        assert secure["server_cpu_s"] > 0 and plain["server_cpu_s"] > 0

        # Wire bytes: 4 bytes per ring element plus chunk framing; plain sends float32.
        assert ring_bytes < secure["vector_bytes_per_clinic"] <= ring_bytes + 64
        assert 4 * params < plain["vector_bytes_per_clinic"] <= 4 * params + 64
        # The protocol's own messages (keys, shares, signatures) cost extra bytes.
        assert secure["bytes_sent_per_clinic"] > plain["bytes_sent_per_clinic"]
        assert secure["masks_per_clinic"] == 3  # a self mask and one per other clinic of U2

        # The aggregator held at least its accumulator (secure) / float64 sum (plain).
        assert secure["peak_server_bytes"] >= ring_bytes
        assert plain["peak_server_bytes"] >= 8 * params
        assert math.isfinite(secure["client_mask_gbps"]) and secure["client_mask_gbps"] > 0

    mask = report["mask_throughput"]
    assert mask["accumulate_mask_gbps"] > 0 and mask["keystream_gbps"] > 0
    assert any("bytes per parameter" in t["target"] for t in report["targets"])


HAM10000 = Path(
    os.environ.get("DERMAFED_HAM10000")
    or Path(__file__).resolve().parents[2] / "shared/data/ham10000_200x150"
)


def test_privacy_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 images not found at {HAM10000} (set DERMAFED_HAM10000)")
    bench = load_benchmark("privacy")
    out = tmp_path / "privacy.json"
    code = bench.main(
        [
            "--data",
            str(HAM10000),
            "--out",
            str(tmp_path / "out"),
            "--train-images",
            "40",
            "--test-images",
            "40",
            "--input-size",
            "32",
            "--rounds",
            "1",
            "--batch-size",
            "4",
            "--epsilons",
            "8,inf",
            "--throughput-examples",
            "16",
            "--throughput-repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| model"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == list(bench.TABLE_COLUMNS)
    for column in (
        "model",
        "eps_target",
        "eps_achieved",
        "noise_multiplier",
        "bal_acc",
        "acc",
        "macro_auroc",
        "mel_sens",
        "pct_nonprivate_BA",
        "wall_s",
    ):
        assert column in columns
    assert "DP-SGD throughput" in printed

    report = json.loads(out.read_text())
    rows = {r["epsilon_target"]: r for r in report["rows"]}
    assert set(rows) == {8.0, math.inf}
    private, plain = rows[8.0], rows[math.inf]
    # The composed ε of the mechanisms that actually ran, per clinic, stays within budget
    # and is not wastefully far below it (σ was solved for this target).
    assert len(private["epsilon_per_clinic"]) == 4
    assert all(7.5 <= e <= 8.0 for e in private["epsilon_per_clinic"])
    assert private["epsilon_achieved"] == max(private["epsilon_per_clinic"]) <= 8.0
    assert len(private["noise_multipliers"]) == 4 and all(
        s > 0 for s in private["noise_multipliers"]
    )
    assert plain["noise_multipliers"] == [] and math.isinf(plain["epsilon_achieved"])
    for r in (private, plain):
        t = r["test"]
        assert 0.0 <= t["balanced_accuracy"] <= 1.0 and 0.0 <= t["accuracy"] <= 1.0
        assert 0.0 <= t["mel_sensitivity"] <= 1.0
        assert r["examples_processed"] == sum(report["clinics"])
        assert len(r["delta_norms"]) == 4  # one per clinic in the one round
    throughput = report["throughput"]
    assert throughput["plain_examples_per_s"] > 0 and throughput["dp_examples_per_s"] > 0
    assert throughput["dp_slowdown_x"] == pytest.approx(
        throughput["plain_examples_per_s"] / throughput["dp_examples_per_s"]
    )
    # The DP recipe's fixed front end: its one-time cost and the end-to-end CNN beside it.
    assert report["recipe"]["arch"] == "efficientnet_lite0_head"
    assert throughput["features_images_per_s"] > 0
    assert throughput["lesionres_plain_examples_per_s"] > 0
    # Each DP row ran --repeats times with fresh noise; the table reports mean ± sd.
    assert len(private["runs"]) == 3 and len(plain["runs"]) == 1
    assert private["test"]["balanced_accuracy"] == private["runs"][0]["balanced_accuracy"]
    eps8_line = next(
        line for line in printed.splitlines() if line.startswith("| efficientnet_lite0_head | 8")
    )
    assert " ± " in eps8_line


def test_gate_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 images not found at {HAM10000} (set DERMAFED_HAM10000)")
    bench = load_benchmark("gate")
    out = tmp_path / "gate.json"
    code = bench.main(
        [
            "--data",
            str(HAM10000),
            "--out",
            str(tmp_path / "out"),
            "--train-images",
            "80",
            "--holdout-images",
            "40",
            "--test-images",
            "40",
            "--input-size",
            "32",
            "--batch-size",
            "4",
            "--rounds",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| setting | pipeline | honest rejected |" in printed
    report = json.loads(out.read_text())
    assert [r["setting"] for r in report["results"]] == ["no DP", "ε=8"]
    for result in report["results"]:
        assert set(result["final_test"]) == set(bench.PIPELINES)
        for kind in bench.KINDS:
            tallies = result["poisoned"][kind]
            # Round 2 is judged against round 1's model: one trial per kind and pipeline.
            assert all(t["judged"] == 1 for t in tallies.values())
        # The sum checks stop the attacks they exist for, before any scoring; the v1
        # pipeline has no sum checks, so nothing it rejects is attributed to them.
        assert result["poisoned"]["tiny_weight"]["harm"]["by_sum"] == 1
        assert all(result["poisoned"][k]["v1"]["by_sum"] == 0 for k in bench.KINDS)


def test_evaluation_benchmark_reports_the_share_of_the_evaluated_rounds() -> None:
    """The federations themselves are the demo's (tested in test_demo.py) and the
    evaluation's (test_federated_evaluation.py); here: what the report computes."""
    bench = load_benchmark("evaluation")
    from dermafed.demo import RoundRow

    def row(number: int, seconds: float, **stages: float) -> RoundRow:
        return RoundRow(number, "published", "3/3", None, None, 0.3, None, seconds, stages)

    on = [
        row(1, 30.0, local_training=25.0),  # against the initial model: not evaluated
        row(2, 10.0, local_training=5.0, evaluate_advertise=1.5, evaluate_unmask=0.5),
        row(3, 14.0, local_training=5.0, evaluate_advertise=3.0, evaluate_share_keys=1.0),
    ]
    off = [row(1, 29.0), row(2, 8.0), row(3, 10.0)]
    text = bench.report(on, off, 3)
    assert "evaluation's share of the rounds it ran in (2): 6.0s of 24.0s = 25.0%" in text
    assert "9.0s mean against 12.0s with it (x1.33)" in text
    assert "no round ran a federated evaluation" in bench.report(on[:1], off, 3)

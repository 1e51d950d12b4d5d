"""``dermafed data partition|synth``, ``dermafed predict`` and ``dermafed evaluate``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from common.datasets import CLASSES, HAM_METADATA, load_records
from common.model import ModelConfig, initial_state
from common.tensors import checkpoint_bytes
from dermafed.cli_data import register


def ham_dir() -> Path:
    env = os.environ.get("DERMAFED_HAM10000")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared/data/ham10000_200x150"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dermafed")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    assert run(["data", "synth", "--out", str(out), "--per-class", "6", "--seed", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig(input_size=32, width=8)
    path = tmp_path_factory.mktemp("ckpt") / "global.safetensors"
    path.write_bytes(checkpoint_bytes(initial_state(cfg, 1), cfg.to_metadata()))
    return path


def test_synth_writes_labelled_synthetic_data(synth: Path, capsys) -> None:
    records = load_records(synth)
    assert len(records) == 6 * len(CLASSES)
    assert (synth / "SYNTHETIC.md").is_file()
    again = synth.parent / "again"
    assert run(["data", "synth", "--out", str(again), "--per-class", "2"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out


def test_partition_prints_counts_and_writes_shards(synth: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    argv = ["data", "partition", "--clinics", "3", "--alpha", "0.3", "--seed", "1"]
    assert run([*argv, "--holdout", "0.2", str(synth), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clinic-3" in printed and "holdout" in printed and "mel" in printed
    shards = [load_records(out / f"clinic-{i}.csv") for i in (1, 2, 3)]
    holdout = load_records(out / "holdout.csv")
    assert sum(map(len, shards)) + len(holdout) == len(load_records(synth))


def test_partition_real_ham10000(tmp_path: Path, capsys) -> None:
    ham = ham_dir()
    if not (ham / HAM_METADATA).is_file():
        pytest.skip(f"real HAM10000 images not found at {ham} (set DERMAFED_HAM10000)")
    argv = ["data", "partition", "--clinics", "4", "--alpha", "inf", "--holdout", "0.1"]
    assert run([*argv, str(ham), str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "partition.json").read_text())
    total = sum(map(sum, summary["counts"])) + sum(summary["holdout_counts"])
    assert total == len(load_records(ham))
    assert not list(tmp_path.rglob("*.jpg"))  # index files only, no copied images
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv",
    [
        ["--clinics", "0", "--alpha", "1"],
        ["--clinics", "2", "--alpha", "-1"],
        ["--clinics", "2", "--alpha", "1", "--holdout", "1.5"],
    ],
)
def test_partition_rejects_bad_arguments(argv: list[str], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run(["data", "partition", *argv, str(tmp_path), str(tmp_path / "o")])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path: Path, capsys) -> None:
    rc = run(["data", "partition", "--clinics", "2", "--alpha", "1", str(tmp_path / "nope"), "o"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("dermafed: error:") and "no such file" in err
    assert "Traceback" not in err
    assert run(["data"]) == 2  # no subcommand: usage on stderr


def test_predict_prints_sorted_probabilities(synth: Path, checkpoint: Path, capsys) -> None:
    images = [r.path for r in load_records(synth)[:2]]
    assert run(["predict", "--checkpoint", str(checkpoint), *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0])
    block = lines[1 : 1 + len(CLASSES)]
    names = [line.split()[0] for line in block]
    probs = [float(line.split()[1]) for line in block]
    assert sorted(names) == sorted(CLASSES)
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=0.01)
    assert lines[1 + len(CLASSES)] == str(images[1])
    assert run(["predict", "--checkpoint", str(checkpoint), "--top", "2", str(images[0])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_predict_missing_image_or_checkpoint(checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert run(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "x.jpg")]) == 2
    assert "no such image" in capsys.readouterr().err
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint at all")
    assert run(["predict", "--checkpoint", str(bogus), str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "Traceback" not in err


def test_evaluate_table_and_json(synth: Path, checkpoint: Path, capsys) -> None:
    assert run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth)]) == 0
    table = capsys.readouterr().out
    for word in ("accuracy", "balanced accuracy", "macro AUROC", "mel", "vasc"):
        assert word in table
    assert run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == 6 * len(CLASSES)
    assert set(metrics["sensitivity"]) == set(CLASSES)
    assert 0 <= metrics["balanced_accuracy"] <= 1
    assert run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth / "no")]) == 2

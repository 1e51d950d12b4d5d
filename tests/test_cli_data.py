"""``dermafed data partition|synth``, ``dermafed predict`` and ``dermafed evaluate``."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from common.datasets import CLASSES, HAM_METADATA, load_records
from common.model import ModelConfig, initial_state
from common.partition import write_index
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


def test_evaluate_says_when_the_data_has_no_subgroup_metadata(
    synth: Path, checkpoint: Path, capsys
) -> None:
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth)]
    assert run(argv) == 0
    table = capsys.readouterr().out
    assert "No sex, age or body-site metadata" in table and "By sex" not in table
    assert run([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subgroups"] == {}


@pytest.fixture(scope="module")
def ham_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """An index CSV (with the metadata columns) of ~70 real images spread over the archive."""
    ham = ham_dir()
    if not (ham / HAM_METADATA).is_file():
        pytest.skip(f"real HAM10000 images not found at {ham} (set DERMAFED_HAM10000)")
    records = load_records(ham)[::120]
    index = tmp_path_factory.mktemp("ham") / "subset.csv"
    write_index(records, index)
    return index, records


class _Page(HTMLParser):
    """Headings, table cells and image sources of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.cells: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "h3", "td", "th"):
            self._open = tag
            (self.headings if tag in ("h2", "h3") else self.cells).append("")
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        elif tag == "table":
            self.tables += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open in ("h2", "h3"):
            self.headings[-1] += data
        elif self._open in ("td", "th"):
            self.cells[-1] += data


def test_evaluate_reports_per_class_and_subgroups_on_real_images(
    ham_index: tuple[Path, list], checkpoint: Path, tmp_path: Path, capsys
) -> None:
    index, records = ham_index
    cases = {c: sum(r.dx == c for r in records) for c in CLASSES}
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(index)]
    page = tmp_path / "evaluation.html"
    assert run([*argv, "--html", str(page)]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {page}" in err
    # Text: one row per class with its cases and the k/n behind sensitivity and specificity.
    lines = out.splitlines()
    assert f"examples           {len(records)}" in lines
    for c in CLASSES:
        row = next(line for line in lines if line.split()[:1] == [c] and "[" in line)
        label_width = 2 if c in ("mel", "bcc", "akiec") else 1  # "mel *"
        assert int(row.split()[label_width]) == cases[c]
        # sensitivity k/cases (n/a without cases), specificity k/(every other case)
        if cases[c]:
            assert re.search(rf"\] \d+/{cases[c]} ", row), row
        assert re.search(rf"\] \d+/{len(records) - cases[c]} ", row), row
    for heading in ("Confusion matrix", "Calibration", "By sex", "By age band", "By body site"):
        assert heading in out
    assert re.search(r"^female\s+\d+\s+\d\.\d{3}", out, re.MULTILINE)

    # JSON: everything, strictly valid, the old flat keys kept.
    assert run([*argv, "--json"]) == 0

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert data["examples"] == len(records)
    assert {m["class"]: m["cases"] for m in data["per_class"]} == cases
    for m in data["per_class"]:
        if m["cases"]:
            assert m["sensitivity"]["n"] == m["cases"]
            assert m["sensitivity"]["estimate"] == pytest.approx(data["sensitivity"][m["class"]])
            lo, hi = m["sensitivity"]["ci95"]
            assert 0 <= lo <= m["sensitivity"]["estimate"] <= hi <= 1
        else:
            assert m["sensitivity"] is None and m["auroc"] is None
        assert m["specificity"]["n"] == len(records) - m["cases"]
    assert set(data["subgroups"]) == {"sex", "age_band", "body_site"}
    for rows in data["subgroups"].values():
        assert sum(g["n"] for g in rows) == len(records)
        assert all(sum(g["class_counts"].values()) == g["n"] for g in rows)
    sexes = {g["group"]: g["n"] for g in data["subgroups"]["sex"]}
    assert sexes["female"] == sum(r.sex == "female" for r in records)
    assert sum(b["count"] for b in data["calibration"]["reliability"]) == len(records)
    assert sum(map(sum, data["confusion"])) == len(records)

    # HTML: standalone, with the per-class, confusion, calibration and subgroup tables.
    parsed = _Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    for heading in ("Per class (one vs rest)", "Confusion matrix", "Calibration"):
        assert heading in parsed.headings
    assert {"By sex", "By age band", "By body site"} <= set(parsed.headings)
    assert parsed.tables == 3 + 3
    mel = CLASSES.index("mel")
    assert cases["mel"] > 0
    assert f"({data['confusion'][mel][mel]}/{cases['mel']})" in " ".join(parsed.cells)
    assert "cases per class" in parsed.cells
    assert len(parsed.images) == 2
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")  # nothing loaded from elsewhere
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_evaluate_html_target_errors_are_one_line(
    synth: Path, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth), "--html"]
    for target, why in ((tmp_path / "no" / "x.html", "does not exist"), (tmp_path, "folder")):
        assert run([*argv, str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # refused before evaluating anything
        assert captured.err.startswith("dermafed: error: --html") and why in captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err

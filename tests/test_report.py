"""``dermafed report``: a real ledger in, a static HTML page and PNG plots out.

The ledger is built with the real :class:`aggregator.ledger.Ledger` API; the report is run
through its command-line entry point; the page is checked by parsing its HTML, by
decoding its PNGs with Pillow and, when Chromium is installed, by rendering it in real
headless Chromium and asking the browser whether every image loaded.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aggregator.ledger import Ledger
from common.evaluation import compute_metrics
from dermafed import cli_report
from dermafed.report import (
    CONFUSION_PNG,
    METRICS_PNG,
    PARTICIPATION_PNG,
    build_report,
    confusion_matrix,
    read_ledger,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL_REASON = "<script>alert('x')</script> mel sensitivity 0.30 < 0.62 - 0.05"
CLINICS = ("clinic-a", "clinic-b", "clinic-c")


# --------------------------------------------------------------------------- fixtures


def _metrics(seed: int, hit_rate: float) -> dict[str, Any]:
    """Real validation metrics (common.evaluation) for a classifier of a given quality."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), 30)
    hits = rng.random(len(labels)) < hit_rate
    predicted = np.where(hits, labels, (labels + rng.integers(1, 7, len(labels))) % 7)
    probs = np.full((len(labels), 7), 0.02)
    probs[np.arange(len(labels)), predicted] = 0.88
    return compute_metrics(labels, probs).to_dict()


ROUND1 = _metrics(1, 0.70)
ROUND2_REJECTED = _metrics(2, 0.40)
ROUND4 = _metrics(4, 0.80)
GATE_OK = "no evidence of a drop beyond 0.000 (each test at 0.0125)"


def _privacy(spent: float, remaining: float | None) -> str:
    return json.dumps({"epsilon_spent": spent, "epsilon_remaining": remaining})


def _build_ledger(path: Path) -> dict[str, str]:
    """Four rounds (published, rejected, aborted, published) and an admin rollback."""
    ids = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("c0", "c1", "c4")}
    plan = {"local_epochs": 1, "lr": 0.01}
    with Ledger(path) as led:
        led.record_checkpoint(ids["c0"], 0, None, 100.0)
        led.publish(ids["c0"], 0, 100.0, "initial", "initial model")

        led.begin_round(1, ids["c0"], "secagg", plan, list(CLINICS), 110.0)
        for c in CLINICS:
            led.record_clinic_event(1, c, "selected", "", 110.0)
        led.record_clinic_event(1, "clinic-a", "contributed", "1024 bytes", 120.0)
        led.record_clinic_event(1, "clinic-b", "contributed", "1024 bytes", 121.0)
        led.record_clinic_event(1, "clinic-c", "declined", "budget: ε would exceed 8", 122.0)
        led.record_clinic_event(1, "clinic-a", "privacy", _privacy(0.9, 7.1), 123.0)
        led.record_clinic_event(1, "clinic-b", "privacy", _privacy(1.1, None), 123.5)
        led.record_stage(1, "train", 30.0)
        led.record_checkpoint(ids["c1"], 1, ids["c0"], 150.0, ROUND1)
        led.finish_round(
            1,
            "published",
            "gate passed",
            150.0,
            checkpoint=ids["c1"],
            contributors=["clinic-a", "clinic-b"],
            train_loss=1.2345,
            metrics=ROUND1,
            publish=True,
        )

        led.begin_round(2, ids["c1"], "secagg", plan, list(CLINICS), 200.0)
        for c in CLINICS:
            led.record_clinic_event(2, c, "selected", "", 200.0)
        led.record_clinic_event(2, "clinic-a", "contributed", "1024 bytes", 210.0)
        led.record_clinic_event(2, "clinic-b", "contributed", "1024 bytes", 211.0)
        led.record_clinic_event(2, "clinic-c", "dropped", "silent in stage train", 230.0)
        led.finish_round(
            2,
            "rejected",
            EVIL_REASON,
            245.5,
            contributors=["clinic-a", "clinic-b"],
            train_loss=1.1,
            metrics=ROUND2_REJECTED,
        )

        led.begin_round(3, ids["c1"], "secagg", plan, list(CLINICS), 300.0)
        for c in CLINICS:
            led.record_clinic_event(3, c, "selected", "", 300.0)
        led.record_clinic_event(3, "clinic-a", "contributed", "1024 bytes", 310.0)
        led.record_clinic_event(3, "clinic-b", "dropped", "silent in stage masked_input", 320.0)
        led.finish_round(3, "aborted", "only 1 of 3 clinics left (threshold 2)", 340.0)

        led.begin_round(4, ids["c1"], "secagg", plan, list(CLINICS), 400.0)
        for c in CLINICS:
            led.record_clinic_event(4, c, "selected", "", 400.0)
            led.record_clinic_event(4, c, "contributed", "1024 bytes", 410.0)
        # Two reports from clinic-a in one round: the later one counts.
        led.record_clinic_event(4, "clinic-a", "privacy", _privacy(1.5, 6.5), 411.0)
        led.record_clinic_event(4, "clinic-a", "privacy", _privacy(1.7, 6.3), 412.0)
        led.record_clinic_event(4, "clinic-c", "privacy", _privacy(0.8, 2.2), 413.0)
        led.record_clinic_event(4, "clinic-b", "privacy", "not json", 414.0)
        led.record_checkpoint(ids["c4"], 4, ids["c1"], 450.0, ROUND4)
        led.finish_round(
            4,
            "published",
            "",  # as the coordinator records it: the gate's own reason is in the metrics
            450.0,
            checkpoint=ids["c4"],
            contributors=list(CLINICS),
            train_loss=0.9,
            metrics={**ROUND4, "gate": {"verdict": "accept", "rule": "harm", "reason": GATE_OK}},
            publish=True,
        )
        led.publish(ids["c1"], 1, 500.0, "rollback", "operator: round 4 misses <bcc>")
    return ids


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    ids = _build_ledger(path)
    return path, ids


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dermafed")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_report.register(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _snapshot_dir(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def report_dir(
    ledger_path: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    path, _ = ledger_path
    before = _snapshot_dir(path.parent)
    out = tmp_path_factory.mktemp("report") / "site"
    assert (
        _run_cli("report", "--ledger", str(path), "--out", str(out), "--title", "Nordic <derm>")
        == 0
    )
    # The ledger folder is exactly as it was: same bytes, and no -wal/-shm left behind.
    assert _snapshot_dir(path.parent) == before
    yield out


class _Page(HTMLParser):
    """Collects table rows by id (cell texts), img sources and every href/src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.row_classes: dict[str, str] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(str(a[key]))
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.images.append(str(a.get("src")))
        if tag == "tr" and a.get("id"):
            self._row = str(a["id"])
            self.rows[self._row] = []
            self.row_classes[self._row] = str(a.get("class"))
        if tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self.rows[self._row].append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    page.close()
    return page


# --------------------------------------------------------------------------- page content


def test_rounds_table_has_every_round_with_its_outcome(report_dir: Path) -> None:
    page = _parse((report_dir / "index.html").read_text(encoding="utf-8"))
    rows = page.rows
    assert set(rows) == {"round-1", "round-2", "round-3", "round-4"}
    # number, outcome, reason, contributors/cohort, train loss, bal. acc, mel sens, seconds
    assert rows["round-1"] == [
        "1",
        "published",
        "gate passed",
        "2/3",
        "1.2345",
        f"{ROUND1['balanced_accuracy']:.3f}",
        f"{ROUND1['sensitivity']['mel']:.3f}",
        "40.0",
    ]
    assert rows["round-2"][:4] == ["2", "rejected", EVIL_REASON, "2/3"]
    assert rows["round-2"][7] == "45.5"
    assert rows["round-3"] == [
        "3",
        "aborted",
        "only 1 of 3 clinics left (threshold 2)",
        "0/3",
        "n/a",
        "n/a",
        "n/a",
        "40.0",
    ]
    # A published round's reason column says why the gate let it through.
    assert rows["round-4"][1:4] == ["published", f"gate (harm): {GATE_OK}", "3/3"]
    assert page.row_classes["round-2"] == "round-rejected"


def test_header_names_the_published_checkpoint_after_the_rollback(
    report_dir: Path, ledger_path: tuple[Path, dict[str, str]]
) -> None:
    _, ids = ledger_path
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    header = text.split('<h2 id="metrics">')[0]
    # The rollback put round 1's checkpoint back: it, not round 4's, is the one in use.
    assert f"{ids['c1'][:12]}</code> from round 1" in header
    assert ids["c4"][:12] not in header
    assert "admin rollback: operator: round 4 misses &lt;bcc&gt;" in header
    assert "<title>Nordic &lt;derm&gt;</title>" in text
    assert "<h1>Nordic &lt;derm&gt;</h1>" in text
    assert "4 round(s): 2 published, 1 rejected by the validation gate, 1 aborted" in header
    assert "1 admin rollback(s)" in header


def test_ledger_strings_are_escaped_and_page_is_self_contained(report_dir: Path) -> None:
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    page = _parse(text)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "<script" not in text.lower()
    assert page.scripts == 0
    # Only the three plots, by relative name: nothing fetched from elsewhere.
    assert sorted(page.links) == sorted([METRICS_PNG, CONFUSION_PNG, PARTICIPATION_PNG])
    assert sorted(page.images) == sorted([METRICS_PNG, CONFUSION_PNG, PARTICIPATION_PNG])
    assert "How to read this" in text
    assert "previous model stayed published" in text


def test_privacy_table_keeps_the_latest_report_per_clinic(report_dir: Path) -> None:
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    section = text.split('<h2 id="participation">')[1].split('<h2 id="publications">')[0]
    assert "No privacy reports yet" not in section
    # clinic-a reported twice in round 4: 1.5 then 1.7; only 1.7 is shown.
    assert "<td>clinic-a</td><td class='num'>4</td><td class='num'>1.700</td>" in section
    assert "1.500" not in section
    # clinic-b's round-4 report was unreadable, so its round-1 report is its latest.
    assert "<td>clinic-b</td><td class='num'>1</td><td class='num'>1.100</td>" in section
    assert "<td class='num'>n/a</td>" in section  # clinic-b reported no remaining budget
    assert "1 privacy report(s) in the ledger could not be read" in section


def test_publication_history_lists_the_rollback(report_dir: Path) -> None:
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    section = text.split('<h2 id="publications">')[1].split("<h2")[0]
    kinds = [k for k in ("initial", "round", "rollback") if f"<td>{k}</td>" in section]
    assert kinds == ["initial", "round", "rollback"]
    assert section.count("<tr class=") == 4


def test_report_model_marks_rejections_rollbacks_and_participation(
    ledger_path: tuple[Path, dict[str, str]],
) -> None:
    path, ids = ledger_path
    report = build_report(read_ledger(path), "t", 0.0)
    assert [r.number for r in report.rounds if r.outcome == "rejected"] == [2]
    assert len(report.rollbacks) == 1
    assert report.rollbacks[0].after_round == 4  # made after round 4 had started
    assert report.rollbacks[0].publication.checkpoint == ids["c1"]
    assert report.published_metrics == ROUND1
    assert confusion_matrix(report.published_metrics) == ROUND1["confusion"]
    assert report.participation["clinic-c"] == {
        1: "declined",
        2: "dropped",
        3: "selected, no answer",
        4: "contributed",
    }
    assert report.participation["clinic-b"][3] == "dropped"
    assert [(p.clinic, p.round, p.epsilon_spent) for p in report.privacy] == [
        ("clinic-a", 1, 0.9),
        ("clinic-a", 4, 1.7),
        ("clinic-b", 1, 1.1),
        ("clinic-c", 4, 0.8),
    ]
    assert report.unreadable_privacy_reports == 1


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize("name", [METRICS_PNG, CONFUSION_PNG, PARTICIPATION_PNG])
def test_plots_are_valid_png_files(report_dir: Path, name: str) -> None:
    path = report_dir / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        width, height = img.size
        assert width >= 400 and height >= 300
        # A drawn figure, not an empty canvas: many distinct colours.
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50


# --------------------------------------------------------------------------- edge cases


def test_initial_model_only_says_so_instead_of_plots(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as led:
        led.record_checkpoint("f" * 64, 0, None, 10.0)
        led.publish("f" * 64, 0, 10.0, "initial", "initial model")
    out = tmp_path / "site"
    out.mkdir()
    (out / CONFUSION_PNG).write_bytes(b"stale plot from an earlier run")
    assert _run_cli("report", "--ledger", str(path), "--out", str(out)) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "initial model, which has no validation metrics" in text
    assert "No privacy reports yet." in text
    assert "No round has validation metrics yet." in text
    assert "No rounds yet." in text
    assert _parse(text).images == []
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]


def test_running_round_is_read_through_a_live_writers_wal(tmp_path: Path) -> None:
    path = tmp_path / "db" / "ledger.sqlite"
    with Ledger(path) as led:
        led.record_checkpoint("a" * 64, 0, None, 10.0)
        led.publish("a" * 64, 0, 10.0, "initial")
        led.begin_round(1, "a" * 64, "secagg", {}, ["clinic-a", "clinic-b"], 20.0)
        led.record_clinic_event(1, "clinic-a", "privacy", _privacy(0.5, 1.5), 21.0)
        # The -shm file is SQLite's shared-memory index, not data: a reader of a live WAL
        # database must take a read mark there so the writer keeps its frames. The
        # database and the WAL itself stay byte-identical.
        before = _snapshot_dir(path.parent)
        assert _run_cli("report", "--ledger", str(path), "--out", str(tmp_path / "site")) == 0
        after = _snapshot_dir(path.parent)
        assert set(after) == set(before) == {path.name, f"{path.name}-wal", f"{path.name}-shm"}
        assert after[path.name] == before[path.name]
        assert after[f"{path.name}-wal"] == before[f"{path.name}-wal"]
    page = _parse((tmp_path / "site" / "index.html").read_text(encoding="utf-8"))
    assert page.rows["round-1"][:4] == ["1", "running", "", "0/2"]


def test_missing_ledger_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sqlite"
    assert _run_cli("report", "--ledger", str(missing), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"ledger {missing} does not exist" in err
    assert not missing.exists()  # read-only: SQLite did not create it either
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a database, just text" * 100, "cannot be read"),
        (b"", "is not a dermafed ledger"),
    ],
)
def test_a_file_that_is_not_a_ledger_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_bytes(content)
    assert _run_cli("report", "--ledger", str(bogus), "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err
    assert bogus.read_bytes() == content


def test_report_is_a_dermafed_subcommand(
    ledger_path: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from dermafed.cli import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(["report", "--ledger", str(ledger_path[0]), "--out", "x"])
    except SystemExit:
        pytest.fail("dermafed/cli.py must call cli_report.register(sub) in build_parser()")
    assert args.func is cli_report.cmd_report


# --------------------------------------------------------------------------- browser


def _chromium() -> str:
    """The Chromium binary, or skip (locally) / fail (in CI) when it is missing."""
    for candidate in (
        os.environ.get("DERMAFED_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if candidate and (found := shutil.which(candidate)):
            return found
    reason = (
        "headless Chromium is not installed (Debian: apt-get install chromium); "
        "set DERMAFED_CHROMIUM to use another binary"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def _browser_flags(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


class _DevTools:
    """Chrome DevTools protocol over ``--remote-debugging-pipe``: no port, stdlib only.

    Chromium reads NUL-terminated JSON commands on fd 3 and writes replies on fd 4.
    """

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Move the child's ends above 4 first so the dup2 calls cannot clobber each other.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self._log = log.open("wb")
        try:
            self.proc = subprocess.Popen(
                [binary, *_browser_flags(profile), "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=wire,
                close_fds=False,  # fds 3 and 4 must survive; ours are all close-on-exec
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self._buffer = b""
        self._id = 0

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_chrome, data) :]
        deadline = time.monotonic() + 60.0  # a hang guard, not a performance assertion
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") != self._id:
                    continue  # an event, or a reply to an earlier call
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from Chromium to {method}")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe during {method}")
                self._buffer += chunk

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close")
            self.proc.wait(timeout=30)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
            self._log.close()


_PAGE_STATE = """(() => ({
  href: location.href,
  ready: document.readyState,
  images: Array.from(document.images).map(i => ({
    src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  allLoaded: Array.from(document.images).every(i => i.complete && i.naturalWidth > 0),
}))()"""


def test_page_renders_in_headless_chromium_with_every_image_loaded(
    report_dir: Path, tmp_path: Path
) -> None:
    binary = _chromium()
    url = (report_dir / "index.html").resolve().as_uri()

    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            binary,
            *_browser_flags(tmp_path / "profile-shot"),
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
    assert rgb.size == (1200, 2000)
    pixels = np.asarray(rgb, dtype=np.int16)
    not_white = (pixels < 245).any(axis=2).mean()
    assert not_white > 0.03, f"screenshot is almost blank ({not_white:.1%} non-white)"
    # matplotlib's first line colour (#1f77b4) appears only inside the plots, so seeing it
    # means the browser decoded and painted at least the metrics image.
    blue = (np.abs(pixels - np.array([0x1F, 0x77, 0xB4])).sum(axis=2) < 30).sum()
    assert blue > 200, "no plot pixels in the screenshot: did the images load?"

    devtools = _DevTools(binary, tmp_path / "profile-cdp", tmp_path / "chromium.log")
    try:
        target = devtools.call("Target.createTarget", {"url": url})["targetId"]
        session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        deadline = time.monotonic() + 60.0
        while True:
            state = devtools.call(
                "Runtime.evaluate",
                {"expression": _PAGE_STATE, "returnByValue": True},
                session,
            )["result"]["value"]
            if state["href"] == url and state["ready"] == "complete":
                break
            assert time.monotonic() < deadline, f"page never finished loading: {state}"
            time.sleep(0.1)
    finally:
        devtools.close()
    assert sorted(i["src"] for i in state["images"]) == sorted(
        [METRICS_PNG, CONFUSION_PNG, PARTICIPATION_PNG]
    )
    assert state["allLoaded"], f"an image did not load: {state['images']}"

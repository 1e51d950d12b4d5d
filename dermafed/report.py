"""``dermafed report``: a static HTML page about a federation, read from its ledger.

Three steps, each usable on its own: :func:`read_ledger` takes a consistent, read-only
snapshot of the aggregator's SQLite ledger; :func:`build_report` turns it into a
:class:`Report` (plain data: series, marks, tables); :func:`write_report` renders
``index.html`` and PNG plots next to it. The page is for a privacy officer or a
clinician opening a file: no JavaScript, no external resources, relative links only,
and every string that came from the ledger is HTML-escaped.

The ledger is never written. Opening it through :class:`aggregator.ledger.Ledger` would
run migrations and switch journal modes, so it is read here with plain ``sqlite3`` in
read-only mode; see :func:`read_ledger` for how that avoids even SQLite's side files.
"""

from __future__ import annotations

import html
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator.ledger import (
    SCHEMA_VERSION,
    CheckpointRecord,
    ClinicEvent,
    Publication,
    RoundRecord,
)
from common.datasets import CLASSES, HIGH_RISK
from common.errors import IntegrityError, NotFoundError, PreconditionError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_TITLE = "dermafed federation report"
METRICS_PNG = "metrics.png"
CONFUSION_PNG = "confusion.png"
PARTICIPATION_PNG = "participation.png"
PLOT_FILES = (METRICS_PNG, CONFUSION_PNG, PARTICIPATION_PNG)
INDEX_HTML = "index.html"

# Per-clinic status in a round, from clinic_events; the latest of these events wins, so a
# clinic that uploaded and then went silent while unmasking shows as dropped.
OUTCOME_EVENTS = ("contributed", "declined", "dropped")
SELECTED_EVENT = "selected"
PRIVACY_EVENT = "privacy"
CHECKPOINT_PREFIX = 12

# Colours chosen to stay distinguishable for the common red-green deficiencies.
_STATUS_COLOURS = {
    "not selected": "#ffffff",
    "selected, no answer": "#c8c8c8",
    "contributed": "#1b7837",
    "declined": "#f1a340",
    "dropped": "#b2182b",
}
_STATUS_ORDER = tuple(_STATUS_COLOURS)
_REJECTED_COLOUR = "#d62728"


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LedgerSnapshot:
    """Everything the report needs, read in one transaction."""

    path: Path
    rounds: tuple[RoundRecord, ...]  # oldest first
    publications: tuple[Publication, ...]  # oldest first
    checkpoints: Mapping[str, CheckpointRecord]
    clinic_events: tuple[ClinicEvent, ...]  # in recorded order


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _sidecars(path: Path) -> tuple[Path, ...]:
    return (Path(f"{path}-wal"), Path(f"{path}-journal"))


def _file_state(path: Path) -> tuple[int, int, int, bool]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, any(p.exists() for p in _sidecars(path)))


def _query(db: sqlite3.Connection, path: Path) -> LedgerSnapshot:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version == 0:
        raise IntegrityError(f"{path} is not a dermafed ledger (no schema version)")
    if version > SCHEMA_VERSION:
        raise PreconditionError(
            f"ledger {path} has schema version {version}, newer than this report "
            f"understands ({SCHEMA_VERSION}); upgrade dermafed"
        )
    rounds = tuple(
        RoundRecord(
            number=int(r[0]),
            parent=r[1],
            mode=r[2],
            plan=_loads(r[3]) or {},
            cohort=_loads(r[4]) or [],
            started_at=float(r[5]),
            finished_at=None if r[6] is None else float(r[6]),
            outcome=r[7],
            reason=r[8],
            checkpoint=r[9],
            contributors=_loads(r[10]) or [],
            train_loss=None if r[11] is None else float(r[11]),
            metrics=_loads(r[12]),
            stages=_loads(r[13]) or {},
        )
        for r in db.execute(
            "SELECT number, parent, mode, plan_json, cohort_json, started_at, finished_at,"
            " outcome, reason, checkpoint, contributors_json, train_loss, metrics_json,"
            " stage_json FROM rounds ORDER BY number"
        )
    )
    publications = tuple(
        Publication(int(r[0]), r[1], r[2], float(r[3]), r[4], r[5] or "")
        for r in db.execute(
            "SELECT id, checkpoint, round, at, kind, reason FROM publications ORDER BY id"
        )
    )
    checkpoints = {
        r[0]: CheckpointRecord(
            id=r[0],
            round=r[1],
            parent=r[2],
            created_at=float(r[3]) if r[3] is not None else 0.0,
            metrics=_loads(r[4]),
        )
        for r in db.execute("SELECT id, round, parent, created_at, metrics_json FROM checkpoints")
    }
    events = tuple(
        ClinicEvent(int(r[0]), r[1], r[2], r[3], r[4], float(r[5]))
        for r in db.execute(
            "SELECT id, round, clinic, event, detail, at FROM clinic_events ORDER BY id"
        )
    )
    return LedgerSnapshot(path, rounds, publications, checkpoints, events)


def _read_once(path: Path, immutable: bool) -> LedgerSnapshot:
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise IntegrityError(f"ledger {path} cannot be opened read-only: {exc}") from exc
    try:
        # One read transaction: all tables come from the same committed state even while
        # the aggregator keeps writing.
        db.execute("BEGIN")
        snapshot = _query(db, path)
        db.execute("COMMIT")
        return snapshot
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"ledger {path} cannot be read: {exc}") from exc
    except (ValueError, TypeError) as exc:  # malformed JSON or a non-numeric column
        raise IntegrityError(f"ledger {path} holds a malformed record: {exc}") from exc
    finally:
        db.close()


def read_ledger(path: Path) -> LedgerSnapshot:
    """Read the ledger at ``path`` without changing anything on disk.

    A plain ``mode=ro`` open of a WAL database makes SQLite create ``-wal``/``-shm``
    files that a read-only connection can never remove. So when no side file exists (no
    aggregator has it open) the file is read as ``immutable``, which creates nothing, and
    the read is trusted only if the file and its side files are unchanged afterwards: in
    WAL mode every writer creates the ``-wal`` file before it writes. Otherwise (an
    aggregator is live, or the snapshot raced one) the ordinary read-only mode reads
    through the writer's WAL, whose side files already exist.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"ledger {path} does not exist")
    if not path.is_file():
        raise NotFoundError(f"ledger {path} is not a file")
    before = _file_state(path)
    if not before[3]:
        snapshot = _read_once(path, immutable=True)
        if _file_state(path) == before:
            return snapshot
    return _read_once(path, immutable=False)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class RollbackMark:
    """An admin rollback, placed after the last round that had started before it."""

    publication: Publication
    after_round: int  # 0 when no round had started yet


@dataclass(frozen=True)
class PrivacyPoint:
    clinic: str
    round: int
    epsilon_spent: float
    epsilon_remaining: float | None
    at: float


@dataclass(frozen=True)
class Report:
    title: str
    generated_at: float
    ledger_path: str
    rounds: tuple[RoundRecord, ...]  # oldest first
    publications: tuple[Publication, ...]  # oldest first
    published: Publication | None
    published_metrics: Mapping[str, Any] | None
    rollbacks: tuple[RollbackMark, ...]
    clinics: tuple[str, ...]  # every clinic with a participation event, sorted
    participation: Mapping[str, Mapping[int, str]]  # clinic -> round -> status
    privacy: tuple[PrivacyPoint, ...]  # latest report per clinic per round
    unreadable_privacy_reports: int

    def rounds_with_metrics(self) -> list[RoundRecord]:
        return [r for r in self.rounds if r.metrics]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _privacy_point(event: ClinicEvent) -> PrivacyPoint | None:
    """Parse a privacy report's detail; None when it is not the documented JSON."""
    if event.round is None or event.detail is None:
        return None
    try:
        detail = json.loads(event.detail)
    except ValueError:
        return None
    if not isinstance(detail, dict):
        return None
    spent = _finite(detail.get("epsilon_spent"))
    if spent is None:
        return None
    remaining_raw = detail.get("epsilon_remaining")
    remaining = _finite(remaining_raw)
    if remaining_raw is not None and remaining is None:
        return None
    return PrivacyPoint(event.clinic, int(event.round), spent, remaining, event.at)


def _participation(events: Iterable[ClinicEvent]) -> dict[str, dict[int, str]]:
    table: dict[str, dict[int, str]] = {}
    for ev in events:
        if ev.round is None:
            continue
        if ev.event == SELECTED_EVENT:
            table.setdefault(ev.clinic, {}).setdefault(ev.round, "selected, no answer")
        elif ev.event in OUTCOME_EVENTS:
            table.setdefault(ev.clinic, {})[ev.round] = ev.event
    return table


def _published_metrics(
    published: Publication | None,
    rounds: Mapping[int, RoundRecord],
    checkpoints: Mapping[str, CheckpointRecord],
) -> Mapping[str, Any] | None:
    if published is None:
        return None
    if published.round is not None:
        producer = rounds.get(published.round)
        # A rollback names the round that produced its target, so this finds its metrics.
        if (
            producer is not None
            and producer.checkpoint == published.checkpoint
            and producer.metrics
        ):
            return producer.metrics
    record = checkpoints.get(published.checkpoint)
    return record.metrics if record is not None and record.metrics else None


def build_report(snapshot: LedgerSnapshot, title: str, generated_at: float) -> Report:
    """Derive everything the page shows from a ledger snapshot (no I/O)."""
    by_number = {r.number: r for r in snapshot.rounds}
    published = snapshot.publications[-1] if snapshot.publications else None

    rollbacks: list[RollbackMark] = []
    for pub in snapshot.publications:
        if pub.kind != "rollback":
            continue
        started = [r.number for r in snapshot.rounds if r.started_at <= pub.at]
        rollbacks.append(RollbackMark(pub, max(started, default=0)))

    latest: dict[tuple[str, int], PrivacyPoint] = {}
    unreadable = 0
    for ev in snapshot.clinic_events:
        if ev.event != PRIVACY_EVENT:
            continue
        point = _privacy_point(ev)
        if point is None:
            unreadable += 1
            continue
        latest[(point.clinic, point.round)] = point  # events are in recorded order
    privacy = tuple(sorted(latest.values(), key=lambda p: (p.clinic, p.round)))

    participation = _participation(snapshot.clinic_events)
    return Report(
        title=title,
        generated_at=generated_at,
        ledger_path=str(snapshot.path),
        rounds=snapshot.rounds,
        publications=snapshot.publications,
        published=published,
        published_metrics=_published_metrics(published, by_number, snapshot.checkpoints),
        rollbacks=tuple(rollbacks),
        clinics=tuple(sorted(participation)),
        participation=participation,
        privacy=privacy,
        unreadable_privacy_reports=unreadable,
    )


# --------------------------------------------------------------------------- plots


def _metric(metrics: Mapping[str, Any] | None, key: str, cls: str | None = None) -> float:
    """One metric as a float; NaN when absent or undefined (stored as null)."""
    if not metrics:
        return math.nan
    value = metrics.get(key)
    if cls is not None:
        value = value.get(cls) if isinstance(value, Mapping) else None
    number = _finite(value)
    return math.nan if number is None else number


def _new_figure(width: float, height: float) -> Figure:
    # The object API with an explicit Agg canvas: no pyplot, so no process-wide backend
    # state and no display is ever needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_LINE_METRICS: tuple[tuple[str, str | None, str, str], ...] = (
    ("accuracy", None, "accuracy", "-"),
    ("balanced_accuracy", None, "balanced accuracy", "-"),
    ("macro_auroc", None, "macro AUROC", "-"),
    *(("sensitivity", c, f"sensitivity {c} (high risk)", "--") for c in HIGH_RISK),
)


def plot_metrics(report: Report, path: Path) -> bool:
    """Validation metrics per round; False (nothing written) when no round has metrics."""
    measured = report.rounds_with_metrics()
    if not measured:
        return False
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _new_figure(10.5, 5.8)
    ax = fig.add_subplot()
    kept = [r for r in measured if r.outcome != "rejected"]
    rejected = [r for r in measured if r.outcome == "rejected"]
    handles: list[Any] = []
    for key, cls, label, style in _LINE_METRICS:
        (line,) = ax.plot(
            [r.number for r in kept],
            [_metric(r.metrics, key, cls) for r in kept],
            linestyle=style,
            marker="o",
            markersize=4,
            label=label,
        )
        handles.append(line)
        if rejected:
            ax.scatter(
                [r.number for r in rejected],
                [_metric(r.metrics, key, cls) for r in rejected],
                marker="x",
                s=60,
                linewidths=2,
                color=line.get_color(),
                zorder=3,
            )
    # Rejections as a shaded band and rollbacks in black, so neither can be mistaken for
    # a metric's line (mel sensitivity is already red).
    rejected_rounds = [r.number for r in report.rounds if r.outcome == "rejected"]
    for n in rejected_rounds:
        ax.axvspan(n - 0.35, n + 0.35, color=_REJECTED_COLOUR, alpha=0.15, linewidth=0, zorder=0)
    if rejected_rounds:
        handles.append(
            Patch(
                facecolor=_REJECTED_COLOUR,
                alpha=0.3,
                label="round rejected by the validation gate (previous model kept)",
            )
        )
        if rejected:
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="x",
                    markersize=7,
                    markeredgewidth=2,
                    color="black",
                    label="the rejected candidate's values",
                )
            )
    for mark in report.rollbacks:
        x = mark.after_round + 0.5
        ax.axvline(x, color="black", linestyle="--", linewidth=1.8, zorder=1)
        target = "?" if mark.publication.round is None else str(mark.publication.round)
        ax.annotate(
            f"rollback to round {target}",
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
        )
    if report.rollbacks:
        handles.append(
            Line2D([], [], color="black", linestyle="--", linewidth=1.8, label="admin rollback")
        )
    # Room on the right for a rollback made after the latest round.
    right = max([r.number for r in report.rounds] + [m.after_round + 1 for m in report.rollbacks])
    ax.set_xlim(0.5, right + 0.5)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out score (0 to 1)")
    ax.set_title("Validation metrics per round (lines: the model kept after each round)")
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.savefig(path, format="png")
    return True


def class_labels(k: int) -> tuple[str, ...]:
    """Same naming as :func:`common.evaluation.class_names` (without importing torch)."""
    return CLASSES if k == len(CLASSES) else tuple(f"class{i}" for i in range(k))


def confusion_matrix(metrics: Mapping[str, Any] | None) -> list[list[int]] | None:
    """The square confusion matrix in ``metrics``, or None when absent or malformed."""
    raw = metrics.get("confusion") if metrics else None
    if not isinstance(raw, list) or not raw:
        return None
    k = len(raw)
    rows: list[list[int]] = []
    for row in raw:
        if not isinstance(row, list) or len(row) != k:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row):
            return None
        rows.append([int(v) for v in row])
    return rows


def plot_confusion(report: Report, path: Path) -> bool:
    """Confusion matrix of the published checkpoint; False when it has none."""
    matrix = confusion_matrix(report.published_metrics)
    if matrix is None:
        return False
    title = "Published model on the held-out set\n(numbers: counts; colour: share of row)"
    confusion_figure(matrix, title).savefig(path, format="png")
    return True


def confusion_figure(matrix: Sequence[Sequence[int]], title: str) -> Figure:
    """A square confusion matrix (rows true, columns predicted): counts in the cells,
    colour the share of the row, row labels with the row's total, high-risk labels red."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    labels = class_labels(len(matrix))
    fig = _new_figure(7.2, 6.2)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if share[i, j] > 0.55 else "black",
            )
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, [f"{c} ({int(totals[i, 0])})" for i, c in enumerate(labels)])
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        if tick.get_text().split(" ")[0] in HIGH_RISK:
            tick.set_color("#b2182b")
            tick.set_fontweight("bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (examples)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.85)
    return fig


def _plot_participation_grid(ax: Axes, report: Report, rounds: Sequence[int]) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = np.zeros((len(report.clinics), len(rounds)), dtype=np.int64)
    column = {n: j for j, n in enumerate(rounds)}
    for i, clinic in enumerate(report.clinics):
        for n, status in report.participation[clinic].items():
            if n in column:
                codes[i, column[n]] = _STATUS_ORDER.index(status)
    cmap = ListedColormap([_STATUS_COLOURS[s] for s in _STATUS_ORDER])
    ax.imshow(
        codes,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(_STATUS_ORDER) - 0.5,
        aspect="auto",
        interpolation="nearest",
        extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(report.clinics) - 0.5, -0.5),
    )
    # Thin white grid lines so neighbouring cells of one colour stay countable.
    ax.set_yticks(range(len(report.clinics)), report.clinics)
    ax.set_yticks([i + 0.5 for i in range(len(report.clinics) - 1)], minor=True)
    if len(rounds) <= 60:
        ax.set_xticks([n + 0.5 for n in rounds[:-1]], minor=True)
    ax.grid(which="minor", color="#eeeeee", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_title("Participation per clinic and round")
    ax.legend(
        handles=[
            Patch(facecolor=_STATUS_COLOURS[s], edgecolor="#888888", label=s) for s in _STATUS_ORDER
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )


def _plot_privacy(ax: Axes, report: Report) -> None:
    clinics = sorted({p.clinic for p in report.privacy})
    for clinic in clinics:
        points = [p for p in report.privacy if p.clinic == clinic]
        (line,) = ax.plot(
            [p.round for p in points],
            [p.epsilon_spent for p in points],
            marker="o",
            markersize=4,
            label=clinic,
        )
        budgets = [
            p.epsilon_spent + p.epsilon_remaining for p in points if p.epsilon_remaining is not None
        ]
        if budgets:
            # The budget as last reported: ε_max = spent + remaining.
            ax.axhline(budgets[-1], color=line.get_color(), linestyle=":", linewidth=1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("Privacy budget spent per clinic (dotted: the clinic's ε budget)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plot_participation(report: Report, path: Path) -> bool:
    """Participation grid (and ε per clinic when reported); False without any events."""
    seen = (
        {r.number for r in report.rounds}
        | {n for per in report.participation.values() for n in per}
        | {p.round for p in report.privacy}
    )
    # Contiguous, because the grid draws one column per round number.
    round_numbers = list(range(min(seen), max(seen) + 1)) if seen else []
    if not round_numbers or not (report.clinics or report.privacy):
        return False
    heights: list[float] = []
    if report.clinics:
        heights.append(max(1.8, 0.32 * len(report.clinics) + 1.2))
    if report.privacy:
        heights.append(3.6)
    fig = _new_figure(10.5, sum(heights) + 0.3)
    axes = list(fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0])
    if report.clinics:
        _plot_participation_grid(axes.pop(0), report, round_numbers)
    if report.privacy:
        ax = axes.pop(0)
        _plot_privacy(ax, report)
        # Same round axis as the grid above, so a clinic's row and its ε line align.
        ax.set_xlim(round_numbers[0] - 0.5, round_numbers[-1] + 0.5)
    fig.savefig(path, format="png")
    return True


def render_plots(report: Report, out: Path) -> set[str]:
    """Write the PNGs that have data into ``out``; returns the names written.

    A plot file left from an earlier run that has nothing to show now is removed, so the
    folder never holds a picture the page does not describe.
    """
    written: set[str] = set()
    for name, draw in (
        (METRICS_PNG, plot_metrics),
        (CONFUSION_PNG, plot_confusion),
        (PARTICIPATION_PNG, plot_participation),
    ):
        target = out / name
        if draw(report, target):
            written.add(name)
        elif target.exists():
            target.unlink()
    return written


# --------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _short(cid: str | None) -> str:
    return "" if cid is None else cid[:CHECKPOINT_PREFIX]


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1120px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
.card { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px;
        padding: 0.8em 1.2em; margin: 1em 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.3em 0.5em; text-align: left;
         vertical-align: top; }
th { background: #f0f2f4; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
.outcome { font-weight: 600; padding: 0.05em 0.45em; border-radius: 4px; }
.outcome-published { background: #dcf5e3; color: #1b5e20; }
.outcome-rejected { background: #fde2e1; color: #a0161f; }
.outcome-aborted { background: #eeeeee; color: #444; }
.outcome-running { background: #e3ecfa; color: #1f4e8c; }
tr.rollback td { background: #f3e8f8; }
.note { color: #555; font-style: italic; }
code { font-size: 0.95em; }
"""


def _html_header(report: Report) -> str:
    pub = report.published
    if pub is None:
        published = "<p><strong>Published model:</strong> none yet.</p>"
    else:
        # Round 0 (or none) is the initial model by the ledger's convention.
        round_text = "the initial model" if pub.round in (None, 0) else f"round {_e(pub.round)}"
        how = {"initial": "initial model", "round": "new round", "rollback": "admin rollback"}
        published = (
            f'<p><strong>Published model:</strong> checkpoint <code title="{_e(pub.checkpoint)}">'
            f"{_e(_short(pub.checkpoint))}</code> from {round_text}, published "
            f"{_e(_when(pub.at))} ({_e(how.get(pub.kind, pub.kind))}"
            + (f": {_e(pub.reason)}" if pub.reason else "")
            + ")</p>"
        )
    outcomes = [r.outcome or "running" for r in report.rounds]
    summary = (
        f"{len(report.rounds)} round(s): {outcomes.count('published')} published, "
        f"{outcomes.count('rejected')} rejected by the validation gate, "
        f"{outcomes.count('aborted')} aborted"
        + (f", {outcomes.count('running')} running" if "running" in outcomes else "")
        + f"; {len(report.rollbacks)} admin rollback(s)."
    )
    return (
        f"<h1>{_e(report.title)}</h1>\n"
        f'<p class="meta">Generated {_e(_when(report.generated_at))} from ledger '
        f"<code>{_e(report.ledger_path)}</code> (read-only).</p>\n"
        f'<div class="card">{published}<p>{_e(summary)}</p></div>\n'
    )


_HOW_TO_READ = """
<h2 id="how-to-read">How to read this</h2>
<p>Each <em>round</em>, clinics train the shared model on their own images, which never
leave the clinic, and send only a protected update. The combined model is then checked
on a held-out set of images that no clinic trained on. <strong>Accuracy</strong> is the
share of those images classified correctly; because most lesions are harmless moles, it
can look good even when rare cancers are missed. <strong>Balanced accuracy</strong> is
the average, over the lesion types, of the share of each type found, so every type counts
the same. The <strong>sensitivity</strong> of a lesion type is the share of lesions of
that type the model finds: for the high-risk types (melanoma <code>mel</code>, basal cell
carcinoma <code>bcc</code>, actinic keratosis / intraepithelial carcinoma
<code>akiec</code>) a low sensitivity means missed cancers. <strong>Macro AUROC</strong>
(0.5 = guessing, 1 = perfect) measures how well the model ranks each type above the
others. A <strong>rejected</strong> round means the held-out images showed, beyond what
chance explains, that the new candidate found fewer high-risk lesions than the model in
use (or the combined update was one no honest group of clinics could send), so the
validation gate discarded it and the previous model stayed published; the reason column
gives the numbers behind every decision. An <strong>aborted</strong> round stopped before
producing a model (for example, too few clinics answered); nothing changed. An
<strong>admin rollback</strong> is an operator putting an earlier published model back
in use. <strong>ε</strong> (epsilon) is the differential-privacy budget a clinic has
spent: smaller means stronger protection of each patient image; each clinic stops
contributing before it would exceed its own limit.</p>
<p class="note">Research use only: these figures describe a model under development, not
a diagnostic device.</p>
"""


def _metrics_section(report: Report, plots: set[str]) -> str:
    parts = ['<h2 id="metrics">Validation metrics per round</h2>']
    if METRICS_PNG in plots:
        parts.append(
            f'<img src="{METRICS_PNG}" alt="Line chart of accuracy, balanced accuracy, '
            "macro AUROC and high-risk sensitivities per round, with rejected rounds and "
            'rollbacks marked">'
        )
        parts.append(
            '<p class="note">Red bands with x markers: rounds whose candidate the validation '
            "gate rejected (the x marks are the rejected candidate's values; the previous "
            "model stayed published). Black dashed lines: admin rollbacks.</p>"
        )
    else:
        parts.append("<p>No round has validation metrics yet.</p>")
    return "\n".join(parts)


def _reason(r: RoundRecord) -> str:
    """The round's reason; for a published round, why the gate let it through."""
    if r.reason:
        return r.reason
    gate = (r.metrics or {}).get("gate")
    if isinstance(gate, dict) and gate.get("reason"):
        return f"gate ({gate.get('rule') or 'tolerance'}): {gate['reason']}"
    return ""


def _round_rows(report: Report) -> str:
    rows = []
    for r in reversed(report.rounds):
        outcome = r.outcome or "running"
        seconds = None if r.finished_at is None else r.finished_at - r.started_at
        contributors = ", ".join(r.contributors) or "none"
        cohort = ", ".join(r.cohort) or "none"
        rows.append(
            f'<tr id="round-{r.number}" class="round-{_e(outcome)}">'
            f'<td class="num">{r.number}</td>'
            f'<td><span class="outcome outcome-{_e(outcome)}">{_e(outcome)}</span></td>'
            f"<td>{_e(_reason(r))}</td>"
            f'<td title="contributed: {_e(contributors)}; cohort: {_e(cohort)}">'
            f"{len(r.contributors)}/{len(r.cohort)}</td>"
            f'<td class="num">{_num(r.train_loss, 4)}</td>'
            f'<td class="num">{_num(_metric(r.metrics, "balanced_accuracy"))}</td>'
            f'<td class="num">{_num(_metric(r.metrics, "sensitivity", "mel"))}</td>'
            f'<td class="num">{_num(seconds, 1)}</td>'
            "</tr>"
        )
    return "\n".join(rows)


def _rounds_section(report: Report) -> str:
    head = '<h2 id="rounds">Rounds (newest first)</h2>'
    if not report.rounds:
        return head + "\n<p>No rounds yet.</p>"
    return (
        f'{head}\n<table>\n<thead><tr><th class="num">round</th><th>outcome</th><th>reason</th>'
        '<th title="clinics whose update is in the model / clinics selected">'
        'contributors/cohort</th><th class="num">train loss</th>'
        '<th class="num">balanced accuracy</th><th class="num">mel sensitivity</th>'
        '<th class="num">seconds</th></tr></thead>\n<tbody>\n'
        f"{_round_rows(report)}\n</tbody>\n</table>"
    )


def _publications_section(report: Report) -> str:
    head = '<h2 id="publications">Published-model history (oldest first)</h2>'
    if not report.publications:
        return head + "\n<p>No model has been published yet.</p>"
    rows = "\n".join(
        f'<tr class="{_e(p.kind)}"><td>{_e(_when(p.at))}</td><td>{_e(p.kind)}</td>'
        f'<td><code title="{_e(p.checkpoint)}">{_e(_short(p.checkpoint))}</code></td>'
        f'<td class="num">{_e("" if p.round is None else p.round)}</td>'
        f"<td>{_e(p.reason)}</td></tr>"
        for p in report.publications
    )
    return (
        f"{head}\n<table>\n<thead><tr><th>when</th><th>kind</th><th>checkpoint</th>"
        '<th class="num">round</th><th>reason</th></tr></thead>\n'
        f"<tbody>\n{rows}\n</tbody>\n</table>"
    )


def _confusion_section(report: Report, plots: set[str]) -> str:
    head = '<h2 id="confusion">Confusion matrix of the published model</h2>'
    pub = report.published
    if CONFUSION_PNG in plots:
        examples = (report.published_metrics or {}).get("examples")
        extra = f" on {_e(examples)} held-out images" if isinstance(examples, int) else ""
        return (
            f"{head}\n<p>Checkpoint <code>{_e(_short(pub.checkpoint if pub else None))}</code>"
            f"{extra}. Each row is a true lesion type; a high-risk row whose count sits "
            "outside the diagonal is a missed high-risk lesion.</p>\n"
            f'<img src="{CONFUSION_PNG}" alt="Confusion matrix of the published model">'
        )
    if pub is None:
        why = "No model has been published yet."
    elif pub.kind == "initial" or pub.round in (None, 0):
        why = (
            "The published model is the initial model, which has no validation metrics "
            "yet; the matrix appears once a round's model is published."
        )
    else:
        why = "The published model has no confusion matrix in the ledger."
    return f"{head}\n<p>{_e(why)}</p>"


def _privacy_table(report: Report) -> str:
    latest: dict[str, PrivacyPoint] = {}
    for p in sorted(report.privacy, key=lambda p: (p.round, p.at)):
        latest[p.clinic] = p
    rows = "\n".join(
        f"<tr><td>{_e(c)}</td><td class='num'>{p.round}</td>"
        f"<td class='num'>{_num(p.epsilon_spent)}</td>"
        f"<td class='num'>{_num(p.epsilon_remaining)}</td>"
        f"<td>{_e(_when(p.at))}</td></tr>"
        for c, p in sorted(latest.items())
    )
    return (
        '<table>\n<thead><tr><th>clinic</th><th class="num">round</th>'
        '<th class="num">ε spent</th><th class="num">ε remaining</th><th>reported</th>'
        "</tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody>\n</table>"
    )


def _participation_section(report: Report, plots: set[str]) -> str:
    parts = ['<h2 id="participation">Clinic participation and privacy budget</h2>']
    if PARTICIPATION_PNG in plots:
        parts.append(
            f'<img src="{PARTICIPATION_PNG}" alt="Participation of each clinic per round'
            + (" and privacy budget spent per clinic" if report.privacy else "")
            + '">'
        )
    else:
        parts.append("<p>No clinic events yet.</p>")
    if report.privacy:
        parts.append("<h3>Latest privacy report per clinic</h3>")
        parts.append(_privacy_table(report))
    else:
        parts.append("<p>No privacy reports yet.</p>")
    if report.unreadable_privacy_reports:
        parts.append(
            f'<p class="note">{report.unreadable_privacy_reports} privacy report(s) in the '
            "ledger could not be read (not the expected JSON) and are not shown.</p>"
        )
    return "\n".join(parts)


def render_html(report: Report, plots: set[str]) -> str:
    """The whole page; ``plots`` names the PNG files that exist next to it."""
    body = "\n".join(
        (
            _html_header(report),
            _metrics_section(report, plots),
            _rounds_section(report),
            _confusion_section(report, plots),
            _participation_section(report, plots),
            _publications_section(report),
            _HOW_TO_READ,
        )
    )
    return html_page(report.title, body, img_src="'self'")


def html_page(title: str, body: str, *, img_src: str, css: str = "") -> str:
    """A standalone page: no scripts and nothing fetched from elsewhere, whatever a
    ledger or file name holds (``img_src`` is the only source images may come from)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        f"img-src {img_src}; style-src 'unsafe-inline'\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}{css}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _write_text_atomic(path: Path, text: str) -> None:
    # A temporary name beside the target, then a rename: a browser reloading the page
    # never sees half of it. open() (unlike mkstemp) honours the umask, so the page is as
    # readable as the PNGs next to it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(
    ledger: Path, out: Path, title: str = DEFAULT_TITLE, generated_at: float | None = None
) -> Path:
    """Read ``ledger``, write ``out/index.html`` and its plots; returns the page's path."""
    import time

    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PreconditionError(
            "dermafed report needs matplotlib to draw its plots (pip install matplotlib)"
        ) from exc
    if not title.strip():
        raise ValueError("the report title must not be empty")
    snapshot = read_ledger(Path(ledger))
    when = time.time() if generated_at is None else generated_at
    report = build_report(snapshot, title, when)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(report, out)
    page = out / INDEX_HTML
    _write_text_atomic(page, render_html(report, plots))
    return page

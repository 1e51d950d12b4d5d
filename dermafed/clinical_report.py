"""What ``dermafed evaluate`` shows: a :class:`common.clinical_metrics.ClinicalReport` as
plain text for a terminal, and as one standalone HTML page (``--html``).

The page embeds its two images (confusion matrix, reliability diagram) as PNG data URIs,
so it is a single file that can be mailed or archived; like ``dermafed report`` it has
no JavaScript and loads nothing from elsewhere, and every string is HTML-escaped. The
styling and the confusion-matrix figure are :mod:`dermafed.report`'s.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common.clinical_metrics import (
    SUBGROUP_TITLES,
    Auroc,
    Calibration,
    ClinicalReport,
    Proportion,
)
from common.datasets import HIGH_RISK
from common.errors import InvalidArgumentError, PreconditionError
from dermafed.report import (
    _e,
    _new_figure,
    _num,
    _write_text_atomic,
    confusion_figure,
    html_page,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESEARCH_NOTE = "Research use only: these figures describe a model, not a diagnostic device."
NO_SUBGROUPS = (
    "No sex, age or body-site metadata in the data, so no subgroup tables (they need the "
    "HAM10000_metadata.csv columns sex, age, localization, or an index CSV written from "
    "such data by dermafed data partition)."
)


# --------------------------------------------------------------------------- text


def _prop(p: Proportion | None) -> str:
    if p is None:
        return "n/a"
    return f"{p.estimate:.3f} [{p.low:.3f}, {p.high:.3f}] {p.k}/{p.n}"


def _auc(a: Auroc | None) -> str:
    return "n/a" if a is None else f"{a.value:.3f} [{a.low:.3f}, {a.high:.3f}]"


def _short_prop(p: Proportion | None) -> str:
    return "n/a" if p is None else f"{p.estimate:.2f} {p.k}/{p.n}"


def _class_label(name: str) -> str:
    return f"{name} *" if name in HIGH_RISK else name


def _confusion_lines(report: ClinicalReport) -> list[str]:
    names = report.classes
    lines = ["true \\ pred" + "".join(f"{n:>7}" for n in names) + f"{'cases':>8}"]
    for name, row in zip(names, report.confusion, strict=True):
        lines.append(f"{_class_label(name):<11}" + "".join(f"{v:>7}" for v in row))
        lines[-1] += f"{sum(row):>8}"
    return lines


def _calibration_lines(cal: Calibration) -> list[str]:
    lines = [f"{'confidence':<16}{'cases':>6}{'mean confidence':>17}{'accuracy':>10}"]
    for b in cal.reliability:
        span = f"({b.low:.3f}, {b.high:.3f}]"
        lines.append(f"{span:<16}{b.count:>6}{b.confidence:>17.3f}{b.accuracy:>10.3f}")
    return lines


def _subgroup_lines(report: ClinicalReport) -> list[str]:
    if not report.subgroups:
        return [NO_SUBGROUPS]
    risky = [c for c in HIGH_RISK if c in report.classes]
    head = f"{'group':<18}{'n':>6}{'bal. acc':>10}{'macro AUROC':>13}  " + "".join(
        f"{f'{c} sensitivity':<18}" for c in risky
    )
    lines = [
        "n = cases in the group; bal. acc over the classes present in it; "
        "sensitivity as estimate k/n"
    ]
    for attribute, rows in report.subgroups.items():
        lines += ["", f"By {SUBGROUP_TITLES.get(attribute, attribute)}", head.rstrip()]
        for r in rows:
            cells = "".join(f"{_short_prop(r.sensitivity.get(c)):<18}" for c in risky)
            line = f"{r.group:<18}{r.n:>6}{r.balanced_accuracy:>10.3f}"
            lines.append(f"{line}{_num(r.macro_auroc):>13}  {cells}".rstrip())
    return lines


def render_text(report: ClinicalReport) -> str:
    """The report for a terminal (fixed-width tables)."""
    lines = [
        f"examples           {report.examples}",
        f"accuracy           {report.accuracy:.4f}",
        f"balanced accuracy  {report.balanced_accuracy:.4f}",
        f"macro AUROC        {_num(report.macro_auroc, 4)}",
        f"ECE ({report.calibration.bins} bins)      {report.calibration.ece:.4f}",
        "",
        "Per class, one vs rest (95 % Wilson intervals; k/n = the cases behind the figure)",
        f"{'class':<9}{'cases':>6}  {'sensitivity':<32}{'specificity':<32}AUROC [95 % CI]",
    ]
    for m in report.per_class:
        lines.append(
            f"{_class_label(m.name):<9}{m.cases:>6}  {_prop(m.sensitivity):<32}"
            f"{_prop(m.specificity):<32}{_auc(m.auroc)}"
        )
    lines += [
        "* high-risk class; n/a: no cases (or no other cases) to measure it on",
        "",
        "Confusion matrix (rows: true class, columns: predicted class)",
        *_confusion_lines(report),
        "",
        f"Calibration (top-label confidence, {report.calibration.bins} equal-width bins, "
        f"ECE {report.calibration.ece:.4f})",
        *_calibration_lines(report.calibration),
        "",
        "Subgroups",
        *_subgroup_lines(report),
        "",
        RESEARCH_NOTE,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def reliability_figure(cal: Calibration) -> Figure:
    """Reliability diagram (accuracy against confidence per bin) over a case histogram."""
    fig = _new_figure(6.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = 1.0 / cal.bins
    mids = [(b.low + b.high) / 2 for b in cal.reliability]
    top.plot([0, 1], [0, 1], linestyle="--", color="#777777", label="perfect calibration")
    top.bar(
        mids,
        [b.accuracy for b in cal.reliability],
        width=width * 0.9,
        color="#4c72b0",
        edgecolor="white",
        label="share correct",
    )
    top.plot(
        [b.confidence for b in cal.reliability],
        [b.accuracy for b in cal.reliability],
        "o",
        color="#dd8452",
        label="bin: mean confidence, share correct",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("share of predictions correct")
    top.set_title(f"Reliability of the top prediction (ECE {cal.ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(mids, [b.count for b in cal.reliability], width=width * 0.9, color="#8c8c8c")
    bottom.set_xlabel("confidence of the top prediction")
    bottom.set_ylabel("cases")
    return fig


def _data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTML


def _td(text: str, num: bool = True) -> str:
    return f'<td class="num">{_e(text)}</td>' if num else f"<td>{_e(text)}</td>"


def _ci_td(value: Proportion | Auroc | None) -> str:
    """Estimate (with k/n for a proportion) over its interval, in one numeric cell."""
    if value is None:
        return _td("n/a")
    if isinstance(value, Proportion):
        top, low, high = f"{value.estimate:.3f} ({value.k}/{value.n})", value.low, value.high
    else:
        top, low, high = f"{value.value:.3f}", value.low, value.high
    return f'<td class="num">{_e(top)}<br><span class="ci">[{low:.3f}, {high:.3f}]</span></td>'


def _table(head: Sequence[str], rows: Sequence[str], text: frozenset[int] = frozenset({0})) -> str:
    """A table whose columns are numeric (right-aligned) except those indexed in ``text``."""
    cells = "".join(
        f"<th>{_e(h)}</th>" if i in text else f'<th class="num">{_e(h)}</th>'
        for i, h in enumerate(head)
    )
    body = "\n".join(f"<tr>{r}</tr>" for r in rows)
    return f"<table>\n<thead><tr>{cells}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _per_class_table(report: ClinicalReport) -> str:
    rows = [
        _td(_class_label(m.name), num=False)
        + _td(str(m.cases))
        + _ci_td(m.sensitivity)
        + _ci_td(m.specificity)
        + _ci_td(m.auroc)
        for m in report.per_class
    ]
    return _table(("class", "cases", "sensitivity (k/n)", "specificity (k/n)", "AUROC"), rows)


def _confusion_table(report: ClinicalReport) -> str:
    rows = [
        _td(_class_label(name), num=False) + "".join(_td(str(v)) for v in row) + _td(str(sum(row)))
        for name, row in zip(report.classes, report.confusion, strict=True)
    ]
    return _table(("true \\ predicted", *report.classes, "cases"), rows)


def _calibration_table(cal: Calibration) -> str:
    rows = [
        _td(f"({b.low:.3f}, {b.high:.3f}]")
        + _td(str(b.count))
        + _td(f"{b.confidence:.3f}")
        + _td(f"{b.accuracy:.3f}")
        for b in cal.reliability
    ]
    return _table(("confidence", "cases", "mean confidence", "share correct"), rows, frozenset())


def _subgroup_section(report: ClinicalReport) -> str:
    parts = ['<h2 id="subgroups">By subgroup</h2>']
    if not report.subgroups:
        return "\n".join([*parts, f"<p>{_e(NO_SUBGROUPS)}</p>"])
    risky = [c for c in HIGH_RISK if c in report.classes]
    parts.append(
        "<p>n is the number of cases in the group; the cases per class are in the last "
        "column. Balanced accuracy and macro AUROC are over the classes present in the "
        "group, so a small group is not comparable with a large one: read the counts and "
        "the 95 % intervals under each sensitivity. The AUROC of each high-risk class by "
        "group is in <code>--json</code>.</p>"
    )
    for attribute, groups in report.subgroups.items():
        title = SUBGROUP_TITLES.get(attribute, attribute)
        rows = [
            _td(g.group, num=False)
            + _td(str(g.n))
            + _td(f"{g.balanced_accuracy:.3f}")
            + _td(_num(g.macro_auroc))
            + "".join(_ci_td(g.sensitivity.get(c)) for c in risky)
            + _td(", ".join(f"{c} {v}" for c, v in g.class_counts.items() if v), num=False)
            for g in groups
        ]
        head = (
            title,
            "n",
            "balanced accuracy",
            "macro AUROC",
            *(f"{c} sensitivity (k/n)" for c in risky),
            "cases per class",
        )
        table = _table(head, rows, frozenset({0, len(head) - 1}))
        parts += [f'<h3 id="by-{_e(attribute)}">By {_e(title)}</h3>', table]
    return "\n".join(parts)


_EXTRA_CSS = """
td.num { white-space: nowrap; }
.ci { color: #555; font-size: 0.85em; }
"""

_HOW_TO_READ = """
<h2 id="how-to-read">How to read this</h2>
<p><strong>Sensitivity</strong> of a lesion type is the share of the lesions of that type
the model calls that type; for the high-risk types (marked *: melanoma <code>mel</code>,
basal cell carcinoma <code>bcc</code>, actinic keratosis / intraepithelial carcinoma
<code>akiec</code>) a low sensitivity means missed cancers. <strong>Specificity</strong>
is the share of all other lesions the model does not call that type. Each comes with
<em>k/n</em>, the cases it is counted on, and a 95 % confidence interval (Wilson score,
in brackets):
with few cases the interval is wide and the estimate alone says little.
<strong>AUROC</strong> (0.5 = guessing, 1 = perfect) measures how well the model's
probability for a type ranks lesions of that type above the others, whatever threshold
is used. <strong>Calibration</strong>: when the model is 80 % confident, is it right 80 %
of the time? Bars under the diagonal mean over-confidence; the
<strong>ECE</strong> is the average gap, weighted by the cases in each bin.</p>
"""


def render_html(
    report: ClinicalReport, checkpoint: str, data: str, generated_at: float | None = None
) -> str:
    """The standalone page (images inline); ``checkpoint`` and ``data`` name the inputs."""
    when = datetime.fromtimestamp(
        datetime.now(UTC).timestamp() if generated_at is None else generated_at, tz=UTC
    )
    confusion_png = _data_uri(
        confusion_figure(
            report.confusion, "Confusion matrix\n(numbers: cases; colour: share of row)"
        )
    )
    reliability_png = _data_uri(reliability_figure(report.calibration))
    cal = report.calibration
    summary = (
        f"{report.examples} cases. Accuracy {report.accuracy:.3f}, balanced accuracy "
        f"{report.balanced_accuracy:.3f}, macro AUROC {_num(report.macro_auroc)}, "
        f"ECE {cal.ece:.3f} ({cal.bins} bins)."
    )
    body = "\n".join(
        (
            f"<h1>Evaluation of {_e(Path(checkpoint).name)}</h1>",
            f'<p class="meta">Checkpoint <code>{_e(checkpoint)}</code> on <code>{_e(data)}</code>;'
            f" generated {_e(when.strftime('%Y-%m-%d %H:%M:%S UTC'))}.</p>",
            f'<div class="card"><p>{_e(summary)}</p><p class="note">{_e(RESEARCH_NOTE)}</p></div>',
            '<h2 id="per-class">Per class (one vs rest)</h2>',
            _per_class_table(report),
            '<p class="note">* high-risk class. n/a: no cases (or no other cases) to '
            "measure it on.</p>",
            '<h2 id="confusion">Confusion matrix</h2>',
            f'<img src="{confusion_png}" alt="Confusion matrix: true class by predicted class">',
            _confusion_table(report),
            '<h2 id="calibration">Calibration</h2>',
            f'<img src="{reliability_png}" alt="Reliability diagram and cases per bin">',
            _calibration_table(cal),
            _subgroup_section(report),
            _HOW_TO_READ,
        )
    )
    return html_page(
        f"Evaluation of {Path(checkpoint).name}", body, img_src="data:", css=_EXTRA_CSS
    )


def check_html_target(path: Path) -> None:
    """Refuse an ``--html`` path that cannot be written, before the slow evaluation."""
    if path.is_dir():
        raise InvalidArgumentError(f"--html {path} is a folder; name the .html file to write")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"--html {path}: folder {path.parent} does not exist")


def write_html(
    path: Path,
    report: ClinicalReport,
    checkpoint: str,
    data: str,
    generated_at: float | None = None,
) -> Path:
    """Write the page to ``path`` atomically; returns ``path``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PreconditionError(
            "dermafed evaluate --html needs matplotlib to draw its plots (pip install matplotlib)"
        ) from exc
    check_html_target(path)
    _write_text_atomic(path, render_html(report, checkpoint, data, generated_at))
    return path

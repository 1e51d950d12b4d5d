"""``dermafed report``: write a static HTML report of a federation from its ledger.

The ledger is only read (see :func:`dermafed.report.read_ledger`), so the command is safe
to run against a live aggregator's ledger or a copy of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import DermafedError

USAGE_ERROR = 2


def cmd_report(args: argparse.Namespace) -> int:
    # Imported here so that ``dermafed --help`` and the other commands do not pay for
    # matplotlib.
    from dermafed.report import DEFAULT_TITLE, write_report

    try:
        page = write_report(Path(args.ledger), Path(args.out), args.title or DEFAULT_TITLE)
    except (DermafedError, ValueError, OSError) as exc:
        print(f"dermafed: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {page}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report``."""
    report = subparsers.add_parser(
        "report",
        help="write an HTML report (metrics, rounds, participation, ε) from a ledger",
        description="Write OUT/index.html and PNG plots next to it from the aggregator's "
        "ledger. The ledger is opened read-only and never modified.",
    )
    report.add_argument("--ledger", required=True, help="the aggregator's ledger (SQLite file)")
    report.add_argument("--out", required=True, help="output folder (created if missing)")
    report.add_argument(
        "--title", default=None, help="page title (default: 'dermafed federation report')"
    )
    report.set_defaults(func=cmd_report)

"""Log lines carry the date and the zone: ISO 8601 in UTC, in text and JSON alike."""

from __future__ import annotations

import json
import logging
import re

from common.logs import JsonFormatter, TextFormatter

# 2026-12-07T14:05:22.123 UTC
CREATED = 1796652322.123


def _record() -> logging.LogRecord:
    record = logging.LogRecord(
        "dermafed.aggregator", logging.INFO, __file__, 1, "round %d", (3,), None
    )
    record.created = CREATED
    record.msecs = 123.0
    return record


def test_text_lines_start_with_an_iso_8601_utc_timestamp():
    line = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(_record())
    assert line == "2026-12-07T14:05:22.123Z INFO dermafed.aggregator: round 3"


def test_json_lines_carry_the_same_timestamp():
    entry = json.loads(JsonFormatter().format(_record()))
    assert entry["ts"] == "2026-12-07T14:05:22.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])

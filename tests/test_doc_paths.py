"""Every repository path that README, deploy/ and scripts/ mention exists.

prometheus.yml pointed operators at deploy/k8s/optional/podmonitor.yaml, which never
existed; this keeps such pointers from rotting.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MENTION = re.compile(
    r"(?<![\w/])((?:deploy|scripts|requirements|benchmarks|tests|protos)/[\w./@%<>-]*\w)"
)


def _mentions() -> list[tuple[str, str]]:
    files = [ROOT / "README.md"]
    for folder in ("deploy", "scripts"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file())
    found = []
    for path in files:
        for match in MENTION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            mention = match.group(1)
            if not any(c in mention for c in "<>%*"):  # templates like agent-%i, <instance>
                found.append((str(path.relative_to(ROOT)), mention))
    return found


def test_every_mentioned_path_exists():
    mentions = _mentions()
    assert len(mentions) > 20, "the scan should see README's and the units' references"
    missing = sorted({(where, m) for where, m in mentions if not (ROOT / m).exists()})
    assert not missing, f"mentioned but not in the repository: {missing}"

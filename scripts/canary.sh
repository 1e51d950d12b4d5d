#!/usr/bin/env bash
# Early warning, deliberately outside CI: installs the newest release of every dependency
# that pyproject.toml's ranges admit into a throwaway virtualenv, regenerates the stubs
# with the newest grpcio-tools, and runs lint, types and the tests there. A failure here
# is the next upstream break, found on purpose before a lock bump (scripts/lock.sh
# --upgrade) or a user's unlocked `pip install dermafed` meets it.
#
#   bash scripts/canary.sh              default test suite
#   bash scripts/canary.sh --system     and the multi-process system tests
#
# Works on a copy of the committed tree (git HEAD) in a temporary folder, which it removes;
# the checkout, its .venv and its lock are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."

system=false
for arg in "$@"; do
  case $arg in
    --system) system=true ;;
    -h|--help) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "canary.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d -t dermafed-canary.XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone --quiet . "$work/src"
# The tests look for ../shared beside the checkout.
[ -d ../shared ] && ln -s "$(cd ../shared && pwd)" "$work/shared"
cd "$work/src"

python3 -m venv .venv
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
echo "== newer than the lock:"
.venv/bin/python - <<'PY'
import re
from importlib import metadata
from packaging.utils import canonicalize_name

text = open("requirements/test.lock", encoding="utf-8").read()
for name, locked in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", text, re.M):
    try:
        now = metadata.version(name)
    except metadata.PackageNotFoundError:
        now = "(not installed)"
    if now != locked:
        print(f"   {canonicalize_name(name):28} {locked:>14} -> {now}")
PY

PYTHON=.venv/bin/python bash scripts/gen_protos.sh
status=0
.venv/bin/ruff check . || status=1
.venv/bin/mypy || status=1
# The lock test is expected to fail here: this environment is unlocked on purpose.
.venv/bin/python -m pytest -q -m 'not system and not lock' || status=1
if $system; then .venv/bin/python -m pytest -q -m system || status=1; fi
if [ $status -eq 0 ]; then
  echo "canary: the newest releases pass; bump with: bash scripts/lock.sh --upgrade"
else
  echo "canary: the newest releases break something (above); fix it before bumping the lock" >&2
fi
exit $status

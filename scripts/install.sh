#!/usr/bin/env bash
# Sets up a virtualenv with exactly the locked dependencies:
#   1. the CPU build of PyTorch (torch==2.13.0), on its own and first, because an unpinned
#      torch pulls gigabytes of CUDA packages;
#   2. every other dependency from requirements/*.lock, each file checked by its SHA-256;
#   3. dermafed itself, editable, with no dependency resolution of its own.
#
#   bash scripts/install.sh            runtime set into .venv (what `dermafed demo` needs)
#   bash scripts/install.sh --test     runtime and test set (pytest, ruff, mypy, grpcio-tools)
#   bash scripts/install.sh DIR        into another virtualenv
set -euo pipefail
cd "$(dirname "$0")/.."

lock=requirements/runtime.lock
venv=.venv
for arg in "$@"; do
  case $arg in
    --test) lock=requirements/test.lock ;;
    -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) venv=$arg ;;
  esac
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.13.0
"$venv/bin/python" -m pip install --quiet --require-hashes -r "$lock"
# The build backend (setuptools) is in the lock too, so nothing unlocked is fetched here.
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
echo "install.sh: $venv holds torch 2.13.0 (CPU), $lock and dermafed"

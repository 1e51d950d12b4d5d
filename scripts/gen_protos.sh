#!/usr/bin/env bash
# Regenerates the Python stubs in dermafed/v1 from protos/. CI checks they are fresh
# (tests/test_protos_fresh.py), so run this after editing any .proto file.
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv's interpreter and its protoc-gen-mypy plugin, whether or not it is activated.
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iprotos \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --python_out=. --grpc_python_out=. --mypy_out=. \
  protos/dermafed/v1/*.proto
touch dermafed/v1/__init__.py

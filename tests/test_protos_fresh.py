"""The committed gRPC stubs must be exactly what protos/ generates with the locked tools.

After editing a .proto file run scripts/gen_protos.sh; after a dependency bump run
scripts/lock.sh, which regenerates the lock and the stubs together.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_protos(tmp_path):
    pytest.importorskip("grpc_tools")
    pytest.importorskip("mypy_protobuf")
    protos = sorted((ROOT / "protos" / "dermafed" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    assert plugin, "protoc-gen-mypy not found next to the interpreter"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            # Named explicitly: CI runs pytest without activating the venv, so the plugin
            # is not on PATH there.
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "dermafed" / "v1").iterdir())
    committed_dir = ROOT / "dermafed" / "v1"
    committed = sorted(
        p.relative_to(ROOT)
        for p in committed_dir.iterdir()
        if p.name != "__init__.py" and p.suffix in (".py", ".pyi")
    )
    assert [str(p) for p in generated] == [str(p) for p in committed], (
        "generated and committed stub files differ; run bash scripts/gen_protos.sh"
    )
    for rel in generated:
        fresh = (tmp_path / rel).read_text()
        stale = (ROOT / rel).read_text()
        assert fresh == stale, (
            f"{rel} is stale: run bash scripts/lock.sh (regenerates the lock and the stubs "
            "with the locked grpcio-tools) or, after editing protos/, bash scripts/gen_protos.sh"
        )

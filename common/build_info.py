"""What is running: dermafed's version and the versions that decide its behaviour.

Exported by both daemons as ``dermafed_build_info`` (a constant 1 with labels), so an
operator can see on a dashboard which hosts an upgrade has reached, and shown by
``dermafed --version``.
"""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Info


def version(distribution: str = "dermafed") -> str:
    """The installed version of ``distribution``, or 'unknown' when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_labels() -> dict[str, str]:
    return {
        "version": version(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "grpcio": version("grpcio"),
    }


def register_build_info(registry: CollectorRegistry) -> None:
    Info(
        "dermafed_build",
        "dermafed's version and the Python, PyTorch and gRPC it runs on.",
        registry=registry,
    ).info(build_labels())

"""The model architectures by name, without importing PyTorch (the CLI's --help reads them)."""

from __future__ import annotations

ARCHITECTURES: tuple[str, ...] = ("lesionres", "lesionnet", "scatternet")

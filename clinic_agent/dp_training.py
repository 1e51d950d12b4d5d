"""DP-SGD local training (Opacus): what leaves the clinic is DP per patient image.

Built from Opacus's two primitives rather than ``PrivacyEngine.make_private``, because the
clinic's accountant (``clinic_agent.privacy``) has already fixed the mechanism and charged
it to the ledger *before* training: this module must run exactly that mechanism, i.e.
``steps`` optimiser steps, each on a Poisson sample of rate ``q`` (every example joins a
batch independently with probability ``q``), per-example gradients clipped to
``max_grad_norm`` (``GradSampleModule`` + ``DPOptimizer``) and Gaussian noise of std
``σ·max_grad_norm`` added to their sum, divided by the expected batch size ``q·n``.

What differs from the plain loop in ``clinic_agent.training`` (whose pieces are reused), and
why each difference is needed for the guarantee to hold:

* **Loss.** A per-example gradient may depend only on that example. ``CrossEntropyLoss``
  with class weights divides by the batch's summed weights (a cross-example coupling), and
  "balanced" weights are computed from the local label counts (a function of every
  record). Under DP the loss is a plain mean of per-example losses, optionally weighted by
  *public* per-class weights passed in by the caller; local-count balancing is not used.
  Clipping already equalises how much each example can move the model, which is most of
  what balancing was for.
* **FedProx.** The proximal term depends on the weights only, not on data; its gradient is
  added *after* clipping and noise (post-processing), since Opacus keeps only per-example
  gradients and would silently drop it.
* **Empty batches.** Poisson sampling can draw no example; the step still runs and adds
  noise, as the accountant assumes.
* **Randomness.** Noise and sampling draw from generators seeded from OS entropy: an
  aggregator that could predict the noise could subtract it. ``noise_seed`` exists for
  tests only. Dropout and augmentation use ``cfg.seed`` as in plain training.

``mean_loss`` in the result is computed on the private data without noise: it is for the
clinic's own metrics and must not be sent to the aggregator.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clinic_agent.privacy import MechanismStep
from clinic_agent.training import (
    Progress,
    ProximalTerm,
    TrainConfig,
    TrainResult,
    check_training_data,
    export_state,
    make_model,
    make_optimizer,
    prepare_batch,
    torch_threads,
)
from common.errors import DermafedError
from common.features import FeatureCache, model_inputs
from common.model import ModelConfig, trainable_part

_OPACUS_PREFIX = "_module."

log = logging.getLogger("dermafed.agent.dp")


class DPModelError(DermafedError, ValueError):
    """The model cannot be trained with per-example clipping (e.g. it has BatchNorm)."""


class MechanismMismatchError(DermafedError, ValueError):
    """The mechanism to run does not fit the local data (it was planned for another n)."""


@dataclass
class DPTrainResult(TrainResult):
    """:class:`TrainResult` plus the mechanism that actually ran (what the ledger charges)."""

    mechanism: MechanismStep
    max_grad_norm: float
    empty_batches: int


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse models whose per-example gradients are undefined (BatchNorm mixes examples)."""
    # Opacus's validator matches BatchNorm by exact class, so a subclass (the pretrained
    # trunk's, common.efficientnet_lite.BatchNorm) would reach its hooks and fail there
    # with a list of NotImplementedErrors.
    batchnorms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if batchnorms:
        raise DPModelError(
            f"model is not compatible with DP-SGD (per-example gradients): {len(batchnorms)} "
            f"BatchNorm layer(s), first {batchnorms[0]!r}; train the frozen-trunk variant "
            "(efficientnet_lite0_head) or a GroupNorm model under DP"
        )
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedModuleError as exc:
        found = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [exc]
        # Opacus's messages are paragraphs; their first sentence names the problem.
        problems = "; ".join(str(e).split(". ")[0].rstrip(".") for e in found)
        raise DPModelError(
            f"model is not compatible with DP-SGD (per-example gradients): {problems} "
            "(e.g. use GroupNorm instead of BatchNorm)"
        ) from exc


def _contiguous_inputs(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def _force_contiguous_conv_inputs(model: nn.Module) -> None:
    """Make every convolution see NCHW-contiguous input.

    Opacus 1.6's conv per-example gradients (``opacus.utils.tensor_utils.unfold2d``) call
    ``as_strided`` with strides that assume a contiguous tensor; on a channels_last input
    (which ``common.model.to_input``'s permute produces) they silently read the wrong
    elements, so "per-example" gradients are wrong and clipping no longer bounds each
    example's influence. The pre-hook runs before Opacus's forward hook records the
    activations, and is a no-op on input that is already contiguous.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            module.register_forward_pre_hook(_contiguous_inputs)


def entropy_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
    secure_noise: bool = True,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` for per-example gradients and ``optimizer`` for clipping and noise.

    ``noise_multiplier = 0`` is allowed here only so tests can observe clipping alone; the
    guard in ``clinic_agent.privacy`` never plans σ ≤ 0. ``secure_noise`` uses Opacus's
    defence against floating-point attacks on Gaussian sampling (sum of four draws).
    """
    check_dp_compatible(model)
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    _force_contiguous_conv_inputs(model)
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_noise,
    )
    return gsm, dp_optimizer


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` index tensors, each holding every example independently with prob. q."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def per_example_loss_fn(
    class_weight: Sequence[float] | None,
    logit_offsets: Sequence[float] | None = None,
) -> nn.Module:
    """Mean over the batch of (optionally class-weighted or logit-adjusted) per-example
    cross-entropy."""
    return _PerExampleMeanLoss(class_weight, logit_offsets)


class _PerExampleMeanLoss(nn.Module):
    def __init__(
        self, class_weight: Sequence[float] | None, logit_offsets: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.weight = (
            None if class_weight is None else torch.tensor(list(class_weight), dtype=torch.float32)
        )
        # Logit adjustment (Menon et al. 2021): train on logits + log prior, predict with the
        # raw logits. Unlike loss weights it survives per-example clipping, which rescales
        # every example's gradient to the same bound and so erases weights.
        self.offsets = (
            None
            if logit_offsets is None
            else torch.tensor(list(logit_offsets), dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.offsets is not None:
            logits = logits + self.offsets
        losses = F.cross_entropy(logits, target, reduction="none")
        if self.weight is not None:
            losses = losses * self.weight[target]
        return losses.mean()


def dp_step(
    gsm: GradSampleModule,
    optimizer: DPOptimizer,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    loss_fn: nn.Module,
    proximal: ProximalTerm | None = None,
) -> float | None:
    """One DP-SGD step; ``x is None`` is an empty Poisson batch (noise only).

    Returns the batch's mean data loss, or None for an empty batch.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_value: float | None = None
    if x is None or y is None or len(y) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    else:
        loss = loss_fn(gsm(x), y)
        with warnings.catch_warnings():
            # Opacus's hooks fire on module outputs because images never require grad;
            # torch warns about that on every step although it is exactly what Opacus wants.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        loss_value = float(loss.detach())
    if optimizer.pre_step():  # clip per example, add noise, divide by the expected batch
        if proximal is not None:
            # Data-independent, so adding it after the noise is post-processing.
            for p, anchor in zip(optimizer.params, proximal.anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=proximal.mu)
        optimizer.original_optimizer.step()
    return loss_value


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped model's state with Opacus's ``_module.`` prefixes removed."""
    inner = module._module if isinstance(module, GradSampleModule) else module
    state = export_state(inner)
    return {
        (k[len(_OPACUS_PREFIX) :] if k.startswith(_OPACUS_PREFIX) else k): v
        for k, v in state.items()
    }


def train_dp(
    model_cfg: ModelConfig,
    global_state: Mapping[str, torch.Tensor],
    images_uint8: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    mechanism: MechanismStep,
    *,
    max_grad_norm: float,
    class_weight: Sequence[float] | None = None,
    logit_offsets: Sequence[float] | None = None,
    threads: int | None = None,
    noise_seed: int | None = None,
    secure_noise: bool = True,
    features: FeatureCache | None = None,
    progress: Progress | None = None,
) -> DPTrainResult:
    """Run DP-SGD with exactly ``mechanism`` (as planned and charged) from ``global_state``.

    ``cfg.epochs`` and ``cfg.batch_size`` are not used for the schedule: the mechanism's
    ``steps`` and ``sample_rate`` are (they were derived from them by ``plan_round``).
    ``cfg.class_weighting`` is ignored (see the module docstring); pass public per-class
    weights as ``class_weight`` to weight the loss. For a model with a fixed front end
    (``scatternet``) only the head is made private and trained, on the front end's
    features (``features`` caches them across rounds); the front end has no parameters,
    so there is nothing of it to protect.
    """
    cfg.validate()
    labels = np.asarray(labels, dtype=np.int64)
    check_training_data(model_cfg, images_uint8, labels)
    if cfg.class_weighting != "none" and class_weight is None:
        log.info(
            "DP training ignores class_weighting=%r: weights from local label counts "
            "are not differentially private; pass public class weights instead",
            cfg.class_weighting,
        )
    n = len(labels)
    expected_batch = mechanism.sample_rate * n
    if expected_batch < 1:
        raise MechanismMismatchError(
            f"sample rate {mechanism.sample_rate} gives fewer than one example per batch on "
            f"{n} examples; the mechanism was planned for a different dataset"
        )
    if class_weight is not None and len(class_weight) != model_cfg.num_classes:
        raise ValueError(f"class_weight needs {model_cfg.num_classes} values")
    seed = entropy_seed() if noise_seed is None else noise_seed
    noise_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator().manual_seed(
        entropy_seed() if noise_seed is None else noise_seed + 1
    )
    labels_t = torch.from_numpy(labels)

    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout draws from the global generator
        model = make_model(model_cfg, global_state)
        start = time.perf_counter()
        inputs = torch.from_numpy(
            np.ascontiguousarray(model_inputs(model_cfg, model, images_uint8, features))
        )
        trainable = trainable_part(model)
        optimizer = make_optimizer(trainable, cfg)
        proximal = ProximalTerm(trainable, cfg.fedprox_mu) if cfg.fedprox_mu > 0 else None
        gsm, dp_optimizer = make_private(
            trainable,
            optimizer,
            noise_multiplier=mechanism.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch,
            generator=noise_gen,
            secure_noise=secure_noise,
        )
        augment_gen = torch.Generator().manual_seed(cfg.seed + 1)
        loss_fn = per_example_loss_fn(class_weight, logit_offsets)
        gsm.train()
        loss_sum, seen, empty, done = 0.0, 0, 0, 0
        try:
            for idx in poisson_batches(n, mechanism.sample_rate, mechanism.steps, sample_gen):
                if len(idx) == 0:
                    dp_step(gsm, dp_optimizer, None, None, loss_fn, proximal)
                    empty += 1
                else:
                    x = prepare_batch(inputs[idx], cfg.augment, augment_gen)
                    loss = dp_step(gsm, dp_optimizer, x, labels_t[idx], loss_fn, proximal)
                    loss_sum += float(loss or 0.0) * len(idx)
                    seen += len(idx)
                done += 1
                if progress is not None:
                    progress(done, mechanism.steps)
        finally:
            seconds = time.perf_counter() - start
            gsm.cleanup()  # drop Opacus's hooks and per-example attributes
    return DPTrainResult(
        state=plain_state_dict(model),
        num_examples=n,
        mean_loss=loss_sum / seen if seen else float("nan"),
        seconds=seconds,
        examples_per_second=seen / seconds if seconds > 0 else float("inf"),
        mechanism=MechanismStep(mechanism.noise_multiplier, mechanism.sample_rate, done),
        max_grad_norm=max_grad_norm,
        empty_batches=empty,
    )

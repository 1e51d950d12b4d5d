"""What a clinic's round produces at each step (plain data; nothing here leaves the clinic
except what the daemon explicitly uploads)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clinic_agent.privacy import RoundDecision
from clinic_agent.training import TrainConfig
from common.model import ModelConfig
from common.tensors import TensorSpec


@dataclass(frozen=True)
class PreparedRound:
    """Everything local a round needs before training (never leaves the clinic)."""

    global_state: dict[str, torch.Tensor]
    model_cfg: ModelConfig
    images: np.ndarray
    labels: np.ndarray
    tcfg: TrainConfig
    decision: RoundDecision | None  # None when DP is off
    specs: tuple[TensorSpec, ...]
    clinic_noise: float = 0.0  # clinic-level noise multiplier on the delta (0: none)


@dataclass(frozen=True)
class TrainedUpdate:
    vector: np.ndarray  # the clipped float32 delta
    num_examples: int
    mean_loss: float
    train_seconds: float


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    result: str  # "contributed" | "declined" | "failed"
    detail: str = ""
    train_loss: float | None = None
    train_seconds: float = 0.0
    protocol_seconds: float = 0.0

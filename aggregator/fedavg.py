"""Plain weighted FedAvg: the aggregator sees each clinic's (clipped) delta.

Kept as a configuration switch for benchmarks and comparison; secure aggregation is the
privacy-preserving default. Sums are kept in float64 so the order clinics arrive in does
not change the published model beyond float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.clipping import l2_norm
from common.errors import InvalidUpdateError, PreconditionError

# A clinic's weight is its number of training examples; anything beyond this is a bug or
# an attack on the weighting, not a real clinic.
MAX_WEIGHT = 1e8


@dataclass(frozen=True)
class AggregateResult:
    delta: np.ndarray  # float32, weighted mean of the contributions
    total_weight: float
    mean_loss: float | None
    contributors: tuple[str, ...]


def check_weight(weight: float, loss: float | None) -> None:
    """Refuse a weight that would let one clinic dominate or poison the average."""
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise InvalidUpdateError(f"weight must be a positive finite number <= {MAX_WEIGHT:g}")
    if loss is not None and not math.isfinite(loss):
        raise InvalidUpdateError("train loss must be finite")


class PlainFedAvg:
    """Accumulates validated float32 deltas; nothing is added until a delta is accepted."""

    def __init__(self, numel: int, clip_norm: float = 0.0) -> None:
        self._sum = np.zeros(numel, dtype=np.float64)
        self._weight = 0.0
        self._loss_sum = 0.0
        self._loss_weight = 0.0
        self._clip_norm = clip_norm
        self._contributors: list[str] = []

    @property
    def numel(self) -> int:
        return int(self._sum.size)

    def check(self, vector: np.ndarray, weight: float, loss: float | None) -> None:
        """Refuse an update the round must not absorb (raises InvalidUpdateError)."""
        if vector.shape != self._sum.shape:
            raise InvalidUpdateError(f"update has {vector.size} values, expected {self._sum.size}")
        check_weight(weight, loss)
        if self._clip_norm > 0:
            norm = l2_norm(vector)
            # A little slack for float32 rounding of a delta clipped exactly to the bound.
            if norm > self._clip_norm * (1 + 1e-4):
                raise InvalidUpdateError(
                    f"delta L2 norm {norm:.4g} exceeds the round's clip bound {self._clip_norm:g}"
                )

    def add(self, clinic: str, vector: np.ndarray, weight: float, loss: float | None) -> None:
        self.check(vector, weight, loss)
        if clinic in self._contributors:
            raise PreconditionError(f"clinic {clinic!r} already contributed")
        self._sum += weight * vector.astype(np.float64)
        self._weight += weight
        if loss is not None:
            self._loss_sum += weight * loss
            self._loss_weight += weight
        self._contributors.append(clinic)

    def result(self, contributors: set[str] | frozenset[str] | None = None) -> AggregateResult:
        """The weighted mean delta. ``contributors`` must equal the set that was added."""
        if contributors is not None and set(contributors) != set(self._contributors):
            raise PreconditionError("survivor set differs from the clinics that contributed")
        if self._weight <= 0:
            raise PreconditionError("no contributions to aggregate")
        mean = (self._sum / self._weight).astype(np.float32)
        loss = self._loss_sum / self._loss_weight if self._loss_weight > 0 else None
        return AggregateResult(mean, self._weight, loss, tuple(sorted(self._contributors)))

"""Checks on the unmasked sum, before any model is formed or scored.

Secure aggregation hides each clinic's vector, so the aggregator cannot check one
clinic's clip bound; a malicious clinic can mask anything whose coordinates stay in the
ring's range (a delta 100x the clip bound, or a weight coordinate that cancels the others
so the mean is divided by almost nothing). What it cannot hide is the *sum*, and the sum
of honest contributions obeys bounds the aggregator knows from its own round plan:

* **weight**: every honest clinic sends a weight in ``[min_weight, weight_max]`` (its
  example count, capped), so the summed weight of ``n`` contributors lies in
  ``[n * min_weight, n * weight_max]``.
* **norm**: every honest clinic's (noised, re-clipped) delta has L2 norm at most the
  plan's upload bound ``B``; the aggregate is their weighted mean with positive weights,
  a convex combination, so its norm is at most ``B`` too — whatever the weights, and
  with no false alarm ever (not a probabilistic bound). The decoded mean also carries
  stochastic-rounding error below ``n / delta_scale`` per coordinate of the sum, i.e.
  ``sqrt(d) * n / (delta_scale * W)`` in L2 for the mean; that and a stated relative
  ``slack`` are allowed on top.
* **loss**: the weighted mean training loss, when carried, lies in ``[0, loss_max]``.
* **finite**: every coordinate is a finite number.

What passing means: the candidate moved no farther from the published model than an
honest round could have moved it. A poisoned update *within* the bounds (a sign flip, a
clinic trained on wrong labels) passes here and is left to the validation gate.

Pure functions of the aggregate and the plan's numbers; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aggregator.fedavg import AggregateResult
from common.clipping import l2_norm
from common.errors import InvalidUpdateError

# Relative allowance on the norm bound for float32 rounding of the mean delta.
DEFAULT_NORM_SLACK = 1e-3

CHECKS = ("finite", "weight", "norm", "loss")
"""Every check's name, as it appears in reasons, the ledger and the metric label."""


class SumCheckError(InvalidUpdateError):
    """The unmasked sum is impossible for honest contributors; ``check`` names which."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"sum check {check!r} failed: {message}")
        self.check = check


@dataclass(frozen=True)
class SumBounds:
    """What the round plan allows each contributor to send."""

    min_weight: float
    weight_max: float
    # L2 bound on one contributor's delta (the plan's upload bound); 0 = unclipped, no check.
    norm_bound: float
    # Secure rounds: the quantization scale of the delta coordinates (0 = float, no rounding).
    delta_scale: float = 0.0
    loss_max: float | None = None
    loss_scale: float = 0.0
    slack: float = DEFAULT_NORM_SLACK

    def norm_limit(self, contributors: int, total_weight: float, dim: int) -> float:
        """The largest mean-delta norm ``contributors`` honest clinics can produce."""
        rounding = 0.0
        if self.delta_scale > 0 and total_weight > 0:
            rounding = math.sqrt(dim) * contributors / (self.delta_scale * total_weight)
        return self.norm_bound * (1.0 + self.slack) + rounding


def check_sum(result: AggregateResult, bounds: SumBounds) -> dict[str, float]:
    """Raise :class:`SumCheckError` if no honest cohort could have produced ``result``.

    Returns the measured values (for the ledger) when every check passes.
    """
    n = len(result.contributors)
    if n == 0:
        raise SumCheckError("weight", "the aggregate has no contributors")
    delta = np.asarray(result.delta)
    if not np.isfinite(delta).all():
        raise SumCheckError("finite", "the aggregate delta has non-finite coordinates")
    weight = float(result.total_weight)
    low, high = n * bounds.min_weight, n * bounds.weight_max
    if not (math.isfinite(weight) and low <= weight <= high * (1 + 1e-9)):
        raise SumCheckError(
            "weight",
            f"summed weight {weight:.6g} of {n} contributor(s) is outside [{low:g}, {high:g}] "
            f"(each honest clinic sends between {bounds.min_weight:g} and "
            f"{bounds.weight_max:g})",
        )
    norm = l2_norm(delta)
    measured = {"contributors": float(n), "total_weight": weight, "norm": norm}
    if bounds.norm_bound > 0:
        limit = bounds.norm_limit(n, weight, int(delta.size))
        measured["norm_limit"] = limit
        if norm > limit:
            raise SumCheckError(
                "norm",
                f"the mean delta has L2 norm {norm:.6g}, more than the {limit:.6g} that "
                f"{n} contribution(s) within the upload bound {bounds.norm_bound:g} allow",
            )
    if result.mean_loss is not None:
        loss = float(result.mean_loss)
        measured["mean_loss"] = loss
        top = bounds.loss_max if bounds.loss_max is not None else math.inf
        # Stochastic rounding moves the decoded mean by less than n / (scale * W).
        rounding = n / (bounds.loss_scale * weight) if bounds.loss_scale > 0 else 1e-9
        if not (math.isfinite(loss) and -rounding <= loss <= top + rounding):
            raise SumCheckError(
                "loss", f"the mean training loss {loss:.6g} is outside [0, {top:g}]"
            )
    return measured

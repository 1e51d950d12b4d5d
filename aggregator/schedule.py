"""Learning rate across federated rounds, as a pure function of the round number.

Local training runs a constant learning rate inside a round (a fresh optimiser per
round, as every clinic starts from the published checkpoint); what decays is the rate
the round plan carries. The aggregator computes it when it builds a round's plan::

    plan.learning_rate = round_learning_rate(
        base_lr, round_index, total_rounds, schedule=..., min_factor=..., warmup_rounds=...
    )

``round_index`` counts from 0 (the first round of the schedule). Past ``total_rounds``
the rate stays at its final value, so a federation that keeps running after the planned
horizon keeps fine-tuning instead of jumping back to the initial rate.

Why decay at all: with non-IID clinics, a large late learning rate keeps each clinic
drifting towards its own optimum every round, and the averaged model oscillates; a
decaying rate shrinks that client drift and lets the average settle (measured in
``benchmarks/quality.py``).
"""

from __future__ import annotations

import math

from common.errors import ConfigError

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
# "step" halves the rate at these fractions of the horizon.
_STEP_POINTS: tuple[float, ...] = (0.5, 0.75)


def validate_schedule(
    schedule: str, total_rounds: int, min_factor: float, warmup_rounds: int
) -> None:
    """Raise :class:`ConfigError` naming the bad setting."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"plan.lr_schedule: must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    if isinstance(total_rounds, bool) or not isinstance(total_rounds, int) or total_rounds < 1:
        raise ConfigError(f"plan.lr_schedule_rounds: must be an integer >= 1, got {total_rounds!r}")
    if not (isinstance(min_factor, int | float) and 0.0 <= min_factor <= 1.0):
        raise ConfigError(f"plan.lr_min_factor: must be in [0, 1], got {min_factor!r}")
    if (
        isinstance(warmup_rounds, bool)
        or not isinstance(warmup_rounds, int)
        or not 0 <= warmup_rounds < total_rounds
    ):
        raise ConfigError(
            "plan.lr_warmup_rounds: must be an integer in [0, lr_schedule_rounds), "
            f"got {warmup_rounds!r}"
        )


def schedule_factor(
    round_index: int,
    total_rounds: int,
    *,
    schedule: str = "cosine",
    min_factor: float = 0.0,
    warmup_rounds: int = 0,
) -> float:
    """Multiplier of the base learning rate for round ``round_index`` (0-based).

    * warm-up: rounds ``0 .. warmup_rounds-1`` ramp linearly up to 1 (round ``k`` gets
      ``(k + 1) / (warmup_rounds + 1)``);
    * "constant": 1;
    * "cosine": from 1 down to ``min_factor`` along half a cosine, evaluated at the
      *middle* of each round so the last round still trains (``min_factor`` 0 would
      otherwise give it a rate of exactly 0);
    * "step": 1, then halved at 50% and again at 75% of the horizon, never below
      ``min_factor``.
    """
    validate_schedule(schedule, total_rounds, min_factor, warmup_rounds)
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise ConfigError(f"round index must be an integer >= 0, got {round_index!r}")
    k = min(round_index, total_rounds - 1)
    if k < warmup_rounds:
        return (k + 1) / (warmup_rounds + 1)
    if schedule == "constant":
        return 1.0
    span = total_rounds - warmup_rounds
    progress = (k - warmup_rounds + 0.5) / span  # in (0, 1)
    if schedule == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    halvings = sum(progress >= point for point in _STEP_POINTS)
    return max(min_factor, 0.5**halvings)


def round_learning_rate(
    base_lr: float,
    round_index: int,
    total_rounds: int,
    *,
    schedule: str = "cosine",
    min_factor: float = 0.0,
    warmup_rounds: int = 0,
) -> float:
    """The learning rate a round plan should carry (see :func:`schedule_factor`)."""
    if not (isinstance(base_lr, int | float) and math.isfinite(base_lr) and base_lr > 0):
        raise ConfigError(f"plan.learning_rate: must be > 0, got {base_lr!r}")
    factor = schedule_factor(
        round_index,
        total_rounds,
        schedule=schedule,
        min_factor=min_factor,
        warmup_rounds=warmup_rounds,
    )
    return float(base_lr) * factor

"""Record-level differential privacy at the clinic: the accounting math and the budget guard.

Two layers, kept apart on purpose (the way Opacus separates ``accountants.analysis`` from
its stateful accountants):

* :func:`epsilon_for` is pure: it replays a history of Poisson-subsampled Gaussian
  mechanism runs (:class:`MechanismStep`) into a *fresh* Opacus accountant and returns the
  ε reached at a given δ. Nothing here reads files or keeps state; the history is the
  clinic's privacy ledger (``clinic_agent.privacy_ledger``) plus, when planning, the round
  about to run.
* :func:`plan_round` is the budget guard: given the clinic's own :class:`PrivacyConfig`,
  what it has already spent and the aggregator's plan, it decides whether the clinic takes
  part and with which noise. The clinic's configuration always wins: an aggregator can
  never raise the budget nor lower the noise below what the clinic chose.

Unit of privacy: one training example (one image) of the clinic, add/remove adjacency, the
convention of Opacus's accountants. All rounds the clinic ever contributed to, in every
federation, are composed together because they all touch the same patients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from common.errors import ConfigError, DermafedError

MODES = ("dp-sgd", "off")
ACCOUNTANTS = ("rdp", "prv")


class PrivacyAccountingError(DermafedError):
    """The accountant could not produce a trustworthy ε for a history."""


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` runs of the sampled Gaussian mechanism at one noise level and sample rate.

    ``noise_multiplier`` is σ in Opacus's convention: noise std = σ · clip norm on the sum
    of clipped per-example gradients. ``sample_rate`` is the Poisson sampling probability
    of each example per step.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")


class AccountedRound(Protocol):
    """What the guard needs from a ledger record (``privacy_ledger.LedgerEntry`` has it)."""

    @property
    def noise_multiplier(self) -> float: ...

    @property
    def sample_rate(self) -> float: ...

    @property
    def steps(self) -> int: ...

    @property
    def delta(self) -> float: ...


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _make_accountant(name: str) -> object:
    # Imported lazily: opacus pulls in torch and scipy, which the aggregator never needs.
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {name!r} (expected one of {', '.join(ACCOUNTANTS)})")


def epsilon_for(history: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
    """The ε that ``history`` reaches at ``delta`` according to Opacus's ``accountant``.

    The history is replayed into a fresh accountant: both Opacus accountants compose
    heterogeneous ``(σ, q, steps)`` entries. Composition is order-independent, so equal
    ``(σ, q)`` pairs are merged first, which keeps the PRV accountant's FFT work bounded by
    the number of distinct settings rather than by the number of rounds.
    Returns ``math.inf`` when the bound is infinite; never returns NaN.
    """
    _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r} (expected {' or '.join(ACCOUNTANTS)})")
    merged: dict[tuple[float, float], int] = {}
    for step in history:
        key = (float(step.noise_multiplier), float(step.sample_rate))
        merged[key] = merged.get(key, 0) + int(step.steps)
    if not merged:
        return 0.0
    acc = _make_accountant(accountant)
    acc.history = [(sigma, q, n) for (sigma, q), n in merged.items()]  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha" and PRV's log(0) at q = 1 only say the
            # bound could be tighter; the value returned is still a valid upper bound.
            warnings.simplefilter("ignore")
            eps = float(acc.get_epsilon(delta=delta))  # type: ignore[attr-defined]
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise PrivacyAccountingError(f"{accountant} accountant failed: {exc}") from exc
    if math.isnan(eps):
        raise PrivacyAccountingError(f"{accountant} accountant returned NaN")
    return eps if eps >= 0 else 0.0


def default_delta(n_examples: int) -> float:
    """1 / (10·n) rounded down to a power of ten: always strictly below 1/n.

    Integer arithmetic (the smallest 10^k ≥ 10·n) avoids log10 rounding at exact powers.
    """
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    exponent = len(str(10 * n_examples - 1))
    return float(10.0 ** (-exponent))


@dataclass(frozen=True)
class PrivacyConfig:
    """The clinic privacy officer's settings (the ``[privacy]`` table of the agent config).

    ``noise_multiplier`` is the σ the clinic trains with. When ``target_epsilon_per_round``
    is set instead, σ is derived from it for each round's sample rate and step count (TOML
    has no null, so a set ``target_epsilon_per_round`` takes precedence over
    ``noise_multiplier``). Either way σ never goes below ``noise_floor``, and a plan from the
    aggregator asking for less than the floor is declined rather than silently changed.
    ``delta`` defaults to :func:`default_delta` of the local dataset size.
    ``min_examples`` refuses to train on datasets so small that DP-SGD is meaningless.
    """

    mode: str = "dp-sgd"
    epsilon_max: float = 8.0
    delta: float | None = None
    noise_multiplier: float | None = 1.0
    target_epsilon_per_round: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    noise_floor: float = 0.5
    min_examples: int = 20
    # Clinic-level (distributed) DP: the least Gaussian noise multiplier z this clinic
    # requires on its clipped delta, calibrated so any t survivors of a secure round
    # together carry N(0, (z·C)²). 0: none required (a plan may still ask for it).
    clinic_noise_multiplier: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key of the first setting that is unsafe."""
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"privacy.accountant: must be one of {', '.join(ACCOUNTANTS)}, "
                f"got {self.accountant!r}"
            )
        if not (math.isfinite(self.epsilon_max) and self.epsilon_max > 0):
            raise ConfigError(
                f"privacy.epsilon_max: must be a finite number > 0, got {self.epsilon_max!r}"
            )
        if self.delta is not None and not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"privacy.delta: must be in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(
                "privacy.max_grad_norm: the per-example clip must be > 0, "
                f"got {self.max_grad_norm!r}"
            )
        if not (math.isfinite(self.noise_floor) and self.noise_floor > 0):
            raise ConfigError(
                f"privacy.noise_floor: must be a finite number > 0, got {self.noise_floor!r}"
            )
        if not (math.isfinite(self.clinic_noise_multiplier) and self.clinic_noise_multiplier >= 0):
            raise ConfigError(
                "privacy.clinic_noise_multiplier: must be a finite number >= 0, "
                f"got {self.clinic_noise_multiplier!r}"
            )
        if isinstance(self.min_examples, bool) or self.min_examples < 1:
            raise ConfigError(
                f"privacy.min_examples: must be an integer >= 1, got {self.min_examples!r}"
            )
        if self.target_epsilon_per_round is not None:
            t = self.target_epsilon_per_round
            if not (math.isfinite(t) and t > 0):
                raise ConfigError(f"privacy.target_epsilon_per_round: must be > 0, got {t!r}")
            if t > self.epsilon_max:
                raise ConfigError(
                    f"privacy.target_epsilon_per_round: {t} exceeds privacy.epsilon_max "
                    f"{self.epsilon_max}; not even one round could run"
                )
        elif self.noise_multiplier is None:
            raise ConfigError(
                "privacy.noise_multiplier: set a noise multiplier "
                "or privacy.target_epsilon_per_round"
            )
        else:
            z = self.noise_multiplier
            if not (math.isfinite(z) and z > 0):
                raise ConfigError(f"privacy.noise_multiplier: must be > 0, got {z!r}")
            if z < self.noise_floor:
                raise ConfigError(
                    f"privacy.noise_multiplier: {z} is below privacy.noise_floor {self.noise_floor}"
                )

    def effective_delta(self, n_examples: int) -> float:
        return self.delta if self.delta is not None else default_delta(n_examples)

    def validate_for_dataset(self, n_examples: int) -> None:
        """Checks that need the local dataset size (δ must be below 1/n to mean anything)."""
        self.validate()
        if self.mode == "off":
            return
        if n_examples < self.min_examples:
            raise ConfigError(
                f"privacy.min_examples: the clinic has {n_examples} examples, "
                f"fewer than the {self.min_examples} required for DP training"
            )
        delta = self.effective_delta(n_examples)
        if delta >= 1.0 / n_examples:
            raise ConfigError(
                f"privacy.delta: {delta} is not below 1/n = {1.0 / n_examples:.3g} for the "
                f"clinic's {n_examples} examples; such a δ allows leaking a whole record"
            )


class DeclineReason(StrEnum):
    """Machine-readable reasons sent back to the aggregator (compare equal to plain strings)."""

    PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"
    NOISE_BELOW_FLOOR = "noise_below_floor"
    DATASET_TOO_SMALL = "dataset_too_small"
    DELTA_TOO_LARGE = "delta_too_large"
    INVALID_PLAN = "invalid_plan"
    NOISE_NOT_DERIVABLE = "noise_not_derivable"
    ACCOUNTING_FAILED = "accounting_failed"


@dataclass(frozen=True)
class PlanPrivacyRequest:
    """The privacy-relevant part of an aggregator's round plan (all optional)."""

    noise_multiplier: float | None = None


@dataclass(frozen=True)
class RoundDecision:
    """The guard's answer for one round.

    ``step`` is what DP-SGD must run with when accepted (``None`` when declined or when the
    clinic runs with ``mode = "off"``). ``epsilon_after`` is the projected total at
    ``delta`` if the round runs (also filled on a budget decline, to say by how much).
    """

    accepted: bool
    reason: DeclineReason | None
    message: str
    step: MechanismStep | None
    max_grad_norm: float
    delta: float | None
    accountant: str
    epsilon_spent: float
    epsilon_after: float | None
    epsilon_max: float

    @property
    def dp_enabled(self) -> bool:
        return self.step is not None


def accounting_delta(
    config: PrivacyConfig, ledger: Sequence[AccountedRound], n_examples: int
) -> float:
    """The δ the whole history is judged at: the smallest ever used (the most conservative).

    The default δ depends on the dataset size, which can change between rounds; taking the
    minimum means a grown dataset can never make past spending look cheaper.
    """
    return min([config.effective_delta(n_examples), *(float(e.delta) for e in ledger)])


def history_of(ledger: Sequence[AccountedRound]) -> list[MechanismStep]:
    return [
        MechanismStep(float(e.noise_multiplier), float(e.sample_rate), int(e.steps)) for e in ledger
    ]


def round_mechanism(
    n_examples: int, batch_size: int, epochs: int, noise_multiplier: float
) -> MechanismStep:
    """DP-SGD for ``epochs`` passes: q = B/n, ``epochs·⌈n/B⌉`` Poisson-sampled steps."""
    return MechanismStep(
        noise_multiplier=noise_multiplier,
        sample_rate=batch_size / n_examples,
        steps=epochs * math.ceil(n_examples / batch_size),
    )


def _decision(
    config: PrivacyConfig,
    reason: DeclineReason | None,
    message: str,
    step: MechanismStep | None,
    delta: float | None,
    spent: float,
    after: float | None,
) -> RoundDecision:
    return RoundDecision(
        accepted=reason is None,
        reason=reason,
        message=message,
        step=step,
        max_grad_norm=config.max_grad_norm,
        delta=delta,
        accountant=config.accountant,
        epsilon_spent=spent,
        epsilon_after=after,
        epsilon_max=config.epsilon_max,
    )


def plan_round(
    config: PrivacyConfig,
    ledger_entries: Sequence[AccountedRound],
    n_examples: int,
    batch_size: int,
    epochs: int,
    requested: PlanPrivacyRequest | None = None,
) -> RoundDecision:
    """Decide whether the clinic can take part in a round without breaking its budget.

    ``ledger_entries`` must be every round the clinic has been charged for. The σ used is
    ``max(plan's σ, clinic's σ)``: the plan can add noise, never remove it; a plan asking
    for less than ``noise_floor`` is declined so the aggregator learns its plan is refused
    instead of silently getting a different mechanism than it planned for.
    """
    config.validate()

    def decline(
        reason: DeclineReason,
        message: str,
        *,
        delta: float | None = None,
        spent: float = math.nan,
        after: float | None = None,
    ) -> RoundDecision:
        return _decision(config, reason, message, None, delta, spent, after)

    bad_int = [
        name
        for name, v in (("batch_size", batch_size), ("epochs", epochs))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1
    ]
    if bad_int:
        return decline(DeclineReason.INVALID_PLAN, f"plan {bad_int[0]} must be an integer >= 1")
    if n_examples < config.min_examples:
        return decline(
            DeclineReason.DATASET_TOO_SMALL,
            f"{n_examples} local examples, fewer than privacy.min_examples = {config.min_examples}",
        )
    if batch_size > n_examples:
        return decline(
            DeclineReason.DATASET_TOO_SMALL,
            f"plan batch size {batch_size} exceeds the {n_examples} local examples",
        )

    round_delta = config.effective_delta(n_examples)
    if round_delta >= 1.0 / n_examples:
        return decline(
            DeclineReason.DELTA_TOO_LARGE,
            f"privacy.delta {round_delta} is not below 1/n for {n_examples} local examples",
        )
    delta = accounting_delta(config, ledger_entries, n_examples)
    try:
        history = history_of(ledger_entries)
        spent = epsilon_for(history, delta, config.accountant)
    except (ValueError, PrivacyAccountingError) as exc:
        return decline(
            DeclineReason.ACCOUNTING_FAILED, f"cannot account the ledger: {exc}", delta=delta
        )

    if config.mode == "off":
        # No mechanism, no guarantee, nothing charged: for demos and benchmarks only.
        return _decision(
            config,
            None,
            "differential privacy is off in the clinic config",
            None,
            delta,
            spent,
            spent,
        )

    plan_sigma = requested.noise_multiplier if requested is not None else None
    if plan_sigma is not None:
        if not (math.isfinite(plan_sigma) and plan_sigma > 0):
            return decline(
                DeclineReason.INVALID_PLAN,
                f"plan noise multiplier {plan_sigma!r} is not > 0",
                delta=delta,
                spent=spent,
            )
        if plan_sigma < config.noise_floor:
            return decline(
                DeclineReason.NOISE_BELOW_FLOOR,
                f"plan noise multiplier {plan_sigma} is below the clinic's floor "
                f"{config.noise_floor}",
                delta=delta,
                spent=spent,
            )

    q = batch_size / n_examples
    steps = epochs * math.ceil(n_examples / batch_size)
    if config.target_epsilon_per_round is not None:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                derived = float(
                    get_noise_multiplier(
                        target_epsilon=config.target_epsilon_per_round,
                        target_delta=delta,
                        sample_rate=q,
                        steps=steps,
                        accountant=config.accountant,
                    )
                )
        except ValueError as exc:
            return decline(
                DeclineReason.NOISE_NOT_DERIVABLE,
                f"no noise multiplier reaches ε={config.target_epsilon_per_round} per round: {exc}",
                delta=delta,
                spent=spent,
            )
        own_sigma = max(derived, config.noise_floor)
    else:
        own_sigma = float(config.noise_multiplier)  # type: ignore[arg-type]  # validate() checked
    sigma = max(own_sigma, plan_sigma or 0.0)

    step = round_mechanism(n_examples, batch_size, epochs, sigma)
    try:
        after = epsilon_for([*history, step], delta, config.accountant)
    except PrivacyAccountingError as exc:
        return decline(DeclineReason.ACCOUNTING_FAILED, str(exc), delta=delta, spent=spent)
    if after > config.epsilon_max:
        return decline(
            DeclineReason.PRIVACY_BUDGET_EXHAUSTED,
            f"this round would bring ε from {spent:.3f} to {after:.3f} at δ={delta:g}, "
            f"over the clinic's budget ε_max={config.epsilon_max}",
            delta=delta,
            spent=spent,
            after=after,
        )
    return _decision(
        config,
        None,
        f"ε {spent:.3f} → {after:.3f} of {config.epsilon_max} at δ={delta:g} (σ={sigma:g})",
        step,
        delta,
        spent,
        after,
    )

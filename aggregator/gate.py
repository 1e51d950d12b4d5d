"""The validation gate: should a candidate checkpoint replace the published one?

Pure function of two metric dictionaries (as produced by ``EvalMetrics.to_dict()``) and
the gate settings, so the rule can be read and tested on its own. A candidate is rejected
when the sensitivity on any high-risk class falls more than ``tolerance`` below the
published checkpoint's, or when its balanced accuracy is below an absolute floor.

A published model no better than chance is no baseline: its sensitivities are whatever a
near-random network happens to output (the untrained initial model, or an early round,
may call every lesion melanoma, i.e. sensitivity 1.0), so comparing against it would
freeze the federation on a useless model. Against such a model — the initial one, or one
whose balanced accuracy is within ``chance_margin`` of 1/k for the k classes in the
held-out set — only the absolute floor applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    high_risk: Sequence[str] = ("mel", "bcc", "akiec")
    # Allowed absolute drop in sensitivity for each high-risk class (0.05 = 5 points).
    tolerance: float = 0.05
    min_balanced_accuracy: float = 0.0
    # A published model whose balanced accuracy is at most 1/k + this is "chance level".
    chance_margin: float = 0.05


@dataclass(frozen=True)
class GateDecision:
    accept: bool
    reason: str
    # Per-check numbers for the ledger: {"mel": {"candidate": .., "published": ..}, ...}
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "accept" if self.accept else "reject"


def _sensitivity(metrics: Mapping[str, Any], cls: str) -> float | None:
    sens = metrics.get("sensitivity")
    if not isinstance(sens, Mapping):
        return None
    value = sens.get(cls)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _chance_level(metrics: Mapping[str, Any], settings: GateSettings) -> bool:
    sens = metrics.get("sensitivity")
    bal = metrics.get("balanced_accuracy")
    if not isinstance(sens, Mapping) or not sens or not isinstance(bal, int | float):
        return False
    return float(bal) <= 1.0 / len(sens) + settings.chance_margin


def decide(
    candidate: Mapping[str, Any] | None,
    published: Mapping[str, Any] | None,
    settings: GateSettings,
    *,
    published_is_initial: bool = False,
) -> GateDecision:
    """Accept or reject ``candidate`` against ``published`` (both metric dicts)."""
    if not settings.enabled:
        return GateDecision(True, "gate disabled")
    if candidate is None:
        return GateDecision(True, "no held-out set configured")
    checks: dict[str, Any] = {}
    failures: list[str] = []
    bal = candidate.get("balanced_accuracy")
    if isinstance(bal, int | float):
        checks["balanced_accuracy"] = {
            "candidate": float(bal),
            "floor": settings.min_balanced_accuracy,
        }
        if bal < settings.min_balanced_accuracy:
            failures.append(
                f"balanced accuracy {bal:.3f} is below the floor "
                f"{settings.min_balanced_accuracy:.3f}"
            )
    trivial = published is None or published_is_initial or _chance_level(published, settings)
    if not trivial and published is not None:
        for cls in settings.high_risk:
            new = _sensitivity(candidate, cls)
            old = _sensitivity(published, cls)
            if new is None or old is None:
                # The class is absent from the held-out set: nothing to compare.
                continue
            checks[cls] = {"candidate": new, "published": old}
            if new < old - settings.tolerance:
                failures.append(
                    f"{cls} sensitivity fell from {old:.3f} to {new:.3f} "
                    f"(tolerance {settings.tolerance:.3f})"
                )
    if failures:
        return GateDecision(False, "; ".join(failures), checks)
    if trivial:
        return GateDecision(
            True,
            "the published model is at chance level (or the initial "
            "one): only the absolute floor applies",
            checks,
        )
    return GateDecision(True, "no high-risk sensitivity dropped beyond tolerance", checks)

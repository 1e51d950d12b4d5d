"""The clinic's evaluation slice: a fixed, lesion-grouped set of cases it never trains on.

Chosen once, the first time the agent reads its data, as a random ``fraction`` of its
lesions holding at most ``max_cases`` images, and kept in
``<state_dir>/evaluation_slice.json`` so it stays the same across rounds and restarts: a
slice that moved would judge the model on cases it had trained on. Every image of a chosen
lesion belongs to the slice, including images added later (two photographs of one lesion
are never split); new lesions go to training.

The file is never re-chosen behind the operator's back: if it is unreadable the agent
stops with a message saying so. Deleting it chooses a new slice, which may then contain
lesions earlier rounds trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.datasets import Record
from common.errors import DermafedError
from common.fsutil import atomic_write

SLICE_FILE = "evaluation_slice.json"
_VERSION = 1


class EvaluationSliceError(DermafedError):
    """The stored slice cannot be read; the agent refuses to guess a new one."""


@dataclass(frozen=True)
class EvaluationSlice:
    lesions: frozenset[str]

    @classmethod
    def load_or_choose(
        cls,
        path: Path,
        records: Sequence[Record],
        *,
        fraction: float,
        max_cases: int,
        rng: random.Random,
        keep: int = 0,
    ) -> EvaluationSlice:
        """The stored slice, or a new one chosen from ``records`` and stored at ``path``
        (leaving at least ``keep`` images to train on)."""
        if path.exists():
            return cls.load(path)
        chosen = choose_lesions(records, fraction=fraction, max_cases=max_cases, rng=rng, keep=keep)
        document = {"version": _VERSION, "lesions": sorted(chosen)}
        atomic_write(path, json.dumps(document, indent=1).encode(), mode=0o640)
        return cls(frozenset(chosen))

    @classmethod
    def load(cls, path: Path) -> EvaluationSlice:
        try:
            document = json.loads(path.read_text())
            lesions = document["lesions"]
            if document.get("version") != _VERSION or not all(isinstance(x, str) for x in lesions):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvaluationSliceError(
                f"{path} (the clinic's evaluation slice) cannot be read ({exc}); restore it "
                "from a backup, or delete it to choose a new slice (which may then hold cases "
                "earlier rounds trained on)"
            ) from None
        return cls(frozenset(lesions))

    def split(self, records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
        """``(training, slice)``: the slice's images, and every other one."""
        train = [r for r in records if r.lesion_id not in self.lesions]
        held = [r for r in records if r.lesion_id in self.lesions]
        return train, held


def choose_lesions(
    records: Sequence[Record],
    *,
    fraction: float,
    max_cases: int,
    rng: random.Random,
    keep: int = 0,
) -> set[str]:
    """A random ``fraction`` of the lesions (rounded down), whole lesions only, holding at
    most ``max_cases`` images and leaving at least ``keep`` to train on (a small clinic
    would otherwise fall below DP-SGD's minimum and decline every round); empty when
    ``max_cases`` is 0 or there are too few lesions."""
    images: dict[str, int] = {}
    for r in records:
        images[r.lesion_id] = images.get(r.lesion_id, 0) + 1
    wanted = math.floor(fraction * len(images))
    order = sorted(images)
    rng.shuffle(order)
    chosen: set[str] = set()
    cases = 0
    limit = min(max_cases, len(records) - keep)
    for lesion in order:
        if len(chosen) >= wanted:
            break
        if cases + images[lesion] <= limit:
            chosen.add(lesion)
            cases += images[lesion]
    return chosen


def capped(records: Sequence[Record], max_cases: int) -> list[Record]:
    """At most ``max_cases`` of the slice, the same ones every round (the plan's bound may
    be below the clinic's slice): ordered by a hash of the image id, not by file name."""
    ordered = sorted(records, key=lambda r: hashlib.sha256(r.image_id.encode()).digest())
    return ordered[:max_cases]


__all__ = ["SLICE_FILE", "EvaluationSlice", "EvaluationSliceError", "capped", "choose_lesions"]

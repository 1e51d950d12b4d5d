"""The clinic's evaluation slice: whole lesions, chosen once, kept across restarts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from clinic_agent.eval_slice import (
    EvaluationSlice,
    EvaluationSliceError,
    capped,
    choose_lesions,
)
from common.datasets import Record


def _records(lesions: int, per_lesion: int = 2) -> list[Record]:
    return [
        Record(f"L{i}__{j}", f"L{i}", i % 7, Path(f"/data/L{i}__{j}.jpg"))
        for i in range(lesions)
        for j in range(per_lesion)
    ]


def test_the_slice_holds_whole_lesions_up_to_the_fraction_and_the_cap():
    records = _records(50)
    chosen = choose_lesions(records, fraction=0.2, max_cases=1000, rng=random.Random(1))
    assert len(chosen) == 10
    capped_choice = choose_lesions(records, fraction=0.2, max_cases=7, rng=random.Random(1))
    assert len(capped_choice) == 3  # 2 images a lesion, at most 7 images
    assert choose_lesions(records, fraction=0.2, max_cases=0, rng=random.Random(1)) == set()
    # A small clinic keeps enough to train on (DP-SGD's minimum): 100 images, keep 96.
    kept = choose_lesions(records, fraction=0.2, max_cases=1000, rng=random.Random(1), keep=96)
    assert len(kept) == 2
    assert choose_lesions(_records(4), fraction=0.2, max_cases=99, rng=random.Random(1)) == set()


def test_the_slice_is_stored_and_stays_the_same_across_restarts(tmp_path: Path):
    path = tmp_path / "evaluation_slice.json"
    records = _records(40)
    first = EvaluationSlice.load_or_choose(
        path, records, fraction=0.25, max_cases=100, rng=random.Random(3)
    )
    # A restart with other randomness and more data reads the stored slice.
    more = records + _records(60)[80:]
    again = EvaluationSlice.load_or_choose(
        path, more, fraction=0.25, max_cases=100, rng=random.Random(99)
    )
    assert again == first and len(first.lesions) == 10
    train, held = again.split(more)
    assert {r.lesion_id for r in held} == first.lesions
    assert not {r.lesion_id for r in train} & first.lesions
    assert len(train) + len(held) == len(more)


def test_a_new_photograph_of_a_slice_lesion_joins_the_slice(tmp_path: Path):
    path = tmp_path / "evaluation_slice.json"
    records = _records(20)
    chosen = EvaluationSlice.load_or_choose(
        path, records, fraction=0.2, max_cases=100, rng=random.Random(5)
    )
    lesion = sorted(chosen.lesions)[0]
    new = Record(f"{lesion}__late", lesion, 0, Path("/data/late.jpg"))
    _, held = chosen.split([*records, new])
    assert new in held


def test_an_unreadable_slice_file_stops_the_agent_instead_of_choosing_again(tmp_path: Path):
    path = tmp_path / "evaluation_slice.json"
    path.write_text("{not json")
    with pytest.raises(EvaluationSliceError, match="cannot be read"):
        EvaluationSlice.load_or_choose(
            path, _records(20), fraction=0.2, max_cases=10, rng=random.Random(0)
        )


def test_the_cap_takes_the_same_cases_every_time():
    records = _records(30)
    first = capped(records, 10)
    assert len(first) == 10 and capped(list(reversed(records)), 10) == first

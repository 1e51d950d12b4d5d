"""Clinic shards for simulations and benchmarks: non-IID label skew, whole lesions only.

Each class's lesions are spread over the clinics in proportions drawn from a symmetric
Dirichlet(alpha) (Hsu et al., 2019): a small alpha gives each clinic a few dominant
classes, ``alpha = inf`` an even, stratified (IID) spread. A lesion is never split, so
two photographs of one lesion cannot end up in two clinics (or in a clinic and the
holdout), which would leak across the split.

Shards are index CSV files that point at the source images by absolute path; images
are never copied.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.datasets import (
    CLASSES,
    INDEX_HEADER,
    METADATA_COLUMNS,
    NUM_CLASSES,
    DatasetError,
    Record,
    class_counts,
    group_split,
    lesion_groups,
    lesion_label,
    load_records,
)

# Redraws before falling back to moving lesions into clinics that came out too small.
_MAX_REDRAWS = 50
_CLINIC_FILE = re.compile(r"^clinic-(\d+)\.csv$")


@dataclass
class PartitionResult:
    out: Path
    clinic_files: list[Path]
    counts: list[list[int]]  # counts[clinic][class], classes in CLASSES order
    holdout_file: Path | None = None
    holdout_counts: list[int] = field(default_factory=list)

    def table(self) -> str:
        """Plain-text table of images per clinic and class."""
        names = [p.stem for p in self.clinic_files]
        rows = list(zip(names, self.counts, strict=True))
        if self.holdout_file is not None:
            rows.append(("holdout", self.holdout_counts))
        first = max([len("shard"), *(len(n) for n, _ in rows)])
        cols = [*CLASSES, "total"]
        width = max(6, *(len(c) for c in cols))
        lines = ["shard".ljust(first) + "".join(c.rjust(width + 1) for c in cols)]
        for name, counts in rows:
            cells = [*counts, sum(counts)]
            lines.append(name.ljust(first) + "".join(str(v).rjust(width + 1) for v in cells))
        return "\n".join(lines)


def _validate(clinics: int, alpha: float, min_per_clinic: int) -> None:
    if clinics < 1:
        raise DatasetError(f"number of clinics must be at least 1, got {clinics}")
    if math.isnan(alpha) or alpha <= 0:
        raise DatasetError(f"Dirichlet alpha must be positive (or inf for IID), got {alpha}")
    if min_per_clinic < 0:
        raise DatasetError(f"min_per_clinic must be >= 0, got {min_per_clinic}")


def _draw(
    by_class: dict[int, list[str]], clinics: int, alpha: float, rng: np.random.Generator
) -> list[list[str]]:
    """One assignment of lesion ids to clinics."""
    shards: list[list[str]] = [[] for _ in range(clinics)]
    for label in sorted(by_class):
        lesions = by_class[label]
        order = rng.permutation(len(lesions))
        if math.isinf(alpha):
            # Round-robin from a random start: every clinic gets floor or ceil of n/k, and
            # the clinics that get the extra lesion differ from class to class.
            start = int(rng.integers(clinics))
            for j, idx in enumerate(order):
                shards[(start + j) % clinics].append(lesions[idx])
            continue
        proportions = rng.dirichlet(np.full(clinics, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(lesions)).astype(int)
        for clinic, part in enumerate(np.split(order, cuts)):
            shards[clinic].extend(lesions[i] for i in part)
    return shards


def _repair(shards: list[list[str]], sizes: dict[str, int], minimum: int) -> bool:
    """Move whole lesions from the biggest clinics into those under ``minimum``.

    Deterministic; returns False when the lesions are too coarse to satisfy everyone.
    """

    def total(s: list[str]) -> int:
        return sum(sizes[lesion] for lesion in s)

    for _ in range(sum(len(s) for s in shards)):
        short = [i for i, s in enumerate(shards) if total(s) < minimum]
        if not short:
            return True
        needy = short[0]
        donors = sorted(range(len(shards)), key=lambda i: (-total(shards[i]), i))
        moved = False
        for donor in donors:
            if donor == needy:
                continue
            # The smallest lesion the donor can give away without going short itself.
            for lesion in sorted(shards[donor], key=lambda lid: (sizes[lid], lid)):
                if total(shards[donor]) - sizes[lesion] >= minimum:
                    shards[donor].remove(lesion)
                    shards[needy].append(lesion)
                    moved = True
                    break
            if moved:
                break
        if not moved:
            return False
    return all(total(s) >= minimum for s in shards)


def dirichlet_partition(
    records: Sequence[Record],
    clinics: int,
    alpha: float,
    seed: int,
    min_per_clinic: int = 1,
) -> list[list[Record]]:
    """Split ``records`` into ``clinics`` shards with Dirichlet(alpha) label skew.

    Whole lesions are assigned. When a draw leaves a clinic with fewer than
    ``min_per_clinic`` records it is redrawn (the n-th draw is seeded with
    ``(seed, n)``, so the result depends on the seed only); after a bounded number of
    redraws, lesions are moved from the largest clinics into the short ones.
    """
    _validate(clinics, alpha, min_per_clinic)
    if len(records) < clinics * min_per_clinic:
        raise DatasetError(
            f"{len(records)} images cannot give {clinics} clinics at least "
            f"{min_per_clinic} image(s) each"
        )
    groups = lesion_groups(records)
    sizes = {lesion: len(g) for lesion, g in groups.items()}
    by_class: dict[int, list[str]] = {}
    for lesion, group in groups.items():
        by_class.setdefault(lesion_label(group), []).append(lesion)

    shards: list[list[str]] | None = None
    for attempt in range(_MAX_REDRAWS):
        draw = _draw(by_class, clinics, alpha, np.random.default_rng([seed, attempt]))
        if all(sum(sizes[lesion] for lesion in s) >= min_per_clinic for s in draw):
            shards = draw
            break
    if shards is None:
        shards = _draw(by_class, clinics, alpha, np.random.default_rng([seed, _MAX_REDRAWS]))
        if not _repair(shards, sizes, min_per_clinic):
            raise DatasetError(
                f"cannot give each of {clinics} clinics {min_per_clinic} image(s) without "
                "splitting a lesion; use fewer clinics"
            )
    out = []
    for shard in shards:
        members = [r for lesion in shard for r in groups[lesion]]
        out.append(sorted(members, key=lambda r: (r.image_id, str(r.path))))
    return out


def iid_partition(
    records: Sequence[Record], clinics: int, seed: int, min_per_clinic: int = 1
) -> list[list[Record]]:
    """Even, class-stratified split of whole lesions (Dirichlet with alpha = inf)."""
    return dirichlet_partition(records, clinics, math.inf, seed, min_per_clinic)


def _age_cell(age: float | None) -> str:
    if age is None:
        return ""
    return str(int(age)) if float(age).is_integer() else repr(float(age))


def write_index(records: Sequence[Record], path: Path) -> None:
    """Write an index CSV (``image_id,lesion_id,dx,path`` with absolute paths), atomically.

    When any record carries case metadata, the columns ``sex,age,localization`` follow
    (empty cells where not recorded), so evaluation on the index can still report by
    subgroup; without metadata the file has the original four columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with_metadata = any(
        r.sex is not None or r.age is not None or r.localization is not None for r in records
    )
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(INDEX_HEADER + METADATA_COLUMNS if with_metadata else INDEX_HEADER)
        for r in records:
            row = [r.image_id, r.lesion_id, r.dx, str(Path(r.path).resolve())]
            if with_metadata:
                row += [r.sex or "", _age_cell(r.age), r.localization or ""]
            writer.writerow(row)
    os.replace(tmp, path)


def partition_to_dir(
    source: Path,
    out: Path,
    clinics: int,
    alpha: float,
    seed: int,
    holdout_fraction: float = 0.0,
) -> PartitionResult:
    """Write ``out/clinic-<i>.csv`` (i from 1) and, optionally, ``out/holdout.csv``.

    The holdout is split off first, by lesion and stratified by class, so no clinic
    holds a lesion of the held-out set. Shard files left by an earlier run with more
    clinics (or a holdout no longer asked for) are removed, so the folder always
    describes one partition. ``out/partition.json`` records the parameters and counts.
    """
    _validate(clinics, alpha, 1)
    records = load_records(source)
    if not records:
        raise DatasetError(f"{source}: no images found")
    holdout: list[Record] = []
    pool: list[Record] = list(records)
    if holdout_fraction > 0:
        pool, holdout = group_split(records, holdout_fraction, seed)
    elif holdout_fraction < 0:
        raise DatasetError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    shards = dirichlet_partition(pool, clinics, alpha, seed)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, shard in enumerate(shards, start=1):
        f = out / f"clinic-{i}.csv"
        write_index(shard, f)
        files.append(f)
    for stale in out.iterdir():
        m = _CLINIC_FILE.match(stale.name)
        if m and int(m.group(1)) > clinics:
            stale.unlink()
    holdout_path = out / "holdout.csv"
    holdout_file: Path | None = None
    if holdout:
        write_index(holdout, holdout_path)
        holdout_file = holdout_path
    else:
        holdout_path.unlink(missing_ok=True)

    result = PartitionResult(
        out=out,
        clinic_files=files,
        counts=[class_counts(s).tolist() for s in shards],
        holdout_file=holdout_file,
        holdout_counts=class_counts(holdout).tolist() if holdout else [0] * NUM_CLASSES,
    )
    summary = {
        "source": str(Path(source).resolve()),
        "clinics": clinics,
        "alpha": "inf" if math.isinf(alpha) else alpha,
        "seed": seed,
        "holdout_fraction": holdout_fraction,
        "classes": list(CLASSES),
        "counts": result.counts,
        "holdout_counts": result.holdout_counts if holdout else None,
    }
    (out / "partition.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result

"""Data loading, lesion-grouped splitting, partitioning, decoding and synthetic data."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datasets import (
    CLASSES,
    HAM_METADATA,
    DatasetError,
    ImageCache,
    Record,
    class_counts,
    decode_image,
    group_split,
    labels_of,
    load_records,
)
from common.partition import (
    dirichlet_partition,
    iid_partition,
    partition_to_dir,
    write_index,
)
from common.synthetic import MARKER, generate_synthetic, is_synthetic


def ham_dir() -> Path:
    env = os.environ.get("DERMAFED_HAM10000")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared/data/ham10000_200x150"


HAM = ham_dir()
needs_ham = pytest.mark.skipif(
    not (HAM / HAM_METADATA).is_file(),
    reason=f"real HAM10000 images not found at {HAM} (set DERMAFED_HAM10000)",
)


def _ham_rows() -> list[dict[str, str]]:
    with (HAM / HAM_METADATA).open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def all_ham() -> list[Record]:
    if not (HAM / HAM_METADATA).is_file():
        pytest.skip(f"real HAM10000 images not found at {HAM} (set DERMAFED_HAM10000)")
    return load_records(HAM)


@pytest.fixture(scope="module")
def ham_subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]], int]:
    """A HAM10000-layout copy of ~90 real images (all classes, multi-image lesions).

    The metadata also lists 6 rows whose images are deliberately not copied.
    Returns (folder, rows with an image, number of rows without).
    """
    if not (HAM / HAM_METADATA).is_file():
        pytest.skip(f"real HAM10000 images not found at {HAM} (set DERMAFED_HAM10000)")
    rows = _ham_rows()
    by_lesion: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_lesion[row["lesion_id"]].append(row)
    chosen: list[dict[str, str]] = []
    for dx in CLASSES:
        lesions = sorted(lid for lid, rs in by_lesion.items() if rs[0]["dx"] == dx)
        multi = [lid for lid in lesions if len(by_lesion[lid]) > 1][:3]
        single = [lid for lid in lesions if len(by_lesion[lid]) == 1][:6]
        for lid in multi + single:
            chosen.extend(by_lesion[lid])
    missing = [r for r in rows if r not in chosen][:6]
    root = tmp_path_factory.mktemp("ham_subset")
    (root / "images").mkdir()
    for row in chosen:
        shutil.copyfile(
            HAM / "images" / f"{row['image_id']}.jpg", root / "images" / f"{row['image_id']}.jpg"
        )
    with (root / HAM_METADATA).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in chosen[:40] + missing + chosen[40:]:
            writer.writerow(row)
    return root, chosen, len(missing)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), images_per_class=12, seed=5)


# --- loaders ------------------------------------------------------------------------------


def test_ham_layout_skips_rows_without_image(ham_subset) -> None:
    root, rows, n_missing = ham_subset
    assert n_missing > 0
    records = load_records(root)
    assert len(records) == len(rows)
    assert [r.image_id for r in records] == sorted(r["image_id"] for r in rows)
    expected = {r["image_id"]: (r["lesion_id"], r["dx"]) for r in rows}
    for rec in records:
        assert (rec.lesion_id, rec.dx) == expected[rec.image_id]
        assert CLASSES[rec.label] == rec.dx
        assert rec.path == root / "images" / f"{rec.image_id}.jpg"
    assert set(np.nonzero(class_counts(records))[0]) == set(range(len(CLASSES)))
    # Pointing at the metadata file itself means the same folder.
    assert load_records(root / HAM_METADATA) == records


def _write_image(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_class_folders_and_lesion_ids(tmp_path: Path) -> None:
    _write_image(tmp_path / "mel" / "L7__front.jpg", (60, 40, 30))
    _write_image(tmp_path / "mel" / "L7__close.png", (70, 40, 30))
    _write_image(tmp_path / "nv" / "n1.jpeg", (120, 80, 60))
    _write_image(tmp_path / "nv" / "N2.JPG", (120, 80, 60))
    (tmp_path / "nv" / "notes.txt").write_text("not an image")
    _write_image(tmp_path / "nv" / ".hidden.jpg", (1, 1, 1))
    _write_image(tmp_path / ".cache" / "x.jpg", (1, 1, 1))
    records = load_records(tmp_path)
    assert [(r.image_id, r.lesion_id, r.dx) for r in records] == [
        ("L7__close", "L7", "mel"),
        ("L7__front", "L7", "mel"),
        ("N2", "N2", "nv"),
        ("n1", "n1", "nv"),
    ]
    # The two photographs of lesion L7 always land on the same side of a split.
    for seed in range(5):
        train, test = group_split(records, 0.5, seed)
        sides = {r.image_id: "train" for r in train} | {r.image_id: "test" for r in test}
        assert sides["L7__close"] == sides["L7__front"]


def test_class_folder_with_unknown_name_is_refused(tmp_path: Path) -> None:
    _write_image(tmp_path / "nv" / "a.jpg", (120, 80, 60))
    _write_image(tmp_path / "melanoma" / "b.jpg", (60, 40, 30))
    with pytest.raises(DatasetError, match=r"melanoma.*unknown diagnosis code 'melanoma'"):
        load_records(tmp_path)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class folders"):
        load_records(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "absent")


def test_unknown_dx_names_file_and_line(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "A.jpg", (1, 2, 3))
    _write_image(tmp_path / "images" / "B.jpg", (1, 2, 3))
    (tmp_path / HAM_METADATA).write_text(
        "lesion_id,image_id,dx\nL1,A,nv\nL2,B,melanoma\n", encoding="utf-8"
    )
    with pytest.raises(DatasetError) as info:
        load_records(tmp_path)
    assert HAM_METADATA in str(info.value)
    assert "line 3" in str(info.value)
    assert "'melanoma'" in str(info.value)


def test_missing_column_and_duplicate_ids(tmp_path: Path) -> None:
    (tmp_path / "index.csv").write_text("image_id,dx,path\nA,nv,a.jpg\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"missing column.*lesion_id"):
        load_records(tmp_path / "index.csv")
    _write_image(tmp_path / "nv" / "same.jpg", (1, 2, 3))
    _write_image(tmp_path / "mel" / "same.jpg", (1, 2, 3))
    with pytest.raises(DatasetError, match="appears twice"):
        load_records(tmp_path)


def test_index_csv_round_trip_and_relative_paths(tmp_path: Path, synthetic: Path) -> None:
    records = load_records(synthetic)
    index = tmp_path / "shards" / "all.csv"
    write_index(records, index)
    back = load_records(index)
    assert [(r.image_id, r.lesion_id, r.label) for r in back] == [
        (r.image_id, r.lesion_id, r.label) for r in records
    ]
    assert all(b.path == r.path.resolve() for b, r in zip(back, records, strict=True))
    assert not list((tmp_path / "shards").glob("*.jpg"))  # images are referenced, not copied
    # A hand-written index with a path relative to the index file.
    _write_image(tmp_path / "imgs" / "x.png", (200, 10, 10))
    rel = tmp_path / "rel.csv"
    rel.write_text("image_id,lesion_id,dx,path\nx,Lx,VASC,imgs/x.png\n", encoding="utf-8")
    (rec,) = load_records(rel)
    assert (rec.dx, rec.path) == ("vasc", (tmp_path / "imgs" / "x.png").resolve())
    rel.write_text("image_id,lesion_id,dx,path\nx,Lx,vasc,imgs/gone.png\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 2.*does not exist"):
        load_records(rel)


def test_ham_metadata_is_kept_on_records_and_through_an_index(ham_subset, tmp_path: Path) -> None:
    root, rows, _ = ham_subset
    records = load_records(root)
    by_id = {r["image_id"]: r for r in rows}

    def expected(text: str) -> str | None:
        return None if text.strip().lower() in ("", "unknown") else text.strip().lower()

    for rec in records:
        row = by_id[rec.image_id]
        assert rec.sex == expected(row["sex"])
        assert rec.localization == expected(row["localization"])
        assert rec.age == (float(row["age"]) if row["age"].strip() else None)
    assert any(r.sex == "female" for r in records) and any(r.age for r in records)
    index = tmp_path / "with-metadata.csv"
    write_index(records, index)
    with index.open(newline="") as fh:
        assert next(csv.reader(fh)) == [
            "image_id",
            "lesion_id",
            "dx",
            "path",
            "sex",
            "age",
            "localization",
        ]
    assert load_records(index) == [
        Record(r.image_id, r.lesion_id, r.label, r.path.resolve(), r.sex, r.age, r.localization)
        for r in records
    ]


def test_records_without_metadata_keep_the_four_column_index(
    tmp_path: Path, synthetic: Path
) -> None:
    # Class folders carry no metadata; the synthetic set's is all "unknown" or empty.
    _write_image(tmp_path / "folders" / "mel" / "a.jpg", (60, 40, 30))
    for records in (load_records(tmp_path / "folders"), load_records(synthetic)):
        assert {(r.sex, r.age, r.localization) for r in records} == {(None, None, None)}
        write_index(records, tmp_path / "plain.csv")
        header = (tmp_path / "plain.csv").read_text(encoding="utf-8").splitlines()[0]
        assert header == "image_id,lesion_id,dx,path"
    # A hand-written index: metadata columns optional, cells lenient (bad age = unknown).
    _write_image(tmp_path / "imgs" / "x.png", (200, 10, 10))
    index = tmp_path / "meta.csv"
    index.write_text(
        "image_id,lesion_id,dx,path,sex,age,localization\n"
        "x,Lx,mel,imgs/x.png,Female,62.5,Back\n"
        "y,Ly,nv,imgs/x.png,unknown,n/a,\n",
        encoding="utf-8",
    )
    x, y = load_records(index)
    assert (x.sex, x.age, x.localization) == ("female", 62.5, "back")
    assert (y.sex, y.age, y.localization) == (None, None, None)
    write_index([x, y], tmp_path / "again.csv")
    assert load_records(tmp_path / "again.csv") == [x, y]


# --- lesion-grouped split -----------------------------------------------------------------


def test_group_split_is_lesion_disjoint_and_stratified(all_ham: list[Record]) -> None:
    train, test = group_split(all_ham, 0.2, seed=3)
    assert len(train) + len(test) == len(all_ham)
    assert {r.image_id for r in train}.isdisjoint({r.image_id for r in test})
    assert {r.lesion_id for r in train}.isdisjoint({r.lesion_id for r in test})
    lesion_class = {r.lesion_id: r.label for r in all_ham}
    for label in range(len(CLASSES)):
        n = sum(1 for c in lesion_class.values() if c == label)
        n_test = len({r.lesion_id for r in test if r.label == label})
        assert n_test >= 1
        assert abs(n_test - round(0.2 * n)) <= 1, CLASSES[label]
    again = group_split(all_ham, 0.2, seed=3)
    other = group_split(all_ham, 0.2, seed=4)
    assert again == (train, test)
    assert {r.image_id for r in other[1]} != {r.image_id for r in test}


def test_group_split_keeps_rare_classes_on_both_sides() -> None:
    # Two lesions of a class: a 10 % split still tests one and trains on the other.
    recs = [Record(f"i{i}", f"L{i}", 3, Path(f"/x/{i}.jpg")) for i in range(2)]
    recs += [Record(f"j{i}", f"M{i}", 5, Path(f"/x/j{i}.jpg")) for i in range(20)]
    train, test = group_split(recs, 0.1, 0)
    assert sorted(r.label for r in test) == [3, 5, 5]
    assert 3 in {r.label for r in train}
    with pytest.raises(DatasetError, match="test fraction"):
        group_split(recs, 1.0, 0)


# --- partitioning -------------------------------------------------------------------------


def _label_skew(shards: list[list[Record]]) -> float:
    """Mean total-variation distance between each clinic's and the global label mix."""
    total = sum((class_counts(s) for s in shards), np.zeros(len(CLASSES)))
    glob = total / total.sum()
    return float(np.mean([0.5 * np.abs(class_counts(s) / len(s) - glob).sum() for s in shards]))


def test_dirichlet_partition_keeps_lesions_whole_and_is_skewed(all_ham: list[Record]) -> None:
    skewed = dirichlet_partition(all_ham, clinics=5, alpha=0.1, seed=1)
    even = dirichlet_partition(all_ham, clinics=5, alpha=100.0, seed=1)
    iid = iid_partition(all_ham, clinics=5, seed=1)
    for shards in (skewed, even, iid):
        assert sorted(r.image_id for s in shards for r in s) == [r.image_id for r in all_ham]
        owner: dict[str, int] = {}
        for i, shard in enumerate(shards):
            assert shard
            for r in shard:
                assert owner.setdefault(r.lesion_id, i) == i, "lesion split across clinics"
    assert _label_skew(skewed) > 0.3
    assert _label_skew(iid) < 0.05
    assert _label_skew(skewed) > 3 * _label_skew(even)
    # IID shards hold about the same number of images.
    sizes = [len(s) for s in iid]
    assert max(sizes) - min(sizes) < 0.05 * len(all_ham)


def test_dirichlet_partition_is_deterministic_per_seed(all_ham: list[Record]) -> None:
    a = dirichlet_partition(all_ham, 4, 0.5, seed=9)
    b = dirichlet_partition(all_ham, 4, 0.5, seed=9)
    c = dirichlet_partition(all_ham, 4, 0.5, seed=10)
    assert a == b
    assert a != c


def test_min_per_clinic_is_met_or_refused(synthetic: Path) -> None:
    records = load_records(synthetic)
    shards = dirichlet_partition(records, clinics=12, alpha=0.01, seed=0, min_per_clinic=4)
    assert all(len(s) >= 4 for s in shards)
    assert sum(len(s) for s in shards) == len(records)
    with pytest.raises(DatasetError, match="cannot give"):
        dirichlet_partition(records, clinics=len(records) + 1, alpha=1.0, seed=0)
    with pytest.raises(DatasetError, match="alpha"):
        dirichlet_partition(records, clinics=2, alpha=0.0, seed=0)


def test_partition_to_dir_writes_index_files(tmp_path: Path, synthetic: Path) -> None:
    out = tmp_path / "shards"
    result = partition_to_dir(synthetic, out, clinics=3, alpha=0.5, seed=2, holdout_fraction=0.25)
    assert [p.name for p in result.clinic_files] == ["clinic-1.csv", "clinic-2.csv", "clinic-3.csv"]
    assert result.holdout_file == out / "holdout.csv"
    holdout = load_records(out / "holdout.csv")
    shards = [load_records(p) for p in result.clinic_files]
    assert [class_counts(s).tolist() for s in shards] == result.counts
    assert class_counts(holdout).tolist() == result.holdout_counts
    held_lesions = {r.lesion_id for r in holdout}
    for shard in shards:
        assert held_lesions.isdisjoint(r.lesion_id for r in shard)
        assert all(r.path.parent == (synthetic / "images").resolve() for r in shard)
    assert sum(len(s) for s in shards) + len(holdout) == len(load_records(synthetic))
    assert all(c > 0 for c in result.holdout_counts)  # stratified holdout: every class
    summary = json.loads((out / "partition.json").read_text())
    assert summary["clinics"] == 3 and summary["counts"] == result.counts
    table = result.table()
    assert "clinic-2" in table and "holdout" in table and "akiec" in table
    # A rerun with fewer clinics and no holdout leaves no stale shards behind.
    again = partition_to_dir(synthetic, out, clinics=2, alpha=float("inf"), seed=2)
    assert sorted(p.name for p in out.glob("*.csv")) == ["clinic-1.csv", "clinic-2.csv"]
    assert again.holdout_file is None
    assert json.loads((out / "partition.json").read_text())["alpha"] == "inf"


# --- decoding -----------------------------------------------------------------------------


def test_image_cache_decodes_only_new_or_changed_files(tmp_path: Path, synthetic: Path) -> None:
    src = load_records(synthetic)[:10]
    folder = tmp_path / "nv"
    folder.mkdir()
    for r in src:
        shutil.copyfile(r.path, folder / r.path.name)
    cache = ImageCache()
    first = cache.load(load_records(tmp_path), 32)
    assert first.shape == (10, 32, 32, 3) and first.dtype == np.uint8
    assert cache.decodes == 10
    again = cache.load(load_records(tmp_path), 32)
    assert cache.decodes == 10
    np.testing.assert_array_equal(first, again)
    # One new file, one replaced file: exactly two decodes.
    shutil.copyfile(load_records(synthetic)[10].path, folder / "new.jpg")
    changed = folder / src[0].path.name
    Image.new("RGB", (64, 64), (10, 200, 10)).save(changed)
    os.utime(changed, ns=(1, 1))  # a distinct mtime even on coarse-grained file systems
    records = load_records(tmp_path)
    third = cache.load(records, 32)
    assert cache.decodes == 12
    idx = [r.path for r in records].index(changed)
    assert tuple(int(v) for v in third[idx, 16, 16]) == pytest.approx((10, 200, 10), abs=3)
    # Another size is another entry; deleted files can be dropped.
    cache.load(records[:2], 16)
    assert cache.decodes == 14
    (folder / "new.jpg").unlink()
    assert cache.retain(r.path for r in load_records(tmp_path)) == 1  # new.jpg at 32 px


@needs_ham
def test_draft_decoding_matches_full_decode() -> None:
    path = HAM / "images" / f"{_ham_rows()[0]['image_id']}.jpg"
    fast = decode_image(path, 64).astype(np.float64)
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 6.0


def test_unreadable_image_is_a_dataset_error(tmp_path: Path) -> None:
    bad = tmp_path / "nv" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg"):
        ImageCache().load(load_records(tmp_path), 32)


# --- synthetic data -----------------------------------------------------------------------


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_data_is_labelled_and_complete(synthetic: Path) -> None:
    assert is_synthetic(synthetic)
    marker = (synthetic / MARKER).read_text()
    assert "SYNTHETIC" in marker and "not patient data" in marker.lower()
    with (synthetic / HAM_METADATA).open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["dx_type"] for r in rows} == {"synthetic"}
    assert all(r["image_id"].startswith("SYN_") for r in rows)
    records = load_records(synthetic)
    assert class_counts(records).tolist() == [12] * len(CLASSES)
    assert len({r.lesion_id for r in records}) < len(records)  # several photos per lesion
    with Image.open(records[0].path) as im:
        assert im.size == (64, 64) and im.format == "JPEG"


def test_synthetic_data_is_deterministic(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", images_per_class=3, size=32, seed=11)
    b = generate_synthetic(tmp_path / "b", images_per_class=3, size=32, seed=11)
    c = generate_synthetic(tmp_path / "c", images_per_class=3, size=32, seed=12)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # Regenerating in place with fewer images leaves no stale files behind.
    generate_synthetic(a, images_per_class=2, size=32, seed=11)
    assert len(list((a / "images").glob("*.jpg"))) == 2 * len(CLASSES)
    assert len(load_records(a)) == 2 * len(CLASSES)


def test_synthetic_classes_differ_in_appearance(synthetic: Path) -> None:
    records = load_records(synthetic)
    images = ImageCache().load(records, 32).astype(np.float64)
    labels = labels_of(records)
    darkness = np.zeros(len(records))
    redness = np.zeros(len(records))
    for i, img in enumerate(images):
        frame = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3)])
        skin = np.median(frame, axis=0)
        lesion = img[np.abs(img - skin).sum(axis=2) > 60]  # pixels far from the skin tone
        assert len(lesion) > 0
        darkness[i] = -lesion.sum(axis=1).mean()
        redness[i] = ((lesion[:, 0] - lesion[:, 1]) / lesion.sum(axis=1)).mean()
    per_class = [labels == k for k in range(len(CLASSES))]
    # Melanomas are the darkest lesions, vascular lesions the reddest.
    assert int(np.argmax([darkness[m].mean() for m in per_class])) == CLASSES.index("mel")
    assert int(np.argmax([redness[m].mean() for m in per_class])) == CLASSES.index("vasc")


def test_synthetic_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    (tmp_path / HAM_METADATA).write_text("lesion_id,image_id,dx\n")
    with pytest.raises(DatasetError, match="not synthetic"):
        generate_synthetic(tmp_path, images_per_class=1)

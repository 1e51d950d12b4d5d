"""Skin-lesion records: finding them on disk, splitting them by lesion, decoding them.

Three layouts are recognised by :func:`load_records`:

* **HAM10000 layout** – a directory holding ``HAM10000_metadata.csv`` (columns
  ``lesion_id,image_id,dx,...``) and ``images/<image_id>.jpg``. Rows whose image file is
  absent are skipped, because a clinic (or the shared test copy) may hold only part of the
  archive.
* **Class folders** – a directory of sub-folders named after the diagnosis codes
  (``mel/``, ``nv/``, ...) holding ``.jpg``/``.jpeg``/``.png`` files. The image id is the
  file stem. The lesion id is the stem too, unless the stem contains ``__``: then the part
  before the first ``__`` is the lesion id, so ``L17__front.jpg`` and ``L17__close.jpg``
  are two photographs of lesion ``L17`` and are kept on the same side of every split.
* **Index CSV** – a ``.csv`` file with header ``image_id,lesion_id,dx,path`` (as written
  by :func:`common.partition.write_index`); ``path`` is absolute or relative to the
  index file's directory. Optional extra columns ``sex,age,localization`` carry the case
  metadata; an index without them (the original four-column format) is still read.

Images are never copied: a :class:`Record` only points at the file.

Case metadata (``sex``, ``age`` in years, ``localization`` = body site) comes from the
HAM10000 metadata columns of the same names, or from an index CSV that has them. It is
only used to break evaluation down by subgroup, so it is read leniently: an empty cell,
``unknown`` or an age that is not a non-negative number becomes None (not recorded)
instead of an error. Class folders carry no metadata (all None).
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.errors import DermafedError

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HIGH_RISK: tuple[str, ...] = ("mel", "bcc", "akiec")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)

HAM_METADATA = "HAM10000_metadata.csv"
INDEX_HEADER: tuple[str, ...] = ("image_id", "lesion_id", "dx", "path")
# Optional case-metadata columns, after INDEX_HEADER in an index CSV (HAM10000's names).
METADATA_COLUMNS: tuple[str, ...] = ("sex", "age", "localization")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
LESION_SEPARATOR = "__"


class DatasetError(DermafedError, ValueError):
    """A data source is malformed (unknown diagnosis, missing column, unreadable image)."""


@dataclass(frozen=True)
class Record:
    image_id: str
    lesion_id: str
    label: int
    path: Path
    # Case metadata, None when not recorded (see the module docstring).
    sex: str | None = None
    age: float | None = None
    localization: str | None = None

    @property
    def dx(self) -> str:
        return CLASSES[self.label]


def class_names(num_classes: int) -> tuple[str, ...]:
    """The HAM10000 codes for a model with their number of classes, else ``class<i>``."""
    if num_classes == len(CLASSES):
        return CLASSES
    return tuple(f"class{i}" for i in range(num_classes))


def label_of(dx: str, where: str) -> int:
    """Index of diagnosis code ``dx``; ``where`` names the file and row for the error."""
    code = dx.strip().lower()
    if code not in CLASS_INDEX:
        raise DatasetError(
            f"{where}: unknown diagnosis code {dx!r}; expected one of {', '.join(CLASSES)}"
        )
    return CLASS_INDEX[code]


def _text_field(raw: str | None) -> str | None:
    value = (raw or "").strip().lower()
    return None if value in ("", "unknown") else value


def _age_field(raw: str | None) -> float | None:
    try:
        age = float((raw or "").strip())
    except ValueError:
        return None
    return age if math.isfinite(age) and age >= 0 else None


def _metadata(row: dict[str, str]) -> dict[str, Any]:
    """The optional metadata of a CSV row as Record keyword arguments."""
    return {
        "sex": _text_field(row.get("sex")),
        "age": _age_field(row.get("age")),
        "localization": _text_field(row.get("localization")),
    }


def load_records(source: str | Path) -> list[Record]:
    """All records under ``source`` (layout auto-detected), sorted by image id."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source}: expected a directory or an index .csv file")
        # Pointing at the metadata file itself means its folder in the HAM10000 layout.
        is_ham = source.name == HAM_METADATA
        records = _load_ham(source.parent) if is_ham else _load_index(source)
    elif source.is_dir():
        if (source / HAM_METADATA).is_file():
            records = _load_ham(source)
        else:
            records = _load_class_folders(source)
    else:
        raise DatasetError(f"{source}: no such file or directory")
    _check_unique_ids(records, source)
    return sorted(records, key=lambda r: (r.image_id, str(r.path)))


def _read_csv(path: Path, required: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield (line number, row) pairs after checking the header has ``required`` columns."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} in the header")
        for row in reader:
            # reader.line_num is the physical line just read; the header is line 1.
            yield reader.line_num, row


def _load_ham(root: Path) -> list[Record]:
    metadata = root / HAM_METADATA
    images = root / "images"
    present = {p.name for p in images.iterdir()} if images.is_dir() else set()
    records = []
    for line, row in _read_csv(metadata, ("lesion_id", "image_id", "dx")):
        where = f"{metadata}, line {line}"
        image_id = row["image_id"].strip()
        lesion_id = row["lesion_id"].strip()
        if not image_id or not lesion_id:
            raise DatasetError(f"{where}: empty image_id or lesion_id")
        label = label_of(row["dx"] or "", where)
        name = f"{image_id}.jpg"
        if name not in present:
            continue  # this copy holds only part of the archive
        records.append(Record(image_id, lesion_id, label, images / name, **_metadata(row)))
    return records


def _load_class_folders(root: Path) -> list[Record]:
    records = []
    found_folder = False
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        files = [
            f
            for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        ]
        if not files:
            continue
        label = label_of(folder.name, f"{folder} (class folder)")
        found_folder = True
        for f in files:
            stem = f.stem
            lesion = stem.split(LESION_SEPARATOR, 1)[0] if LESION_SEPARATOR in stem else stem
            if not lesion:
                raise DatasetError(f"{f}: empty lesion id before {LESION_SEPARATOR!r}")
            records.append(Record(stem, lesion, label, f))
    if not found_folder:
        raise DatasetError(
            f"{root}: found no {HAM_METADATA}, no class folders "
            f"({', '.join(CLASSES)}) with images, and it is not an index .csv"
        )
    return records


def _load_index(index: Path) -> list[Record]:
    base = index.resolve().parent
    records = []
    for line, row in _read_csv(index, INDEX_HEADER):
        where = f"{index}, line {line}"
        image_id = (row["image_id"] or "").strip()
        lesion_id = (row["lesion_id"] or "").strip()
        raw_path = (row["path"] or "").strip()
        if not image_id or not lesion_id or not raw_path:
            raise DatasetError(f"{where}: empty image_id, lesion_id or path")
        label = label_of(row["dx"] or "", where)
        path = Path(raw_path)
        if not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise DatasetError(f"{where}: image file {path} does not exist")
        records.append(Record(image_id, lesion_id, label, path, **_metadata(row)))
    return records


def _check_unique_ids(records: Sequence[Record], source: Path) -> None:
    seen: dict[str, Path] = {}
    for r in records:
        if r.image_id in seen:
            raise DatasetError(
                f"{source}: image id {r.image_id!r} appears twice ({seen[r.image_id]} and "
                f"{r.path}); image ids must be unique"
            )
        seen[r.image_id] = r.path


def labels_of(records: Sequence[Record]) -> np.ndarray:
    return np.fromiter((r.label for r in records), dtype=np.int64, count=len(records))


def class_counts(records: Sequence[Record]) -> np.ndarray:
    """Number of records per class, in :data:`CLASSES` order."""
    return np.bincount(labels_of(records), minlength=NUM_CLASSES).astype(np.int64)


def lesion_groups(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by lesion id (groups and their members in a deterministic order)."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.lesion_id, r.image_id)):
        groups[r.lesion_id].append(r)
    return dict(groups)


def lesion_label(group: Sequence[Record]) -> int:
    """The class a lesion counts as for stratification: its most frequent label.

    HAM10000 gives every image of a lesion the same diagnosis; this only matters for
    hand-made data sets, where ties go to the lower class index.
    """
    counts = Counter(r.label for r in group)
    return min(counts, key=lambda label: (-counts[label], label))


def group_split(
    records: Sequence[Record], test_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Split into (train, test) by lesion, stratified by class.

    For each class, the lesions of that class are shuffled and ``round(fraction * n)``
    of them go to the test side — at least one when the class has two or more lesions
    and the fraction is positive, and never all of them, so both sides see the class.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test fraction must be in [0, 1), got {test_fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    groups = lesion_groups(records)
    for lesion_id, group in groups.items():
        by_class[lesion_label(group)].append(lesion_id)
    test_lesions: set[str] = set()
    for label in sorted(by_class):
        lesions = sorted(by_class[label])
        rng = np.random.default_rng([seed, label])
        order = rng.permutation(len(lesions))
        n_test = round(test_fraction * len(lesions))
        if test_fraction > 0 and len(lesions) >= 2:
            n_test = min(max(n_test, 1), len(lesions) - 1)
        test_lesions.update(lesions[i] for i in order[:n_test])
    train = [r for r in records if r.lesion_id not in test_lesions]
    test = [r for r in records if r.lesion_id in test_lesions]
    key = lambda r: (r.image_id, str(r.path))  # noqa: E731
    return sorted(train, key=key), sorted(test, key=key)


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to a (size, size, 3) uint8 array (whole image resized to square)."""
    try:
        with Image.open(path) as im:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale inside the DCT; draft picks the
            # smallest scale still >= the target, which makes decoding several times faster.
            im.draft("RGB", (size, size))
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from exc


# Bumped whenever decode_image's output changes, so stale on-disk caches are rebuilt.
DECODER_VERSION = 1
_DISK_MAGIC = b"DERMAFED-IMAGES\n"
_DISK_ALIGN = 4096  # the pixel block starts on a page boundary, so it maps cleanly


def _signature(path: Path) -> tuple[int, int]:
    """(mtime in ns, size in bytes): what says a file changed without reading it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read image: {exc.strerror}") from exc
    return st.st_mtime_ns, st.st_size


class ImageCache:
    """Decoded images, re-decoded only when a file changes.

    An agent rescans its data folder before every round; the cache key includes the
    file's modification time and byte size, so unchanged files are never decoded twice
    and a replaced file is picked up.

    Two back ends behind one API:

    * **in memory** (``cache_dir=None``): one entry per (path, target size); a changed
      file replaces its old entry instead of leaking it. :meth:`load` returns a fresh copy.
    * **on disk** (``cache_dir`` given): each data source (``name``) and size is one file,
      ``<cache_dir>/<name>-<size>px.u8``, holding a JSON manifest (path, mtime, size of
      every image, in order) followed by the pixels as one (N, S, S, 3) uint8 block.
      :meth:`load` returns a read-only ``np.memmap`` of that block, so the decoded images
      live in the OS page cache (shared by processes, dropped under memory pressure)
      instead of the Python heap, and a restarted agent decodes nothing. When the
      records no longer match the manifest (files added, removed, replaced, reordered),
      the file is rebuilt: rows of unchanged files are copied from the old file and only
      new or changed files are decoded. Rebuilds write a temporary file and rename it
      over the old one, so a crash never leaves a half-written cache and arrays mapped
      from the old file stay valid.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self._entries: dict[tuple[str, int], tuple[tuple[int, int], np.ndarray]] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.decodes = 0  # how many files were actually decoded (for tests and metrics)

    def __len__(self) -> int:
        """Number of in-memory entries (always 0 for the on-disk back end)."""
        return len(self._entries)

    def load_one(self, path: Path, size: int) -> np.ndarray:
        """One decoded image, kept in memory (used by the in-memory back end)."""
        _check_size(size)
        signature = _signature(path)
        key = (str(path), size)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == signature:
            return entry[1]
        array = decode_image(path, size)
        array.setflags(write=False)  # shared between callers: nobody may modify it
        self.decodes += 1
        self._entries[key] = (signature, array)
        return array

    def load(self, records: Sequence[Record], size: int, *, name: str = "images") -> np.ndarray:
        """Images of ``records`` as one (N, size, size, 3) uint8 array.

        In memory: a fresh, writable copy. On disk: a read-only memory map of the cache
        file for ``name`` (one name per data source; two sources sharing a name would
        rebuild each other's file on every call).
        """
        _check_size(size)
        if self.cache_dir is None:
            out = np.empty((len(records), size, size, 3), dtype=np.uint8)
            for i, r in enumerate(records):
                out[i] = self.load_one(r.path, size)
            return out
        return self._load_disk(records, size, name)

    def retain(self, paths: Iterable[Path]) -> int:
        """Drop in-memory entries for files not in ``paths`` (deleted images); returns how
        many. The on-disk back end needs no pruning: a rebuild keeps only current files."""
        keep = {str(p) for p in paths}
        stale = [k for k in self._entries if k[0] not in keep]
        for k in stale:
            del self._entries[k]
        return len(stale)

    # -- on-disk back end ----------------------------------------------------------------

    def cache_file(self, size: int, name: str = "images") -> Path:
        if self.cache_dir is None:
            raise DatasetError("this ImageCache keeps images in memory; it has no cache file")
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
            raise DatasetError(
                f"cache name {name!r} must be letters, digits, '-', '_' or '.' (not leading)"
            )
        return self.cache_dir / f"{name}-{size}px.u8"

    def _load_disk(self, records: Sequence[Record], size: int, name: str) -> np.ndarray:
        path = self.cache_file(size, name)
        entries = [[os.path.abspath(r.path), *_signature(r.path)] for r in records]
        old = _read_disk_cache(path, size)
        if old is not None and old[0] == entries:
            return old[1]
        return self._rebuild(path, records, entries, size, old)

    def _rebuild(
        self,
        path: Path,
        records: Sequence[Record],
        entries: list[list[Any]],
        size: int,
        old: tuple[list[list[Any]], np.ndarray] | None,
    ) -> np.ndarray:
        """Write a new cache file for ``entries`` and return a read-only map of it."""
        reuse: dict[tuple[Any, ...], int] = {}
        if old is not None:
            reuse = {tuple(e): i for i, e in enumerate(old[0])}
        header = json.dumps(
            {"decoder": DECODER_VERSION, "size": size, "count": len(entries), "files": entries},
            separators=(",", ":"),
        ).encode()
        offset = _data_offset(len(header))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(_DISK_MAGIC + len(header).to_bytes(8, "little") + header)
                fh.truncate(offset + len(entries) * size * size * 3)
            if not entries:
                os.replace(tmp, path)
                return np.zeros((0, size, size, 3), dtype=np.uint8)
            shape = (len(entries), size, size, 3)
            pixels = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
            for i, (record, entry) in enumerate(zip(records, entries, strict=True)):
                row = reuse.get(tuple(entry))
                if row is not None and old is not None:
                    pixels[i] = old[1][row]
                else:
                    pixels[i] = decode_image(record.path, size)
                    self.decodes += 1
            pixels.flush()
            del pixels
            # Mapped before the rename: the map follows the inode, so what we return is
            # exactly what we wrote even if another process replaces the file right after.
            result = np.memmap(tmp, dtype=np.uint8, mode="r", offset=offset, shape=shape)
            os.replace(tmp, path)
            return result
        finally:
            tmp.unlink(missing_ok=True)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DatasetError(f"image size must be a positive integer, got {size!r}")


def _data_offset(header_len: int) -> int:
    end = len(_DISK_MAGIC) + 8 + header_len
    return -(-end // _DISK_ALIGN) * _DISK_ALIGN


def _read_disk_cache(path: Path, size: int) -> tuple[list[list[Any]], np.ndarray] | None:
    """(manifest entries, read-only pixel map) of a valid cache file, else None.

    Anything unexpected (missing, truncated, another decoder version or size, garbage)
    means "rebuild", never an error: the cache is derived data.
    """
    try:
        with path.open("rb") as fh:
            if fh.read(len(_DISK_MAGIC)) != _DISK_MAGIC:
                return None
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > os.fstat(fh.fileno()).st_size:
                return None
            meta = json.loads(fh.read(header_len))
        files = meta["files"]
        count = int(meta["count"])
        if meta["decoder"] != DECODER_VERSION or meta["size"] != size or len(files) != count:
            return None
        offset = _data_offset(header_len)
        if path.stat().st_size != offset + count * size * size * 3:
            return None
        if count == 0:
            return files, np.zeros((0, size, size, 3), dtype=np.uint8)
        pixels = np.memmap(
            path, dtype=np.uint8, mode="r", offset=offset, shape=(count, size, size, 3)
        )
        return files, pixels
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Class counts of the whole published HAM10000 release (Tschandl et al. 2018), in CLASSES
# order. Public knowledge, so weights derived from them cost no privacy budget.
HAM10000_PUBLISHED_COUNTS: tuple[float, ...] = (327, 514, 1099, 115, 1113, 6705, 142)


def public_class_weights() -> list[float]:
    """Balanced per-class loss weights from the published HAM10000 counts only (no local
    data), scaled so the average weight over the published distribution is 1. DP-SGD uses
    these: weights from a clinic's own label counts would not be differentially private."""
    counts = np.asarray(HAM10000_PUBLISHED_COUNTS, dtype=np.float64)
    weights = counts.sum() / (len(counts) * counts)
    return [float(w) for w in weights]


def public_logit_offsets(strength: float = 1.0) -> list[float]:
    """``strength`` × log of the published HAM10000 class frequencies: the logit
    adjustment DP-SGD trains with (public, so it costs no privacy budget). See
    ``clinic_agent.training.DP_LOGIT_ADJUSTMENT`` for why DP uses more than 1."""
    counts = np.asarray(HAM10000_PUBLISHED_COUNTS, dtype=np.float64)
    return [float(strength * v) for v in np.log(counts / counts.sum())]

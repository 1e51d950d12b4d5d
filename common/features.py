"""Outputs of a model's fixed front end, computed once per image.

A ``scatternet`` model's front end (``common.scattering``) has no parameters: its output
for an image never changes between rounds, checkpoints or clinics, and it costs far more
than the head behind it (tens of milliseconds per image against microseconds). Training
and evaluation therefore run the head on features computed once and kept here.

Entries are keyed by the front end (architecture and input size, via
:func:`frontend_key`) and by the SHA-256 of the image's pixels, not by file name: a
replaced image gets new features, a renamed one keeps them, and nothing can go stale.
The cache is bounded in bytes and drops the least recently used entries first, and it
is safe to share between threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.model import ModelConfig, build_model, frontend_of, to_input

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~69k images at 64 px (15.5 KB of features each)


def frontend_key(model_cfg: ModelConfig) -> str:
    """What the front end's output depends on (the head's settings do not matter)."""
    return f"{model_cfg.arch}/{model_cfg.input_size}"


def compute_features(
    frontend: nn.Module, images_uint8: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """(N, S, S, 3) uint8 -> the front end's float32 output for every image, in order.

    Every image is transformed on its own footing (FFTs are per image), so the result
    does not depend on ``batch_size`` or on which other images share a batch.
    """
    out: np.ndarray | None = None
    with torch.inference_mode():
        for start in range(0, len(images_uint8), batch_size):
            chunk = frontend(to_input(images_uint8[start : start + batch_size])).numpy()
            if out is None:
                out = np.empty((len(images_uint8), *chunk.shape[1:]), dtype=np.float32)
            out[start : start + len(chunk)] = chunk
    if out is None:
        raise ValueError("no images to compute features for")
    return out


def _digest(image: np.ndarray) -> bytes:
    # Shape and dtype are part of the key: the same bytes in another layout are another image.
    h = hashlib.sha256(f"{image.shape}/{image.dtype.str}".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.digest()


class FeatureCache:
    """Front-end features by (front end, pixel digest), LRU-bounded to ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._frontends: dict[str, nn.Module] = {}
        self._no_frontend: set[str] = set()
        # One lock for everything: computing under it also keeps two threads from
        # computing the same images twice.
        self._lock = threading.Lock()
        self.computed = 0  # images whose features were computed (not found), for tests

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def features(self, model_cfg: ModelConfig, images_uint8: np.ndarray) -> np.ndarray:
        """Features of every image (float32, in order); computes only the missing ones."""
        if len(images_uint8) == 0:
            raise ValueError("no images to compute features for")
        digests = [_digest(im) for im in images_uint8]
        with self._lock:
            return self._features_locked(model_cfg, images_uint8, digests)

    def warm(self, model_cfg: ModelConfig, images_uint8: np.ndarray) -> int:
        """Compute the features of ``images`` ahead of need (a clinic's evaluation slice,
        while it prepares a round), so scoring later runs only the head. Returns how many
        were computed; 0 for a model without a fixed front end, which needs none."""
        key = frontend_key(model_cfg)
        if len(images_uint8) == 0 or key in self._no_frontend:
            return 0
        with self._lock:
            try:
                self._frontend(model_cfg)
            except ValueError:
                self._no_frontend.add(key)
                return 0
        before = self.computed
        self.features(model_cfg, images_uint8)
        return self.computed - before

    def _features_locked(
        self, model_cfg: ModelConfig, images_uint8: np.ndarray, digests: list[bytes]
    ) -> np.ndarray:
        frontend = self._frontend(model_cfg)
        key = frontend_key(model_cfg)
        missing = [i for i, d in enumerate(digests) if (key, d) not in self._entries]
        fresh: dict[int, np.ndarray] = {}
        if missing:
            computed = compute_features(frontend, np.asarray(images_uint8)[missing])
            self.computed += len(missing)
            fresh = dict(zip(missing, computed, strict=True))
        rows = []
        for i, digest in enumerate(digests):
            row = fresh.get(i)
            if row is None:
                row = self._entries[(key, digest)]
                self._entries.move_to_end((key, digest))
            rows.append(row)
        for i, row in fresh.items():
            self._store((key, digests[i]), row)
        return np.stack(rows)

    def save(self, path: str | Path) -> int:
        """Write every entry to an ``.npz`` file (for benchmarks that rerun on the same
        images); returns the number of entries written."""
        with self._lock:
            keys = list(self._entries)
            arrays: dict[str, Any] = {f"{k}|{d.hex()}": self._entries[(k, d)] for k, d in keys}
        np.savez(Path(path), **arrays)
        return len(keys)

    def load(self, path: str | Path) -> int:
        """Add the entries of a file written by :meth:`save`; returns how many were read.

        Entries are keyed by the front end and the pixels' digest, so a file from other
        images or another front end only adds entries that nothing will ask for.
        """
        with np.load(Path(path)) as data, self._lock:
            for name in data.files:
                key, _, digest = name.rpartition("|")
                self._store((key, bytes.fromhex(digest)), data[name])
            return len(data.files)

    def _frontend(self, model_cfg: ModelConfig) -> nn.Module:
        key = frontend_key(model_cfg)
        if key not in self._frontends:
            frontend = frontend_of(build_model(model_cfg))
            if frontend is None:
                raise ValueError(f"model {model_cfg.arch!r} has no fixed front end")
            self._frontends[key] = frontend.eval()
        return self._frontends[key]

    def _store(self, key: tuple[str, bytes], row: np.ndarray) -> None:
        if key in self._entries or row.nbytes > self.max_bytes:
            return  # a duplicate image in one call, or a cache too small to hold anything
        row = row.copy()  # own the memory: a view would pin the whole batch array
        row.setflags(write=False)
        self._entries[key] = row
        self._bytes += row.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes


def model_inputs(
    model_cfg: ModelConfig,
    model: nn.Module,
    images_uint8: np.ndarray,
    features: FeatureCache | None = None,
) -> np.ndarray:
    """What the trainable part of ``model`` is fed, one row per image.

    The raw images for a model that trains end to end; for a model with a fixed front
    end (``scatternet``), the front end's float32 features, taken from ``features`` when
    given (computed there once per image) or computed here. Per-batch augmentation cannot
    apply to precomputed features; such models train without it.
    """
    frontend = frontend_of(model)
    if frontend is None:
        return images_uint8
    if features is not None:
        return features.features(model_cfg, images_uint8)
    return compute_features(frontend.eval(), images_uint8)

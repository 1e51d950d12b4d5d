"""Validation metrics for the aggregator's gate and the ``evaluate`` command.

Numpy only. Conventions, chosen so the gate never compares against a made-up number:

* ``sensitivity[c]`` (recall) is reported only for classes with at least one example,
  ``specificity[c]`` only for classes with at least one negative example; a class that
  cannot be measured is omitted rather than reported as NaN or 0.
* balanced accuracy is the mean recall over the classes present.
* macro AUROC is the mean one-vs-rest AUROC over classes with both positives and
  negatives; NaN when there is no such class (e.g. a one-class set).
* ECE uses 15 equal-width confidence bins over (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.clinical_metrics import check_predictions
from common.datasets import (
    DatasetError,
    ImageCache,
    Record,
    class_names,
    labels_of,
    load_records,
)
from common.errors import InvalidUpdateError
from common.features import FeatureCache, model_inputs
from common.model import ModelConfig, build_model, to_input, trainable_part
from common.tensors import load_checkpoint_file

ECE_BINS = 15


@dataclass
class EvalMetrics:
    accuracy: float
    balanced_accuracy: float
    macro_auroc: float
    sensitivity: dict[str, float]
    specificity: dict[str, float]
    confusion: list[list[int]]  # confusion[true][predicted]
    examples: int
    expected_calibration_error: float
    auroc: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (an undefined metric) becomes None."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {k: clean(v) for k, v in asdict(self).items()}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic (ties count 1/2).

    NaN when ``positive`` has no positives or no negatives.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Σ_b (n_b / N) |accuracy_b − confidence_b| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bin b covers (b/B, (b+1)/B]; a confidence of exactly 0 falls into the first bin.
    idx = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> EvalMetrics:
    """All validation metrics from true labels (N,) and class probabilities (N, K)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    check_predictions(labels, probs)
    k = probs.shape[1]
    names = class_names(k)
    preds = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)

    n = len(labels)
    sensitivity: dict[str, float] = {}
    specificity: dict[str, float] = {}
    auroc: dict[str, float] = {}
    for c, name in enumerate(names):
        positives = int(confusion[c].sum())
        negatives = n - positives
        tp = int(confusion[c, c])
        fp = int(confusion[:, c].sum()) - tp
        if positives:
            sensitivity[name] = tp / positives
        if negatives:
            specificity[name] = (negatives - fp) / negatives
        if positives and negatives:
            auroc[name] = binary_auroc(labels == c, probs[:, c])
    return EvalMetrics(
        accuracy=float((preds == labels).mean()),
        balanced_accuracy=float(np.mean(list(sensitivity.values()))),
        macro_auroc=float(np.mean(list(auroc.values()))) if auroc else float("nan"),
        sensitivity=sensitivity,
        specificity=specificity,
        confusion=confusion.tolist(),
        examples=n,
        expected_calibration_error=expected_calibration_error(labels, probs),
        auroc=auroc,
    )


def load_model(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(model_cfg)
    try:
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    except RuntimeError as exc:
        raise InvalidUpdateError(f"weights do not fit the model {model_cfg}: {exc}") from exc
    model.eval()
    return model


def predict_proba(
    model_cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    images_uint8: np.ndarray,
    batch_size: int = 256,
    features: FeatureCache | None = None,
) -> np.ndarray:
    """Softmax class probabilities (N, num_classes) in eval mode (no dropout, no grad).

    A model with a fixed front end runs its head on the front end's features, taken from
    ``features`` when given (the aggregator scores every candidate on the same held-out
    images): the same numbers as the whole model on the images, computed once.
    """
    model = load_model(model_cfg, state)
    out = np.empty((len(images_uint8), model_cfg.num_classes), dtype=np.float32)
    if len(images_uint8) == 0:
        return out
    inputs = model_inputs(model_cfg, model, images_uint8, features)
    from_images = inputs is images_uint8  # else float features, already the head's input
    part = trainable_part(model)
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            x = to_input(chunk) if from_images else torch.from_numpy(np.ascontiguousarray(chunk))
            out[start : start + len(x)] = torch.softmax(part(x), dim=1).numpy()
    return out


def checkpoint_predictions(
    path: str | Path,
    data: str | Path,
    size: int | None = None,
    *,
    cache: ImageCache | None = None,
) -> tuple[list[Record], np.ndarray]:
    """The records under ``data`` and the checkpoint's class probabilities (N, K) for them.

    ``size`` overrides the input size stored in the checkpoint (rarely useful: the model
    was trained at that size). Pass a long-lived ``cache`` to decode a fixed holdout once.
    """
    state, meta = load_checkpoint_file(path)
    model_cfg = ModelConfig.from_metadata(meta)
    records = load_records(data)
    if not records:
        raise DatasetError(f"{data}: no images to evaluate on")
    images = (cache if cache is not None else ImageCache()).load(
        records, size or model_cfg.input_size
    )
    return records, predict_proba(model_cfg, state, images)


def evaluate_checkpoint(
    path: str | Path,
    data: str | Path,
    size: int | None = None,
    *,
    cache: ImageCache | None = None,
) -> EvalMetrics:
    """Metrics of the checkpoint at ``path`` on the records under ``data`` (arguments as
    for :func:`checkpoint_predictions`)."""
    records, probs = checkpoint_predictions(path, data, size, cache=cache)
    return compute_metrics(labels_of(records), probs)

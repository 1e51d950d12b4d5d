"""Held-out evaluation of candidate checkpoints at the aggregator.

The held-out images are decoded once at start (they never change while the service
runs) and every candidate is scored on the same array, so metrics are comparable across
rounds. For a model with a fixed front end (``scatternet``) the front end's features of
the held-out images are computed at the first evaluation and reused for every later one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from common.datasets import ImageCache, load_records
from common.evaluation import EvalMetrics, compute_metrics, predict_proba
from common.features import FeatureCache
from common.model import ModelConfig

log = logging.getLogger("dermafed.aggregator")


class HoldoutEvaluator:
    def __init__(self, source: Path, model_config: ModelConfig, *, max_examples: int = 0) -> None:
        records = load_records(source)
        if max_examples and len(records) > max_examples:
            # Deterministic thinning keeps metrics comparable across restarts.
            step = len(records) / max_examples
            records = [records[int(i * step)] for i in range(max_examples)]
        if not records:
            raise ValueError(f"held-out set {source} contains no images")
        self.model_config = model_config
        self.images = ImageCache().load(records, model_config.input_size)
        self.labels = np.array([r.label for r in records], dtype=np.int64)
        self.features = FeatureCache()
        log.info("held-out set: %d images from %s", len(records), source)

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> EvalMetrics:
        return self.score(state)[0]

    def score(self, state: Mapping[str, torch.Tensor]) -> tuple[EvalMetrics, np.ndarray]:
        """The metrics and the predicted label of every held-out case (for paired tests)."""
        probs = predict_proba(self.model_config, dict(state), self.images, features=self.features)
        return compute_metrics(self.labels, probs), probs.argmax(axis=1)

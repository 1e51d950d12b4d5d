"""Validation metrics against known answers, prediction and checkpoint evaluation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.datasets import CLASSES, HAM_METADATA, ImageCache, labels_of, load_records
from common.errors import ConfigError, InvalidUpdateError
from common.evaluation import (
    average_ranks,
    binary_auroc,
    compute_metrics,
    evaluate_checkpoint,
    expected_calibration_error,
    predict_proba,
)
from common.model import ModelConfig, initial_state
from common.partition import write_index
from common.synthetic import generate_synthetic
from common.tensors import checkpoint_bytes

K = len(CLASSES)


def ham_dir() -> Path:
    env = os.environ.get("DERMAFED_HAM10000")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared/data/ham10000_200x150"


def one_hot(labels: np.ndarray, k: int = K) -> np.ndarray:
    out = np.zeros((len(labels), k))
    out[np.arange(len(labels)), labels] = 1.0
    return out


# --- AUROC --------------------------------------------------------------------------------


def test_average_ranks_share_ties() -> None:
    np.testing.assert_array_equal(average_ranks(np.array([0.3, 0.1, 0.3, 0.2])), [3.5, 1, 3.5, 2])


def test_binary_auroc_known_answers() -> None:
    # Positives {0.8, 0.4}, negatives {0.4, 0.2}: pairs won 1 + 1 + 0.5 (tie) + 1 of 4.
    assert binary_auroc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.2])) == 0.875
    assert binary_auroc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert binary_auroc(np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8])) == 0.0
    assert binary_auroc(np.array([1, 0, 1, 0]), np.full(4, 0.5)) == 0.5
    assert math.isnan(binary_auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_binary_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 5, 40) / 4.0  # many ties
        pos, neg = s[y == 1], s[y == 0]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert binary_auroc(y, s) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


def test_auroc_matches_scikit_learn_when_available() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, 300)
    probs = rng.dirichlet(np.ones(K), 300)
    probs[np.arange(300), labels] += 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics(labels, probs)
    expected = metrics.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert m.macro_auroc == pytest.approx(expected, abs=1e-9)
    assert m.balanced_accuracy == pytest.approx(
        metrics.balanced_accuracy_score(labels, probs.argmax(1)), abs=1e-12
    )


# --- whole metric set ---------------------------------------------------------------------


def test_perfect_classifier() -> None:
    labels = np.repeat(np.arange(K), 3)
    m = compute_metrics(labels, one_hot(labels))
    assert (m.accuracy, m.balanced_accuracy, m.macro_auroc) == (1.0, 1.0, 1.0)
    assert m.sensitivity == dict.fromkeys(CLASSES, 1.0)
    assert m.specificity == dict.fromkeys(CLASSES, 1.0)
    assert m.confusion == (np.eye(K, dtype=int) * 3).tolist()
    assert m.expected_calibration_error == 0.0
    assert m.examples == 3 * K


def test_random_classifier_is_near_chance() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, K, 20_000)
    m = compute_metrics(labels, rng.dirichlet(np.ones(K), len(labels)))
    assert m.accuracy == pytest.approx(1 / K, abs=0.02)
    assert m.balanced_accuracy == pytest.approx(1 / K, abs=0.02)
    assert m.macro_auroc == pytest.approx(0.5, abs=0.02)


def test_constant_scores_are_all_ties() -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 0])
    m = compute_metrics(labels, np.full((8, K), 1 / K))
    assert m.macro_auroc == 0.5
    # argmax of a tie is class 0: recall 1 for akiec, 0 elsewhere.
    assert m.sensitivity["akiec"] == 1.0 and m.sensitivity["mel"] == 0.0
    assert m.balanced_accuracy == pytest.approx(1 / K)
    assert m.accuracy == 0.25


def test_known_confusion_and_missing_classes() -> None:
    # Only akiec (0), bcc (1) and mel (4) occur.
    labels = np.array([0, 0, 0, 0, 1, 1, 4, 4, 4, 4])
    preds = np.array([0, 0, 0, 1, 1, 4, 4, 4, 4, 0])
    probs = one_hot(preds) * 0.94 + 0.01
    m = compute_metrics(labels, probs)
    assert m.accuracy == 0.7
    assert m.sensitivity == {"akiec": 0.75, "bcc": 0.5, "mel": 0.75}
    assert m.balanced_accuracy == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    # Specificity for akiec: 6 negatives, 1 predicted akiec -> 5/6. Classes with no
    # examples still have negatives, so their specificity is defined.
    assert m.specificity["akiec"] == pytest.approx(5 / 6)
    assert m.specificity["nv"] == 1.0
    assert set(m.auroc) == {"akiec", "bcc", "mel"}
    assert m.confusion[0][1] == 1 and m.confusion[4][0] == 1 and m.confusion[1][4] == 1
    # Every prediction has confidence 0.95 and 70 % are right.
    assert m.expected_calibration_error == pytest.approx(0.25)


def test_expected_calibration_error_known_answer() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.4, 0.6]])
    # Confidence 0.8 (3 examples, 2 right) and 0.6 (1 example, right) fall in two bins.
    expected = 0.75 * abs(2 / 3 - 0.8) + 0.25 * abs(1.0 - 0.6)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)


def test_undefined_metrics_and_json() -> None:
    m = compute_metrics(np.array([5, 5, 5]), one_hot(np.array([5, 5, 4])))
    assert math.isnan(m.macro_auroc)
    assert m.sensitivity == {"nv": pytest.approx(2 / 3)}
    d = m.to_dict()
    assert d["macro_auroc"] is None
    json.dumps(d, allow_nan=False)


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics(np.zeros(0, dtype=int), np.zeros((0, K)))
    with pytest.raises(ValueError, match="do not match"):
        compute_metrics(np.zeros(3, dtype=int), np.zeros((2, K)))
    with pytest.raises(ValueError, match="labels must be in"):
        compute_metrics(np.array([7]), np.ones((1, K)) / K)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.array([0]), np.full((1, K), np.nan))


# --- prediction and checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelConfig, dict]:
    cfg = ModelConfig(input_size=32, width=8, dropout=0.5)
    state = initial_state(cfg, seed=7)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    path.write_bytes(checkpoint_bytes(state, cfg.to_metadata()))
    return path, cfg, state


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), images_per_class=4, seed=3)


def test_predict_proba_is_a_deterministic_distribution(checkpoint, synthetic) -> None:
    _, cfg, state = checkpoint
    images = ImageCache().load(load_records(synthetic), 32)
    a = predict_proba(cfg, state, images, batch_size=5)
    b = predict_proba(cfg, state, images, batch_size=64)
    assert a.shape == (len(images), K)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)
    # Eval mode: dropout (p=0.5 here) is off, so batching and repetition do not matter.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_evaluate_checkpoint_matches_manual_pipeline(checkpoint, synthetic) -> None:
    path, cfg, state = checkpoint
    records = load_records(synthetic)
    cache = ImageCache()
    m = evaluate_checkpoint(path, synthetic, cache=cache)
    assert cache.decodes == len(records)
    evaluate_checkpoint(path, synthetic, cache=cache)
    assert cache.decodes == len(records)  # a long-lived cache decodes the holdout once
    manual = compute_metrics(
        labels_of(records), predict_proba(cfg, state, ImageCache().load(records, 32))
    )
    assert m.examples == len(records)
    assert m.accuracy == manual.accuracy
    assert m.confusion == manual.confusion
    assert m.macro_auroc == pytest.approx(manual.macro_auroc)


def test_evaluate_checkpoint_on_real_images(checkpoint, tmp_path: Path) -> None:
    ham = ham_dir()
    if not (ham / HAM_METADATA).is_file():
        pytest.skip(f"real HAM10000 images not found at {ham} (set DERMAFED_HAM10000)")
    records = load_records(ham)[::120]  # ~70 images spread over the archive
    index = tmp_path / "subset.csv"
    write_index(records, index)
    path, _, _ = checkpoint
    m = evaluate_checkpoint(path, index)
    assert m.examples == len(records)
    assert sum(map(sum, m.confusion)) == len(records)
    assert 0.0 <= m.accuracy <= 1.0 and 0.0 <= m.macro_auroc <= 1.0


def test_checkpoint_without_model_metadata_is_refused(tmp_path: Path, synthetic) -> None:
    cfg = ModelConfig(input_size=32, width=8)
    path = tmp_path / "bare.safetensors"
    path.write_bytes(checkpoint_bytes(initial_state(cfg, 0), {}))
    with pytest.raises(ConfigError, match=r"no 'dermafed\.model'"):
        evaluate_checkpoint(path, synthetic)
    wrong = tmp_path / "wrong.safetensors"
    state = initial_state(cfg, 0)
    state["classifier.bias"] = torch.zeros(3)
    wrong.write_bytes(checkpoint_bytes(state, cfg.to_metadata()))
    with pytest.raises(InvalidUpdateError, match="do not fit"):
        evaluate_checkpoint(wrong, synthetic)

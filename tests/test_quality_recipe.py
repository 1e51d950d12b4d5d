"""The training recipe's pieces: augmentation, sampling, class weights, the on-disk image
cache, the learning-rate schedule across rounds, server momentum, the residual model, and
the quality benchmark's own helpers (secure aggregation in one process, quantity skew)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from PIL import Image

from aggregator.schedule import round_learning_rate, schedule_factor
from aggregator.server_opt import ServerOptSettings, server_step
from clinic_agent.training import (
    AugmentPolicy,
    EpochBatches,
    TrainConfig,
    augment_images,
    class_weights,
    epoch_indices,
    log_prior_of,
    make_loss,
    make_model,
    make_optimizer,
    prepare_batch,
    train_epochs,
    train_local,
)
from common.datasets import DatasetError, ImageCache, Record, labels_of, load_records
from common.errors import ConfigError, InvalidUpdateError
from common.model import (
    ModelConfig,
    ResidualBlock,
    build_model,
    initial_state,
    parameter_count,
    to_input,
)
from common.secagg.messages import mean_error_bound, plan_quantization
from common.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]
TINY_RES = ModelConfig(arch="lesionres", input_size=32, width=8, dropout=0.0)


def load_benchmark() -> ModuleType:
    """benchmarks/quality.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks/quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn"), images_per_class=10, seed=3)


def _symmetries(img: torch.Tensor) -> list[torch.Tensor]:
    turns = [torch.rot90(img, k, dims=(1, 2)) for k in range(4)]
    return turns + [t.flip(2) for t in turns]


# --- augmentation ---------------------------------------------------------------------


def test_augmentation_without_crop_or_jitter_is_an_exact_symmetry() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    out = augment_images(
        torch.from_numpy(raw), torch.Generator().manual_seed(1), AugmentPolicy(1.0, 0.0)
    )
    ref = to_input(raw)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    used = set()
    for i in range(len(raw)):
        errors = [float((out[i] - v).abs().max()) for v in _symmetries(ref[i])]
        assert min(errors) < 1e-4, "not one of the 8 symmetries of the square"
        used.add(int(np.argmin(errors)))
    assert len(used) > 2  # drawn per example, not once per batch


def test_colour_jitter_is_a_per_image_affine_colour_map() -> None:
    """Without geometry, each output pixel is M·pixel + b with M, b fixed per image."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(2)
    out = augment_images(torch.from_numpy(raw), gen, AugmentPolicy(1.0, 0.2))
    base = to_input(raw)
    changed = 0
    for i in range(len(raw)):
        best = min(_affine_fit_residual(v, out[i]) for v in _symmetries(base[i]))
        assert best < 1e-3
        changed += int(min(float((out[i] - v).abs().max()) for v in _symmetries(base[i])) > 1e-3)
    assert changed == len(raw)


def _affine_fit_residual(src: torch.Tensor, dst: torch.Tensor) -> float:
    x = src.reshape(3, -1).T.double()
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    y = dst.reshape(3, -1).T.double()
    sol = torch.linalg.lstsq(a, y).solution
    return float((a @ sol - y).abs().max())


def test_crops_zoom_in_and_stay_within_the_image() -> None:
    # Left half black, right half white: any crop keeps values in range, and a zoomed
    # crop has a smaller fraction of pixels exactly at the border between the halves.
    img = np.zeros((64, 32, 32, 3), dtype=np.uint8)
    img[:, :, 16:] = 255
    out = augment_images(
        torch.from_numpy(img), torch.Generator().manual_seed(0), AugmentPolicy(0.5, 0.0)
    )
    lo, hi = to_input(img[:1]).amin(), to_input(img[:1]).amax()
    assert float(out.amin()) >= float(lo) - 1e-4 and float(out.amax()) <= float(hi) + 1e-4
    plain = augment_images(
        torch.from_numpy(img), torch.Generator().manual_seed(0), AugmentPolicy(1.0, 0.0)
    )
    assert not torch.allclose(out, plain)


def test_augmentation_is_deterministic_per_generator_and_prepare_batch_uses_it() -> None:
    raw = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), np.uint8))
    a = prepare_batch(raw, True, torch.Generator().manual_seed(5))
    b = prepare_batch(raw, True, torch.Generator().manual_seed(5))
    c = prepare_batch(raw, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(prepare_batch(raw, False, torch.Generator()), to_input(raw))
    with pytest.raises(ValueError, match="uint8"):
        augment_images(raw.float(), torch.Generator())


# --- sampling and class weights --------------------------------------------------------


def test_balanced_sampling_evens_out_classes() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [3] * 10)
    rng = np.random.default_rng(0)
    drawn = np.concatenate([labels[epoch_indices(labels, "balanced", rng)] for _ in range(20)])
    freq = np.bincount(drawn, minlength=4) / len(drawn)
    np.testing.assert_allclose(freq[[0, 1, 3]], 1 / 3, atol=0.02)
    assert freq[2] == 0  # an absent class is never invented
    perm = epoch_indices(labels, "shuffle", rng)
    assert sorted(perm.tolist()) == list(range(len(labels)))


def test_epoch_batches_reshuffle_and_cover_every_example() -> None:
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    batches = EpochBatches(images, np.arange(10) % 2, batch_size=4, seed=0)
    first = [int(v) for x, _ in batches for v in x[:, 0, 0, 0]]
    second = [int(v) for x, _ in batches for v in x[:, 0, 0, 0]]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second


def test_sqrt_and_prior_class_weights_known_answers() -> None:
    labels = np.array([0] * 9 + [1])
    w = class_weights(labels, 3, "sqrt")
    assert w is not None
    # weight ∝ count^-1/2 = (1/3, 1), scaled so the 10 examples average 1: 10/(9/3 + 1).
    np.testing.assert_allclose(w.numpy(), [2.5 / 3, 2.5, 0.0], rtol=1e-6)
    prior = class_weights(labels, 3, "balanced", prior=(8.0, 1.0, 1.0))
    assert prior is not None
    # 1/freq = (1/8, 1, 1), scaled so the local examples average 1: 10/(9/8 + 1).
    np.testing.assert_allclose(prior.numpy(), np.array([1 / 8, 1, 1]) * 10 / (9 / 8 + 1), rtol=1e-6)
    assert float(prior[2]) > 0  # a class absent locally still has its shared weight
    with pytest.raises(ConfigError, match="prior"):
        class_weights(labels, 3, "balanced", prior=(1.0, 2.0))


def test_logit_adjusted_loss_shifts_logits_by_the_log_prior() -> None:
    labels = np.array([0, 0, 0, 1])
    loss_fn = make_loss(labels, 3, "logit_adjusted")
    logits = torch.tensor([[0.5, -0.2, 0.3], [1.0, 2.0, -1.0]], requires_grad=True)
    target = torch.tensor([0, 1])
    loss = loss_fn(logits, target)
    # Class 2 never occurs locally: it leaves the softmax (and gets no gradient).
    shifted = logits.detach()[:, :2] + torch.log(torch.tensor([0.75, 0.25]))
    expected = torch.nn.functional.cross_entropy(shifted, target)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[:, 2] == 0)
    np.testing.assert_allclose(
        log_prior_of(labels, 3, prior=(1.0, 1.0, 2.0)).numpy(),
        np.log([0.25, 0.25, 0.5]),
        rtol=1e-6,
    )
    # The optimum of the adjusted loss is the balanced posterior: a constant model's
    # best logits are equal for every present class, whatever the imbalance.
    bias = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([bias], lr=0.5)
    many = torch.from_numpy(np.array([0] * 90 + [1] * 10))
    la = make_loss(many.numpy(), 3, "logit_adjusted")
    for _ in range(300):
        opt.zero_grad()
        la(bias.expand(len(many), 3), many).backward()
        opt.step()
    assert abs(float(bias.detach()[0] - bias.detach()[1])) < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"crop_scale": 0.0}, "train.crop_scale"),
        ({"crop_scale": 1.5}, "train.crop_scale"),
        ({"color_jitter": 1.0}, "train.color_jitter"),
        ({"sampling": "oversample"}, "train.sampling"),
        ({"sampling": "balanced"}, "train.sampling"),  # with balanced class weights too
        ({"class_prior": (1.0, -2.0)}, "train.class_prior"),
        ({"class_weighting": "inverse"}, "train.class_weighting"),
    ],
)
def test_train_config_rejects_bad_recipe_fields(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**kwargs)


# --- training on the memory-mapped cache -----------------------------------------------


def test_training_from_the_disk_cache_equals_training_from_memory(
    tmp_path: Path, synthetic: Path
) -> None:
    records = load_records(synthetic)
    cached = ImageCache(tmp_path / "cache").load(records, 32)
    assert isinstance(cached, np.memmap) and not cached.flags.writeable
    in_ram = ImageCache().load(records, 32)
    np.testing.assert_array_equal(cached, in_ram)
    labels = labels_of(records)
    start = initial_state(TINY_RES, 0)
    cfg = TrainConfig(epochs=1, optimizer="adam", learning_rate=1e-3, batch_size=16, seed=4)
    a = train_local(TINY_RES, start, cached, labels, cfg, threads=1)
    b = train_local(TINY_RES, start, in_ram, labels, cfg, threads=1)
    assert all(torch.equal(a.state[k], b.state[k]) for k in start)
    assert not all(torch.equal(a.state[k], start[k]) for k in start)


def test_balanced_sampling_and_channels_last_train(synthetic: Path) -> None:
    records = load_records(synthetic)
    images, labels = ImageCache().load(records, 32), labels_of(records)
    start = initial_state(TINY_RES, 1)
    base = dict(epochs=1, optimizer="adam", learning_rate=1e-3, batch_size=16, seed=2)
    plain = train_local(TINY_RES, start, images, labels, TrainConfig(**base), threads=1)
    cl = train_local(
        TINY_RES, start, images, labels, TrainConfig(**base, channels_last=True), threads=1
    )
    # Same computation in another memory layout: equal up to float reassociation.
    for k in start:
        assert cl.state[k].is_contiguous()
        torch.testing.assert_close(cl.state[k], plain.state[k], rtol=1e-3, atol=1e-4)
    balanced = train_local(
        TINY_RES,
        start,
        images,
        labels,
        TrainConfig(**base, sampling="balanced", class_weighting="none"),
        threads=1,
    )
    assert np.isfinite(balanced.mean_loss) and balanced.num_examples == len(labels)


def test_max_steps_caps_local_training(synthetic: Path) -> None:
    records = load_records(synthetic)
    images, labels = ImageCache().load(records, 32), labels_of(records)
    cfg = TrainConfig(epochs=3, optimizer="adam", learning_rate=1e-3, batch_size=8, seed=0)
    model = make_model(TINY_RES, initial_state(TINY_RES, 0))
    batches = EpochBatches(images, labels, cfg.batch_size, seed=0)
    _, seen = train_epochs(
        model,
        make_optimizer(model, cfg),
        batches,
        3,
        make_loss(labels, 7, "none"),
        augment=True,
        generator=torch.Generator().manual_seed(0),
        max_steps=2,
    )
    assert seen == 2 * 8
    _, seen = train_epochs(
        model,
        make_optimizer(model, cfg),
        batches,
        3,
        make_loss(labels, 7, "none"),
        augment=False,
        generator=torch.Generator(),
    )
    assert seen == 3 * len(labels)  # no cap: every epoch in full
    capped = train_local(
        TINY_RES,
        initial_state(TINY_RES, 0),
        images,
        labels,
        TrainConfig(epochs=3, batch_size=8, max_steps=1),
        threads=1,
    )
    assert capped.num_examples == len(labels)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        TrainConfig(max_steps=-1)


# --- on-disk image cache ----------------------------------------------------------------


def _copy_images(src: Path, dst: Path, n: int) -> None:
    folder = dst / "nv"
    folder.mkdir(parents=True)
    for r in load_records(src)[:n]:
        shutil.copyfile(r.path, folder / r.path.name)


def test_disk_cache_decodes_each_file_once_across_restarts(tmp_path: Path, synthetic: Path):
    data = tmp_path / "data"
    _copy_images(synthetic, data, 8)
    cache_dir = tmp_path / "cache"
    first_cache = ImageCache(cache_dir)
    first = first_cache.load(load_records(data), 24)
    assert first_cache.decodes == 8 and first.shape == (8, 24, 24, 3)
    assert first_cache.cache_file(24).is_file()
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    restarted = ImageCache(cache_dir)  # a new process: nothing in memory
    again = restarted.load(load_records(data), 24)
    assert restarted.decodes == 0
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(again, ImageCache().load(load_records(data), 24))


def test_disk_cache_rebuilds_only_changed_and_new_files(tmp_path: Path, synthetic: Path):
    data = tmp_path / "data"
    _copy_images(synthetic, data, 6)
    cache = ImageCache(tmp_path / "cache")
    old = cache.load(load_records(data), 24)
    old_copy = np.array(old)
    changed = sorted((data / "nv").iterdir())[0]
    Image.new("RGB", (40, 40), (250, 10, 10)).save(changed)
    os.utime(changed, ns=(1, 1))
    shutil.copyfile(load_records(synthetic)[7].path, data / "nv" / "added.jpg")
    records = load_records(data)
    fresh = cache.load(records, 24)
    assert cache.decodes == 6 + 2  # the replaced file and the new one
    idx = [r.path for r in records].index(changed)
    assert tuple(int(v) for v in fresh[idx, 12, 12]) == pytest.approx((250, 10, 10), abs=3)
    # Arrays handed out earlier still show the old images (the file was replaced, not
    # rewritten in place).
    np.testing.assert_array_equal(old, old_copy)
    # Deleting a file needs no decode at all; the rows are copied from the cache.
    (data / "nv" / "added.jpg").unlink()
    fewer = cache.load(load_records(data), 24)
    assert cache.decodes == 8 and len(fewer) == 6


def test_disk_cache_survives_garbage_and_keeps_sources_apart(tmp_path: Path, synthetic: Path):
    records = load_records(synthetic)[:5]
    cache = ImageCache(tmp_path / "cache")
    cache.cache_file(24).parent.mkdir(parents=True)
    cache.cache_file(24).write_bytes(b"DERMAFED-IMAGES\n" + b"\xff" * 100)
    a = cache.load(records, 24)
    assert cache.decodes == 5 and len(a) == 5
    b = cache.load(records[:2], 24, name="other")
    assert cache.decodes == 7
    assert cache.load(records, 24).shape == (5, 24, 24, 3) and cache.decodes == 7
    assert cache.load([], 24, name="empty").shape == (0, 24, 24, 3)
    np.testing.assert_array_equal(a[:2], b)
    with pytest.raises(DatasetError, match="cache name"):
        cache.load(records, 24, name="../escape")
    with pytest.raises(DatasetError, match="no cache file"):
        ImageCache().cache_file(24)


# --- learning-rate schedule and server momentum -----------------------------------------


def test_cosine_schedule_known_answers() -> None:
    factors = [schedule_factor(r, 4, schedule="cosine") for r in range(6)]
    # Evaluated at round middles: cos(pi/8), cos(3pi/8), ... mapped to (1 + cos)/2.
    expected = [(1 + math.cos(math.pi * (r + 0.5) / 4)) / 2 for r in range(4)]
    np.testing.assert_allclose(factors[:4], expected, rtol=1e-12)
    assert factors[4] == factors[5] == factors[3] > 0  # past the horizon: stays final
    assert schedule_factor(3, 4, schedule="cosine", min_factor=0.1) > factors[3]
    assert round_learning_rate(2e-3, 0, 4) == pytest.approx(2e-3 * expected[0])
    assert [schedule_factor(r, 4, schedule="step") for r in range(4)] == [1, 1, 0.5, 0.25]
    assert [schedule_factor(r, 5, schedule="constant", warmup_rounds=2) for r in range(3)] == [
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
        1.0,
    ]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"schedule": "linear"}, "plan.lr_schedule"),
        ({"total_rounds": 0}, "plan.lr_schedule_rounds"),
        ({"min_factor": 1.5}, "plan.lr_min_factor"),
        ({"warmup_rounds": 4}, "plan.lr_warmup_rounds"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict, key: str) -> None:
    args = {"total_rounds": 4, **kwargs}
    total = args.pop("total_rounds")
    with pytest.raises(ConfigError, match=key):
        schedule_factor(0, total, **args)


def test_server_momentum_is_fedavg_at_zero_and_heavy_ball_otherwise() -> None:
    d1 = np.array([1.0, -2.0], dtype=np.float32)
    d2 = np.array([0.5, 0.5], dtype=np.float32)
    plain = ServerOptSettings()
    assert plain.is_plain_fedavg
    update, velocity = server_step(d1, None, plain)
    np.testing.assert_array_equal(update, d1)
    update, _ = server_step(d2, velocity, plain)
    np.testing.assert_array_equal(update, d2)  # momentum 0 forgets the past
    heavy = ServerOptSettings(momentum=0.9, server_lr=0.5)
    _, v = server_step(d1, None, heavy)
    update, v = server_step(d2, v, heavy)
    np.testing.assert_allclose(v, 0.9 * d1 + d2, rtol=1e-6)
    np.testing.assert_allclose(update, 0.5 * (0.9 * d1 + d2), rtol=1e-6)
    with pytest.raises(InvalidUpdateError, match="velocity"):
        server_step(d1, np.zeros(3, np.float32), heavy)
    with pytest.raises(InvalidUpdateError, match="NaN"):
        server_step(np.array([np.nan], np.float32), None, heavy)
    with pytest.raises(ConfigError, match=r"plan\.server_momentum"):
        ServerOptSettings(momentum=1.0)


# --- the residual model -----------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
def test_residual_model_is_dp_compatible_at_any_size(size: int) -> None:
    cfg = ModelConfig(arch="lesionres", input_size=size, width=24)
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=True) == []
    assert parameter_count(model) == 681_439
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 7)


def test_residual_blocks_start_as_their_shortcut() -> None:
    model = build_model(TINY_RES)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    assert all(float(b.norm2.weight.detach().abs().sum()) == 0 for b in blocks)


# --- benchmark helpers -------------------------------------------------------------------


def _fake_records(n_lesions: int) -> list[Record]:
    out = []
    for i in range(n_lesions):
        label = i % 7
        for j in range(1 + i % 2):
            out.append(Record(f"img{i}_{j}", f"L{i}", label, Path(f"/nonexistent/{i}_{j}.jpg")))
    return out


def test_quantity_skew_keeps_lesions_whole_and_case_mix_alike() -> None:
    bench = load_benchmark()
    records = _fake_records(700)
    shards = bench.quantity_skew_partition(records, 4, 0.5, seed=0, min_per_clinic=20)
    assert sum(len(s) for s in shards) == len(records)
    owner = {}
    for i, shard in enumerate(shards):
        for r in shard:
            assert owner.setdefault(r.lesion_id, i) == i  # no lesion split
    sizes = sorted(len(s) for s in shards)
    assert sizes[-1] > 2 * sizes[0]  # volumes differ a lot
    for shard in shards:
        freq = np.bincount(labels_of(shard), minlength=7) / len(shard)
        np.testing.assert_allclose(freq, 1 / 7, atol=0.06)  # similar case mix


def test_benchmark_secure_aggregation_matches_plain_fedavg(tmp_path: Path) -> None:
    bench = load_benchmark()
    clinics = ["clinic-1", "clinic-2", "clinic-3", "clinic-4"]
    secure = bench.SecureAggregation(tmp_path, clinics)
    rng = np.random.default_rng(0)
    contributions = {}
    for i, c in enumerate(clinics):
        raw = rng.standard_normal(500).astype(np.float32)
        delta = raw * np.float32(min(1.0, 3.0 / float(np.linalg.norm(raw))))
        contributions[c] = (delta, float(100 * (i + 1)), 1.0 + i)
    plan = plan_quantization(3.0, 4, weight_max=1000.0, loss_max=20.0)
    result = secure.aggregate(1, contributions, plan)
    expected = bench.plain_aggregate(contributions, 3.0)
    assert result.total_weight == expected.total_weight == 1000.0
    bound = mean_error_bound(plan, contributors=4, weight_sum=1000.0)
    assert float(np.abs(result.delta - expected.delta).max()) <= bound

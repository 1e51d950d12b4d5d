"""DP-SGD local training with Opacus (clinic_agent.dp_training)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from clinic_agent.dp_training import (
    DPModelError,
    MechanismMismatchError,
    check_dp_compatible,
    dp_step,
    make_private,
    per_example_loss_fn,
    plain_state_dict,
    poisson_batches,
    train_dp,
)
from clinic_agent.privacy import MechanismStep, round_mechanism
from clinic_agent.training import TrainConfig, train_local
from common.model import ModelConfig, build_model, initial_state, to_input

TINY = ModelConfig(input_size=16, width=8, dropout=0.0)

# torch warns on every backward through Opacus's hooks when the input needs no gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _data(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic tensors (not patient data): class-dependent brightness plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, n)
    base = (labels[:, None, None, None] * 30 + 40).astype(np.float64)
    images = np.clip(base + rng.normal(0, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return images, labels


def _flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in params])


# -- model validation -------------------------------------------------------------------


def test_lesionnet_is_dp_compatible() -> None:
    check_dp_compatible(build_model(TINY))


def test_batchnorm_model_is_refused_with_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(DPModelError, match=r"BatchNorm.*GroupNorm"):
        check_dp_compatible(model)
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(DPModelError, match="not compatible with DP-SGD"):
        make_private(
            bn,
            torch.optim.SGD(bn.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            generator=torch.Generator(),
        )


# -- per-example clipping ---------------------------------------------------------------


def test_every_per_example_gradient_is_clipped_to_max_grad_norm() -> None:
    torch.manual_seed(0)
    images, labels = _data(6)
    x, y = to_input(images), torch.from_numpy(labels)
    model = build_model(TINY)
    reference = copy.deepcopy(model)
    clip = 0.05  # far below the raw per-example norms, so clipping is active for all
    gsm, opt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=6,
        generator=torch.Generator().manual_seed(0),
    )
    loss_fn = per_example_loss_fn(None)

    # Per-example gradients computed one example at a time, without Opacus.
    raw, clipped = [], []
    for i in range(6):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]), y[i : i + 1]).backward()
        g = _flat_grads([p.grad for p in reference.parameters()])  # type: ignore[misc]
        raw.append(g.norm().item())
        clipped.append(g * min(1.0, clip / g.norm().item()))
    assert min(raw) > 10 * clip

    opt.zero_grad(set_to_none=True)
    loss_fn(gsm(x), y).backward()
    # Opacus's per-example gradients agree with the one-at-a-time ones ...
    per_sample = torch.cat([p.grad_sample.reshape(6, -1) for p in opt.params], dim=1)
    np.testing.assert_allclose(per_sample.norm(dim=1).numpy(), raw, rtol=1e-4)
    # ... and the step's gradient is the mean of the individually clipped ones.
    assert opt.pre_step()
    got = _flat_grads([p.grad for p in opt.params])  # type: ignore[misc]
    expected = torch.stack(clipped).sum(0) / 6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    for g in clipped:
        assert g.norm().item() <= clip * (1 + 1e-6)


def test_channels_last_input_gives_the_same_per_example_gradients() -> None:
    """Regression: Opacus 1.6's unfold2d misreads channels_last tensors (to_input's layout)."""
    torch.manual_seed(2)
    images, labels = _data(5, seed=2)
    x = to_input(images).contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    norms = []
    for batch in (x, x.contiguous()):
        model = build_model(TINY)
        model.load_state_dict(initial_state(TINY, 3))
        gsm, opt = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=5,
            generator=torch.Generator(),
        )
        per_example_loss_fn(None)(gsm(batch), torch.from_numpy(labels)).backward()
        norms.append(torch.cat([p.grad_sample.reshape(5, -1) for p in opt.params], 1))
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=1e-7)


def test_a_single_example_moves_the_gradient_by_at_most_max_grad_norm() -> None:
    torch.manual_seed(1)
    images, labels = _data(4, seed=1)
    model = build_model(TINY)
    gsm, opt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=1,
        generator=torch.Generator(),
    )
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        per_example_loss_fn(None)(
            gsm(to_input(images[i : i + 1])), torch.from_numpy(labels[i : i + 1])
        ).backward()
        assert opt.pre_step()
        norm = _flat_grads([p.grad for p in opt.params]).norm().item()  # type: ignore[misc]
        assert norm <= 0.3 * (1 + 1e-5)


# -- noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("secure_noise", [True, False])
def test_noise_has_std_sigma_times_clip_over_expected_batch(secure_noise: bool) -> None:
    sigma, clip, batch = 1.3, 0.7, 25.0
    model = nn.Linear(500, 200)  # 100,200 parameters: std estimated to about 0.3 %
    gsm, opt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(5),
        secure_noise=secure_noise,
    )
    opt.zero_grad(set_to_none=True)
    (gsm(torch.zeros(25, 500)) * 0.0).sum().backward()  # every per-example gradient is 0
    assert opt.pre_step()
    noise = _flat_grads([p.grad for p in opt.params]).double()  # type: ignore[misc]
    expected = sigma * clip / batch
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(noise.numel())


def test_an_empty_poisson_batch_still_adds_noise() -> None:
    model = nn.Linear(400, 100)
    before = plain_state_dict(model)
    gsm, opt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(2),
    )
    assert dp_step(gsm, opt, None, None, per_example_loss_fn(None)) is None
    after = plain_state_dict(model)
    moved = torch.cat([(before[k] - after[k]).reshape(-1) for k in before]).double()
    assert moved.std().item() == pytest.approx(2.0 * 1.0 / 10, rel=0.03)


def test_poisson_sampling_has_the_planned_rate() -> None:
    gen = torch.Generator().manual_seed(11)
    sizes, hits = [], torch.zeros(1000)
    for idx in poisson_batches(1000, 0.1, 400, gen):
        sizes.append(len(idx))
        hits[idx] += 1
        assert len(set(idx.tolist())) == len(idx)
    assert len(sizes) == 400
    assert np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.var(sizes) == pytest.approx(1000 * 0.1 * 0.9, rel=0.25)
    assert hits.mean().item() == pytest.approx(40, rel=0.03)


# -- the whole local round --------------------------------------------------------------


def test_train_dp_returns_plain_keys_and_the_mechanism_it_ran() -> None:
    images, labels = _data(64)
    global_state = initial_state(TINY, 0)
    mech = round_mechanism(64, 16, 2, 1.0)
    cfg = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, momentum=0.0, augment=True)
    result = train_dp(TINY, global_state, images, labels, cfg, mech, max_grad_norm=1.0, threads=1)
    assert list(result.state) == list(global_state)
    assert not any(k.startswith("_module.") for k in result.state)
    for k, v in result.state.items():
        assert v.shape == global_state[k].shape and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    assert any(not torch.equal(result.state[k], global_state[k]) for k in global_state)
    assert result.mechanism == MechanismStep(1.0, 0.25, 8) == mech
    assert result.num_examples == 64 and result.max_grad_norm == 1.0
    assert math.isfinite(result.mean_loss) and result.examples_per_second > 0


def test_noise_comes_from_os_entropy_unless_a_test_seed_is_given() -> None:
    images, labels = _data(40)
    g = initial_state(TINY, 0)
    mech = MechanismStep(1.0, 0.25, 2)
    cfg = TrainConfig(epochs=1, batch_size=10, momentum=0.0, augment=False)

    def run(seed: int | None) -> torch.Tensor:
        r = train_dp(
            TINY, g, images, labels, cfg, mech, max_grad_norm=1.0, noise_seed=seed, threads=1
        )
        return r.state["classifier.weight"]

    assert torch.equal(run(123), run(123))
    assert not torch.equal(run(None), run(None))


def test_fedprox_term_is_applied_after_the_noise() -> None:
    images, labels = _data(48)
    g = initial_state(TINY, 0)
    mech = MechanismStep(1.0, 0.25, 6)

    def delta_norm(mu: float) -> float:
        cfg = TrainConfig(
            epochs=1, batch_size=12, learning_rate=0.1, momentum=0.0, augment=False, fedprox_mu=mu
        )
        r = train_dp(TINY, g, images, labels, cfg, mech, max_grad_norm=1.0, noise_seed=9, threads=1)
        return float(torch.cat([(r.state[k] - g[k]).reshape(-1) for k in g]).norm())

    # Same data, sampling and noise: only the pull towards the global weights differs.
    assert delta_norm(5.0) < 0.7 * delta_norm(0.0)


def test_mechanism_planned_for_another_dataset_is_refused() -> None:
    images, labels = _data(30)
    with pytest.raises(MechanismMismatchError, match="fewer than one example"):
        train_dp(
            TINY,
            initial_state(TINY, 0),
            images,
            labels,
            TrainConfig(),
            MechanismStep(1.0, 0.01, 3),
            max_grad_norm=1.0,
        )
    with pytest.raises(ValueError, match="class_weight"):
        train_dp(
            TINY,
            initial_state(TINY, 0),
            images,
            labels,
            TrainConfig(),
            MechanismStep(1.0, 0.5, 3),
            max_grad_norm=1.0,
            class_weight=[1.0, 2.0],
        )


def test_dp_vs_plain_throughput_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    """Report (never assert) how much slower DP-SGD is than plain training here."""
    model_cfg = ModelConfig(input_size=32, width=16, dropout=0.1)
    images, labels = _data(128, size=32)
    g = initial_state(model_cfg, 0)
    cfg = TrainConfig(epochs=1, batch_size=32, augment=True)
    plain = train_local(model_cfg, g, images, labels, cfg, threads=2)
    dp = train_dp(
        model_cfg,
        g,
        images,
        labels,
        cfg,
        round_mechanism(128, 32, 1, 1.0),
        max_grad_norm=1.0,
        threads=2,
    )
    ratio = dp.examples_per_second / plain.examples_per_second
    with capsys.disabled():
        print(
            f"\nDP-SGD vs plain throughput: {dp.examples_per_second:.0f} vs "
            f"{plain.examples_per_second:.0f} examples/s (ratio {ratio:.2f})"
        )
    assert ratio > 0


def test_logit_adjusted_loss_shifts_logits_by_the_public_prior() -> None:
    """DP-SGD's class-imbalance handling: a logit shift survives per-example clipping."""
    import torch.nn.functional as F

    from clinic_agent.dp_training import per_example_loss_fn
    from common.datasets import public_logit_offsets

    offsets = public_logit_offsets()
    assert len(offsets) == 7 and max(offsets) < 0  # log-probabilities of the prior
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 4, 5, 6])
    got = per_example_loss_fn(None, offsets)(logits, target)
    want = F.cross_entropy(logits + torch.tensor(offsets), target)
    assert torch.allclose(got, want)
    # Rare classes (akiec, df) get the most negative offsets: the loss pushes their logits up.
    assert offsets[3] < offsets[5] and offsets[0] < offsets[5]

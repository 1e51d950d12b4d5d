"""The scattering front end: filter-bank facts, exact symmetries, a pinned vector.

The front end is rebuilt from formulas, never loaded from a checkpoint, so a change to
it would silently change what every stored ``scatternet`` head means; the pinned values
below fail first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.scattering import (
    MAPS_PER_CHANNEL,
    L,
    Scattering2D,
    ScatteringFrontend,
    filter_bank,
)


def _pattern(size: int = 32, channels: int = 3) -> torch.Tensor:
    """A deterministic, structured test image (no RNG involved)."""
    i = torch.arange(size, dtype=torch.float64).view(-1, 1)
    j = torch.arange(size, dtype=torch.float64).view(1, -1)
    planes = [
        torch.sin(0.7 * i + 0.3 * (c + 1) * j) + 0.5 * torch.cos(0.11 * i * j / (c + 1))
        for c in range(channels)
    ]
    return torch.stack(planes).unsqueeze(0).to(torch.float32)


def test_wavelets_have_zero_mean_and_the_low_pass_unit_gain():
    psi, phi = filter_bank(32)
    assert psi.shape == (2 * L, 32, 32) and phi.shape == (32, 32)
    assert np.abs(psi[:, 0, 0]).max() < 1e-6  # ψ̂(0) = 0: blind to flat brightness
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-6)  # φ̂(0) = 1: averages, keeps level
    assert not psi.flags.writeable and not phi.flags.writeable  # shared, cached arrays


def test_filter_bank_rejects_sizes_it_cannot_subsample():
    with pytest.raises(ValueError, match="multiple of 4"):
        filter_bank(30)
    with pytest.raises(ValueError, match=">= 16"):
        filter_bank(8)


def test_output_shape_and_order_of_maps():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = Scattering2D(32)(x)
    assert s.shape == (2, 3 * MAPS_PER_CHANNEL, 8, 8)
    assert MAPS_PER_CHANNEL == 81
    # Channel c's 81 maps are contiguous: scattering one channel alone gives the same maps.
    alone = Scattering2D(32)(x[:, 1:2])
    torch.testing.assert_close(s[:, 81:162], alone, rtol=0, atol=1e-5)
    # Order 0 of a constant image is that constant; every wavelet response vanishes.
    flat = Scattering2D(32)(torch.full((1, 1, 32, 32), 2.5))
    torch.testing.assert_close(flat[0, 0], torch.full((8, 8), 2.5), rtol=0, atol=1e-5)
    assert flat[0, 1:].abs().max() < 1e-4


def test_circular_shift_by_the_subsampling_step_shifts_the_output_exactly():
    x = _pattern()
    s = Scattering2D(32)(x)
    shifted = Scattering2D(32)(torch.roll(x, shifts=(4, -8), dims=(2, 3)))
    torch.testing.assert_close(
        shifted, torch.roll(s, shifts=(1, -2), dims=(2, 3)), rtol=0, atol=1e-4
    )


def _orientation_permutation() -> list[int]:
    """Where map k of one channel goes when the image turns by a quarter."""
    turn = [(ell + L // 2) % L for ell in range(L)]  # θ + π/2 ≡ θ_{l+4} (mod π)
    perm = [0]
    perm += [1 + turn[ell] for ell in range(L)]  # order 1, scale 0
    perm += [1 + L + turn[ell] for ell in range(L)]  # order 1, scale 1
    perm += [1 + 2 * L + turn[a] * L + turn[b] for a in range(L) for b in range(L)]
    return perm


def test_a_quarter_turn_permutes_orientations_exactly():
    """Rotating the image about the grid origin rotates every map and maps θ to θ + π/2
    (the filters are periodised about the origin, so this holds to float precision)."""
    x = _pattern(channels=1)
    m = x.shape[-1]
    idx = torch.arange(m)
    # x_rot[i, j] = x[j, -i]: a quarter turn about pixel (0, 0) of the periodic grid.
    x_rot = x[..., idx.view(1, -1).expand(m, m), (-idx.view(-1, 1)) % m]
    s, s_rot = Scattering2D(32)(x)[0], Scattering2D(32)(x_rot)[0]
    k = s.shape[-1]
    kdx = torch.arange(k)
    turned = s[:, kdx.view(1, -1).expand(k, k), (-kdx.view(-1, 1)) % k]
    perm = _orientation_permutation()
    assert sorted(perm) == list(range(MAPS_PER_CHANNEL))
    torch.testing.assert_close(s_rot[perm], turned, rtol=0, atol=1e-4)


def test_each_image_is_transformed_independently_of_its_batch():
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    together = Scattering2D(32)(x)
    for i in range(5):
        assert torch.equal(Scattering2D(32)(x[i : i + 1])[0], together[i])


def test_frontend_pools_a_signed_log_to_the_grid():
    x = _pattern()
    frontend = ScatteringFrontend(32, grid=4)
    out = frontend(x)
    assert out.shape == (1, frontend.channels, 4, 4) and frontend.channels == 243
    s = Scattering2D(32)(x)
    expected = torch.nn.functional.avg_pool2d(torch.sign(s) * torch.log1p(s.abs()), 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="grid 3"):
        ScatteringFrontend(32, grid=3)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(N, C, 32, 32\)"):
        Scattering2D(32)(torch.zeros(1, 3, 64, 64))


def _direct_transform(x: torch.Tensor) -> torch.Tensor:
    """The same transform computed the slow, obvious way: every convolution at full
    resolution, subsampled by 4 only at the end."""
    size = x.shape[-1]
    psi_np, phi_np = filter_bank(size)
    psi, phi = torch.from_numpy(psi_np.copy()), torch.from_numpy(phi_np.copy())
    spectrum = torch.fft.fft2(x)

    def low(u: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.fft2(u) * phi).real[..., ::4, ::4]

    u0 = torch.fft.ifft2(spectrum.unsqueeze(2) * psi[:L]).abs()
    u1 = torch.fft.ifft2(spectrum.unsqueeze(2) * psi[L:]).abs()
    u2 = torch.fft.ifft2(torch.fft.fft2(u0).unsqueeze(3) * psi[L:]).abs().flatten(2, 3)
    maps = torch.cat([low(x).unsqueeze(2), low(u0), low(u1), low(u2)], dim=2)
    return maps.reshape(x.shape[0], -1, size // 4, size // 4)


@pytest.mark.parametrize("size", [32, 64])
def test_matches_the_full_resolution_transform(size):
    # Maps computed at full resolution agree exactly; those computed at half resolution
    # (scale-1 wavelets, order 2) differ only by the aliasing of |·|, about 1 % measured.
    x = torch.cat(
        [_pattern(size), torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(0))]
    )
    fast = Scattering2D(size)(x).reshape(3, 3, MAPS_PER_CHANNEL, -1)
    slow = _direct_transform(x).reshape(3, 3, MAPS_PER_CHANNEL, -1)
    exact, half_res = slice(0, 1 + L), slice(1 + L, MAPS_PER_CHANNEL)
    torch.testing.assert_close(fast[:, :, exact], slow[:, :, exact], rtol=1e-5, atol=1e-6)
    for i in range(3):
        a, b = fast[i, :, half_res], slow[i, :, half_res]
        assert float((a - b).norm() / b.norm()) < 0.03
        assert float(a.norm() / b.norm()) == pytest.approx(1.0, abs=0.01)


# Pinned when the front end was introduced (the half-resolution maps re-pinned when their
# low-pass lost a stray factor 1/4, before any scatternet checkpoint left this repository).
# The front end is not stored in checkpoints, so if these move, every stored scatternet
# head means something else: change them only together with a new architecture name.
PINNED_FILTERS = {  # (filter, row, column) of the Fourier-domain filter bank at 32 px
    ("psi", 3, 1, 2): 0.045009,
    ("psi", 3, 30, 2): -0.049631,
    ("psi", 10, 2, 5): 0.037127,
    ("psi", 13, 5, 1): 0.014167,
    ("phi", 0, 1, 1): 0.906018,
    ("phi", 0, 3, 0): 0.641381,
}
PINNED_OUTPUT = {  # (map, row, column) of Scattering2D(32) on _pattern()
    (0, 0, 0): 0.394216,
    (5, 3, 2): 0.066961,
    (12, 7, 1): 0.247365,
    (40, 2, 6): 0.003044,
    (100, 4, 4): 0.007517,
    (242, 1, 7): 0.019690,
}


def test_pinned_filter_bank_and_output():
    psi, phi = filter_bank(32)
    for (name, k, r, c), value in PINNED_FILTERS.items():
        got = psi[k, r, c] if name == "psi" else phi[r, c]
        assert float(got) == pytest.approx(value, abs=2e-6), (name, k, r, c)
    s = Scattering2D(32)(_pattern())[0]
    for (k, r, c), value in PINNED_OUTPUT.items():
        assert float(s[k, r, c]) == pytest.approx(value, rel=1e-3, abs=2e-6), (k, r, c)

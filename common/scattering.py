"""A fixed, data-independent image front end: the 2-D wavelet scattering transform.

Why it exists: under DP-SGD every trainable parameter receives Gaussian noise on every
step, so the noise grows with the square root of the parameter count while the signal
does not. A network learning its own features from a few thousand images per clinic
drowns in that noise (measured: end-to-end CNNs collapse to one or two classes at ε = 8).
Scattering features are computed from fixed wavelets, cost no privacy, and leave only a
small head to train, which is what Tramèr & Boneh ("Differentially Private Learning Needs
Better Features", ICLR 2021) found works best for DP training without public data.

The transform (Mallat 2012; Bruna & Mallat 2013) with J = 2 scales and L = 8 orientations:

* order 0: ``x ⋆ φ`` (a Gaussian low-pass);
* order 1: ``|x ⋆ ψ_{j,θ}| ⋆ φ`` for 2 scales × 8 orientations;
* order 2: ``||x ⋆ ψ_{0,θ1}| ⋆ ψ_{1,θ2}| ⋆ φ`` for 8 × 8 orientation pairs;

all subsampled by 2^J, so one image channel gives 1 + 16 + 64 = 81 maps at a quarter of
the resolution. The Morlet wavelets and the low-pass follow the definitions popularised
by Kymatio (Andreux et al., JMLR 2020): Gaussian envelope σ = 0.8·2^j, centre frequency
3π/4·2^-j, slant 4/L, low-pass σ = 0.8·2^(J-1); filters are periodised on the image grid
and applied by FFT (periodic boundary). Kymatio itself is not a dependency: its 0.3 release
no longer imports against current SciPy, and its CPU path is slower than the few FFTs here.

Everything is a pure function of the image; the filters are rebuilt from the formulas
(never stored in checkpoints), so a checkpoint cannot carry a tampered front end.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn

J = 2  # scales; the module below is written for exactly two
L = 8  # orientations
MAPS_PER_CHANNEL = 1 + J * L + L * L * J * (J - 1) // 2  # 81


def gabor_2d(size: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """A Gabor filter on a ``size``×``size`` periodic grid (complex, spatial domain).

    ``g(u) = exp(-uᵀ A u / 2σ²) · exp(i ξ (u₁ cos θ + u₂ sin θ)) / (2πσ²/slant)`` with the
    envelope's axes turned by θ and squeezed by ``slant`` across the oscillation; the
    Gaussian is summed over the neighbouring periods so that it is periodic.
    """
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curvature = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2.0 * sigma * sigma)
    grid = np.arange(size, dtype=np.float64)
    out = np.zeros((size, size), dtype=np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.meshgrid(grid + ex * size, grid + ey * size, indexing="ij")
            quadratic = (
                curvature[0, 0] * xx * xx
                + (curvature[0, 1] + curvature[1, 0]) * xx * yy
                + curvature[1, 1] * yy * yy
            )
            out += np.exp(-quadratic + 1j * xi * (xx * c + yy * s))
    return out / (2.0 * math.pi * sigma * sigma / slant)


def morlet_2d(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Morlet wavelet: the Gabor filter minus the multiple of its envelope that makes
    its mean exactly zero (so it responds to structure, not to brightness)."""
    wave = gabor_2d(size, sigma, theta, xi, slant)
    envelope = gabor_2d(size, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / envelope.sum()) * envelope


@lru_cache(maxsize=8)
def filter_bank(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ψ̂ of shape (J·L, size, size), φ̂ of shape (size, size)): Fourier transforms, real.

    Row ``j·L + l`` is scale j, orientation θ_l = (L/2 − 1 − l)·π/L. The transforms are
    real because every filter's envelope is centrally symmetric.
    """
    if size % (2**J) or size < 4 * 2**J:
        raise ValueError(
            f"scattering needs a size that is a multiple of {2**J} and >= {4 * 2**J}, got {size}"
        )
    psi = []
    for j in range(J):
        for ell in range(L):
            theta = (L // 2 - 1 - ell) * math.pi / L
            wavelet = morlet_2d(size, 0.8 * 2**j, theta, 0.75 * math.pi / 2**j, 4.0 / L)
            psi.append(np.fft.fft2(wavelet).real)
    phi = np.fft.fft2(gabor_2d(size, 0.8 * 2 ** (J - 1), 0.0, 0.0)).real
    out = (np.stack(psi).astype(np.float32), phi.astype(np.float32))
    for array in out:
        array.setflags(write=False)
    return out


def _fold(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """k² × (subsampling by ``k`` in space): the spectrum summed onto a k-times smaller grid.

    Periodisation, without the 1/k² (the filters below carry it). Folded one axis at a
    time: each step sums whole contiguous blocks, several times faster than one
    reduction over two strided axes of a complex tensor.
    """
    *batch, m, n = spectrum.shape
    rows = spectrum.reshape(*batch, k, m // k, n).sum(dim=-3)
    return rows.reshape(*batch, m // k, k, n // k).sum(dim=-2)


class Scattering2D(nn.Module):
    """(N, C, S, S) float -> (N, C·81, S/4, S/4): the J = 2, L = 8 scattering transform.

    Maps per channel, in order: order 0 (1), order 1 at scale 0 (8 orientations), order 1
    at scale 1 (8), order 2 (θ1 major, θ2 minor; 64). Work that lives in the low band is
    done at half resolution (scale-1 wavelets, the order-2 maps), as Kymatio does.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        psi, phi = filter_bank(size)
        psi_t = torch.from_numpy(psi.copy())
        phi_t = torch.from_numpy(phi.copy())
        # Non-persistent: rebuilt from the formulas, never read from a checkpoint. Each
        # filter that is followed by a fold by k carries that fold's 1/k².
        self.register_buffer("psi0", psi_t[:L], persistent=False)
        self.register_buffer("psi1", psi_t[L:] / 4, persistent=False)  # then folded by 2
        self.register_buffer("phi", phi_t / 16, persistent=False)  # then folded by 4
        # At half resolution the low-pass is φ̂ folded by 2 (a convolution over 4× fewer
        # taps needs them 4× heavier), and the fold after it carries 1/4.
        self.register_buffer("phi_half", _fold(phi_t, 2) / 4, persistent=False)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(
                f"expected (N, C, {self.size}, {self.size}) input, got {tuple(x.shape)}"
            )
        n, c = x.shape[:2]
        spectrum = torch.fft.fft2(x.to(torch.float32))
        order0 = torch.fft.ifft2(_fold(spectrum * self.phi, 4)).real.unsqueeze(2)
        # Order 1, scale 0, at full resolution: these maps also feed order 2.
        u0 = torch.fft.ifft2(spectrum.unsqueeze(2) * self.psi0).abs()
        u0_spectrum = torch.fft.fft2(u0)
        order1_s0 = torch.fft.ifft2(_fold(u0_spectrum * self.phi, 4)).real
        # Order 1, scale 1: band-limited, so computed at half resolution.
        u1 = torch.fft.ifft2(_fold(spectrum.unsqueeze(2) * self.psi1, 2)).abs()
        order1_s1 = torch.fft.ifft2(_fold(torch.fft.fft2(u1) * self.phi_half, 2)).real
        # Order 2: |u0 ⋆ ψ_1|, at half resolution.
        u2 = torch.fft.ifft2(_fold(u0_spectrum.unsqueeze(3) * self.psi1, 2)).abs()
        order2 = torch.fft.ifft2(_fold(torch.fft.fft2(u2) * self.phi_half, 2)).real.flatten(2, 3)
        maps = torch.cat([order0, order1_s0, order1_s1, order2], dim=2)
        return maps.reshape(n, c * MAPS_PER_CHANNEL, self.size // 4, self.size // 4)


class ScatteringFrontend(nn.Module):
    """Model input (N, 3, S, S) -> fixed features (N, 3·81, grid, grid).

    log(1 + s) compresses the heavy-tailed scattering coefficients (a handful of strong
    edges would otherwise dominate every linear score), and average pooling down to a
    ``grid``×``grid`` layout keeps coarse position (centre vs border of the lesion) while
    cutting the trainable head's size. Scattering coefficients of the normalised input
    can be negative only at order 0 (a low-pass of a signed image); they pass through a
    sign-preserving log.
    """

    def __init__(self, size: int, grid: int) -> None:
        super().__init__()
        if grid < 1 or (size // 4) % grid:
            raise ValueError(f"grid {grid} must divide the {size // 4}-wide scattering maps")
        self.scattering = Scattering2D(size)
        self.grid = grid

    @property
    def channels(self) -> int:
        return 3 * MAPS_PER_CHANNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scattering(x)
        s = torch.sign(s) * torch.log1p(s.abs())
        return nn.functional.adaptive_avg_pool2d(s, self.grid)

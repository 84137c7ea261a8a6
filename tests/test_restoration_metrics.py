"""Restoration metrics (pygen.metrics.restoration) against exact answers: PSNR of a known
error, SSIM of constant images (its closed form) and, position by position, Wang et al.'s
formula over a Gaussian window; the diversity of outputs with known distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pygen.metrics import pairwise_diversity, psnr, ssim


def test_psnr_of_a_known_error():
    x = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    assert psnr(x + 0.1, x) == pytest.approx(20.0, rel=1e-9)  # MSE 0.01
    assert psnr(x + 0.1, x, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-9)
    y = x.clone()
    y[1] += 0.2  # per-image values (MSE 0.01 and 0.04), then their mean
    assert psnr(y, x + torch.tensor([0.1, 0.0]).view(2, 1, 1, 1)) == pytest.approx(
        (20.0 + 10 * math.log10(1 / 0.04)) / 2, rel=1e-7)


def test_ssim_of_constant_images_is_the_luminance_term():
    for a, b, dr in ((0.2, 0.7, 1.0), (0.5, 0.5, 1.0), (0.3, 1.5, 2.0)):
        x, t = (torch.full((1, 2, 9, 9), v, dtype=torch.float64) for v in (a, b))
        c1 = (0.01 * dr) ** 2  # zero variances: the structure term is c2 / c2
        assert ssim(x, t, data_range=dr) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def _ssim_by_position(x: np.ndarray, t: np.ndarray, window: int, sigma: float, dr: float) -> float:
    """Wang et al. (2004) at each valid position of each channel, a Gaussian window of
    ``window`` taps and std ``sigma``, then the mean over positions, channels and images."""
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    per_image = []
    for xi, ti in zip(x, t):
        vals = []
        for xc, tc in zip(xi, ti):
            for i in range(xc.shape[0] - window + 1):
                for j in range(xc.shape[1] - window + 1):
                    p, q = xc[i : i + window, j : j + window], tc[i : i + window, j : j + window]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                    cov = (w * (p - mp) * (q - mq)).sum()
                    vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
        per_image.append(np.mean(vals))
    return float(np.mean(per_image))


@pytest.mark.parametrize("window,sigma,dr,hw", [(7, 1.5, 1.0, (9, 11)), (5, 0.8, 2.0, (8, 6)), (3, 1.0, 1.0, (3, 5))])
def test_ssim_equals_the_formula_at_every_position(window, sigma, dr, hw):
    g = torch.Generator().manual_seed(window)
    x = torch.rand(3, 2, *hw, generator=g, dtype=torch.float64) * dr
    t = (0.6 * x + 0.4 * torch.rand(3, 2, *hw, generator=g, dtype=torch.float64) * dr)
    got = ssim(x.float(), t, data_range=dr, window=window, sigma=sigma)
    assert got == pytest.approx(_ssim_by_position(x.float().double().numpy(), t.numpy(), window, sigma, dr), rel=1e-9)
    assert ssim(x, x, data_range=dr, window=window, sigma=sigma) == pytest.approx(1.0, rel=1e-12)
    assert 0 < got < 0.99


def test_restoration_metrics_refuse_bad_shapes():
    x = torch.rand(1, 1, 8, 8)
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=r"^x and target must both be \(B, C, H, W\), got \(1, 1, 8, 8\) and "
                                             r"\(1, 1, 8, 7\)$"):
            fn(x, x[..., :7])
        with pytest.raises(ValueError, match=r"got \(1, 8, 8\) and \(1, 8, 8\)$"):
            fn(x[0], x[0])
    with pytest.raises(ValueError, match=r"^images must be at least 9x9 for SSIM with window=9$"):
        ssim(x, x, window=9)
    assert ssim(x, x, window=8) == pytest.approx(1.0)  # exactly the image's size: one position


def test_pairwise_diversity_of_known_distances():
    # three constant outputs 0, 1, 3 for each of two inputs: pair distances 1, 3, 2
    s = torch.tensor([0.0, 1.0, 3.0]).view(1, 3, 1, 1, 1).expand(2, 3, 2, 2, 2)
    assert pairwise_diversity(s) == pytest.approx(2.0, rel=1e-12)
    s = torch.zeros(1, 2, 1, 2, 2)
    s[0, 1, 0, 0, 0] = 4.0  # one pixel of four differs by 4: RMS 2 over the image, 4 over that pixel
    assert pairwise_diversity(s) == pytest.approx(2.0, rel=1e-12)
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1
    assert pairwise_diversity(s, mask) == pytest.approx(4.0, rel=1e-12)
    assert pairwise_diversity(s, mask[None]) == pytest.approx(4.0, rel=1e-12)  # a (1, C, H, W) mask
    assert pairwise_diversity(s, torch.zeros(1, 2, 2)) == 0.0  # nothing counted
    for bad in (torch.zeros(3, 1, 4), torch.zeros(4, 4)):
        with pytest.raises(ValueError, match=r"^samples must be \(B, n >= 2, \.\.\.\), got"):
            pairwise_diversity(bad)

"""Restoration metrics for image-to-image stages (super-resolution, colorization, inpainting):
PSNR, SSIM, and the diversity of several outputs for one input.

Images are (B, C, H, W) in [0, data_range]. Per-image values, averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim", "pairwise_diversity"]


def _pair(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != target.shape or x.dim() != 4:
        raise ValueError(f"x and target must both be (B, C, H, W), got {tuple(x.shape)} and {tuple(target.shape)}")
    return x.double(), target.double().to(x.device)


def psnr(x: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Mean over images of 10 log10(data_range^2 / MSE) in dB (higher is better)."""
    x, target = _pair(x, target)
    mse = (x - target).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return float((10 * torch.log10(data_range**2 / mse)).mean())


def ssim(x: Tensor, target: Tensor, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with a Gaussian ``window`` (valid positions only, per
    channel, K1 = 0.01, K2 = 0.03). The window defaults to 7 (not 11) so that 16x16 images
    keep 10x10 positions; 1 is identical images."""
    x, target = _pair(x, target)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images must be at least {window}x{window} for SSIM with window={window}")
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, k, groups=c)

    mx, my = blur(x), blur(target)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(target * target) - my * my, blur(x * target) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.flatten(1).mean(1).mean())


def pairwise_diversity(samples: Tensor, mask: Tensor | None = None) -> float:
    """Mean RMS distance between the outputs for the same input: samples (B, n, ...), n >= 2,
    averaged over the n (n - 1) / 2 pairs and the B inputs; ``mask`` (broadcastable to one
    output, 1 = counted) restricts it to a region (e.g. the inpainted pixels)."""
    if samples.dim() < 3 or samples.shape[1] < 2:
        raise ValueError(f"samples must be (B, n >= 2, ...), got {tuple(samples.shape)}")
    s = samples.double()
    one = s[0, 0]
    w = torch.ones_like(one) if mask is None else torch.as_tensor(mask, dtype=s.dtype, device=s.device)
    while w.dim() > one.dim() and w.shape[0] == 1:  # (1, C, H, W) masks of a batch
        w = w[0]
    w = w.expand_as(one)
    b, n = s.shape[:2]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            d2 = ((s[:, i] - s[:, j]) ** 2 * w).flatten(1).sum(1) / w.sum().clamp_min(1)
            total += float(d2.sqrt().sum())
            pairs += b
    return total / pairs

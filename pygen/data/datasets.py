"""The built-in data sets: all offline, all fixed on every machine.

- :func:`digits`: scikit-learn's bundled 8x8 handwritten digits, with a fixed held-out split.
- :func:`toy2d` / :func:`toy2d_log_prob`: the usual 2-D benchmark densities (FFJORD's
  definitions), exact log-densities where they have a closed form.
- :func:`patches`: crops of the two photographs scikit-learn ships, for super-resolution.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SPLITS",
    "DIGITS_SIZES",
    "TOY2D",
    "TOY2D_DENSITIES",
    "digits",
    "digits_split_index",
    "toy2d",
    "toy2d_log_prob",
    "patches",
]

SPLITS = ("train", "test", "all")
DIGITS_SIZES = (8, 16, 32)
TOY2D = ("two_moons", "8gaussians", "checkerboard", "swiss_roll", "pinwheel")
#: the toy sets whose density :func:`toy2d_log_prob` evaluates exactly
TOY2D_DENSITIES = ("8gaussians", "checkerboard")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digits_split_index(split: str = "train") -> Tensor:
    """Indices (int64, ascending) into scikit-learn's 1797 digits of the fixed ``split``.

    The split is stratified by index, with no random numbers involved (so it is the same on
    every machine and numpy version): within each class, taken in the dataset's order, every
    fifth image (ranks 4, 9, 14, ...) is held out. That is 355 test and 1442 train images,
    each class about 20% test.
    """
    _check_split(split)
    _, y = _digits_raw()
    rank = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        where = np.flatnonzero(y == c)
        rank[where] = np.arange(len(where))
    test = rank % 5 == 4
    keep = {"train": ~test, "test": test, "all": np.ones_like(test)}[split]
    return torch.from_numpy(np.flatnonzero(keep))


def digits(split: str = "train", size: int = 8) -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits: (images (N, 1, size, size) float32 in [0, 1], labels (N,) int64).

    Pixels are the dataset's 0..16 counts divided by 16 (17 levels: dequantise with
    ``n_bins=17``). ``split`` is "train" (1442), "test" (355) or "all" (1797), fixed as
    :func:`digits_split_index` states. ``size`` 16 or 32 upsamples bilinearly
    (align_corners=False), which keeps values in [0, 1], for models that need room.
    """
    _check_split(split)
    if size not in DIGITS_SIZES:
        raise ValueError(f"digits size must be one of {DIGITS_SIZES}, got {size!r}")
    x, y = _digits_raw()
    idx = digits_split_index(split).numpy()
    images = torch.from_numpy(x[idx]).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return images.contiguous(), torch.from_numpy(y[idx])


# ---------------------------------------------------------------------------------------
# 2-D toy densities (definitions follow FFJORD's toy_data.py, re-drawn with torch RNG)

_8G_RADIUS = 4.0 / math.sqrt(2.0)  # FFJORD: centres at radius 4, then everything / 1.414
_8G_STD = 0.5 / math.sqrt(2.0)


def _8g_centres() -> Tensor:
    a = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return _8G_RADIUS * torch.stack([torch.cos(a), torch.sin(a)], 1)


def toy2d(name: str, n: int, *, seed: int = 0) -> Tensor:
    """n points (n, 2) float32 from the 2-D toy set ``name`` (one of :data:`TOY2D`).

    Drawn from a local ``torch.Generator`` seeded with ``seed`` (the global RNG is not
    touched): the same (name, n, seed) gives the same points. All sets lie roughly in
    [-4, 4]^2:

    - "two_moons": scikit-learn's moons (noise 0.1), times 2, shifted by (-1, -0.2);
    - "8gaussians": equal mixture of 8 isotropic Gaussians (std 0.5/sqrt 2) at radius 4/sqrt 2;
    - "checkerboard": uniform on the 8 "black" 2x2 squares of a 4x4 board on [-4, 4]^2;
    - "swiss_roll": t cos t, t sin t for t = 1.5 pi (1 + 2u), noise std 1, divided by 5;
    - "pinwheel": 5 arms, radial std 0.3, tangential std 0.1, rate 0.25, times 2.
    """
    if name not in TOY2D:
        raise ValueError(f"unknown toy2d set {name!r}; expected one of {TOY2D}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    if name == "two_moons":
        t = torch.rand(n, generator=g, dtype=f64) * math.pi
        upper = torch.rand(n, generator=g, dtype=f64) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x, y], 1) + 0.1 * torch.randn(n, 2, generator=g, dtype=f64)
        pts = pts * 2 + torch.tensor([-1.0, -0.2], dtype=f64)
    elif name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g)
        pts = _8g_centres()[k] + _8G_STD * torch.randn(n, 2, generator=g, dtype=f64)
    elif name == "checkerboard":
        x1 = torch.rand(n, generator=g, dtype=f64) * 4 - 2
        # x2 in one of the two unit rows whose parity matches floor(x1): black squares
        row = torch.randint(0, 2, (n,), generator=g) * 2 - 2 + torch.floor(x1).remainder(2)
        x2 = row + torch.rand(n, generator=g, dtype=f64)
        pts = torch.stack([x1, x2], 1) * 2
    elif name == "swiss_roll":
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=f64))
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
        pts = (pts + torch.randn(n, 2, generator=g, dtype=f64)) / 5
    else:  # pinwheel
        arms = torch.arange(5, dtype=f64) * (2 * math.pi / 5)
        f = torch.randn(n, 2, generator=g, dtype=f64) * torch.tensor([0.3, 0.1], dtype=f64)
        f[:, 0] += 1
        a = arms[torch.randint(0, 5, (n,), generator=g)] + 0.25 * torch.exp(f[:, 0])
        c, s = torch.cos(a), torch.sin(a)
        pts = 2 * torch.stack([c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]], 1)
    return pts.to(torch.float32)


def toy2d_log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density (natural log) of the toy set ``name`` at points x (B, 2) -> (B,).

    Defined for "8gaussians" (the Gaussian mixture) and "checkerboard" (1/32 on the black
    squares, -inf elsewhere); the others have no closed form and raise NotImplementedError.
    Computed in float64, returned in x's dtype.
    """
    if name not in TOY2D:
        raise ValueError(f"unknown toy2d set {name!r}; expected one of {TOY2D}")
    if name not in TOY2D_DENSITIES:
        raise NotImplementedError(
            f"toy2d set {name!r} has no closed-form density; exact ones: {TOY2D_DENSITIES}"
        )
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be (B, 2), got {tuple(x.shape)}")
    z = x.to(torch.float64)
    if name == "8gaussians":
        d2 = ((z[:, None, :] - _8g_centres().to(z.device)) ** 2).sum(-1)  # (B, 8)
        lp = -d2 / (2 * _8G_STD**2) - math.log(2 * math.pi * _8G_STD**2) - math.log(8)
        out = torch.logsumexp(lp, 1)
    else:
        cell = torch.floor(z / 2)  # unit squares of the board before the x2 scaling
        inside = ((cell >= -2) & (cell <= 1)).all(1) & ((cell[:, 0] + cell[:, 1]).remainder(2) == 0)
        out = torch.where(inside, torch.tensor(-math.log(32.0), dtype=z.dtype, device=z.device), -math.inf)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------
# photographs for super-resolution


@functools.lru_cache(maxsize=1)
def _sample_images() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # china.jpg and flower.jpg, bundled

    return tuple(np.asarray(im) for im in load_sample_images().images)


#: columns [256, 384) of each 640-wide photograph are held out (20%). The middle strip
#: holds detail in both images (the temple, the petals); the right edge of flower.jpg is
#: blurred background, where bicubic up-sampling alone scores 47 dB. Disjoint regions:
#: no test patch overlaps a train patch.
_TEST_COLS = (256, 384)


def patches(
    size: int = 32, scale: int = 4, split: str = "train", *, stride: int | None = None
) -> tuple[Tensor, Tensor]:
    """Photograph patches for super-resolution: (hr (N, 3, size, size), low_res (N, 3, size/scale, size/scale)).

    Cut from scikit-learn's two sample photographs (china.jpg, flower.jpg, 427 x 640 RGB),
    float32 in [0, 1] (8-bit / 255). The split is by region: columns 256..383 (the middle
    20%) of each image are "test", the parts left and right of it "train", so no test patch
    overlaps a train patch. Patches lie on a grid of step ``stride`` (default ``size``: no
    overlap) from the top-left of each region; order: china then flower, region, rows,
    columns.
    ``low_res`` is ``hr`` area-downsampled (mean of scale x scale blocks). ``size`` must be a
    multiple of ``scale``; with size=32, scale=4: 416 train and 104 test patches.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(size, int) and isinstance(scale, int) and scale >= 1 and size >= scale and size % scale == 0):
        raise ValueError(f"size must be a positive multiple of scale, got size={size!r}, scale={scale!r}")
    stride = size if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    out = []
    for im in _sample_images():
        h, w, _ = im.shape
        a, b = _TEST_COLS
        regions = {"train": [(0, a), (b, w)], "test": [(a, b)]}
        regions["all"] = [(0, a), (a, b), (b, w)]
        t = torch.from_numpy(im.copy()).permute(2, 0, 1).float().div_(255)
        for c0, c1 in regions[split]:
            if c1 - c0 < size or h < size:
                raise ValueError(f"patch size {size} does not fit in a {h} x {c1 - c0} region")
            # unfold: (3, nr, nc, size, size) windows of the region, read in row-major order
            win = t[:, :, c0:c1].unfold(1, size, stride).unfold(2, size, stride)
            out.append(win.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size))
    hr = torch.cat(out).contiguous()
    low_res = F.avg_pool2d(hr, scale) if scale > 1 else hr.clone()
    return hr, low_res

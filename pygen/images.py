"""Image grids as PNG (Pillow), written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from pygen._io import write_atomic


def make_grid(images: Tensor, nrow: int | None = None, *, pad: int = 1, scale: int = 1) -> Tensor:
    """(N, C, H, W) images in [0, 1] -> one (C, H', W') grid, nrow per row (default ~sqrt(N)),
    ``pad`` pixels of white between cells, each pixel repeated ``scale`` times (small digits
    are hard to see otherwise)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, *, pad: int = 1,
              scale: int = 1) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` as PNG, atomically (a reader never
    sees half a file). 1 channel -> grayscale, 3 -> RGB. Returns the path."""
    from PIL import Image

    grid = make_grid(images, nrow, pad=pad, scale=scale)
    arr = (grid * 255).round().to(torch.uint8)
    if arr.shape[0] == 1:
        img = Image.fromarray(arr[0].numpy(), mode="L")
    elif arr.shape[0] == 3:
        img = Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")
    else:
        raise ValueError(f"images must have 1 or 3 channels, got {arr.shape[0]}")
    write_atomic(path, lambda f: img.save(f, format="PNG"), "wb")
    return Path(path)


__all__ = ["make_grid", "save_grid"]

"""Image-shape transforms: squeeze (space to channels) and the multi-scale split."""

from __future__ import annotations

import torch
from torch import Tensor

from pygen.flows.base import Transform

__all__ = ["Squeeze", "MultiScale"]


def _check_image(x: Tensor, name: str, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} expects {name} of shape (B, C, H, W); got {got}")


class Squeeze(Transform):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block becomes 4 channels; logdet 0.

    Output channel 4c + 2i + j holds pixel (2h + i, 2w + j) of input channel c.
    H and W must be even. ``inverse`` undoes it ((B, 4C, h, w) -> (B, C, 2h, 2w)).
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(x, "x", "Squeeze")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze expects x of shape (B, C, H, W) with even H and W; got {tuple(x.shape)}")
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, x.new_zeros(b)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(z, "z", "Squeeze.inverse")
        b, c4, h, w = z.shape
        if c4 % 4:
            raise ValueError(f"Squeeze.inverse expects z of shape (B, 4C, h, w); got {tuple(z.shape)}")
        c = c4 // 4
        x = z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
        return x, z.new_zeros(b)


class MultiScale(Transform):
    """One level of a multi-scale image flow (RealNVP / Glow), shape-preserving.

    forward, for x (B, C, H, W):
      1. squeeze to (B, 4C, H/2, W/2) and run ``steps`` on it;
      2. if ``inner`` is given: split the channels in halves; the second half (2C channels)
         is "factored out": it goes to the prior as it is; the first half goes through
         ``inner`` (the next, coarser level, on (B, 2C, H/2, W/2));
      3. concatenate the halves and unsqueeze back to (B, C, H, W).
    So the whole flow maps x to z of x's shape, and a standard normal prior over all of z is
    Glow's prior with the factored-out halves at each scale. ``inverse`` runs the mirror
    image. logdet = steps' + inner's.
    """

    def __init__(self, steps: Transform, inner: Transform | None = None) -> None:
        super().__init__()
        self.squeeze = Squeeze()
        self.steps = steps
        self.inner = inner

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(x, "x", "MultiScale")
        h, _ = self.squeeze(x)
        h, logdet = self.steps(h, context)
        if self.inner is not None:
            keep, out = h.chunk(2, dim=1)
            keep, ld = self.inner(keep, context)
            h, logdet = torch.cat([keep, out], dim=1), logdet + ld
        z, _ = self.squeeze.inverse(h)
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(z, "z", "MultiScale.inverse")
        h, _ = self.squeeze(z)
        logdet = z.new_zeros(z.shape[0])
        if self.inner is not None:
            keep, out = h.chunk(2, dim=1)
            keep, logdet = self.inner.inverse(keep, context)
            h = torch.cat([keep, out], dim=1)
        h, ld = self.steps.inverse(h, context)
        x, _ = self.squeeze.inverse(h)
        return x, logdet + ld

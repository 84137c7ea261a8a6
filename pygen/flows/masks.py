"""Coupling masks: 1 marks an element the coupling transforms, 0 one it passes through.

A mask's first dim is always the channel (feature) count C, so a coupling knows C from
its mask:

- :func:`channel_mask` -> (C,) for vectors, (C, 1, 1) for images: one contiguous half
  of the channels is transformed. The pass-through half is then a slice of x (a view),
  which the coupling hands to its conditioner without a copy.
- :func:`checkerboard_mask` -> (C, H, W): the RealNVP spatial checkerboard, the same
  pattern on every channel. The conditioner then sees ``x * (1 - mask)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_mask", "checkerboard_mask", "identity_block"]


def channel_mask(channels: int, parity: int = 0, *, image: bool = False) -> Tensor:
    """Transform one half of the channels: parity 0 the second half, parity 1 the first.

    For odd C, parity 0 transforms the larger half (ceil(C/2) channels).

    Returns:
        float32 (C,) or, with ``image=True``, (C, 1, 1).
    """
    if not isinstance(channels, int) or channels < 2:
        raise ValueError(f"a coupling needs at least 2 channels/features to split; got {channels!r}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    half = channels // 2
    m = torch.zeros(channels, device="cpu")  # a constant: CPU whatever the default device
    if parity == 0:
        m[half:] = 1
    else:
        m[: channels - half] = 1
    return m.view(channels, 1, 1) if image else m


def checkerboard_mask(channels: int, height: int, width: int, parity: int = 0) -> Tensor:
    """Spatial checkerboard: element (h, w) is transformed when (h + w + parity) is odd.

    Returns:
        float32 (C, H, W), the same pattern on every channel.
    """
    if channels < 1 or height < 1 or width < 1 or height * width < 2:
        raise ValueError(f"checkerboard_mask needs C >= 1 and H * W >= 2; got {(channels, height, width)}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    h = torch.arange(height, device="cpu").view(height, 1)
    w = torch.arange(width, device="cpu").view(1, width)
    m = ((h + w + parity) % 2).to(torch.float32)
    return m.expand(channels, height, width).contiguous()


def identity_block(mask: Tensor) -> slice | None:
    """The pass-through channels as a slice when mask is a channel mask with one contiguous
    pass-through block (constant over non-channel dims); None otherwise."""
    c = mask.shape[0]
    flat = mask.reshape(c, -1)
    if flat.shape[1] > 1 and not bool((flat == flat[:, :1]).all()):
        return None  # varies spatially: not a channel mask
    ident = (flat[:, 0] == 0).nonzero().flatten().tolist()
    if not ident or ident != list(range(ident[0], ident[-1] + 1)):
        return None
    return slice(ident[0], ident[-1] + 1)

"""Network blocks shared by the model families: MLPs for vectors, conv encoders/decoders
for small images. Sized from the data shape so that one constructor serves 2-D points,
8x8 digits and 32x32 patches alike.

Images are (B, C, H, W) with H = W a power of two >= 4: the conv stacks halve (or double)
the resolution down to (up from) 4x4, doubling (halving) the width each time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def activation(name: str) -> nn.Module:
    """"silu", "relu", "lrelu" (slope 0.2, the GAN discriminator's) or "tanh"."""
    acts = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "lrelu": lambda: nn.LeakyReLU(0.2)}
    if name not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {name!r}")
    return acts[name]()


class MLP(nn.Sequential):
    """in_features -> hidden (x layers, activation) -> out_features; (B, in) -> (B, out)."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 256, layers: int = 2,
                 act: str = "silu") -> None:
        dims = [in_features] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), activation(act)]
        mods.append(nn.Linear(dims[-1], out_features))
        super().__init__(*mods)


def _levels(size: int) -> int:
    """Resolution halvings from size x size down to 4x4."""
    if size < 4 or size & (size - 1):
        raise ValueError(f"image size must be a power of two >= 4, got {size}")
    return int(math.log2(size)) - 2


def _norm(kind: str | None, ch: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    raise ValueError(f"norm must be None, 'group' or 'batch', got {kind!r}")


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_features): conv 3x3, then stride-2 convs down to 4x4 (width
    doubling), flatten, linear. ``norm``: None (a GAN discriminator, spectral-normed by its
    owner), "group" or "batch"."""

    def __init__(self, shape: Sequence[int], out_features: int, width: int = 32, act: str = "silu",
                 norm: str | None = "group") -> None:
        super().__init__()
        c, h, w = shape
        if h != w:
            raise ValueError(f"square images only, got {h}x{w}")
        mods: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), activation(act)]
        ch = width
        for _ in range(_levels(h)):
            mods += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), _norm(norm, 2 * ch), activation(act)]
            ch *= 2
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(ch * 16, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """(B, in_features) -> (B, C, H, W): linear to (width * 2^levels, 4, 4), then stride-2
    transposed convs up to H (width halving), then a 3x3 conv to C channels (no output
    activation: the owner applies its likelihood's link, e.g. logits or tanh)."""

    def __init__(self, in_features: int, shape: Sequence[int], width: int = 32, act: str = "silu",
                 norm: str | None = "group") -> None:
        super().__init__()
        c, h, w = shape
        if h != w:
            raise ValueError(f"square images only, got {h}x{w}")
        levels = _levels(h)
        ch = width * 2**levels
        self.ch = ch
        self.head = nn.Linear(in_features, ch * 16)
        mods: list[nn.Module] = [activation(act)]
        for _ in range(levels):
            mods += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), _norm(norm, ch // 2), activation(act)]
            ch //= 2
        mods.append(nn.Conv2d(ch, c, 3, padding=1))
        self.body = nn.Sequential(*mods)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z).view(z.shape[0], self.ch, 4, 4))


def is_image(shape: Sequence[int]) -> bool:
    """True for (C, H, W) data shapes (conv networks), False for (D,) vectors (MLPs)."""
    return len(shape) == 3


def encoder(shape: Sequence[int], out_features: int, *, width: int = 32, hidden: int = 256, act: str = "silu",
            norm: str | None = "group") -> nn.Module:
    """A conv encoder for images, an MLP for vectors: (B, *shape) -> (B, out_features)."""
    if is_image(shape):
        return ConvEncoder(shape, out_features, width, act, norm)
    return nn.Sequential(nn.Flatten(), MLP(math.prod(shape), out_features, hidden, act=act))


def decoder(in_features: int, shape: Sequence[int], *, width: int = 32, hidden: int = 256, act: str = "silu",
            norm: str | None = "group") -> nn.Module:
    """A conv decoder for images, an MLP for vectors: (B, in_features) -> (B, *shape)."""
    if is_image(shape):
        return ConvDecoder(in_features, shape, width, act, norm)
    return nn.Sequential(MLP(in_features, math.prod(shape), hidden, act=act), nn.Unflatten(1, tuple(shape)))


__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "activation", "encoder", "decoder", "is_image"]

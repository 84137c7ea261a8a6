"""Network blocks shared by the model families: MLPs for vectors, conv encoders/decoders
for small images. Sized from the data shape so that one constructor serves 2-D points,
8x8 digits and 32x32 patches alike.

Images are (B, C, H, W) of any H, W >= 4: the conv stacks halve (or double) the resolution
``levels`` times, while the short side stays >= 4, doubling (halving) the width each time.
An image whose sides are not multiples of 2^levels is zero-padded (centred) to the next
multiple on the way in and the decoder's output cropped back (:func:`conv_plan`), so a
power-of-two square image gives the plain DCGAN stack (4x4 at the bottom) and 28x28 a 7x7
bottom with no padding at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
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


class ConvPlan(NamedTuple):
    """How a conv stack sees an H x W image: ``levels`` stride-2 stages, the image zero-padded
    by ``pad`` = (left, right, top, bottom) to ``padded`` (multiples of 2^levels), and the
    ``bottom`` resolution (padded / 2^levels) where the flattening happens."""

    levels: int
    padded: tuple[int, int]
    bottom: tuple[int, int]
    pad: tuple[int, int, int, int]


def conv_plan(h: int, w: int) -> ConvPlan:
    """The :class:`ConvPlan` of an H x W image (H, W >= 4): halvings while the short side
    stays >= 4; padding centred (the extra pixel, if odd, after)."""
    if min(h, w) < 4:
        raise ValueError(f"conv networks need images of at least 4x4, got {h}x{w}")
    levels = int(math.log2(min(h, w) // 4))
    f = 2**levels
    pad = padding_for(h, w, f)
    hp, wp = h + pad[2] + pad[3], w + pad[0] + pad[1]
    return ConvPlan(levels, (hp, wp), (hp // f, wp // f), pad)


def padding_for(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that takes H x W to the next multiples of
    ``multiple``, centred (an odd extra pixel after): F.pad's order."""
    ph, pw = -h % multiple, -w % multiple
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def pad_to(x: Tensor, plan: ConvPlan | tuple[int, int, int, int]) -> Tensor:
    """(B, C, H, W) zero-padded by a plan's (or an explicit F.pad) padding; x itself when none."""
    pad = plan.pad if isinstance(plan, ConvPlan) else plan
    return F.pad(x, pad) if any(pad) else x


def crop_from(x: Tensor, plan: ConvPlan | tuple[int, int, int, int]) -> Tensor:
    """The inverse of :func:`pad_to`: the H x W window of a padded (B, C, H', W') output."""
    pad = plan.pad if isinstance(plan, ConvPlan) else plan
    if not any(pad):
        return x
    left, right, top, bottom = pad
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def _norm(kind: str | None, ch: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    raise ValueError(f"norm must be None, 'group' or 'batch', got {kind!r}")


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_features): zero-pad (:func:`conv_plan`), conv 3x3, then
    stride-2 convs down to the bottom resolution (width doubling), flatten, linear.
    ``norm``: None (a GAN discriminator, spectral-normed by its owner), "group" or "batch"."""

    def __init__(self, shape: Sequence[int], out_features: int, width: int = 32, act: str = "silu",
                 norm: str | None = "group") -> None:
        super().__init__()
        c, h, w = shape
        self.plan = conv_plan(h, w)
        mods: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), activation(act)]
        ch = width
        for _ in range(self.plan.levels):
            mods += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), _norm(norm, 2 * ch), activation(act)]
            ch *= 2
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(ch * math.prod(self.plan.bottom), out_features)

    def phi(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, head.in_features): the flattened features the head reads."""
        return self.features(pad_to(x, self.plan)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.phi(x))


class ConvDecoder(nn.Module):
    """(B, in_features) -> (B, C, H, W): linear to (width * 2^levels, *bottom), then
    stride-2 transposed convs up to the padded size (width halving), a 3x3 conv to C
    channels, and the crop back to H x W (:func:`conv_plan`). No output activation: the
    owner applies its likelihood's link, e.g. logits or tanh."""

    def __init__(self, in_features: int, shape: Sequence[int], width: int = 32, act: str = "silu",
                 norm: str | None = "group") -> None:
        super().__init__()
        c, h, w = shape
        self.plan = conv_plan(h, w)
        levels = self.plan.levels
        ch = width * 2**levels
        self.ch = ch
        self.head = nn.Linear(in_features, ch * math.prod(self.plan.bottom))
        mods: list[nn.Module] = [activation(act)]
        for _ in range(levels):
            mods += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), _norm(norm, ch // 2), activation(act)]
            ch //= 2
        mods.append(nn.Conv2d(ch, c, 3, padding=1))
        self.body = nn.Sequential(*mods)

    def forward(self, z: Tensor) -> Tensor:
        return crop_from(self.body(self.head(z).view(z.shape[0], self.ch, *self.plan.bottom)), self.plan)


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


__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "ConvPlan", "activation", "conv_plan", "crop_from", "decoder",
           "encoder", "is_image", "pad_to", "padding_for"]

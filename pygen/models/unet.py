"""Denoiser networks parametric in the noise level: a compact UNet for images and a residual
MLP for vectors. Both map (x (B, *shape), c_noise (B,), labels (B,) | None, cond | None) to
(B, *shape); the noise-level preconditioning lives in :class:`pygen.models.Diffusion`.

Conditioning paths (all optional, set at construction):

- noise level: a sinusoidal embedding of ``c_noise`` through a 2-layer MLP, added to every
  residual block as a GroupNorm scale and shift (adaptive GroupNorm, as in ADM / EDM);
- class labels: an embedding table with one extra row, the null label (index
  ``num_classes``) that classifier-free guidance's unconditional half uses;
- an image ``cond`` (B, cond_channels, H, W) concatenated to the input channels (the
  super-resolution stage's upsampled low-resolution image, the colorizer's grayscale);
- ``aug_level`` (B,): the noise-augmentation level of that image (cascaded diffusion), a
  second sinusoidal embedding added to the noise-level one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pygen.models.networks import crop_from, pad_to, padding_for

__all__ = ["SinusoidalEmbedding", "ResBlock", "SelfAttention", "UNet", "MLPDenoiser"]


class SinusoidalEmbedding(nn.Module):
    """(B,) real -> (B, dim): [cos(x f_k), sin(x f_k)] with f_k from 1 down to 1/max_period
    (the Transformer's / DDPM's timestep embedding; works for real-valued levels)."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        a = x.float()[:, None] * self.freqs[None]
        return torch.cat([a.cos(), a.sin()], 1)


def _group_norm(ch: int) -> nn.GroupNorm:
    # up to 32 groups of at least 4 channels, a divisor of ch
    return nn.GroupNorm(math.gcd(ch, max(1, min(32, ch // 4))), ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN with (1 + scale, shift) from the embedding, SiLU, dropout, conv;
    plus a 1x1-conv skip where the width changes. The last conv starts at zero, so each block
    starts as the identity (stable early training)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = _group_norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (torch's scaled_dot_product_attention),
    residual, output projection zero-initialised."""

    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention width {ch} must be divisible by heads={heads}")
        self.heads = heads
        self.norm, self.qkv, self.proj = _group_norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Conditioning(nn.Module):
    """The embedding every block sees: MLP(sin(c_noise)) + label embedding + aug-level embedding."""

    def __init__(self, base: int, emb_dim: int, num_classes: int | None, aug: bool) -> None:
        super().__init__()
        self.sin = SinusoidalEmbedding(base)
        self.mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.num_classes = num_classes
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)
        self.aug = nn.Sequential(SinusoidalEmbedding(base), nn.Linear(base, emb_dim)) if aug else None

    def forward(self, c_noise: Tensor, labels: Tensor | None, aug_level: Tensor | None) -> Tensor:
        emb = self.mlp(self.sin(c_noise))
        if self.label is not None:
            if labels is None:  # no labels: the null label (the unconditional model)
                labels = torch.full((c_noise.shape[0],), self.num_classes, dtype=torch.long, device=c_noise.device)
            emb = emb + self.label(labels)
        if self.aug is not None:
            lvl = torch.zeros_like(c_noise) if aug_level is None else aug_level
            emb = emb + self.aug(lvl)
        return F.silu(emb)


class UNet(nn.Module):
    """A compact UNet: (B, C, H, W) -> (B, C, H, W) at every noise level.

    ``width`` channels at full resolution, ``width * mults[i]`` at level i (each level halves
    H and W), ``blocks`` residual blocks per level (plus one on the way up for the skip),
    self-attention at the lowest resolution (and in the middle) when ``attention``. Any H, W:
    sides that are not multiples of 2^(len(mults) - 1) are zero-padded (centred) on the way in
    and the output cropped back (:func:`pygen.models.networks.padding_for`).
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int = 64,
        mults: Sequence[int] = (1, 2),
        blocks: int = 2,
        attention: bool = True,
        heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        cond_channels: int = 0,
        aug_conditioning: bool = False,
    ) -> None:
        super().__init__()
        emb_dim = 4 * width
        self.cond_channels = cond_channels
        self.embed = _Conditioning(width, emb_dim, num_classes, aug_conditioning)
        self.conv_in = nn.Conv2d(channels + cond_channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [width], width
        for i, m in enumerate(mults):
            for _ in range(blocks):
                self.down.append(ResBlock(ch, width * m, emb_dim, dropout))
                ch = width * m
                skips.append(ch)
                if attention and i == len(mults) - 1:
                    self.down.append(SelfAttention(ch, heads))
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout)] + ([SelfAttention(ch, heads)] if attention else [])
                                 + [ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), width * m, emb_dim, dropout))
                ch = width * m
                if attention and i == len(mults) - 1:
                    self.up.append(SelfAttention(ch, heads))
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out, self.conv_out = _group_norm(ch), nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.factor = 2 ** (len(mults) - 1)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, cond: Tensor | None = None,
                aug_level: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, labels, aug_level)
        if self.cond_channels:
            if cond is None:
                raise ValueError(f"this UNet needs cond= (B, {self.cond_channels}, H, W)")
            x = torch.cat([x, cond.to(x.dtype)], 1)
        pad = padding_for(x.shape[-2], x.shape[-1], self.factor)
        h = self.conv_in(pad_to(x, pad))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, SelfAttention):
                hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], 1), emb)
            else:
                h = layer(h)
        return crop_from(self.conv_out(F.silu(self.norm_out(h))), pad)


class MLPDenoiser(nn.Module):
    """A residual MLP for (B, D) vectors: in -> hidden, ``layers`` blocks
    (LayerNorm, SiLU, Linear, + embedding), -> D. Zero-initialised output."""

    def __init__(self, dim: int, *, hidden: int = 256, layers: int = 3, num_classes: int | None = None) -> None:
        super().__init__()
        self.embed = _Conditioning(64, hidden, num_classes, False)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, cond: Tensor | None = None,
                aug_level: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, labels, None)
        h = self.inp(x.flatten(1))
        for blk in self.blocks:
            h = h + blk(h + emb)
        return self.out(h).view_as(x)

"""A KL-regularised convolutional autoencoder with a spatial latent: the first stage of
latent diffusion (Rombach et al. 2022, "f = 2^levels" autoencoders).

(B, C, H, W) images <-> (B, latent_channels, H', W') latents, H' = ceil(H / 2^levels):
28x28x1 -> 7x7x4 with the defaults (a 12x smaller array for the diffusion model to denoise,
and 16x fewer positions for its convolutions). The encoder emits a diagonal Gaussian
Q(z|x) = N(mu, sigma^2) per latent element; the latent is drawn by pygen's fused
reparameterize + KL kernel (:class:`pygen.nn.GaussianReparameterize`), so the KL to N(0, I)
that keeps the latent space bounded comes out of the same pass. Any H, W: the image is
zero-padded (centred) to multiples of 2^levels and the decoder's output cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from pygen.models.networks import crop_from, pad_to, padding_for
from pygen.nn import GaussianReparameterize

__all__ = ["KLAutoencoder"]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 8), ch)


class _Res(nn.Module):
    """GN-SiLU-conv3x3, twice, plus the input (the width is kept)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class KLAutoencoder(nn.Module):
    """(B, C, H, W) <-> (B, latent_channels, ceil(H / 2^levels), ceil(W / 2^levels)).

    The first halving is a pixel unshuffle (each 2x2 block of pixels becomes 4 channels) and
    the last doubling a pixel shuffle, so no convolution runs at full resolution (where a
    28x28 image's FLOPs and the slow small-channel convolutions would be); the other levels
    are stride-2 convolutions down and conv + pixel shuffle up. ``2 * width`` channels at half
    resolution, doubling at each further level; one residual block per level.
    """

    def __init__(self, shape: Sequence[int], *, latent_channels: int = 4, levels: int = 2, width: int = 16) -> None:
        super().__init__()
        c, h, w = (int(s) for s in shape)
        if levels < 1 or min(h, w) < 2**levels:
            raise ValueError(f"levels must be >= 1 with 2^levels <= min(H, W), got levels={levels} for {h}x{w}")
        self.pad = padding_for(h, w, 2**levels)
        self.latent_shape = (latent_channels, -(-h // 2**levels), -(-w // 2**levels))
        chans = [width * 2**i for i in range(1, levels + 1)]  # at 1/2, 1/4, ... resolution
        enc: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(4 * c, chans[0], 3, padding=1), _Res(chans[0])]
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), _Res(b)]
        enc += [_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, chans[-1], 3, padding=1), _Res(chans[-1])]
        for a, b in zip(chans[:0:-1], chans[-2::-1]):
            dec += [nn.Conv2d(a, 4 * b, 3, padding=1), nn.PixelShuffle(2), _Res(b)]
        dec += [_norm(chans[0]), nn.SiLU(), nn.Conv2d(chans[0], 4 * c, 3, padding=1), nn.PixelShuffle(2)]
        self.decoder = nn.Sequential(*dec)
        self.reparameterize = GaussianReparameterize(dim=1, logvar_range=(-30.0, 20.0))

    def moments(self, x: Tensor) -> Tensor:
        """(B, 2 * latent_channels, H', W'): Q(z|x)'s mean and log-variance, concatenated."""
        return self.encoder(pad_to(x, self.pad))

    def encode(self, x: Tensor, *, sample: bool = True) -> tuple[Tensor, Tensor]:
        """(z, kl): z (B, *latent_shape) drawn from Q(z|x) (its mean when not ``sample``) and
        KL(Q(z|x) || N(0, I)) (B,) in nats."""
        z, kl = self.reparameterize(self.moments(x), deterministic=not sample)
        return z, kl

    def decode(self, z: Tensor) -> Tensor:
        """(B, *latent_shape) -> (B, C, H, W): the reconstruction (linear output)."""
        return crop_from(self.decoder(z), self.pad)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction (B, C, H, W), KL (B,)) of a sampled latent."""
        z, kl = self.encode(x)
        return self.decode(z), kl


def l1_per_example(a: Tensor, b: Tensor) -> Tensor:
    """(B,): the sum over each example's elements of |a - b|."""
    return F.l1_loss(a, b, reduction="none").flatten(1).sum(1)

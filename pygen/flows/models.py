"""Ready-made flows: RealNVP and NSF for vectors, Glow for images.

Each is a :class:`~pygen.flows.distribution.FlowDistribution` (``log_prob``, ``sample``,
``sample_and_log_prob``, ``bits_per_dim``) with a standard-normal prior; pass
``context_features`` for a conditional flow (e.g. a one-hot class), then give every call
a (B, context_features) ``context``.
"""

from __future__ import annotations

from torch import nn

from pygen.flows.base import Chain, Transform
from pygen.flows.coupling import AffineCoupling, SplineCoupling
from pygen.flows.distribution import FlowDistribution, StandardNormal
from pygen.flows.image import MultiScale
from pygen.flows.linear import InvConv1x1
from pygen.flows.masks import channel_mask
from pygen.flows.normalization import ActNorm

__all__ = ["RealNVP", "NSF", "Glow"]


def _check_features(features: int, n_layers: int) -> None:
    if not isinstance(features, int) or features < 2:
        raise ValueError(f"features must be an int >= 2 (a coupling splits them in two), got {features!r}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")


class RealNVP(FlowDistribution):
    """RealNVP for (B, features) vectors.

    ``n_layers`` x ([ActNorm], AffineCoupling) with channel masks alternating between the
    two halves of the features, MLP conditioners (``hidden`` units) and soft-clamped
    log-scales (``soft_clamp``; None disables the clamp).
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        n_layers: int = 4,
        *,
        context_features: int | None = None,
        actnorm: bool = True,
        soft_clamp: float | None = 3.0,
    ) -> None:
        _check_features(features, n_layers)
        layers: list[Transform] = []
        for i in range(n_layers):
            if actnorm:
                layers.append(ActNorm(features))
            mask = channel_mask(features, i % 2)
            layers.append(AffineCoupling(mask, hidden=hidden, context_features=context_features, soft_clamp=soft_clamp))
        super().__init__(Chain(layers), StandardNormal(features))


class NSF(FlowDistribution):
    """Neural Spline FlowDistribution (coupling, rational-quadratic splines) for (B, features) vectors.

    ``n_layers`` x ([ActNorm], [LU linear], SplineCoupling): the LU-parameterised linear
    layer (:class:`InvConv1x1` on vectors) mixes the features between couplings, and the
    masks alternate between the two halves. Splines have ``n_bins`` bins on
    [-tail_bound, tail_bound] and are the identity outside, so standardise the data
    (or keep ``actnorm=True``) to have most of it inside.
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        n_layers: int = 4,
        n_bins: int = 8,
        tail_bound: float = 3.0,
        *,
        context_features: int | None = None,
        actnorm: bool = False,
        lu_linear: bool = True,
    ) -> None:
        _check_features(features, n_layers)
        layers: list[Transform] = []
        for i in range(n_layers):
            if actnorm:
                layers.append(ActNorm(features))
            if lu_linear:
                layers.append(InvConv1x1(features))
            layers.append(
                SplineCoupling(
                    channel_mask(features, i % 2),
                    n_bins=n_bins,
                    tail_bound=tail_bound,
                    hidden=hidden,
                    context_features=context_features,
                )
            )
        super().__init__(Chain(layers), StandardNormal(features))


class Glow(FlowDistribution):
    """Multi-scale Glow for (B, in_channels, H, W) images.

    ``levels`` scales; at each: squeeze (C -> 4C channels, H, W halved), then ``depth``
    steps of (ActNorm, InvConv1x1, AffineCoupling with a :class:`ConvNet` conditioner of
    ``hidden`` channels and soft-clamped log-scale), then, except at the last level, half of
    the channels go to the prior and the other half continue (:class:`MultiScale`). z has
    x's shape. H and W must be divisible by 2**levels. ``context_features`` conditions
    every coupling on a vector (broadcast over H x W as extra conditioner channels).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | tuple[int, int],
        levels: int = 2,
        depth: int = 4,
        hidden: int = 64,
        *,
        context_features: int | None = None,
        soft_clamp: float | None = 2.0,
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if not isinstance(levels, int) or levels < 1 or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"levels and depth must be positive ints, got levels={levels!r}, depth={depth!r}")
        if height % 2**levels or width % 2**levels:
            raise ValueError(f"image_size {(height, width)} must be divisible by 2**levels = {2**levels}")

        def level(channels: int, i: int) -> MultiScale:
            c = 4 * channels
            steps: list[nn.Module] = []
            for j in range(depth):
                steps += [
                    ActNorm(c),
                    InvConv1x1(c),
                    AffineCoupling(
                        channel_mask(c, j % 2, image=True),
                        hidden=hidden,
                        context_features=context_features,
                        soft_clamp=soft_clamp,
                    ),
                ]
            inner = level(c // 2, i + 1) if i + 1 < levels else None
            return MultiScale(Chain(steps), inner)

        super().__init__(level(in_channels, 0), StandardNormal(in_channels, height, width))

"""Default conditioner networks of the couplings: an MLP for vectors, a small CNN for images.

Both take ``(h, context=None)``: ``h`` is the pass-through part of the coupling's input,
``context`` an optional (B, context_features) vector (concatenated to the input; for
images broadcast over H x W as extra channels). The last layer starts at zero, so a
fresh coupling is the identity map (a standard trick for stable flow training).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConvNet"]


def _check_context(context: Tensor | None, features: int | None, batch: int, who: str) -> None:
    if features is None:
        if context is not None:
            raise ValueError(f"{who} was built without context_features but got a context")
        return
    if context is None:
        raise ValueError(f"{who} was built with context_features={features}: pass a (B, {features}) context")
    if context.dim() != 2 or context.shape != (batch, features):
        raise ValueError(
            f"{who} expects context of shape (B, {features}) = ({batch}, {features}); got {tuple(context.shape)}"
        )


class MLP(nn.Module):
    """(B, in_features) [+ (B, context_features)] -> (B, out_features).

    ``depth`` hidden layers of width ``hidden`` with ReLU; the output layer is zero-initialised.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        *,
        depth: int = 2,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_features, self.context_features = in_features, context_features
        layers: list[nn.Module] = []
        width = in_features + (context_features or 0)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        _check_context(context, self.context_features, h.shape[0], "MLP conditioner")
        if context is not None:
            h = torch.cat([h, context.to(h.dtype)], dim=1)
        return self.net(h)


class ConvNet(nn.Module):
    """(B, in_channels, H, W) [+ context] -> (B, out_channels, H, W).

    Glow's coupling network: conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> conv 3x3 (zero-init),
    ``hidden`` channels, padding keeps H x W.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        *,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.context_features = in_channels, context_features
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + (context_features or 0), hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            last,
        )

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        _check_context(context, self.context_features, h.shape[0], "ConvNet conditioner")
        if context is not None:
            b, _, height, width = h.shape
            c = context.to(h.dtype).view(b, -1, 1, 1).expand(b, context.shape[1], height, width)
            h = torch.cat([h, c], dim=1)
        return self.net(h)

"""The invertible-transform interface of :mod:`pygen.flows` and its composition.

Direction convention (every transform in this package):

- ``forward(x, context=None) -> (z, logdet)`` maps **data to latent**; ``logdet`` (B,) is
  ``log|det dz/dx|`` per sample. Density evaluation uses it:
  ``log p(x) = log N(z) + logdet``.
- ``inverse(z, context=None) -> (x, logdet)`` maps **latent to data** (sampling);
  ``logdet`` (B,) is ``log|det dx/dz|``, so ``forward`` and ``inverse`` log-dets of a
  round trip sum to 0.

Transforms are shape-preserving (``z`` has the shape of ``x``, (B, D) for vectors or
(B, C, H, W) for images), except :class:`~pygen.flows.image.Squeeze`, which reshapes.
``context`` is an optional (B, context_features) tensor that conditional transforms (couplings built with ``context_features``) feed to their
conditioner; the others ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["Transform", "Chain", "check_event_shape", "check_channels"]


class Transform(nn.Module):
    """Base class: an invertible map with tractable log-determinant (see the module docstring)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, ...) -> (z of x's shape, logdet (B,) = log|det dz/dx|)."""
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z (B, ...) -> (x of z's shape, logdet (B,) = log|det dx/dz|)."""
        raise NotImplementedError


class Chain(Transform):
    """Transforms applied in order by ``forward`` and in reverse order by ``inverse``; log-dets add.

    ``Chain(a, b, c).forward(x)`` is ``c(b(a(x)))``.
    """

    def __init__(self, *transforms: Transform | Iterable[Transform]) -> None:
        super().__init__()
        if len(transforms) == 1 and not isinstance(transforms[0], nn.Module):
            transforms = tuple(transforms[0])
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"Chain takes Transform modules; item {i} is {type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, logdet = t(x, context)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, logdet = t.inverse(z, context)
            total = total + logdet
        return z, total


def check_event_shape(x: Tensor, expected: tuple[int | None, ...], name: str = "x", what: str = "") -> None:
    """Raise a ValueError unless x is (B, *expected); a None entry matches any size.

    ``what`` names the layer in the message, e.g. ``"ActNorm(4)"``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(expected) + 1 and all(e is None or e == s for e, s in zip(expected, x.shape[1:]))
    if not ok:
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        where = f"{what} expects" if what else "expected"
        raise ValueError(f"{where} {name} of shape (B, {shown}); got {tuple(x.shape)}")


def check_channels(x: Tensor, channels: int, name: str, what: str) -> None:
    """Raise a ValueError unless x is (B, channels) or (B, channels, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 4) or x.shape[1] != channels:
        raise ValueError(
            f"{what} expects {name} of shape (B, {channels}) or (B, {channels}, H, W); got {tuple(x.shape)}"
        )

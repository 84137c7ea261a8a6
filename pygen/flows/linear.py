"""Channel-mixing linear transforms: the LU-parameterised invertible 1x1 convolution and
fixed permutations. Both act on dim 1 of (B, C) vectors or (B, C, H, W) images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pygen.flows.base import Transform, check_channels

__all__ = ["InvConv1x1", "Permutation"]


def _mix(x: Tensor, w: Tensor) -> Tensor:
    """Apply the (C, C) matrix w to the channels of x: (B, C) or (B, C, H, W)."""
    if x.dim() == 2:
        return x @ w.T
    return F.conv2d(x, w.view(*w.shape, 1, 1))


class InvConv1x1(Transform):
    """Glow's invertible 1x1 convolution, W = P L (U + diag(sign * exp(log_s))).

    P is a fixed permutation (buffer), L unit lower-triangular, U strictly upper-triangular
    and log_s the log|diagonal| (parameters); sign is a fixed buffer. log|det W| is then
    sum(log_s) with no determinant to compute, and the inverse uses two triangular solves.
    Initialised from a random rotation (torch's global generator, or ``generator``).

    For (B, C) input this is the "LU linear" layer of NSF; for (B, C, H, W) a 1x1 conv.
    logdet (B,) = H * W * sum(log_s).
    """

    def __init__(self, channels: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        q = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_s))
        return lower, upper

    def weight(self) -> Tensor:
        """W, (C, C)."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """W^-1 = U^-1 L^-1 P^T, (C, C), by triangular solves (no general inverse)."""
        lower, upper = self._factors()
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return u_inv @ l_inv @ self.perm.T

    def _logdet(self, x: Tensor) -> Tensor:
        return (math.prod(x.shape[2:]) * self.log_s.sum()).to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.channels, "x", f"InvConv1x1({self.channels})")
        return _mix(x, self.weight()), self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.channels, "z", f"InvConv1x1({self.channels})")
        return _mix(z, self.inverse_weight()), -self._logdet(z)

    def extra_repr(self) -> str:
        return str(self.channels)


class Permutation(Transform):
    """A fixed permutation of dim 1: z[:, i] = x[:, perm[i]]; logdet 0.

    Build with a permutation tensor, or ``Permutation.reverse(C)`` / ``Permutation.random(C)``.
    The permutation is a buffer (saved in state_dict, so a random one survives reloading).
    """

    def __init__(self, perm: Tensor) -> None:
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.int64)
        n = perm.numel()
        if perm.dim() != 1 or n < 1 or not torch.equal(torch.sort(perm).values, torch.arange(n)):
            raise ValueError(f"perm must be a permutation of 0..C-1, got {perm.tolist()}")
        self.channels = n
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    @classmethod
    def reverse(cls, channels: int) -> Permutation:
        return cls(torch.arange(channels - 1, -1, -1))

    @classmethod
    def random(cls, channels: int, *, generator: torch.Generator | None = None) -> Permutation:
        return cls(torch.randperm(channels, generator=generator))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.channels, "x", f"Permutation({self.channels})")
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.channels, "z", f"Permutation({self.channels})")
        return z.index_select(1, self.inverse_perm), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return str(self.channels)

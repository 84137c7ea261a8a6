"""ActNorm (Glow): a per-channel affine map with data-dependent initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pygen.flows.base import Transform, check_channels

__all__ = ["ActNorm"]


class ActNorm(Transform):
    """z = (x + bias) * exp(log_scale), per channel (dim 1).

    On the first ``forward`` (while the ``initialized`` buffer is False) bias and
    log_scale are set from that batch so that z has zero mean and unit variance per
    channel (statistics over the batch and spatial dims). A channel whose std is <= eps
    (e.g. constant in the first batch) keeps scale 1 instead of 1/std: dividing by a
    floored std would blow up every later, non-constant value of that channel. The flag
    is a buffer, so it is saved in ``state_dict`` and a loaded model is not re-initialised.
    ``inverse`` never initialises (before any forward it is the identity).

    Shapes: x (B, C) or (B, C, H, W); logdet (B,) = H * W * sum(log_scale).
    """

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels, self.eps = channels, eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # host-side copy of the flag: no device sync per call

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and log_scale from the per-channel mean and std of x."""
        self._check(x, "x")
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(torch.where(std > self.eps, -torch.log(std), torch.zeros_like(std)))
        self.initialized.fill_(True)

    def _check(self, x: Tensor, name: str) -> None:
        check_channels(x, self.channels, name, f"ActNorm({self.channels})")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # re-read the loaded flag on the next forward

    def _logdet(self, x: Tensor) -> Tensor:
        spatial = math.prod(x.shape[2:])
        return (spatial * self.log_scale.sum()).to(x.dtype).expand(x.shape[0])

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(1, self.channels, *([1] * (x.dim() - 2)))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        if not self._known_initialized:
            if not bool(self.initialized):
                self.initialize(x)
            self._known_initialized = True
        z = (x + self._view(self.bias, x)) * self._view(self.log_scale.exp(), x)
        return z, self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z")
        x = z * self._view(torch.exp(-self.log_scale), z) - self._view(self.bias, z)
        return x, -self._logdet(z)

    def extra_repr(self) -> str:
        return f"{self.channels}, initialized={bool(self.initialized)}"

"""Preconditioning of a diffusion network (how the network's input, output and noise level are
scaled), as wrappers around any network ``net(x, c_noise, *cond) -> F``:

- :class:`EDM` (Karras et al. 2022): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with x
  the sigma-space sample, c_in = 1 / sqrt(sigma^2 + sd^2), c_skip = sd^2 / (sigma^2 + sd^2),
  c_out = sigma sd / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (times 100 for a
  sinusoidal embedding), sd = ``sigma_data``. D predicts x0; the loss weight lambda(sigma) =
  1 / c_out^2 makes the x0-space MSE |F - F_target|^2 (unit-variance targets at every level).
- :class:`VP` (DDPM / diffusers practice): F(x_t; t) predicts ``prediction_type`` (epsilon,
  v or x0) of the alpha-space sample from the (fractional) training timestep of sigma.

Both are parameter-free modules called as ``precond(net, x_t, sigma, *cond)`` with alpha-space x_t (B, ...) and
levels sigma (B,), and say what they return (``output_type``), which the sampler steps are told.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pygen.diffusion.schedules import sigma_to_t

__all__ = ["EDM", "VP"]


class EDM(nn.Module):
    """Karras et al.'s preconditioning (module docstring); returns x0. No parameters."""

    name = "edm"
    output_type = "sample"

    def __init__(self, sigma_data: float) -> None:
        super().__init__()
        self.sigma_data = float(sigma_data)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """25 ln(sigma): EDM's ln(sigma) / 4, scaled for the sinusoidal embedding."""
        return 25.0 * sigma.double().log().float()

    def forward(self, net: nn.Module, x_t: Tensor, sigma: Tensor, *cond: Any) -> Tensor:
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x_t.dim() - 1)))
        sd2 = self.sigma_data**2
        x = x_t * (s * s + 1).sqrt().to(x_t.dtype)  # the sigma-space sample x0 + sigma eps
        c_in = (1 / (s * s + sd2).sqrt()).to(x_t.dtype)
        c_skip = (sd2 / (s * s + sd2)).to(x_t.dtype)
        c_out = (s * self.sigma_data / (s * s + sd2).sqrt()).to(x_t.dtype)
        return c_skip * x + c_out * net(c_in * x, self.c_noise(sigma), *cond)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma^2 sd^2), float32."""
        s2 = sigma.double() ** 2
        return ((s2 + self.sigma_data**2) / (s2 * self.sigma_data**2)).float()


class VP(nn.Module):
    """The network predicts ``prediction_type`` from the training timestep of sigma. No
    parameters; the training levels are a buffer derived from the config (not saved)."""

    name = "vp"

    def __init__(self, prediction_type: str, train_sigmas: Tensor) -> None:
        super().__init__()
        self.output_type = prediction_type
        self.register_buffer("train_sigmas", train_sigmas, persistent=False)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The fractional training timestep of sigma."""
        return sigma_to_t(sigma, self.train_sigmas).float()

    def forward(self, net: nn.Module, x_t: Tensor, sigma: Tensor, *cond: Any) -> Tensor:
        return net(x_t, self.c_noise(sigma), *cond)

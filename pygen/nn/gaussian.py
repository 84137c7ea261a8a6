"""The sampling layer of a VAE encoder: z ~ Q(z|X) and KL(Q(z|X) || N(0, I)) in one pass."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pygen.ops.gaussian import gaussian_kl, reparameterize_kl


class GaussianSample(NamedTuple):
    z: Tensor  # (B, ...) reparameterized sample
    kl: Tensor  # (B,) KL to the standard normal, summed over non-batch dims


class GaussianReparameterize(nn.Module):
    """Turn encoder outputs into ``(z, kl)``.

    Call with ``(mu, logvar)``, or with one tensor ``h`` that holds both, split in two
    equal halves along ``dim`` (``mu`` first), as a VAE encoder usually emits them:
    ``h`` of shape (B, 2D) gives z of shape (B, D); (B, 2C, H, W) with dim=1 gives
    (B, C, H, W).

    Args:
        dim: the dimension to split a single input along (default 1).
        logvar_range: optional (low, high) clamp of logvar before sampling, a common guard
            against exp overflow early in training (gradients stop outside the range).
        backend: the pygen backend (default: ``"auto"``, or the ``use_backend`` setting).

    With ``deterministic=True`` in ``forward`` (or in eval mode when the module was built
    with ``sample_in_eval=False``), z is mu itself: the posterior mean.
    """

    def __init__(
        self,
        dim: int = 1,
        *,
        logvar_range: tuple[float, float] | None = None,
        sample_in_eval: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.logvar_range = logvar_range
        self.sample_in_eval = sample_in_eval
        self.backend = backend

    def forward(
        self,
        mu_or_params: Tensor,
        logvar: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        deterministic: bool | None = None,
    ) -> GaussianSample:
        if logvar is None:
            h = mu_or_params
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"expected a tensor holding (mu, logvar), got {type(h).__name__}")
            if h.dim() == 0 or h.shape[self.dim] % 2:
                raise ValueError(
                    f"a single input is split in two halves along dim {self.dim}: that dim must have "
                    f"even size, got shape {tuple(h.shape)}"
                )
            mu, logvar = h.chunk(2, dim=self.dim)
        else:
            mu = mu_or_params
        if self.logvar_range is not None:
            logvar = logvar.clamp(*self.logvar_range)
        if deterministic is None:
            deterministic = not self.training and not self.sample_in_eval
        if deterministic:
            return GaussianSample(mu, gaussian_kl(mu, logvar, backend=self.backend))
        z, kl = reparameterize_kl(mu, logvar, generator=generator, backend=self.backend)
        return GaussianSample(z, kl)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, logvar_range={self.logvar_range}, backend={self.backend!r}"

"""Flow distributions: a standard-normal prior, and a transform + prior as one distribution.

Conventions (see :mod:`pygen.flows.base`): the transform's ``forward`` maps data x to
latent z, so ``log p(x) = log N(z; 0, I) + log|det dz/dx|``; sampling runs ``inverse``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pygen.ops import randn
from pygen.flows.base import Transform, check_event_shape

__all__ = ["StandardNormal", "FlowDistribution", "dequantize"]

_LOG_2PI = math.log(2 * math.pi)


class StandardNormal(nn.Module):
    """N(0, I) over events of ``shape`` (e.g. (D,) or (C, H, W)).

    Samples come from pygen's fused Philox RNG (:func:`pygen.ops.randn`), honouring
    ``generator=`` and ``seed=``. dtype and device follow the module (``.to()``, ``.double()``).
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"StandardNormal needs a non-empty event shape of positive ints, got {shape!r}")
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        # carries dtype and device through .to() / .double(); not saved
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """z (B, *shape) -> (B,) log-density."""
        check_event_shape(z, self.shape, "z", "StandardNormal")
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * (sq + self.dim * _LOG_2PI)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, seed: int | Tensor | None = None
    ) -> Tensor:
        """(n, *shape) standard-normal draws."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        a = self._anchor
        return randn(n, *self.shape, generator=generator, seed=seed, device=a.device, dtype=a.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def dequantize(x: Tensor, n_bins: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of quantised data in [0, 1].

    x holds levels k / (n_bins - 1), k = 0..n_bins-1 (e.g. 8-bit images scaled by 1/255:
    n_bins = 256). Returns y = (k + u) / n_bins with u ~ U[0, 1) elementwise, so y lies in
    [0, 1) and bin k is the interval [k / n_bins, (k + 1) / n_bins).
    """
    if not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    if x.numel() and not torch.compiler.is_compiling():  # a data-dependent check: eager only
        lo, hi = (float(v) for v in torch.aminmax(x))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"dequantize expects x in [0, 1] (levels k / {n_bins - 1}); got values in [{lo}, {hi}]")
    k = torch.round(x * (n_bins - 1))
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (k + u) / n_bins


class FlowDistribution(nn.Module):
    """A normalizing flow: ``transform`` (data -> latent) and a ``base`` distribution over z.

    Methods (x and z have shape (B, *base.shape); ``context`` is an optional
    (B, context_features) tensor for conditional transforms):

    - ``log_prob(x, context)`` -> (B,): log N(z) + log|det dz/dx|, z = transform(x).
      ``flow(x)`` is the same.
    - ``sample(n, context, generator=, seed=)`` -> (n, *shape): x = transform.inverse(z).
    - ``sample_and_log_prob(n, ...)`` -> (x, log p(x)) in one inverse pass:
      log p(x) = log N(z) - log|det dx/dz|.
    - ``bits_per_dim(x, n_bins, context, generator=)`` -> (B,), for quantised data, see there.

    For sampling, ``context`` may be (context_features,) or (1, context_features), used for
    every sample, or (n, context_features).
    """

    def __init__(self, transform: Transform, base: StandardNormal) -> None:
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a pygen.flows Transform, got {type(transform).__name__}")
        self.transform = transform
        self.base = base

    @property
    def shape(self) -> tuple[int, ...]:
        """The event shape: x is (B, *shape)."""
        return self.base.shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.log_prob(x, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, *shape) -> (B,) log-density."""
        check_event_shape(x, self.shape, "x", type(self).__name__)
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z) + logdet

    def _sample_context(self, n: int, context: Tensor | None) -> Tensor | None:
        if context is None:
            return None
        if context.dim() == 1:
            context = context.unsqueeze(0)
        if context.dim() != 2 or context.shape[0] not in (1, n):
            raise ValueError(
                f"context for n={n} samples must be (F,), (1, F) or ({n}, F); got {tuple(context.shape)}"
            )
        return context.expand(n, -1)

    def sample(
        self,
        n: int,
        context: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | Tensor | None = None,
    ) -> Tensor:
        """(n, *shape) samples."""
        z = self.base.sample(n, generator=generator, seed=seed)
        x, _ = self.transform.inverse(z, self._sample_context(n, context))
        return x

    def sample_and_log_prob(
        self,
        n: int,
        context: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x (n, *shape), log p(x) (n,)) from one pass through the inverse."""
        z = self.base.sample(n, generator=generator, seed=seed)
        x, logdet = self.transform.inverse(z, self._sample_context(n, context))
        return x, self.base.log_prob(z) - logdet

    def bits_per_dim(
        self,
        x: Tensor,
        n_bins: int = 256,
        context: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Bits per dimension of quantised data x in [0, 1] (levels k / (n_bins - 1)), (B,).

        The flow models y = :func:`dequantize` (x) = (k + u) / n_bins, a density on [0, 1)^D;
        the probability of bin k is the integral of p over a cube of volume n_bins^-D, so
        (Jensen) log P(k) >= E_u[log p(y)] - D log(n_bins). With one draw of u this returns

            bits/dim = -(log p(y) - D * log(n_bins)) / (D * log 2),

        an unbiased estimate of an upper bound on -log2 P(k) / D (D = prod(shape)).
        Train on the same dequantised y (this is a valid training loss, its mean over a batch).
        """
        d = math.prod(self.shape)
        y = dequantize(x, n_bins, generator=generator)
        lp = self.log_prob(y, context)
        return -(lp - d * math.log(n_bins)) / (d * math.log(2))

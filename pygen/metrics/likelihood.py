"""Log-likelihood helpers: stable means of likelihoods, bits per dimension, batched evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["logmeanexp", "bits_per_dim", "dataset_log_likelihood"]


def logmeanexp(x: Tensor, dim: int) -> Tensor:
    """log(mean(exp(x), dim)) without overflow: logsumexp(x, dim) - log(x.shape[dim]).

    E.g. the IWAE bound from k importance log-weights (B, k): ``logmeanexp(logw, 1)`` (B,).
    """
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def bits_per_dim(nll_nats: Tensor | float, num_dims: int, *, bins: int = 256) -> Tensor | float:
    """Negative log-likelihood per example in nats -> bits per dimension (lower is better).

    Convention (pygen.flows.dequantize's): data quantised to ``bins`` levels k / (bins - 1)
    in [0, 1] is dequantised to y = (k + u) / bins, and ``nll_nats`` = -log p(y) of a density
    on [0, 1]^D. A bin has volume bins^-D, so the discrete NLL (an upper bound, by Jensen) in
    bits per dimension is

        bpd = (nll + D log(bins)) / (D log 2),     D = num_dims.

    Works elementwise on tensors and on floats.
    """
    if not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    return (nll_nats + num_dims * math.log(bins)) / (num_dims * math.log(2))


@torch.no_grad()
def dataset_log_likelihood(
    fn: Callable[..., Tensor], data: Tensor, batch_size: int = 256, *, indexed: bool = False
) -> tuple[float, float]:
    """Mean log-likelihood of ``data`` (N, ...) under ``fn`` (B, ...) -> (B,), and its standard error.

    Higher is better. Evaluated in batches of ``batch_size`` (no gradients), accumulated in
    float64; the standard error is std / sqrt(N) (0 for N = 1). Non-finite values propagate
    (a model giving -inf somewhere has mean -inf). ``indexed``: ``fn(batch, start)`` gets the
    index of the batch's first example too (per-example labels or noise).
    """
    n = data.shape[0]
    if n == 0:
        raise ValueError("dataset_log_likelihood needs at least one example")
    parts = []
    for i in range(0, n, batch_size):
        batch = data[i : i + batch_size]
        lp, b = (fn(batch, i) if indexed else fn(batch)), min(batch_size, n - i)
        if lp.shape != (b,):
            raise ValueError(f"fn must return (B,) log-likelihoods, got shape {tuple(lp.shape)} for a batch of {b}")
        parts.append(lp.detach().to(torch.float64).cpu())
    lp = torch.cat(parts)
    mean = float(lp.mean())
    se = float(lp.std() / math.sqrt(n)) if n > 1 else 0.0
    return mean, se

"""The baselines pygen is compared with: what users write without pygen.

``eager_*`` is the usual chain of torch ops (eps from ``torch.randn_like``, then the
elementwise formula, then a per-sample sum); ``compiled(op)`` is ``torch.compile`` of the
very same function. This module is the one place where the chain is written out; the
benchmarks import it (and pygen's references, ``pygen.ops.*_ref``, for sanity checks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["EAGER", "eager_reparameterize", "eager_gaussian_kl", "eager_reparameterize_kl", "compiled"]


def eager_reparameterize_kl(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """z = mu + exp(logvar / 2) * eps and KL(N(mu, e^logvar) || N(0, I)) per sample, as users write it."""
    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (torch.exp(logvar) + mu * mu - 1 - logvar).flatten(1).sum(1)
    return z, kl


def eager_reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """The sampling half of :func:`eager_reparameterize_kl` alone."""
    eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * eps


def eager_gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """The KL half of :func:`eager_reparameterize_kl` alone, shape (B,)."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1 - logvar).flatten(1).sum(1)


EAGER: dict[str, Callable] = {
    "reparameterize": eager_reparameterize,
    "gaussian_kl": eager_gaussian_kl,
    "reparameterize_kl": eager_reparameterize_kl,
}

_COMPILED: dict[tuple[str, bool | None], Callable] = {}


def _raise_recompile_limit(limit: int = 64) -> None:
    # One code object is compiled per (shape, dtype, grad mode); the benchmarks use more
    # than Dynamo's default limit of 8 per function, after which Dynamo falls back to eager.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def compiled(op: str, *, dynamic: bool | None = False) -> Callable:
    """``torch.compile`` of ``EAGER[op]`` (static shapes by default: the best case for compile).

    Cached per (op, dynamic) so each process compiles a given shape/dtype/grad-mode once.
    """
    key = (op, dynamic)
    if key not in _COMPILED:
        _raise_recompile_limit()
        _COMPILED[key] = torch.compile(EAGER[op], dynamic=dynamic)
    return _COMPILED[key]

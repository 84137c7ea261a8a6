"""The baselines pygen is compared with: what users write without pygen.

``EAGER[op]`` is the usual chain of torch ops; ``compiled(op)`` is ``torch.compile`` of the
very same function.

- Gaussian ops: eps from ``torch.randn_like``, then the elementwise formula, then a
  per-sample sum, written out below (this module is the one place where that chain is
  written; pygen's ``gaussian_kl_ref`` is used only for sanity checks).
- Coupling ops: pygen's references *are* that chain, so they are the baselines:
  ``affine_coupling_ref`` is ``s = log_scale; y = x * exp(s) + shift`` (inverse
  ``(x - shift) * exp(-s)``) and ``logdet = s.flatten(1).sum(1)``; ``rq_spline_ref`` is the
  nflows-style chain (softmax, cumsum, pad, searchsorted, gather, the rational-quadratic
  formula, log). They are imported, never copied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

import pygen

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
    # (x, shift, log_scale, *, inverse) -> (y, logdet) and (x, widths, heights, derivatives,
    # *, inverse) -> (y, logdet), computed in float32 (float64 for float64 inputs)
    "affine_coupling": pygen.ops.affine_coupling_ref,
    "rq_spline": pygen.ops.rq_spline_ref,
}

_COMPILED: dict[tuple, Callable] = {}


def _raise_recompile_limit(limit: int = 64) -> None:
    # One code object is compiled per (shape, dtype, grad mode); the benchmarks use more
    # than Dynamo's default limit of 8 per function, after which Dynamo falls back to eager.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def compiled(op: str, *, dynamic: bool | None = False, **options) -> Callable:
    """``torch.compile`` of ``EAGER[op]`` (static shapes by default: the best case for compile).

    ``options`` are keyword arguments of the op bound before compiling (``inverse=True``).
    Cached per (op, dynamic, options) so each process compiles a given shape/dtype/grad-mode
    once.
    """
    key = (op, dynamic, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _raise_recompile_limit()
        fn = functools.partial(EAGER[op], **options) if options else EAGER[op]
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[key]

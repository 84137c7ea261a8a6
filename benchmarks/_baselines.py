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
- Diffusion ops: the unfused chain a sampler loop runs per step with every sample at its
  own timestep: gather the step's coefficients from the schedule table on the device with
  the per-sample (B,) indices, draw the noise with ``torch.randn_like`` (stochastic steps),
  then pygen's pure-torch reference step (``pygen.ops.diffusion.*_step_ref``, imported,
  not copied). The training loss is ``eps = torch.randn_like(x0)``, ``q_sample_ref`` and the
  per-sample MSE of model_output against eps, written out below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

import pygen

from pygen.ops.diffusion import (
    ddim_step_ref,
    ddpm_step_ref,
    dpmpp_2m_step_ref,
    euler_ancestral_step_ref,
    gather,
)

__all__ = ["EAGER", "eager_reparameterize", "eager_gaussian_kl", "eager_reparameterize_kl", "eager_ddim_step",
           "eager_ddpm_step", "eager_diffusion_loss", "eager_euler_ancestral_step", "eager_dpmpp_2m_step",
           "compiled"]


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


def _alpha_coefficients(t: Tensor, prev_t: Tensor, alphas_cumprod: Tensor, ndim: int,
                        final_alpha_cumprod: float = 1.0) -> tuple[Tensor, Tensor]:
    """abar_t and abar_prev per sample, (B, 1, ...): prev_t = -1 is the final step."""
    ab = gather(alphas_cumprod, t, ndim)
    ab_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha_cumprod)
    return ab, ab_prev.reshape(ab.shape)


def eager_ddim_step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor, alphas_cumprod: Tensor,
                    *, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """DDIM step, per-sample t / prev_t (B,): gathered coefficients, torch.randn_like noise when eta > 0."""
    ab, ab_prev = _alpha_coefficients(t, prev_t, alphas_cumprod, sample.dim())
    noise = torch.randn_like(sample) if eta > 0 else None
    return ddim_step_ref(model_output, sample, ab, ab_prev, noise, eta=eta)


def eager_ddpm_step(model_output: Tensor, sample: Tensor, t: Tensor, prev_t: Tensor,
                    alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """DDPM step (fixed_small), per-sample t: torch.randn_like noise, none where t == 0."""
    ab, ab_prev = _alpha_coefficients(t, prev_t, alphas_cumprod, sample.dim())
    noise = torch.randn_like(sample) * (t > 0).to(sample.dtype).reshape(ab.shape)
    return ddpm_step_ref(model_output, sample, ab, ab_prev, noise, variance_type="fixed_small")


def eager_diffusion_loss(model_output: Tensor, x0: Tensor, t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, per-sample loss): eps = randn, x_t = q_sample_ref, loss = mean((model_output - eps)^2) per sample."""
    eps = torch.randn_like(x0)
    x_t = pygen.ops.q_sample_ref(x0, t, alphas_cumprod, eps)
    loss = (model_output - eps).pow(2).flatten(1).mean(1)
    return x_t, loss


def eager_euler_ancestral_step(model_output: Tensor, sample: Tensor, index: Tensor,
                               sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Euler-ancestral step, per-sample index (B,): sigma, sigma_next gathered, torch.randn_like noise."""
    nd = sample.dim()
    noise = torch.randn_like(sample)
    return euler_ancestral_step_ref(model_output, sample, gather(sigmas, index, nd), gather(sigmas, index + 1, nd),
                                    noise)


def eager_dpmpp_2m_step(model_output: Tensor, sample: Tensor, index: Tensor, sigmas: Tensor,
                        prev_x0: Tensor) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) second-order step, per-sample index: sigma, sigma_next, sigma_prev gathered."""
    nd = sample.dim()
    return dpmpp_2m_step_ref(model_output, sample, gather(sigmas, index, nd), gather(sigmas, index + 1, nd),
                             prev_x0, gather(sigmas, index - 1, nd))


EAGER: dict[str, Callable] = {
    "reparameterize": eager_reparameterize,
    "gaussian_kl": eager_gaussian_kl,
    "reparameterize_kl": eager_reparameterize_kl,
    # (x, shift, log_scale, *, inverse) -> (y, logdet) and (x, widths, heights, derivatives,
    # *, inverse) -> (y, logdet), computed in float32 (float64 for float64 inputs)
    "affine_coupling": pygen.ops.affine_coupling_ref,
    "rq_spline": pygen.ops.rq_spline_ref,
    # diffusion: (inputs of _common.make_inputs) -> (prev_sample, pred_original_sample) / (x_t, loss)
    "ddim_step": eager_ddim_step,
    "ddim_step_prev": lambda *inputs: eager_ddim_step(*inputs)[:1],  # the chain computes x0 on the way
    "ddim_step_eta1": functools.partial(eager_ddim_step, eta=1.0),
    "ddpm_step": eager_ddpm_step,
    "diffusion_loss": eager_diffusion_loss,
    "euler_ancestral_step": eager_euler_ancestral_step,
    "dpmpp_2m_step": eager_dpmpp_2m_step,
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

"""Measurements of the four classic VAE problems (the remedies are switches of :class:`pygen.models.VAE`).

1. reconstruction vs KL balance: :func:`elbo_terms` (reconstruction NLL, KL, MSE, reported apart);
2. variable collapse: :func:`active_units` (Burda et al. 2016: latent u is active when
   Var_x(E_q[z_u | x]) > 0.01), :func:`kl_per_dim` (the KL of each latent dimension, accurate
   near zero: the fused :func:`pygen.ops.gaussian_kl` per element);
3. aggregate posterior Q(z) vs prior P(z): :func:`aggregate_posterior_mismatch` (Fréchet
   distance between encoded latents and N(0, I) draws; closed-form KL between a Gaussian
   fitted to Q(z) and the prior) and :func:`aggregate_posterior_samples` (decodes of
   z ~ Q(z), to compare their sample quality with that of prior samples);
4. blurriness: :func:`variance_loss` (Asperti 2020: mean per-image pixel variance of real
   images minus that of generated ones).

``model`` is anything with the VAE's ``encode(x[, labels]) -> (mu, logvar)`` (and
``decode``, ``loss`` where stated); ``data`` is x (N, ...), (x, labels) or an object with
``.data`` / ``.labels`` (:func:`pygen.data.load`'s). Everything runs in eval mode without
gradients and restores the model's mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pygen.data.loader import as_tensors
from pygen.metrics.sample_quality import frechet_distance
from pygen.ops.gaussian import gaussian_kl, randn

__all__ = [
    "encode_dataset",
    "elbo_terms",
    "kl_per_dim",
    "posterior_mean_variance",
    "active_units",
    "latent_report",
    "aggregate_posterior_mismatch",
    "gaussian_kl_to_prior",
    "aggregate_posterior_samples",
    "image_variance",
    "variance_loss",
]


def _device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval(model: Any) -> Iterator[None]:
    was = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was:
            model.train()


def _batches(model: Any, data: Any, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    x, labels = as_tensors(data)
    device = _device(model)
    conditional = bool(getattr(model, "num_classes", None))
    for i in range(0, len(x), batch_size):
        lab = labels[i : i + batch_size].to(device) if conditional and labels is not None else None
        yield x[i : i + batch_size].to(device), lab


def _encode(model: Any, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    return model.encode(x, labels) if labels is not None else model.encode(x)


def encode_dataset(model: Any, data: Any, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(mu, logvar), each (N, D): Q(z|x)'s parameters for every example."""
    with _eval(model):
        parts = [_encode(model, x, lab) for x, lab in _batches(model, data, batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def elbo_terms(model: Any, data: Any, *, seed: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Example-weighted means over ``data`` of the model's loss terms (reconstruction NLL
    "recon", "kl", "elbo", "mse", ...), with one z ~ Q(z|x) each from a fixed torch seed
    (the global RNG is restored afterwards)."""
    sums: dict[str, float] = {}
    x, _ = as_tensors(data)
    device = _device(model)
    with _eval(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for xb, lab in _batches(model, data, batch_size):
            terms = model.loss(xb if lab is None else (xb, lab))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).double().mean()) * len(xb)
    return {k: v / len(x) for k, v in sums.items()}


def kl_per_dim(model: Any, data: Any, *, batch_size: int = 500) -> Tensor:
    """(D,) float64: the mean over ``data`` of KL(Q(z_u|x) || N(0, 1)) for each latent u, in
    nats (they sum to the mean KL). Each element goes through the fused
    :func:`pygen.ops.gaussian_kl` as its own row, which is accurate for a collapsed
    dimension (KL ~ 1e-8 does not drown in cancellation)."""
    mu, logvar = encode_dataset(model, data, batch_size=batch_size)
    kl = gaussian_kl(mu.reshape(-1, 1), logvar.reshape(-1, 1)).reshape(mu.shape)
    return kl.double().mean(0).cpu()


def posterior_mean_variance(model: Any, data: Any, *, batch_size: int = 500) -> Tensor:
    """(D,) float64: Var_x(E_q[z_u | x]), the variance over ``data`` of each posterior mean."""
    mu, _ = encode_dataset(model, data, batch_size=batch_size)
    return mu.double().var(0, unbiased=True).cpu()


def active_units(model: Any, data: Any, threshold: float = 0.01, *, batch_size: int = 500) -> int:
    """The number of latent dimensions u with Var_x(E_q[z_u | x]) > ``threshold`` (Burda et al.)."""
    return int((posterior_mean_variance(model, data, batch_size=batch_size) > threshold).sum())


def latent_report(model: Any, data: Any, threshold: float = 0.01, *, batch_size: int = 500) -> dict[str, Any]:
    """Per-dimension lists: {"active_units", "threshold", "mean_variance" [D], "kl_per_dim" [D],
    "kl" (their sum)}; dimensions in the model's order."""
    var = posterior_mean_variance(model, data, batch_size=batch_size)
    kl = kl_per_dim(model, data, batch_size=batch_size)
    return {
        "active_units": int((var > threshold).sum()),
        "threshold": threshold,
        "mean_variance": [float(v) for v in var],
        "kl_per_dim": [float(v) for v in kl],
        "kl": float(kl.sum()),
    }


def gaussian_kl_to_prior(z: Tensor) -> float:
    """KL(N(m, S) || N(0, I)) in nats for the Gaussian N(m, S) fitted to the rows of ``z``
    (N, D): 0.5 (tr S + m.m - D - log det S), float64."""
    z = z.double()
    m = z.mean(0)
    s = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    logdet = torch.linalg.slogdet(s)[1]
    return float(0.5 * (torch.trace(s) + m.dot(m) - z.shape[1] - logdet))


def aggregate_posterior_mismatch(
    model: Any, data: Any, *, latents: str = "sample", seed: int = 0, batch_size: int = 500
) -> dict[str, float]:
    """How far the aggregate posterior Q(z) = mean_x Q(z|x) is from the prior N(0, I).

    ``latents="sample"``: one z ~ Q(z|x) per example (draws from Q(z) itself); ``"mean"``:
    the posterior means. Returns "fd" (Fréchet distance between those latents and as many
    N(0, I) draws, seeded), "kl_gaussian" (closed-form KL of the Gaussian fitted to them to
    the prior), "mean_norm" (|E[z]|) and "var_min" / "var_max" (the extreme per-dimension
    variances of Q(z); the prior has 1).
    """
    if latents not in ("sample", "mean"):
        raise ValueError(f"latents must be 'sample' or 'mean', got {latents!r}")
    mu, logvar = encode_dataset(model, data, batch_size=batch_size)
    n, d = mu.shape
    z = mu
    if latents == "sample":
        z = mu + torch.exp(0.5 * logvar) * randn(n, d, seed=seed, device=mu.device, dtype=mu.dtype)
    prior = randn(n, d, seed=seed + 1, device=mu.device, dtype=mu.dtype)
    var = z.double().var(0)
    return {
        "fd": frechet_distance(prior, z),
        "kl_gaussian": gaussian_kl_to_prior(z),
        "mean_norm": float(z.double().mean(0).norm()),
        "var_min": float(var.min()),
        "var_max": float(var.max()),
    }


def aggregate_posterior_samples(model: Any, data: Any, *, seed: int = 0, batch_size: int = 500) -> Tensor:
    """decode(z) for one z ~ Q(z|x) per example of ``data``: samples from the model with the
    prior replaced by the aggregate posterior (the best a second stage could do on this data)."""
    mu, logvar = encode_dataset(model, data, batch_size=batch_size)
    z = mu + torch.exp(0.5 * logvar) * randn(*mu.shape, seed=seed, device=mu.device, dtype=mu.dtype)
    _, labels = as_tensors(data)
    conditional = bool(getattr(model, "num_classes", None))
    out = []
    with _eval(model):
        for i in range(0, len(z), batch_size):
            if conditional:
                out.append(model.decode(z[i : i + batch_size], labels[i : i + batch_size].to(z.device)))
            else:
                out.append(model.decode(z[i : i + batch_size]))
    return torch.cat(out)


def image_variance(x: Tensor) -> Tensor:
    """(N,) float64: each image's pixel variance (population variance over all its values)."""
    return x.detach().flatten(1).double().var(1, unbiased=False)


def variance_loss(real: Tensor, generated: Tensor, *, relative: bool = False) -> float:
    """Asperti's variance loss: mean per-image pixel variance of ``real`` minus that of
    ``generated`` (equal-sized sets of images, (N, ...)). Positive: the generated images are
    flatter (blurrier) than the data. ``relative``: divided by the real images' mean variance."""
    if real.shape != generated.shape:
        shapes = f"{tuple(real.shape)} and {tuple(generated.shape)}"
        raise ValueError(f"variance_loss compares equal-sized sets, got {shapes}")
    if real.shape[0] == 0:
        raise ValueError("variance_loss needs at least one image")
    vr = image_variance(real).mean()
    out = vr - image_variance(generated).mean().to(vr.device)
    if relative:
        out = out / vr if float(vr) > 0 else torch.tensor(math.nan)
    return float(out)

"""Samples fixed by (seed, index): seeds, the named noise streams, and uniforms/labels drawn
by the counter rule.

Every family draws its noise from pygen's counter-based Philox stream: element j of a draw
with seed s is a function of (s, offset + j), so sample i reads stream positions that depend
on (seed, offset + i) only, whatever the batch size, chunking or rank. Noise other than the
sample's own latent (random labels, mixture components, per-step noise of a sampler) reads a
separate stream whose seed is ``derive_seed(seed, Stream.X)``: one enum, so that no two uses
share a stream by accident and the numbers live in one place.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import Tensor

from pygen.ops.gaussian import randn

__all__ = ["Stream", "derive_seed", "resolve_seed", "counter_uniform", "uniform_labels", "SEED_MOD"]

SEED_MOD = 2**63  # sample seeds live in [0, 2^63): int64-safe


class Stream(IntEnum):
    """The derived noise streams of a sample seed (``derive_seed(seed, Stream.X [+ k])``).

    Ranges (step k, RePaint event e) start at their base value and must not overlap."""

    MIXTURE = 1  # a VAE second stage's mixture component of sample i
    LABELS = 2  # random class labels of a conditional model's sample i
    SR_AUGMENT = 7  # the noise added to a super-resolution stage's low-res condition
    CASCADE_SR = 11  # the seed of a cascade's super-resolution stage
    IWAE = 13  # importance samples of an IWAE likelihood (example i, draw j)
    AUGMENT = 17  # a padded flow's augmentation pixels of example i (evaluate's likelihood)
    POST_HOC = 19  # a trained model's post-hoc fit (the VAE's: examples, latent draws, calibration samples)
    STEP = 1000  # + k: the noise of a sampler's step k (k < 10^7)
    REPAINT_STEP = 10_000_000  # + e: RePaint's denoising step at event e
    REPAINT_KNOWN = 20_000_000  # + e: the known region noised to the new level at event e
    REPAINT_JUMP = 30_000_000  # + e: RePaint's re-noising jump at event e


def derive_seed(seed: int, stream: int) -> int:
    """A seed for a separate noise stream of ``seed`` (a splitmix64 step), in [0, 2^63)."""
    z = (int(seed) + 0x9E3779B97F4A7C15 * (int(stream) + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % SEED_MOD


def resolve_seed(seed: int | Tensor | None, generator: torch.Generator | None = None) -> int:
    """The int seed of a ``sample(seed=, generator=)`` call: ``seed`` checked, else one drawn
    from ``generator`` (or torch's default generator, so ``torch.manual_seed`` fixes it)."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed= or generator=, not both")
        seed = int(seed.item()) if isinstance(seed, Tensor) else int(seed)
        if not 0 <= seed < SEED_MOD:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return seed
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_MOD - 1, (1,), generator=generator, device=device).item())


def counter_uniform(n: int, *, seed: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(n,) float64 uniforms in (0, 1); element i is a function of (seed, offset + i) only.

    Phi(eps) of pygen's Philox normal at stream position offset + i (the normal CDF of a
    standard normal is uniform).
    """
    eps = randn(n, seed=seed, offset=offset, device=device).double()
    return (0.5 * torch.erfc(-eps / math.sqrt(2))).clamp(1e-12, 1 - 1e-12)


def uniform_labels(n: int, num_classes: int, *, seed: int, offset: int = 0,
                   device: torch.device | str | None = None) -> Tensor:
    """(n,) int64 labels uniform over ``num_classes``; label i is a function of (seed, offset + i).

    ``seed`` is the stream's own seed: a model's random labels use
    ``derive_seed(sample_seed, Stream.LABELS)`` (see :func:`pygen.models.labels.sample_labels`)."""
    u = counter_uniform(n, seed=seed, offset=offset, device=device)
    return (u * num_classes).long().clamp_(max=num_classes - 1)

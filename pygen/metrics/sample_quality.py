"""Sample-quality indicators between a reference set and a candidate set of features.

Every function takes (N, D) tensors (real / reference first, fake / candidate second; any
float dtype, any device: the work happens on ``real``'s device in float64) and returns
plain floats. Nothing of size N x N is ever held in memory: pairwise quantities are formed a
block of rows at a time (at most ``_BLOCK`` entries), so N = 50k is fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "feature_moments",
    "frechet_distance",
    "frechet_distance_from_moments",
    "kid",
    "precision_recall",
    "density_coverage",
    "mmd",
]

_BLOCK = 1 << 22  # entries of one block of a pairwise matrix (32 MB in float64)


def _check(name: str, x: Tensor, min_n: int = 1) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be an (N, D) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} rows, got {x.shape[0]}")


def _pair(real: Tensor, fake: Tensor, min_n: int = 1) -> tuple[Tensor, Tensor]:
    _check("real", real, min_n)
    _check("fake", fake, min_n)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    return real.to(torch.float64), fake.to(device=real.device, dtype=torch.float64)


def _rows(n_cols: int) -> int:
    return max(1, _BLOCK // max(1, n_cols))


# ---------------------------------------------------------------------------------------
# Frechet distance


def feature_moments(x: Tensor, batch_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of x (N, D), float64, two passes over batches.

    Centring before the outer products (rather than E[xx^T] - mu mu^T) avoids cancellation.
    """
    _check("x", x, 2)
    n = x.shape[0]
    mu = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, batch_size):
        mu += x[i : i + batch_size].to(torch.float64).sum(0)
    mu /= n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, batch_size):
        c = x[i : i + batch_size].to(torch.float64) - mu
        cov += c.T @ c
    return mu, cov / (n - 1)


def _sqrtm_psd(s: Tensor) -> Tensor:
    lam, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_moments(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) computed as the sum
    of square roots of the eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1) (same
    eigenvalues as S1 S2; ``eigh`` for both square roots, negatives from rounding clamped at
    0): no sqrtm of a non-symmetric matrix. Clamped at 0. Lower is better.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(device=mu1.device, dtype=torch.float64)
    s1, s2 = sigma1.to(device=mu1.device, dtype=torch.float64), sigma2.to(device=mu1.device, dtype=torch.float64)
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt
    return max(float(fd), 0.0)


def frechet_distance(real: Tensor, fake: Tensor, *, batch_size: int = 8192) -> float:
    """Frechet distance between Gaussians fitted to real (N, D) and fake (M, D) features.

    FID when the features are Inception's; here e.g. :class:`DigitsFeatures`. Lower is
    better; 0 for identical moments. Biased upward at small N: compare at equal sizes.

    When N >= D and M >= D: :func:`frechet_distance_from_moments` (D x D covariances, eigh).
    When N or M < D (e.g. raw pixels of a few hundred images) the covariances are low-rank
    and the same number comes cheaper: with centred, scaled rows A (S1 = A^T A) and B
    (S2 = B^T B), the non-zero eigenvalues of S1 S2 are those of (A B^T)(A B^T)^T, so
    tr sqrt(S1 S2) is the nuclear norm of the N x M matrix A B^T; no D x D matrix is formed.
    """
    real, fake = _pair(real, fake, 2)
    d = real.shape[1]
    if min(real.shape[0], fake.shape[0]) >= d:
        return frechet_distance_from_moments(*feature_moments(real, batch_size), *feature_moments(fake, batch_size))
    mu1, mu2 = real.mean(0), fake.mean(0)
    a = (real - mu1) / (real.shape[0] - 1) ** 0.5
    b = (fake - mu2) / (fake.shape[0] - 1) ** 0.5
    tr_sqrt = torch.linalg.matrix_norm(a @ b.T, ord="nuc")
    fd = (mu1 - mu2).pow(2).sum() + a.pow(2).sum() + b.pow(2).sum() - 2 * tr_sqrt
    return max(float(fd), 0.0)


# ---------------------------------------------------------------------------------------
# kernel distances


def kid(
    real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 -> (mean, std).

    Averaged over ``subsets`` random subsets of m = min(subset_size, N, M) rows from each set,
    drawn without replacement by a local generator seeded with ``seed``; std is over the
    subsets (population std, as torch-fidelity). Lower is better; about 0 (it can be
    slightly negative: the estimator is unbiased) when both come from one distribution.
    """
    real, fake = _pair(real, fake, 2)
    d = real.shape[1]
    m = min(subset_size, real.shape[0], fake.shape[0])
    g = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=g)[:m].to(real.device)]
        y = fake[torch.randperm(fake.shape[0], generator=g)[:m].to(real.device)]
        kxx, kyy, kxy = (k * k * k for k in (x @ x.T / d + 1, y @ y.T / d + 1, x @ y.T / d + 1))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(within - 2 * kxy.mean())
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))


def _gauss_kernel_sum(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], _rows(y.shape[0])):
        d2 = torch.cdist(x[i : i + _rows(y.shape[0])], y).pow(2)
        for h in bandwidths:
            total += torch.exp(-d2 / (2 * h * h)).sum()
    return total


def mmd(a: Tensor, b: Tensor, *, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 between a (N, D) and b (M, D) with a sum of Gaussian kernels.

    k(x, y) = sum_h exp(-|x - y|^2 / (2 h^2)) over ``bandwidths`` (absolute distances in the
    data's units: the defaults suit the 2-D toy sets, which span about [-4, 4]). Lower is
    better; about 0 (slightly negative possible) for one distribution. Blocked: O(N D) memory.
    """
    a, b = _pair(a, b, 2)
    if not bandwidths or any(h <= 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths!r}")
    n, m, nh = a.shape[0], b.shape[0], len(bandwidths)
    kaa = (_gauss_kernel_sum(a, a, bandwidths) - n * nh) / (n * (n - 1))  # minus the diagonal (k = 1 each)
    kbb = (_gauss_kernel_sum(b, b, bandwidths) - m * nh) / (m * (m - 1))
    kab = _gauss_kernel_sum(a, b, bandwidths) / (n * m)
    return float(kaa + kbb - 2 * kab)


# ---------------------------------------------------------------------------------------
# k-NN manifold estimates


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row (N,)."""
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {x.shape[0]}")
    out = []
    for i in range(0, x.shape[0], _rows(x.shape[0])):
        d = torch.cdist(x[i : i + _rows(x.shape[0])], x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out)


def _in_any_ball(q: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(Q,) bool: q within radius of some centre (distance <= radius)."""
    out = []
    for i in range(0, q.shape[0], _rows(centres.shape[0])):
        d = torch.cdist(q[i : i + _rows(centres.shape[0])], centres)
        out.append((d <= radii).any(1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) -> (precision, recall).

    Each point's k-NN ball (radius: distance to its k-th nearest neighbour in its own set)
    estimates the set's manifold. Precision: the fraction of fake points inside some real
    ball (fidelity); recall: the fraction of real points inside some fake ball (diversity).
    Both in [0, 1], higher is better.
    """
    real, fake = _pair(real, fake, 2)
    precision = _in_any_ball(fake, real, _knn_radii(real, k)).double().mean()
    recall = _in_any_ball(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def density_coverage(real: Tensor, fake: Tensor, *, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) -> (density, coverage).

    With real k-NN balls B_i: density = (1 / kM) sum_j #{i : fake_j in B_i} (about 1 when
    fake matches real; above 1 when fake crowds dense regions), coverage = the fraction of
    real balls holding at least one fake point (in [0, 1]). Higher is better for both;
    unlike precision / recall they use real balls only, so fake outliers do not inflate them.
    """
    real, fake = _pair(real, fake, 2)
    radii = _knn_radii(real, k)
    rows = _rows(real.shape[0])
    hits = torch.zeros((), dtype=torch.float64, device=real.device)
    for i in range(0, fake.shape[0], rows):
        hits += (torch.cdist(fake[i : i + rows], real) < radii).sum()
    nearest = []
    for i in range(0, real.shape[0], _rows(fake.shape[0])):
        nearest.append(torch.cdist(real[i : i + _rows(fake.shape[0])], fake).min(1).values)
    coverage = (torch.cat(nearest) < radii).double().mean()
    return float(hits / (k * fake.shape[0])), float(coverage)

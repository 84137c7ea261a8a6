"""pygen.metrics against direct numpy / scipy computations, the feature net, evaluate() on stub models."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import pygen.data as D
import pygen.metrics.sample_quality as sq
from pygen.metrics import (
    DigitsFeatures,
    bits_per_dim,
    dataset_log_likelihood,
    density_coverage,
    evaluate,
    feature_moments,
    format_table,
    frechet_distance,
    frechet_distance_from_moments,
    kid,
    logmeanexp,
    mmd,
    precision_recall,
)
from pygen.metrics.features import WEIGHTS


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many row blocks in the pairwise metrics, so the chunking is what is tested."""
    monkeypatch.setattr(sq, "_BLOCK", 97)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------
# likelihood helpers


def test_logmeanexp_stable_and_exact():
    x = _randn(4, 7) * 3 + 1000  # exp would overflow
    ref = np.log(np.mean(np.exp(x.numpy() - 1000), axis=1)) + 1000
    np.testing.assert_allclose(logmeanexp(x, 1).numpy(), ref, rtol=1e-12)


def test_bits_per_dim_convention():
    # the uniform density on [0, 1]^D (nll 0) spends log2(bins) bits per dimension
    assert bits_per_dim(0.0, 10, bins=256) == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([0.0, 64 * math.log(2)]), 64, bins=2).tolist() == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError):
        bits_per_dim(0.0, 0)


def test_dataset_log_likelihood_batches():
    x = _randn(103, 3)

    def lp(b):
        return -0.5 * (b**2).sum(1)

    full = lp(x).numpy()
    for bs in (1, 10, 500):
        mean, se = dataset_log_likelihood(lp, x, bs)
        assert mean == pytest.approx(full.mean()) and se == pytest.approx(full.std(ddof=1) / math.sqrt(103))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dataset_log_likelihood(lambda b: b, x, 10)


# ---------------------------------------------------------------------------------------
# Frechet distance


def _fd_scipy(a, b):
    a, b = a.numpy(), b.numpy()
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n, m, d", [(300, 200, 8), (40, 30, 50), (300, 20, 16)])  # moments path, low-rank paths
def test_frechet_distance_matches_scipy(n, m, d):
    a = _randn(n, d, seed=1) @ _randn(d, d, seed=2)
    b = _randn(m, d, seed=3) @ _randn(d, d, seed=4) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-6, abs=1e-8)
    assert frechet_distance(a.float(), b.float(), batch_size=37) == pytest.approx(_fd_scipy(a, b), rel=1e-4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_gaussians():
    # N(mu1, diag(v1)) vs N(mu2, diag(v2)): |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    exact = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance_from_moments(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(exact)
    # rotated (non-commuting) covariances: against scipy
    q, _ = torch.linalg.qr(_randn(3, 3, seed=5))
    s2 = q @ torch.diag(v2) @ q.T
    s1n, s2n = torch.diag(v1).numpy(), s2.numpy()
    ref = 5 + np.trace(s1n) + np.trace(s2n) - 2 * np.trace(scipy.linalg.sqrtm(s1n @ s2n).real)
    assert frechet_distance_from_moments(mu1, torch.diag(v1), mu2, s2) == pytest.approx(ref)
    # and from samples (100k) close to the closed form
    a = mu1 + _randn(100_000, 3, seed=6) * v1.sqrt()
    b = mu2 + _randn(100_000, 3, seed=7) * v2.sqrt()
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.01)


def test_feature_moments_batched():
    x = _randn(1001, 5, seed=8).float() * 100 + 1e4  # large offset: centring matters
    mu, cov = feature_moments(x, batch_size=64)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-9)


# ---------------------------------------------------------------------------------------
# KID and MMD


def _kid_numpy(x, y):
    x, y = x.numpy(), y.numpy()
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_direct_computation():
    x, y = _randn(60, 4, seed=1), _randn(60, 4, seed=2) + 0.5
    mean, std = kid(x, y, subsets=3, subset_size=100)  # subsets = the whole sets, permuted
    assert mean == pytest.approx(_kid_numpy(x, y), rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_kid_unbiased_near_zero_for_one_distribution():
    x, y = _randn(2000, 16, seed=3), _randn(2000, 16, seed=4)
    same, same_std = kid(x, y, subsets=50, subset_size=200)
    shifted, _ = kid(x, y + 0.25, subsets=50, subset_size=200)
    assert abs(same) < 3 * same_std / math.sqrt(50) + 1e-3
    assert shifted > 20 * abs(same) and shifted > 0


def _mmd_numpy(a, b, hs):
    a, b = a.numpy(), b.numpy()
    k = lambda x, y: sum(np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / (2 * h * h)) for h in hs)  # noqa: E731
    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    within = (kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return within - 2 * k(a, b).mean()


def test_mmd_matches_direct_computation(small_blocks):
    a, b = _randn(70, 2, seed=1), _randn(50, 2, seed=2) * 1.5
    hs = (0.3, 1.0)
    assert mmd(a, b, bandwidths=hs) == pytest.approx(_mmd_numpy(a, b, hs), rel=1e-9)
    x, y = D.toy2d("8gaussians", 1000, seed=1), D.toy2d("8gaussians", 1000, seed=2)
    assert abs(mmd(x, y)) < 0.01 < mmd(x, D.toy2d("checkerboard", 1000))


# ---------------------------------------------------------------------------------------
# precision / recall, density / coverage


def _knn_radii_np(x, k):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, 1)[:, k]


def test_pr_dc_match_direct_computation(small_blocks):
    real, fake = _randn(80, 3, seed=1), _randn(60, 3, seed=2) * 1.3 + 0.4
    r, f = real.numpy(), fake.numpy()
    d_fr = np.sqrt(((f[:, None] - r[None]) ** 2).sum(-1))  # (M, N)
    rr, fr = _knn_radii_np(r, 3), _knn_radii_np(f, 3)
    precision = (d_fr <= rr[None]).any(1).mean()
    recall = (d_fr.T <= fr[None]).any(1).mean()
    assert precision_recall(real, fake, k=3) == pytest.approx((precision, recall))
    rr5 = _knn_radii_np(r, 5)
    density = (d_fr < rr5[None]).sum() / (5 * len(f))
    coverage = (d_fr.min(0) < rr5).mean()
    assert density_coverage(real, fake, k=5) == pytest.approx((density, coverage))


def test_pr_dc_identical_and_disjoint_sets():
    x = _randn(500, 8, seed=3)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    dens, cov = density_coverage(x, x.clone())
    assert cov == 1.0 and 0.8 < dens < 1.2
    far = x + 100
    assert precision_recall(x, far) == (0.0, 0.0) and density_coverage(x, far) == (0.0, 0.0)
    y = _randn(500, 8, seed=4)  # same distribution, other draw
    p, r = precision_recall(x, y)
    assert p > 0.6 and r > 0.6


def test_metric_argument_errors():
    with pytest.raises(ValueError, match="differ in dimension"):
        frechet_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kid(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="more than 5 points"):
        density_coverage(torch.randn(5, 2), torch.randn(5, 2))


# ---------------------------------------------------------------------------------------
# the digits feature network


def test_digits_features_accuracy_with_committed_weights():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 400_000
    net = DigitsFeatures.pretrained()
    for size in (8, 16, 32):
        x, y = D.digits("test", size=size)
        acc = float((net.predict(x) == y).double().mean())
        assert acc > 0.97, (size, acc)
    x, _ = D.digits("test")
    f = net.features(x, batch_size=100)
    assert f.shape == (355, 64) and f.dtype == torch.float32 and not f.requires_grad
    torch.testing.assert_close(f, net.features(x))
    with pytest.raises(ValueError, match="S in"):
        net.features(torch.zeros(2, 1, 12, 12))


def test_feature_training_is_deterministic():
    from pygen.metrics.train_features import train

    a, b = train(epochs=1), train(epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------------------
# evaluate() on stub models


class HeldOut:
    """Samples the held-out split itself: a perfect model, should score the floor."""

    def __init__(self, name):
        self.x = D.load(name, "test").data

    def sample(self, n, *, seed=None):
        return self.x[:n]


class FittedGaussian:
    """A full-covariance Gaussian on the train split (pixels clipped to [0, 1]), sampled in chunks."""

    def __init__(self, name):
        x = D.load(name, "train").data
        self.shape, self.image = x.shape[1:], x.dim() == 4
        f = x.flatten(1).double()
        self.mu, self.c = f.mean(0), (f - f.mean(0)) / math.sqrt(len(f) - 1)
        self.calls = []

    def sample(self, n, *, seed=None, offset=0):
        self.calls.append((n, offset))
        g = torch.Generator().manual_seed(seed * 7919 + offset + 12345)
        y = self.mu + torch.randn(n, self.c.shape[0], generator=g, dtype=torch.float64) @ self.c
        return (y.clamp(0, 1) if self.image else y).float().reshape(n, *self.shape)


class Exact8Gaussians:
    def sample(self, n, *, seed=None):
        return D.toy2d("8gaussians", n, seed=1000 + (seed or 0))

    def log_prob(self, x):
        return D.toy2d_log_prob("8gaussians", x)


def test_evaluate_digits_floor_and_bar():
    perfect = evaluate(HeldOut("digits"), "digits", kid_subsets=10)
    assert perfect["meta"]["feature_space"] == "digits" and perfect["meta"]["n"] == 355
    base, bar = perfect["baseline_data"], perfect["baseline_gaussian"]
    for k, v in base.items():  # the held-out model is the floor, exactly
        assert perfect[k] == pytest.approx(v), k
    assert base["fd"] < 0.1 * bar["fd"] and base["kid"] < bar["kid"]
    for k in ("precision", "recall", "density", "coverage"):
        assert base[k] > bar[k], k
    gauss_model = FittedGaussian("digits")
    r = evaluate(gauss_model, D.load("digits"), kid_subsets=10, batch_size=100)
    assert gauss_model.calls == [(100, 0), (100, 100), (100, 200), (55, 300)]  # chunked by offset
    assert r["fd"] == pytest.approx(bar["fd"], rel=0.3) and r["fd"] > 5 * base["fd"]
    assert all(isinstance(v, float) for k, v in r.items() if k != "meta" and not isinstance(v, dict))
    table = format_table(r)
    assert "| fd | lower |" in table and "Gaussian (bar)" in table and "feature_space: digits" in table


def test_evaluate_toy2d_with_likelihood():
    r = evaluate(Exact8Gaussians(), "8gaussians", n=400, n_reference=800)
    base, bar = r["baseline_data"], r["baseline_gaussian"]
    assert "fd" not in r and r["meta"]["feature_space"] == "points"
    assert abs(base["mmd"]) < 0.2 * bar["mmd"] and abs(r["mmd"]) < 0.2 * bar["mmd"]
    assert base["precision"] > bar["precision"] + 0.2 and r["precision"] > bar["precision"] + 0.2
    # the true density's NLL on the held-out points equals the exact model's; the Gaussian's is worse
    assert r["nll"] == pytest.approx(base["nll"]) and bar["nll"] > base["nll"] + 1


def test_evaluate_image_likelihood_in_bits_per_dim():
    class WithLogProb(HeldOut):
        def log_prob(self, x):  # uniform on [0, 1]^64: 0 nats, log2(17) bits per dim
            assert 0 <= float(x.min()) and float(x.max()) < 1  # dequantised
            return torch.zeros(x.shape[0])

    r = evaluate(WithLogProb("digits"), "digits", kid_subsets=2)
    assert r["nll"] == 0.0 and r["nll_bpd"] == pytest.approx(math.log2(17)) and r["meta"]["bins"] == 17
    assert r["baseline_gaussian"]["nll_bpd"] < math.log2(17)  # a fitted Gaussian beats uniform


def test_evaluate_super_resolution():
    class Bicubic:
        def sample(self, n, *, seed=None, low_res=None):
            return F.interpolate(low_res, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)

    r = evaluate(Bicubic(), "patches", kid_subsets=2)
    assert r["meta"]["feature_space"] == "pixels" and r["meta"]["reference"] == "test targets"
    assert r["psnr"] == pytest.approx(r["baseline_bicubic"]["psnr"]) and r["psnr"] > r["baseline_gaussian"]["psnr"] + 10
    assert r["baseline_data"]["fd"] == 0.0 and "psnr" not in r["baseline_data"]


def test_evaluate_refuses_bad_samples():
    class Wrong:
        def __init__(self, x):
            self.x = x

        def sample(self, n, *, seed=None):
            return self.x

    with pytest.raises(ValueError, match=r"shape \(355, 1, 8, 8\)"):
        evaluate(Wrong(torch.zeros(355, 64)), "digits")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(Wrong(torch.full((355, 1, 8, 8), float("nan"))), "digits")


@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_features_classify_the_test_split_and_are_the_auto_space_at_28px():
    import pygen.data as D
    from pygen.metrics import FashionFeatures
    from pygen.metrics.evaluate import feature_space

    net = FashionFeatures.pretrained()
    x, y = D.fashion_mnist("test")
    acc = float((net.predict(x) == y).double().mean())
    assert acc > 0.90 and acc == pytest.approx(net.test_accuracy, abs=1e-9)  # 90.94% when the weights were made
    assert net.features(x[:5]).shape == (5, 128)
    name, fn = feature_space(D.load("fashion-mnist:test"))
    assert name == "fashion-mnist" and torch.equal(fn(x[:7]), net.features(x[:7]))
    with pytest.raises(ValueError, match=r"FashionFeatures takes \(N, 1, 28, 28\) images, got \(2, 1, 8, 8\)"):
        net.features(torch.zeros(2, 1, 8, 8))

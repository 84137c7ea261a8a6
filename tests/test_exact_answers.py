"""Exact answers (closed forms, or a reference derived from the formulas) for behaviour whose
bugs a plausible-output test does not see: load(ema=), the trainer's and the GAN's EMA, the
EDM loss weight, RePaint's re-noising, and super-resolution noise augmentation.

Statistical checks use fixed seeds; each tolerance is stated next to it as a multiple of the
standard error (se) of the estimate, and the bug it guards against moves the estimate by far
more. Tiny models, one thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pygen.models as M
from pygen.diffusion.schedules import spaced_timesteps
from pygen.models import GenerativeModel, load
from pygen.models.diffusion import repaint_schedule
from pygen.models.gan import GAN
from pygen.train import fit
from pygen.models.update import ema_warmup_fn as _ema_warmup_fn

pytestmark = pytest.mark.usefixtures("one_thread")


def _warmup(decay: float, k: int) -> float:
    """The documented warm-up: min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + k) / (10 + k))


# ---- load(ema=) -----------------------------------------------------------------------------


def _states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_picks_the_ema_or_the_raw_weights_of_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = M.Diffusion((2,), hidden=8, layers=1)
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    ema = {k: v + 1.0 + torch.rand_like(v) for k, v in raw.items()}  # differs from raw everywhere
    ckpt = {"family": m.family, "config": m.config, "model": raw, "ema": ema}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert _states_equal(load(tmp_path / "ckpt.pt").state_dict(), ema)  # ema=True is the default
    assert _states_equal(load(tmp_path / "ckpt.pt", ema=True).state_dict(), ema)
    assert _states_equal(load(tmp_path / "ckpt.pt", ema=False).state_dict(), raw)
    # no EMA in the file (None, or no key): the raw weights whatever ema says
    for without in ({**ckpt, "ema": None}, {k: v for k, v in ckpt.items() if k != "ema"}):
        torch.save(without, tmp_path / "plain.pt")
        assert _states_equal(load(tmp_path / "plain.pt", ema=True).state_dict(), raw)


# ---- the trainer's EMA ------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_warmup_fn_is_the_closed_form(decay):
    update = _ema_warmup_fn(decay)
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 50, 5000):  # k = n_averaged, the updates already averaged in
        old = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
        new = [torch.randn_like(t) for t in old]
        avg = [t.clone() for t in old]
        update(avg, new, torch.tensor(k))
        d = _warmup(decay, k)
        assert d not in (0.5, 1.0)  # d and 1 - d differ: a swapped weight shows
        for a, o, c in zip(avg, old, new):
            torch.testing.assert_close(a, d * o + (1 - d) * c, rtol=0, atol=1e-12)  # float64 lerp


_SEQUENCE = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))  # the weights after each step


class _Scripted(GenerativeModel, family="test-exact-scripted"):
    """Its training step sets the weight w to the scripted value _SEQUENCE[step]: the trainer's
    EMA of it then has a closed form."""

    def __init__(self, ema_decay: float = 0.9, warmup: bool = True) -> None:
        super().__init__()
        self.config = {"ema_decay": ema_decay, "warmup": warmup}
        self.ema_decay, self.ema_warmup = ema_decay, warmup
        self.w = nn.Parameter(torch.zeros(3))

    def loss(self, batch):
        return {"loss": ((batch - self.w) ** 2).mean()}

    def training_step(self, batch, step, optimizers, *, update=None):
        with torch.no_grad():
            self.w.copy_(_SEQUENCE[step])
        return {"loss": torch.zeros(())}


@pytest.mark.parametrize("warmup", [True, False])
def test_fit_ema_is_the_closed_form_and_load_returns_it(tmp_path, warmup):
    """AveragedModel copies the weights at the first update; update j >= 2 averages with the
    decay d = min(decay, (1 + n) / (10 + n)) (warm-up) or decay, n = j - 1 the updates
    averaged so far. load() returns those weights with ema=True and the raw ones with ema=False."""
    decay, steps = 0.9, len(_SEQUENCE)
    m = _Scripted(decay, warmup)
    fit(m, torch.zeros(8, 3), steps=steps, batch_size=4, out=tmp_path, progress=False)
    expect = _SEQUENCE[0].double()
    for n in range(1, steps):
        d = _warmup(decay, n) if warmup else decay
        expect = d * expect + (1 - d) * _SEQUENCE[n].double()
    ckpt = torch.load(tmp_path / f"ckpt-{steps}.pt", weights_only=True)
    assert ckpt["ema_n_averaged"] == steps
    torch.testing.assert_close(ckpt["ema"]["w"].double(), expect, rtol=0, atol=1e-6)  # float32 lerps
    assert torch.equal(ckpt["model"]["w"], _SEQUENCE[-1])
    assert (ckpt["ema"]["w"] - ckpt["model"]["w"]).abs().min() > 1e-2
    assert torch.equal(load(tmp_path).w.detach(), ckpt["ema"]["w"])
    assert torch.equal(load(tmp_path, ema=False).w.detach(), ckpt["model"]["w"])


# ---- the GAN's EMA generator --------------------------------------------------------------------


def test_gan_update_ema_is_the_closed_form():
    torch.manual_seed(0)
    gan = GAN((1, 8, 8), z_dim=8, g_width=8, d_width=8, ema_decay=0.9)  # batch-norm G: has buffers
    g = torch.Generator().manual_seed(2)
    for step in (0, 3, 50, 51):
        # beta = min(0.9, (1 + step) / (10 + step)): 0.1, 4/13, 0.9, 0.9
        beta = _warmup(0.9, step)
        old = [p.detach().clone() for p in gan.g_ema.parameters()]
        with torch.no_grad():
            for p in gan.generator.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for b in gan.generator.buffers():
                b.copy_(torch.randint(0, 9, b.shape, generator=g).to(b.dtype))
        gan.update_ema(step)
        for e, o, p in zip(gan.g_ema.parameters(), old, gan.generator.parameters()):
            torch.testing.assert_close(e, beta * o + (1 - beta) * p.detach(), rtol=0, atol=1e-6)  # float32
        for be, b in zip(gan.g_ema.buffers(), gan.generator.buffers(), strict=True):
            assert torch.equal(be, b)  # batch-norm statistics copied, not averaged
    assert sum(1 for _ in gan.g_ema.buffers()) > 0


# ---- the EDM loss weight ----------------------------------------------------------------------


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_edm_weight_is_one_over_c_out_squared(sd):
    m = M.Diffusion((2,), hidden=8, layers=1, sigma_data=sd)
    sigma = m.train_sigmas[torch.tensor([0, 1, 10, 500, 998, 999])]
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    torch.testing.assert_close(m.precond.loss_weight(sigma).double(), 1 / c_out**2, rtol=1e-6, atol=0)  # float32 out
    torch.testing.assert_close(m.precond.loss_weight(sigma).double(), (sigma**2 + sd**2) / (sigma**2 * sd**2), rtol=1e-6,
                               atol=0)


def test_edm_loss_is_the_weighted_x0_mse_of_what_the_denoiser_saw(monkeypatch):
    """loss = mean_b lambda(sigma_b) mean_j (D(x_t)_bj - x0_bj)^2 with lambda = 1 / c_out^2,
    recomputed from the (x_t, sigma, D) of the call: exact whatever t and eps were drawn."""
    torch.manual_seed(0)
    m = M.Diffusion((4,), hidden=16, layers=2, sigma_data=0.5)
    for p in m.parameters():  # a non-trivial network
        nn.init.normal_(p, std=0.3)
    seen = []
    real = m.denoise

    def recording(x_t, sigma, *args, **kwargs):
        out = real(x_t, sigma, *args, **kwargs)
        seen.append((sigma.detach().double(), out.detach().double()))
        return out

    monkeypatch.setattr(m, "denoise", recording)
    x0 = torch.randn(64, 4) * 0.5
    torch.manual_seed(1)
    loss = m.loss(x0)["loss"]
    (sigma, d), = seen
    weight = (sigma**2 + 0.25) / (sigma**2 * 0.25)
    ref = (weight * ((d - x0.double()) ** 2).mean(1)).mean()
    assert weight.max() / weight.min() > 10  # the levels drawn differ: an unweighted loss differs
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)  # float32 kernels


class _Zero(nn.Module):
    def forward(self, x, c_noise, labels=None, cond=None, aug_level=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_edm_loss_of_a_zero_network_on_data_of_std_sigma_data_is_one(sd):
    """F = 0: D = c_skip x, and lambda (D - x0)^2 = (sigma x0 - sd^2 eps)^2 / (sd^2 (sigma^2 + sd^2))
    is chi-square(1) for x0 ~ N(0, sd^2): mean 1 at every level (EDM's unit-variance targets).
    Without the weight the loss is E[c_out^2] < sd^2 (0.2 for sd = 0.5)."""
    torch.manual_seed(0)
    m = M.Diffusion((8,), hidden=8, layers=1, sigma_data=sd)
    m.net = _Zero()
    x0 = torch.randn(4096, 8) * sd
    loss = m.loss(x0)["loss"].item()
    # 32768 chi-square(1) terms (variance 2): se = sqrt(2 / 32768) = 0.0078; tolerance 5 se
    assert abs(loss - 1) < 0.04, loss


# ---- RePaint inpainting against the exact propagation of its moments ---------------------------

_MU = np.array([0.3, -0.2])
_COV = np.array([[1.0, 0.72], [0.72, 0.64]])  # std 1 and 0.8, correlation 0.9


class _CorrelatedGaussian(M.Diffusion):
    """Data N(MU, COV) in 2-D: the exact denoiser E[x0 | x0 + sigma eps = x] = MU + COV (COV +
    sigma^2 I)^-1 (x - MU) (x the sigma-space sample x_t sqrt(sigma^2 + 1))."""

    def denoise(self, x_t, sigma, labels=None, cond=None, aug_level=None):
        s = sigma.double().reshape(-1, 1, 1)
        cov, mu = torch.tensor(_COV), torch.tensor(_MU)
        x = x_t.double() * (s[:, :, 0] ** 2 + 1).sqrt()
        gain = cov @ torch.linalg.inv(cov + s**2 * torch.eye(2, dtype=torch.float64))
        return (mu + ((x - mu).unsqueeze(1) @ gain.transpose(1, 2)).squeeze(1)).to(x_t.dtype)


def _repaint_moments(model: M.Diffusion, known: int, value: float, steps: int, jump_length: int,
                     jump_n_sample: int) -> tuple[float, float]:
    """Mean and std of the hidden coordinate after RePaint with the exact denoiser, by
    propagating the Gaussian state's mean and covariance in float64 through the documented
    steps: x_T ~ N(0, I); a denoising step t -> p is the DDPM posterior (fixed_small) around the
    predicted x0 (x_p = c1 x0_hat + c2 x_t + sqrt(var) z; p = -1: x0_hat), then the known
    coordinate is replaced by sqrt(ab_p) value + sqrt(1 - ab_p) z' (value itself at p = -1);
    a jump a -> c re-noises x_c = sqrt(r) x_a + sqrt(1 - r) z with r = ab_c / ab_a."""
    ab = model.alphas_cumprod.double().numpy()
    ts = spaced_timesteps(steps, model.num_train_timesteps, "trailing").flip(0).tolist()
    eye = np.eye(2)
    mean, cov = np.zeros(2), eye.copy()
    sched = repaint_schedule(steps, min(jump_length, steps), jump_n_sample)
    for a, c in zip(sched[:-1], sched[1:]):
        if c < a:
            abt = ab[ts[a]]
            gain = _COV @ np.linalg.inv(_COV + (1 - abt) / abt * eye)
            h, h0 = gain / math.sqrt(abt), _MU - gain @ _MU  # x0_hat = h x_t + h0
            if c >= 0:
                abp = ab[ts[c]]
                beta = 1 - abt / abp
                c1, c2 = math.sqrt(abp) * beta / (1 - abt), math.sqrt(1 - beta) * (1 - abp) / (1 - abt)
                lin = c1 * h + c2 * eye
                mean, cov = lin @ mean + c1 * h0, lin @ cov @ lin.T + beta * (1 - abp) / (1 - abt) * eye
                kmean, kvar = math.sqrt(abp) * value, 1 - abp
            else:
                mean, cov = h @ mean + h0, h @ cov @ h.T
                kmean, kvar = value, 0.0
            mean[known] = kmean
            cov[known, :] = cov[:, known] = 0.0
            cov[known, known] = kvar
        else:
            r = ab[ts[c]] / ab[ts[a]]
            mean, cov = math.sqrt(r) * mean, r * cov + (1 - r) * eye
    hidden = 1 - known
    return float(mean[hidden]), math.sqrt(cov[hidden, hidden])


def _conditional(known: int, value: float) -> tuple[float, float]:
    h = 1 - known
    m = _MU[h] + _COV[h, known] / _COV[known, known] * (value - _MU[known])
    return float(m), math.sqrt(_COV[h, h] - _COV[h, known] ** 2 / _COV[known, known])


def test_repaint_reference_approaches_the_conditional_distribution():
    """The reference itself: RePaint is approximate, and its resampling (jumps) is what brings
    the completion towards p(hidden | known) = N(0.664, 0.349^2) (known x_0 = 1.5). Without
    jumps the mean stays at 0.40 (10 steps) or 0.46 (1000 steps); 1000 steps with 19 jumps of
    10 levels reach 0.658 and std 0.343 (the remaining gap: the chain's discretisation)."""
    m = _CorrelatedGaussian((2,), hidden=8, layers=1, ema_decay=None)
    cm, cs = _conditional(0, 1.5)
    assert (round(cm, 6), round(cs, 3)) == (0.664, 0.349)
    plain = _repaint_moments(m, 0, 1.5, 10, 3, 1)
    few = _repaint_moments(m, 0, 1.5, 10, 3, 4)  # the setting test_inpaint_matches_... samples
    many = _repaint_moments(m, 0, 1.5, 1000, 10, 20)
    assert abs(plain[0] - cm) > 0.2
    assert abs(few[0] - cm) < 0.7 * abs(plain[0] - cm)
    assert abs(many[0] - cm) < 0.01 and abs(many[1] / cs - 1) < 0.03


def test_inpaint_matches_the_exact_repaint_moments():
    """With the exact denoiser the completions are Gaussian with the moments of
    _repaint_moments. Not re-noising the known region (the clean value at every level) or
    jumps that do not re-noise move the hidden mean by > 0.07 (15 se) and its std by > 20%."""
    m = _CorrelatedGaussian((2,), hidden=8, layers=1, ema_decay=None).eval()
    x = torch.tensor([[1.5, 0.0], [0.0, -0.5]])  # image 0 knows coordinate 0, image 1 coordinate 1
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    steps, jump_length, jump_n_sample, n = 10, 3, 4, 10000
    out = m.inpaint(x, mask, n=n, seed=0, steps=steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    assert out.shape == (2, n, 2)
    assert (out[0, :, 0] == 1.5).all() and (out[1, :, 1] == -0.5).all()  # known coordinates kept exactly
    for b, (known, value) in enumerate([(0, 1.5), (1, -0.5)]):
        mean, std = _repaint_moments(m, known, value, steps, jump_length, jump_n_sample)
        h = out[b, :, 1 - known].double()
        # se of the mean std / sqrt(n) (< 0.0045), of std / std 1 / sqrt(2 n) (0.0071); tolerance 4 se
        assert abs(h.mean().item() - mean) < 4 * std / math.sqrt(n), (b, h.mean().item(), mean)
        assert abs(h.std().item() / std - 1) < 4 / math.sqrt(2 * n), (b, h.std().item(), std)


# ---- super-resolution noise augmentation --------------------------------------------------------


def _upsampling_matrix(scale: int, h: int, w: int) -> torch.Tensor:
    """(H W, h w) float64: bicubic upsampling (align_corners=False) of one channel, column i the
    upsampling of the i-th basis image."""
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    up = F.interpolate(basis, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.reshape(h * w, -1).T


def _recover_noise(diff: torch.Tensor, level: torch.Tensor, scale: int) -> torch.Tensor:
    """noise with diff = upsample(level noise) (upsampling is linear and injective: least squares
    recovers it exactly), per image; (B, C, h, w)."""
    b, c, hh, ww = diff.shape
    u = _upsampling_matrix(scale, hh // scale, ww // scale)
    sol = torch.linalg.lstsq(u, diff.double().reshape(b * c, hh * ww).T).solution  # (h w, B C)
    noise = sol.T.reshape(b, c, hh // scale, ww // scale) / level.double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close((u @ sol).T.reshape(diff.shape), diff.double(), atol=1e-5, rtol=0)  # in the range
    return noise


def test_super_resolution_training_condition_is_noised_at_its_level():
    """cond = upsample(low_res + a noise) with noise ~ N(0, I), a ~ U(0, aug_max) per image, and
    aug_level = 1000 a (model space: data_range (0, 1) maps to [-1, 1])."""
    torch.manual_seed(0)
    sr = M.SuperResolution((1, 8, 8), scale=2, aug_max=0.4, width=8, mults=[1, 2], blocks=1)
    x = torch.rand(512, 1, 8, 8)
    torch.manual_seed(1)
    x0, extra = sr.training_inputs(x)
    torch.testing.assert_close(x0, x * 2 - 1)
    level = extra["aug_level"].double() / 1000
    assert level.min() >= 0 and level.max() <= 0.4
    # U(0, 0.4) over 512 images: mean 0.2, se 0.4 / sqrt(12 * 512) = 0.0051; tolerance 5 se
    assert abs(level.mean().item() - 0.2) < 0.026, level.mean()
    clean = F.interpolate(F.avg_pool2d(x0, 2), scale_factor=2, mode="bicubic", align_corners=False)
    noise = _recover_noise(extra["cond"] - clean, level, 2)
    # 8192 standard normals: se of the mean 0.011, of the std 1 / sqrt(2 * 8192) = 0.0078; tolerance 5 se
    assert abs(noise.mean().item()) < 0.055, noise.mean()
    assert abs(noise.std().item() - 1) < 0.04, noise.std()


def test_super_resolution_sample_uses_the_clean_condition_at_level_zero(monkeypatch):
    torch.manual_seed(0)
    sr = M.SuperResolution((1, 8, 8), scale=2, width=8, mults=[1, 2], blocks=1).eval()
    seen = []

    def recording(x_t, sigma, labels=None, cond=None, aug_level=None):
        seen.append((cond.clone(), aug_level.clone()))
        return torch.zeros_like(x_t)

    monkeypatch.setattr(sr, "denoise", recording)
    low_res = torch.rand(64, 1, 4, 4)
    clean = F.interpolate(low_res * 2 - 1, scale_factor=2, mode="bicubic", align_corners=False)
    sr.sample(low_res=low_res, seed=0, steps=1, aug_level=0.0)
    cond, level = seen[-1]
    torch.testing.assert_close(cond, clean, atol=1e-6, rtol=0)
    assert (level == 0).all()
    sr.sample(low_res=low_res, seed=0, steps=1, aug_level=0.25)
    cond, level = seen[-1]
    assert (level == 250).all()
    noise = _recover_noise(cond - clean, level / 1000, 2)
    # 1024 standard normals: se of the std 1 / sqrt(2048) = 0.022; tolerance 5 se
    assert abs(noise.std().item() - 1) < 0.11, noise.std()

"""pygen.models.Diffusion, SuperResolution, Colorization, Cascade: preconditioning, training,
samplers (against an analytic denoiser), (seed, index) sampling, guidance, inpainting,
image conditioning, save/load and argument errors. Tiny networks, one thread."""

from __future__ import annotations

import math

import pytest
import torch

import pygen.models as M
from pygen.models.conditioned import luminance, with_luminance
from pygen.models.diffusion import DEFAULT_STEPS, SAMPLERS, repaint_schedule
from pygen.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 8, "mults": [1, 2], "blocks": 1}


def tiny(shape=(1, 8, 8), **kw) -> M.Diffusion:
    torch.manual_seed(0)
    opts = dict(TINY) if len(shape) == 3 else {"hidden": 32, "layers": 2}
    opts.update(kw)
    return M.Diffusion(shape, **opts).eval()


# ---- preconditioning ----------------------------------------------------------------------


class _Const(torch.nn.Module):
    """A stand-in network returning a constant, recording what it saw."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.seen = value, {}

    def forward(self, x, c_noise, labels=None, cond=None, aug_level=None):
        self.seen = {"x": x, "c_noise": c_noise, "labels": labels}
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_edm_preconditioning(sd):
    m = tiny((3,), sigma_data=sd)
    m.net = _Const(0.7)
    x_t = torch.randn(5, 3, dtype=torch.float64)
    sigma = torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0], dtype=torch.float64)
    s = sigma[:, None]
    x = x_t * (s * s + 1).sqrt()  # sigma space
    c_skip, c_out, c_in = sd**2 / (s * s + sd**2), s * sd / (s * s + sd**2).sqrt(), 1 / (s * s + sd**2).sqrt()
    out = m.denoise(x_t, sigma)
    torch.testing.assert_close(out, c_skip * x + c_out * 0.7, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.net.seen["x"], c_in * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.net.seen["c_noise"], (25 * sigma.log()).float())
    assert m.output_type == "sample"
    # 1 / c_out^2: the x0-space error times the weight is the network-space error
    torch.testing.assert_close(m.precond.loss_weight(sigma).double(), 1 / (c_out[:, 0] ** 2), rtol=1e-6, atol=0)


def test_vp_preconditioning_passes_the_timestep():
    m = tiny((3,), precond="vp", prediction_type="v_prediction")
    m.net = _Const(0.25)
    t = torch.tensor([0, 17, 999])
    out = m.denoise(torch.randn(3, 3), m.train_sigmas[t].float())
    assert (out == 0.25).all() and m.output_type == "v_prediction"
    torch.testing.assert_close(m.net.seen["c_noise"], t.float(), atol=2e-3, rtol=0)


def test_data_range_round_trip():
    m = tiny()
    x = torch.rand(4, 1, 8, 8)
    assert m.to_model(x).min() >= -1 and m.to_model(x).max() <= 1
    torch.testing.assert_close(m.from_model(m.to_model(x)), x)
    assert m.from_model(torch.full((1, 1, 8, 8), 5.0)).max() == 1.0  # clamped to the data's range
    assert tiny((2,)).data_range is None


# ---- samplers against an analytic denoiser -----------------------------------------------


class _GaussianData(M.Diffusion):
    """Data N(mu, s^2) per coordinate: the exact denoiser D(x; sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2)."""

    mu, s = 0.3, 0.5

    def denoise(self, x_t, sigma, labels=None, cond=None, aug_level=None):
        sg = sigma.double().reshape(-1, *([1] * (x_t.dim() - 1)))
        x = x_t.double() * (sg * sg + 1).sqrt()
        d = self.mu + (x - self.mu) * self.s**2 / (self.s**2 + sg * sg)
        return d.to(x_t.dtype)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_the_data_distribution(sampler):
    """With the exact denoiser of Gaussian data every sampler must give that Gaussian: a wrong
    coefficient, sigma table, input scaling or noise stream shows as a wrong mean or std."""
    m = _GaussianData((4,), hidden=8, layers=1)
    steps = {"ddpm": 200, "ddim": 50, "euler": 100, "euler_ancestral": 200, "dpmpp_2m": 25}[sampler]
    x = m.sample(2000, seed=1, sampler=sampler, steps=steps).double()
    assert abs(x.mean().item() - m.mu) < 0.02, x.mean()
    assert abs(x.std().item() / m.s - 1) < 0.04, x.std()


def test_ddpm_full_chain_runs_1000_steps():
    m = _GaussianData((2,), hidden=8, layers=1)
    x = m.sample(1000, seed=0, sampler="ddpm")  # the default: the full 1000-step chain
    assert DEFAULT_STEPS["ddpm"] == 1000
    assert abs(x.std().item() / m.s - 1) < 0.06


# ---- sample i depends on (seed, i) only ---------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_do_not_depend_on_batch_size_or_offset(sampler):
    m = tiny(num_classes=3)
    a = m.sample(7, seed=5, sampler=sampler, steps=4)
    b = m.sample(7, seed=5, sampler=sampler, steps=4, batch_size=3)
    c = m.sample(4, seed=5, sampler=sampler, steps=4, offset=3)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a[3:], atol=1e-5, rtol=0)
    assert not torch.allclose(m.sample(7, seed=6, sampler=sampler, steps=4), a)


def test_seed_none_follows_torch_manual_seed_and_generator():
    m = tiny()
    torch.manual_seed(3)
    a = m.sample(3, steps=3)
    torch.manual_seed(3)
    torch.testing.assert_close(m.sample(3, steps=3), a)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    torch.testing.assert_close(m.sample(3, steps=3, generator=g1), m.sample(3, steps=3, generator=g2))
    with pytest.raises(ValueError, match="seed= or generator="):
        m.sample(2, seed=1, generator=g1)


def test_samples_in_data_range_and_empty():
    m = tiny()
    x = m.sample(5, seed=0, steps=3)
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert m.sample(0, seed=0, steps=3).shape == (0, 1, 8, 8)


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        tiny().sample(2, seed=0, steps=2, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_graph_replays_the_eager_loop(sampler):
    m = tiny(num_classes=3).cuda()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    eager = m.sample(6, seed=4, sampler=sampler, steps=5, batch_size=3)
    graphed = m.sample(6, seed=4, sampler=sampler, steps=5, batch_size=3, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=0)
    again = m.sample(6, seed=5, sampler=sampler, steps=5, batch_size=3, cuda_graph=True)  # replayed, new seed
    torch.testing.assert_close(again, m.sample(6, seed=5, sampler=sampler, steps=5, batch_size=3), atol=1e-5, rtol=0)


# ---- guidance -----------------------------------------------------------------------------


def test_guidance():
    m = tiny(num_classes=4)
    for p in m.parameters():  # non-zero output layers so that the label matters
        torch.nn.init.normal_(p, std=0.05)
    x, sigma, lab = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 9.0]), torch.tensor([0, 2, 3])
    c = m.denoise(x, sigma, lab)
    u = m.denoise(x, sigma, torch.full_like(lab, 4))
    assert not torch.allclose(c, u)
    torch.testing.assert_close(m.guided(x, sigma, lab, 1.0), c)
    torch.testing.assert_close(m.guided(x, sigma, lab, 0.0), u)
    torch.testing.assert_close(m.guided(x, sigma, lab, 3.0), u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    # s = 1 through the batched path equals the conditional model
    torch.testing.assert_close(m.guided(x, sigma, lab, 1.0 + 1e-12), c, atol=1e-5, rtol=1e-5)
    a = m.sample(4, seed=2, labels=1, steps=4)
    b = m.sample(4, seed=2, labels=torch.ones(4, dtype=torch.long), steps=4, guidance_scale=1.0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(m.sample(4, seed=2, labels=1, steps=4, guidance_scale=3.0), a)


def test_label_dropout_uses_the_null_label():
    m = tiny(num_classes=4, label_dropout=0.5)
    seen = []
    real = m.net.forward
    m.net.forward = lambda x, c, labels=None, cond=None, aug_level=None: (seen.append(labels), real(x, c, labels))[1]
    torch.manual_seed(0)
    m.loss((torch.rand(64, 1, 8, 8), torch.zeros(64, dtype=torch.long)))
    frac = (seen[0] == 4).float().mean().item()
    assert 0.3 < frac < 0.7 and set(seen[0].tolist()) <= {0, 4}


# ---- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("precond,ptype", [("edm", "epsilon"), ("vp", "epsilon"), ("vp", "v_prediction"),
                                           ("vp", "sample")])
def test_training_lowers_the_loss(precond, ptype):
    torch.manual_seed(0)
    data = torch.randn(512, 2) * torch.tensor([1.0, 0.2]) + torch.tensor([0.5, -1.0])
    m = M.Diffusion((2,), precond=precond, prediction_type=ptype, hidden=64, layers=2, ema_decay=None)

    def held_out() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(m.loss(data[:256])["loss"].item() for _ in range(8)) / 8

    before = held_out()
    fit(m, data, steps=150, batch_size=128, lr=3e-3, seed=0, progress=False)
    after = held_out()
    assert after < 0.8 * before, (before, after)


def test_fit_and_load_restores_the_ema_model(tmp_path):
    torch.manual_seed(0)
    m = M.Diffusion((1, 8, 8), num_classes=10, **TINY)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    fit(m, (x, y), steps=3, batch_size=16, seed=0, out=tmp_path, progress=False)
    loaded = M.load(tmp_path)
    assert type(loaded) is M.Diffusion and loaded.config == M.load(tmp_path, ema=False).config
    s = loaded.sample(2, seed=0, steps=3)
    assert s.shape == (2, 1, 8, 8)
    m.save(tmp_path / "m.pt")
    again = M.load(tmp_path / "m.pt")
    torch.testing.assert_close(again.sample(2, seed=0, steps=3), m.eval().sample(2, seed=0, steps=3))


# ---- inpainting ---------------------------------------------------------------------------


def test_repaint_schedule():
    assert repaint_schedule(4, 1, 1) == [3, 2, 1, 0, -1]
    s = repaint_schedule(10, 2, 3)
    assert s[0] == 9 and s[-2:] == [0, -1]
    steps = list(zip(s[:-1], s[1:]))
    assert all(b == a - 1 or b == a + 1 for a, b in steps)
    ups = sum(b > a for a, b in steps)
    assert ups == 2 * 2 * len(range(0, 10 - 2, 2))  # (jump_n_sample - 1) * jump_length per jump point


def test_inpaint_keeps_known_pixels_and_varies():
    m = tiny()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1  # top half known
    out = m.inpaint(x, mask, n=3, seed=0, steps=10, jump_length=3, jump_n_sample=2)
    assert out.shape == (2, 3, 1, 8, 8)
    known = mask.bool().expand(2, 3, 1, 8, 8)
    torch.testing.assert_close(out[known], x[:, None].expand_as(out)[known], atol=1e-6, rtol=0)
    free = ~known
    assert (out[:, 0] - out[:, 1])[free[:, 0]].abs().max() > 1e-3  # completions differ
    other = m.inpaint(x, mask, n=3, seed=1, steps=10, jump_length=3, jump_n_sample=2)
    assert not torch.allclose(other[free], out[free])
    torch.testing.assert_close(m.inpaint(x, mask, n=3, seed=0, steps=10, jump_length=3, jump_n_sample=2), out)


# ---- image-conditioned stages -------------------------------------------------------------


def test_super_resolution_conditioning_shapes():
    torch.manual_seed(0)
    sr = M.SuperResolution((3, 16, 16), scale=4, **TINY).eval()
    for p in sr.parameters():  # non-zero output layers so that the condition matters
        torch.nn.init.normal_(p, std=0.05)
    assert sr.low_res_shape == (3, 4, 4) and sr.net.cond_channels == 3
    x = torch.rand(4, 3, 16, 16)
    x0, extra = sr.training_inputs(x)
    assert extra["cond"].shape == (4, 3, 16, 16) and extra["aug_level"].shape == (4,)
    assert 0 <= extra["aug_level"].min() and extra["aug_level"].max() <= 1000 * sr.aug_max
    assert sr.loss(x)["loss"].ndim == 0
    low_res = sr.downsample(x)
    a = sr.sample(low_res=low_res, seed=0, steps=3)
    assert a.shape == (4, 3, 16, 16)
    torch.testing.assert_close(sr.sample(2, low_res=low_res[2:], seed=0, steps=3, offset=2), a[2:], atol=1e-5, rtol=0)
    assert not torch.allclose(sr.sample(low_res=low_res, seed=0, steps=3, aug_level=0.5), a)
    with pytest.raises(ValueError, match="low_res must be"):
        sr.sample(low_res=torch.rand(2, 3, 8, 8), seed=0)
    with pytest.raises(ValueError, match="shape must be"):
        M.SuperResolution((10,), scale=4)
    with pytest.raises(ValueError, match=r"scale must be an int in \[1, min\(H, W\)\] = \[1, 10\], got 11"):
        M.SuperResolution((3, 10, 10), scale=11)
    assert M.SuperResolution((3, 10, 10), scale=4, width=8, mults=[1]).low_res_shape == (3, 3, 3)  # partial blocks


def test_super_resolution_samples_are_consistent_with_their_input():
    torch.manual_seed(0)
    sr = M.SuperResolution((3, 8, 8), scale=2, data_range=None, **TINY).eval()
    for p in sr.parameters():
        torch.nn.init.normal_(p, std=0.05)
    low_res = torch.randn(3, 3, 4, 4)
    raw = sr.sample(low_res=low_res, seed=0, steps=3, consistent=False)
    out = sr.sample(low_res=low_res, seed=0, steps=3)
    assert (sr.downsample(raw) - low_res).abs().max() > 1e-2
    torch.testing.assert_close(sr.downsample(out), low_res, atol=1e-5, rtol=0)
    hr = torch.randn(3, 3, 8, 8)  # the projection never moves a sample away from an image consistent with low_res
    target = sr.project(hr, low_res)
    assert (sr.project(raw, low_res) - target).norm() <= (raw - target).norm() + 1e-6


def test_cascade_and_sr_save_load(tmp_path):
    torch.manual_seed(0)
    base = M.Diffusion((1, 8, 8), **TINY).eval()
    sr = M.SuperResolution((1, 16, 16), scale=2, **TINY).eval()
    cas = M.Cascade(base, sr)
    hi, lo = cas.sample(3, seed=0, base_kwargs={"steps": 3}, sr_kwargs={"steps": 3}, return_low=True)
    assert hi.shape == (3, 1, 16, 16) and lo.shape == (3, 1, 8, 8)
    torch.testing.assert_close(cas.sample(3, seed=0, base_kwargs={"steps": 3}, sr_kwargs={"steps": 3}), hi)
    sr.save(tmp_path / "sr.pt")
    again = M.load(tmp_path / "sr.pt")
    assert type(again) is M.SuperResolution and again.scale == 2
    torch.testing.assert_close(again.sample(low_res=lo, seed=1, steps=3), sr.sample(low_res=lo, seed=1, steps=3))
    with pytest.raises(ValueError, match="SR stage takes"):
        M.Cascade(M.Diffusion((1, 4, 4), **TINY), sr)


def test_colorization_matches_luminance(tmp_path):
    torch.manual_seed(0)
    c = M.Colorization((3, 8, 8), **TINY).eval()
    for p in c.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(2, 3, 8, 8)
    gray = luminance(x)
    out = c.colorize(gray, n=3, seed=0, steps=3)
    assert out.shape == (2, 3, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(luminance(out.flatten(0, 1)), gray.repeat_interleave(3, 0), atol=1e-5, rtol=0)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3
    c.save(tmp_path / "c.pt")
    assert type(M.load(tmp_path / "c.pt")) is M.Colorization


def test_with_luminance_stays_in_range():
    rgb = torch.rand(64, 3, 4, 4) * 3 - 1  # far out of range
    y = torch.rand(64, 1, 4, 4)
    out = with_luminance(rgb, y, [0.0, 1.0])
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    torch.testing.assert_close(luminance(out), y, atol=1e-5, rtol=0)


# ---- argument errors ----------------------------------------------------------------------


def test_errors():
    m = tiny()
    with pytest.raises(ValueError, match="sampler must be one of"):
        m.sample(2, sampler="heun")
    with pytest.raises(ValueError, match="steps must be"):
        m.sample(2, steps=0)
    with pytest.raises(ValueError, match="steps must be"):
        m.sample(2, steps=1001)
    with pytest.raises(ValueError, match="unconditional"):
        m.sample(2, labels=1)
    with pytest.raises(ValueError, match="batch must be"):
        m.loss(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="n must be"):
        m.sample(-1)
    mc = tiny(num_classes=3)
    with pytest.raises(ValueError, match="labels must lie"):
        mc.sample(2, labels=3)
    with pytest.raises(ValueError, match=r"labels must be an int or \(2,\)"):
        mc.sample(2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class-conditional"):
        mc.loss(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="precond"):
        M.Diffusion((2,), precond="ve")


def test_for_data_and_defaults():
    import pygen.data

    d = pygen.data.load("digits", "train")
    m = M.Diffusion.for_data(d)
    assert m.num_classes == 10 and m.shape == (1, 8, 8) and m.config["mults"] == [1, 2]
    assert set(M.Diffusion.train_defaults) == {"steps", "batch_size", "lr"}
    p = pygen.data.load("patches", "test")
    sr = M.SuperResolution.for_data(p, **TINY)
    assert sr.scale == p.shape[-1] // p.low_res.shape[-1]
    assert math.prod(sr.low_res_shape) * sr.scale**2 == math.prod(sr.shape)

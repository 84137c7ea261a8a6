"""pygen.diffusion: schedules, reference steps and schedulers.

Schedules and steps are compared with formulas written here independently in float64;
whole sampling loops with an exact denoiser (data = one point x0*) must land on x0*; when
diffusers is installed, whole loops are compared with its schedulers on the same inputs.
"""

import math

import pytest
import torch

import pygen.diffusion as D
from pygen.diffusion import schedules as S
from pygen.ops import diffusion as R

F64 = torch.float64
PRED_TYPES = ["epsilon", "v_prediction", "sample"]


# ---- schedules ---------------------------------------------------------------------------


def test_linear_and_scaled_linear_betas():
    N, b0, b1 = 7, 1e-4, 0.02
    lin = [b0 + (b1 - b0) * i / (N - 1) for i in range(N)]
    sl = [(b0**0.5 + (b1**0.5 - b0**0.5) * i / (N - 1)) ** 2 for i in range(N)]
    torch.testing.assert_close(S.make_betas(N, b0, b1, "linear", dtype=F64), torch.tensor(lin, dtype=F64))
    torch.testing.assert_close(S.make_betas(N, b0, b1, "scaled_linear", dtype=F64), torch.tensor(sl, dtype=F64))
    assert S.make_betas(N, b0, b1).dtype == torch.float32  # diffusers' precision by default


def test_cosine_schedule_from_definition():
    N = 50
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = S.alphas_cumprod_from_betas(S.make_betas(N, beta_schedule="squaredcos_cap_v2", dtype=F64))
    # abar_i = f((i+1)/N) / f(0) wherever the 0.999 cap does not bite (all but the last)
    expect = torch.tensor([f((i + 1) / N) / f(0) for i in range(N)], dtype=F64)
    torch.testing.assert_close(abar[:-1], expect[:-1], rtol=1e-12, atol=1e-12)
    assert S.cosine_betas(N, dtype=F64)[-1] == 0.999


def test_alphas_cumprod_sigmas_final_alpha():
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    ab = S.alphas_cumprod_from_betas(betas)
    torch.testing.assert_close(ab, torch.tensor([0.9, 0.72, 0.504], dtype=F64))
    torch.testing.assert_close(S.sigmas_from_alphas_cumprod(ab), ((1 - ab) / ab).sqrt())
    assert S.final_alpha_cumprod(ab, True) == 1.0 and S.final_alpha_cumprod(ab, False) == 0.9
    assert D.DDIMScheduler(set_alpha_to_one=False).final_alpha_cumprod == 1 - 1e-4


def test_rescale_zero_terminal_snr():
    ab = S.alphas_cumprod_from_betas(S.make_betas(100, dtype=F64))
    ab2 = S.alphas_cumprod_from_betas(S.make_betas(100, dtype=F64, rescale_betas_zero_snr=True))
    assert abs(ab2[-1]) < 1e-12
    torch.testing.assert_close(ab2[0], ab[0])


@pytest.mark.parametrize(
    "spacing, offset, expect",
    [
        ("leading", 0, [6, 3, 0]),  # k * (10 // 3)
        ("leading", 1, [7, 4, 1]),
        ("trailing", 0, [9, 6, 2]),  # round(10, 6.67, 3.33) - 1
        ("linspace", 0, [9, 4, 0]),  # round(9, 4.5, 0), half to even
    ],
)
def test_timestep_spacing_by_hand(spacing, offset, expect):
    ts = S.spaced_timesteps(3, 10, spacing, offset)
    assert ts.dtype == torch.int64 and ts.tolist() == expect


def test_timestep_spacing_1000():
    assert S.spaced_timesteps(10, 1000, "leading", 1)[[0, -1]].tolist() == [901, 1]
    assert S.spaced_timesteps(10, 1000, "trailing")[[0, -1]].tolist() == [999, 99]
    assert S.spaced_timesteps(10, 1000, "linspace")[:3].tolist() == [999, 888, 777]
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.spaced_timesteps(11, 10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.spaced_timesteps(3, 10, "middle")


def test_karras_sigmas_and_sigma_to_t():
    s = S.karras_sigmas(0.03, 14.6, 5, rho=7.0)
    i = torch.arange(5, dtype=F64)
    expect = (14.6 ** (1 / 7) + i / 4 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, expect)
    assert abs(s[0] - 14.6) < 1e-12 and abs(s[-1] - 0.03) < 1e-12
    table = S.sigmas_from_alphas_cumprod(S.alphas_cumprod_from_betas(S.make_betas(1000, dtype=F64)))
    t = torch.tensor([0.0, 17.0, 500.0, 999.0], dtype=F64)
    torch.testing.assert_close(S.sigma_to_t(table[t.long()], table), t)
    # half way in log sigma between 10 and 11
    mid = (0.5 * (table[10].log() + table[11].log())).exp()
    torch.testing.assert_close(S.sigma_to_t(mid.reshape(1), table), torch.tensor([10.5], dtype=F64))


# ---- reference steps vs independent float64 derivations ----------------------------------


def _x0_eps(pred, mo, x, ab):
    """(x0, eps) from a model output, written from x_t = sqrt(ab) x0 + sqrt(1-ab) eps, v = sqrt(ab) eps - sqrt(1-ab) x0."""
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    if pred == "epsilon":
        return (x - b * mo) / a, mo
    if pred == "sample":
        return mo, (x - a * mo) / b
    # solve [x; v] = [[a, b], [-b, a]] [x0; eps]  (a^2 + b^2 = 1)
    return a * x - b * mo, b * x + a * mo


@pytest.fixture
def xs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, 5, generator=g, dtype=F64) for _ in range(4)]


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_ref(xs, pred, variance_type):
    mo, x, z, _ = xs
    ab, ab_prev = 0.3, 0.5
    alpha = ab / ab_prev
    beta = 1 - alpha
    x0, eps = _x0_eps(pred, mo, x, ab)
    # Ho et al. eq. 11 (eps form of the posterior mean)
    mean = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
    var = (1 - ab_prev) / (1 - ab) * beta if variance_type == "fixed_small" else beta
    prev, px0 = R.ddpm_step_ref(
        mo, x, torch.tensor(ab, dtype=F64), torch.tensor(ab_prev, dtype=F64), z,
        prediction_type=pred, variance_type=variance_type,
    )
    torch.testing.assert_close(px0, x0)
    torch.testing.assert_close(prev, mean + math.sqrt(var) * z)


def test_ddpm_clip(xs):
    mo, x, _, _ = xs
    ab, ab_prev = 0.3, 0.5
    _, x0 = R.ddpm_step_ref(mo * 10, x, torch.tensor(ab, dtype=F64), torch.tensor(ab_prev, dtype=F64),
                            prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    torch.testing.assert_close(x0, (mo * 10).clamp(-0.5, 0.5))


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_ref(xs, pred, eta):
    mo, x, z, _ = xs
    ab, ab_prev = 0.3, 0.5
    x0, eps = _x0_eps(pred, mo, x, ab)
    sig = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    expect = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sig**2) * eps + sig * z
    prev, px0 = R.ddim_step_ref(mo, x, torch.tensor(ab, dtype=F64), torch.tensor(ab_prev, dtype=F64), z,
                                eta=eta, prediction_type=pred)
    torch.testing.assert_close(prev, expect)
    torch.testing.assert_close(px0, x0)
    if eta == 1.0:  # eta = 1 is DDPM's ancestral step
        ddpm, _ = R.ddpm_step_ref(mo, x, torch.tensor(ab, dtype=F64), torch.tensor(ab_prev, dtype=F64), z,
                                  prediction_type=pred)
        torch.testing.assert_close(prev, ddpm)


def _x0_sigma(pred, mo, x, s):
    """x0 for a VE sample x = x0 + s eps whose model input is the VP sample x / sqrt(1 + s^2)."""
    ab = 1 / (1 + s * s)
    x0, _ = _x0_eps(pred, mo, x * math.sqrt(ab), ab)
    return x0


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_euler_step_ref(xs, pred):
    mo, x, _, _ = xs
    s, sn = 2.0, 0.7
    x0 = _x0_sigma(pred, mo, x, s)
    prev, px0 = R.euler_step_ref(mo, x, torch.tensor(s, dtype=F64), torch.tensor(sn, dtype=F64), prediction_type=pred)
    torch.testing.assert_close(px0, x0)
    torch.testing.assert_close(prev, x + (x - x0) / s * (sn - s))


def test_euler_step_ref_churn(xs):
    mo, x, z, _ = xs
    s, sn, g = 2.0, 0.7, 0.3
    sh = s * (1 + g)
    xh = x + math.sqrt(sh**2 - s**2) * z
    prev, _ = R.euler_step_ref(mo, x, torch.tensor(s, dtype=F64), torch.tensor(sn, dtype=F64), z, gamma=g)
    torch.testing.assert_close(prev, xh + mo * (sn - sh))  # epsilon: (x - x0) / sigma_hat = eps


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_euler_ancestral_step_ref(xs, pred):
    mo, x, z, _ = xs
    s, sn = 2.0, 0.7
    x0 = _x0_sigma(pred, mo, x, s)
    up = min(sn, math.sqrt(sn**2 * (s**2 - sn**2) / s**2))  # k-diffusion get_ancestral_step, eta=1
    down = math.sqrt(sn**2 - up**2)
    prev, px0 = R.euler_ancestral_step_ref(mo, x, torch.tensor(s, dtype=F64), torch.tensor(sn, dtype=F64), z,
                                           prediction_type=pred)
    torch.testing.assert_close(px0, x0)
    torch.testing.assert_close(prev, x + (x - x0) / s * (down - s) + up * z)


@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("second", [False, True])
def test_dpmpp_2m_step_ref(xs, pred, second):
    """Against k-diffusion's sample_dpmpp_2m written in VE space (t = -log sigma)."""
    mo, x_vp, _, x0_prev = xs
    sp, s, sn = 5.0, 2.0, 0.7
    alpha = lambda q: 1 / math.sqrt(1 + q * q)  # noqa: E731
    x_ve = x_vp / alpha(s)
    x0 = _x0_sigma(pred, mo, x_ve, s)
    t, tn, tp = -math.log(s), -math.log(sn), -math.log(sp)
    h = tn - t
    den = x0
    if second:
        r = (t - tp) / h
        den = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    x_ve_next = (sn / s) * x_ve - math.expm1(-h) * den
    prev, px0 = R.dpmpp_2m_step_ref(
        mo, x_vp, torch.tensor(s, dtype=F64), torch.tensor(sn, dtype=F64),
        x0_prev if second else None, torch.tensor(sp, dtype=F64) if second else None, prediction_type=pred,
    )
    torch.testing.assert_close(px0, x0)
    torch.testing.assert_close(prev, x_ve_next * alpha(sn))
    # sigma_next = 0 lands on x0
    last, _ = R.dpmpp_2m_step_ref(mo, x_vp, torch.tensor(s, dtype=F64), torch.tensor(0.0, dtype=F64), prediction_type=pred)
    torch.testing.assert_close(last, x0)


def test_ref_bad_prediction_type(xs):
    mo, x, _, _ = xs
    with pytest.raises(ValueError, match="prediction_type"):
        R.ddim_step_ref(mo, x, torch.tensor(0.3), torch.tensor(0.5), prediction_type="eps")


# ---- schedulers: per-sample timesteps, first/last steps, noise -----------------------------


@pytest.mark.parametrize("cls", [D.DDPMScheduler, D.DDIMScheduler])
@pytest.mark.parametrize("pred", PRED_TYPES)
def test_per_sample_timesteps_equal_single(cls, pred):
    kw = {"eta": 0.7} if cls is D.DDIMScheduler else {}
    sch = cls(prediction_type=pred, clip_sample=False, **kw)
    sch.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    B = 4
    x, mo, z = (torch.randn(B, 3, 8, generator=g) for _ in range(3))
    t = sch.timesteps[[0, 7, 19, 3]]  # first, middle, last (-> -1), another
    batched = sch.step(mo, t, x, noise=z)
    for b in range(B):
        one = sch.step(mo[b : b + 1], t[b], x[b : b + 1], noise=z[b : b + 1])
        torch.testing.assert_close(batched.prev_sample[b : b + 1], one.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(batched.pred_original_sample[b : b + 1], one.pred_original_sample, rtol=0, atol=0)
        one_int = sch.step(mo[b : b + 1], int(t[b]), x[b : b + 1], noise=z[b : b + 1])
        torch.testing.assert_close(one_int.prev_sample, one.prev_sample, rtol=0, atol=0)


def test_ddpm_first_and_last_step_coefficients():
    sch = D.DDPMScheduler(clip_sample=False)
    sch.set_timesteps(10)  # leading: 900, ..., 0
    assert sch.previous_timestep(900) == 800 and sch.previous_timestep(0) == -1
    ab = sch.alphas_cumprod.double()
    g = torch.Generator().manual_seed(2)
    x, mo, z = (torch.randn(2, 5, generator=g) for _ in range(3))
    # last step (t = 0): no noise, prev_sample = x0 exactly (abar_prev = 1)
    out = sch.step(mo, torch.tensor([0, 0]), x, noise=z)
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample)
    # first step: 900 -> 800 with the strided beta
    out = sch.step(mo.double(), 900, x.double(), noise=z.double())
    a, ap = ab[900].item(), ab[800].item()
    x0, eps = _x0_eps("epsilon", mo.double(), x.double(), a)
    beta = 1 - a / ap
    mean = (x.double() - beta / math.sqrt(1 - a) * eps) / math.sqrt(1 - beta)
    torch.testing.assert_close(out.prev_sample, mean + math.sqrt((1 - ap) / (1 - a) * beta) * z.double(), rtol=1e-5, atol=1e-5)


def test_ddim_last_step_uses_final_alpha():
    for one in (True, False):
        sch = D.DDIMScheduler(clip_sample=False, set_alpha_to_one=one)
        sch.set_timesteps(10)
        x, mo = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
        out = sch.step(mo, 0, x)
        ab0 = sch.alphas_cumprod[0].double().item()
        ab_prev = 1.0 if one else ab0
        x0, eps = _x0_eps("epsilon", mo, x, ab0)
        torch.testing.assert_close(out.prev_sample, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps,
                                   rtol=1e-6, atol=1e-6)


def test_noise_follows_generator():
    sch = D.DDPMScheduler()
    sch.set_timesteps(10)
    x, mo = torch.zeros(2, 16), torch.zeros(2, 16)
    a = sch.step(mo, 500, x, generator=torch.Generator().manual_seed(5)).prev_sample
    b = sch.step(mo, 500, x, generator=torch.Generator().manual_seed(5)).prev_sample
    c = sch.step(mo, 500, x, generator=torch.Generator().manual_seed(6)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_add_noise_per_sample():
    sch = D.DDPMScheduler()
    x0, z = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 500, 999])
    ab = sch.alphas_cumprod[t].unsqueeze(1)
    torch.testing.assert_close(sch.add_noise(x0, z, t), ab.sqrt() * x0 + (1 - ab).sqrt() * z)


def test_config_carries_over():
    cfg = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", "beta_start": 0.00085,
           "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
           "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}
    sch = D.DDIMScheduler.from_config(cfg)
    assert sch.config.beta_schedule == "scaled_linear" and sch.config["steps_offset"] == 1
    sch.set_timesteps(50)
    assert sch.timesteps[[0, -1]].tolist() == [981, 1]
    e = D.EulerDiscreteScheduler.from_config(sch.config)
    assert e.config.beta_start == 0.00085


# ---- whole loops with an exact denoiser land on x0* -------------------------------------


def _ab_of(sch, t, sample):
    if isinstance(sch, (D.EulerDiscreteScheduler, D.DPMSolverMultistepScheduler)):
        s = sch.sigmas[sch.step_index if sch.step_index is not None else sch.index_for_timestep(t)].double()
        return 1 / (1 + s * s)
    return sch.alphas_cumprod.double()[t]


@pytest.mark.parametrize(
    "make",
    [
        lambda: D.DDIMScheduler(clip_sample=False),
        lambda: D.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction"),
        lambda: D.DDPMScheduler(clip_sample=False),
        lambda: D.EulerDiscreteScheduler(),
        lambda: D.EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction"),
        lambda: D.EulerAncestralDiscreteScheduler(),
        lambda: D.DPMSolverMultistepScheduler(),
        lambda: D.DPMSolverMultistepScheduler(use_karras_sigmas=True, prediction_type="sample"),
    ],
    ids=["ddim", "ddim-trailing-v", "ddpm", "euler", "euler-karras-v", "euler-a", "dpmpp2m", "dpmpp2m-karras-x0"],
)
def test_loop_with_exact_denoiser_lands_on_x0(make):
    """Data = the single point x0*: the exact model output at any noise level is known in closed form."""
    sch = make()
    sch.set_timesteps(25)
    g = torch.Generator().manual_seed(3)
    x0_star = torch.randn(2, 3, 4, generator=g)
    x = torch.randn(2, 3, 4, generator=g) * sch.init_noise_sigma
    pred = sch.config.prediction_type
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t).double()  # the VP sample sqrt(ab) x0 + sqrt(1-ab) eps
        ab = _ab_of(sch, t, x)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        eps = (inp - a * x0_star.double()) / b
        mo = {"epsilon": eps, "sample": x0_star.double(), "v_prediction": a * eps - b * x0_star.double()}[pred]
        x = sch.step(mo.float(), t, x, generator=g).prev_sample
    # float32 tables and samples: x0 recovered from epsilon at abar ~ 4e-5 amplifies rounding ~150x
    torch.testing.assert_close(x, x0_star, rtol=0, atol=2e-3)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs():
    sch = D.DDIMScheduler()
    sch.set_timesteps(10)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        sch.step(x, 1000, x)
    with pytest.raises(ValueError, match="timestep must be in"):
        sch.step(x, torch.tensor([5, -1]), x)
    with pytest.raises(TypeError, match="timestep must be an integer tensor"):
        sch.step(x, torch.tensor(500.0), x)
    with pytest.raises(ValueError, match=r"timestep must be 0-dim or of shape \(B,\)"):
        sch.step(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        sch.step(torch.randn(2, 4), 500, x)
    with pytest.raises(ValueError, match="noise must have the shape"):
        D.DDPMScheduler().step(x, 500, x, noise=torch.randn(3))
    with pytest.raises(ValueError, match="prediction_type"):
        D.DDPMScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="beta_schedule"):
        D.DDPMScheduler(beta_schedule="cosine")
    with pytest.raises(NotImplementedError, match="solver_order"):
        D.DPMSolverMultistepScheduler(solver_order=4)  # orders 1-3 are supported
    with pytest.raises(RuntimeError, match="set_timesteps"):
        D.DDIMScheduler().step(x, 500, x)
    e = D.EulerDiscreteScheduler()
    e.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        e.step(x, torch.tensor(3.5), x)


# ---- diffusers, when installed -----------------------------------------------------------------

CONFIGS = [
    ("DDPMScheduler", {"clip_sample": False}),
    ("DDPMScheduler", {"variance_type": "fixed_large", "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "set_alpha_to_one": False, "steps_offset": 1}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "clip_sample": False}),
    ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("name, cfg", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_loop_matches_diffusers(name, cfg):
    diffusers = pytest.importorskip("diffusers")
    theirs, ours = getattr(diffusers, name)(**cfg), getattr(D, name)(**cfg)
    n = 12
    theirs.set_timesteps(n)
    ours.set_timesteps(n)
    torch.testing.assert_close(ours.timesteps.to(theirs.timesteps.dtype), theirs.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * float(ours.init_noise_sigma)
    xa, xb = x.clone(), x.clone()
    eta = {"eta": 0.5} if name == "DDIMScheduler" else {}
    for t in ours.timesteps:
        mo = torch.randn(2, 4, 8, 8, generator=g)
        # same input to both: the trajectories themselves may drift apart by float rounding
        torch.testing.assert_close(ours.scale_model_input(xa, t), theirs.scale_model_input(xa, t))
        # same noise: diffusers draws it with torch.randn_like-style calls from `generator`
        gen_a = torch.Generator().manual_seed(int(t) + 7)
        za = torch.randn(xa.shape, generator=gen_a)
        if name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
            extra = {"variance_noise": za}
        else:  # diffusers draws torch.randn(shape, generator=...) on CPU: the same za
            extra = {"generator": torch.Generator().manual_seed(int(t) + 7)}
        xa = theirs.step(mo, t, xa, **extra, **eta).prev_sample
        xb = ours.step(mo, t, xb, noise=za, **eta).prev_sample
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=1e-4)


# ---- zero terminal SNR: abar_T = 0 in DDIM / DDPM, as diffusers ---------------------------------

ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
ZERO_SNR_CONFIGS = [("DDIMScheduler", {**ZERO_SNR, "clip_sample": False}), ("DDPMScheduler", {**ZERO_SNR, "clip_sample": False})]


@pytest.mark.parametrize("name, cfg", ZERO_SNR_CONFIGS, ids=["ddim", "ddpm"])
def test_zero_snr_loop_matches_diffusers(name, cfg):
    test_loop_matches_diffusers(name, cfg)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_snr_terminal_alpha_matches_diffusers(name):
    """diffusers keeps abar_T = 0 in DDIM / DDPM and lifts it to 2**-24 in the sigma-space schedulers."""
    diffusers = pytest.importorskip("diffusers")
    theirs, ours = getattr(diffusers, name)(rescale_betas_zero_snr=True), getattr(D, name)(rescale_betas_zero_snr=True)
    assert ours.alphas_cumprod[-1].item() == theirs.alphas_cumprod[-1].item()
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=0)


def _step_all_backends(step, *args, **kw):
    from backends_under_test import BACKEND_DEVICES

    return {b: step(*args, backend=b, **kw) for b, d in BACKEND_DEVICES if d == "cpu"}


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_steps_at_zero_terminal_alpha_on_every_backend(kind):
    """ab_t = 0 (t = T-1 of a zero-SNR schedule): v_prediction and sample are finite and agree on
    every backend; epsilon divides by sqrt(ab_t) = 0 (x0 is not determined), inf/nan as in diffusers."""
    import pygen.ops as O

    step = O.ddim_step if kind == "ddim" else O.ddpm_step
    extra = {"eta": 0.5} if kind == "ddim" else {}
    table = torch.tensor([0.99, 0.6, 0.2, 0.0])
    g = torch.Generator().manual_seed(4)
    mo, x, z = (torch.randn(3, 17, generator=g) for _ in range(3))
    for pred in ("v_prediction", "sample"):
        outs = _step_all_backends(step, mo, x, 3, table, 1, prediction_type=pred, noise=z, **extra)
        ref = outs.pop("torch")
        assert all(t.isfinite().all() for t in ref)
        if pred == "v_prediction":
            torch.testing.assert_close(ref[1], -mo)  # x0 = sqrt(ab) x - sqrt(1 - ab) v
        for b, out in outs.items():
            torch.testing.assert_close(out[0], ref[0], msg=f"{b} {pred}")
            torch.testing.assert_close(out[1], ref[1], msg=f"{b} {pred}")
    for out in _step_all_backends(step, mo, x, 3, table, 1, prediction_type="epsilon", noise=z, **extra).values():
        assert not out[1].isfinite().any() and not out[0].isfinite().any()


# ---- the DDIM reference where its formulas are 0/0 or sqrt(< 0): defined as the kernels do -------


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("case", ["abar-1-final-1", "var-slightly-negative", "var-negative"])
def test_ddim_ref_degenerate_coefficients_match_kernels(case, eta):
    import pygen.ops as O

    table = torch.tensor([1.0, 0.7, 0.3], dtype=F64)
    t, final = {"abar-1-final-1": (0, 1.0), "var-slightly-negative": (2, 0.3 * (1 - 1e-15)),
                "var-negative": (2, 0.2)}[case]  # prev_t = -1: ab_prev = final
    g = torch.Generator().manual_seed(5)
    mo, x, z = (torch.randn(2, 9, generator=g, dtype=F64) for _ in range(3))
    prev, x0 = R.ddim_step_ref(mo, x, table[t], torch.tensor(final, dtype=F64), z, eta=eta)
    assert prev.isfinite().all() and x0.isfinite().all()
    # sigma_t = 0 (sqrt of a variance <= 0 or undefined is 0, the kernels' rule): the deterministic step
    ab, ab_prev = table[t].item(), final
    eps_x0 = (x - math.sqrt(1 - ab) * mo) / math.sqrt(ab)
    torch.testing.assert_close(prev, math.sqrt(ab_prev) * eps_x0 + math.sqrt(max(1 - ab_prev, 0)) * mo)
    for b, out in _step_all_backends(O.ddim_step, mo, x, t, table, -1, final_alpha_cumprod=final, eta=eta,
                                     noise=z).items():
        torch.testing.assert_close(out[0], prev, msg=b)
        torch.testing.assert_close(out[1], x0, msg=b)


# ---- a model output in another dtype (autocast) stays on the fused path ----------------------

SCHEDULERS = [
    (D.DDPMScheduler, {"clip_sample": False}),
    (D.DDIMScheduler, {"clip_sample": False, "eta": 0.5}),
    (D.EulerDiscreteScheduler, {}),
    (D.EulerAncestralDiscreteScheduler, {}),
    (D.DPMSolverMultistepScheduler, {}),
]
REFS = ["ddpm_step_ref", "ddim_step_ref", "euler_step_ref", "euler_ancestral_step_ref", "dpmpp_2m_step_ref"]


@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=[c.__name__ for c, _ in SCHEDULERS])
def test_bf16_model_output_stays_fused(cls, kw, compiled_backend, monkeypatch):
    import pygen

    backend, device = compiled_backend

    def make():
        sch = cls(**kw)
        sch.set_timesteps(4)
        return sch

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 8, generator=g)
    mos = [torch.randn(2, 3, 8, generator=g).bfloat16() for _ in range(3)]

    def loop(sch, cast):
        y = x.to(device)
        for t, mo in zip(sch.timesteps[:3], mos):
            out = sch.step(cast(mo.to(device)), t, y, generator=torch.Generator().manual_seed(int(t)))
            y = out.prev_sample
        return y, out.pred_original_sample

    with pygen.use_backend(backend):
        want = loop(make(), lambda m: m.float())
        for name in REFS:  # the reference steps are not the fused path
            monkeypatch.setattr(R, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called"))
        got = loop(make(), lambda m: m)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


# ---- add_noise broadcasts one timestep of shape (1,) over the batch, as diffusers ------------


@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=[c.__name__ for c, _ in SCHEDULERS])
def test_add_noise_broadcasts_a_single_timestep(cls, kw):
    sch = cls(**kw)
    sch.set_timesteps(10)
    g = torch.Generator().manual_seed(7)
    x0, z = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    t = sch.timesteps[3:4]
    want = sch.add_noise(x0, z, t.expand(4).clone())
    torch.testing.assert_close(sch.add_noise(x0, z, t), want, rtol=0, atol=0)
    torch.testing.assert_close(sch.add_noise(x0, z, t.reshape(())), want, rtol=0, atol=0)
    if cls in (D.DDPMScheduler, D.DDIMScheduler):  # the schedulers whose diffusers class has get_velocity
        torch.testing.assert_close(sch.get_velocity(x0, z, t), sch.get_velocity(x0, z, t.expand(4).clone()),
                                   rtol=0, atol=0)
    diffusers = pytest.importorskip("diffusers")
    theirs = getattr(diffusers, cls.__name__)(**{k: v for k, v in kw.items() if k != "eta"})
    theirs.set_timesteps(10)
    torch.testing.assert_close(sch.add_noise(x0, z, t), theirs.add_noise(x0, z, t), rtol=1e-6, atol=1e-6)

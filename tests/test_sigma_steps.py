"""Fused sigma-space sampler steps (pygen.ops.euler_step, euler_ancestral_step, dpmpp_2m_step) on
every backend against the float64 reference steps of pygen.ops.diffusion, with per-sample step
indices into the scheduler's ``sigmas`` (sigma = sigmas[index], sigma_next = sigmas[index + 1],
sigma_prev = sigmas[index - 1]) and in-kernel Philox noise.

Tolerances vs float64: float64 1e-10 (1e-9 for DPM-Solver++, whose coefficients are ratios of
log-sigma differences), float32 1e-5, float16/bfloat16 (GPU) 1e-2 / 2e-2, rtol and atol alike.
Sigma-space samples are ~sigma in magnitude (up to ~160 at the start of the default schedule)
and x0 recovered from them carries the rounding error of that magnitude, so every sample is
divided by its scale sqrt(sigma^2 + 1) (>= 1) before the comparison: the tolerances are relative
to values ~1 (the normalisation only loosens rows at high sigma, by that factor).
"""

import math
import zlib

import pytest
import torch

import pygen
from pygen.diffusion import schedules as S
from pygen.ops import diffusion as R
from pygen.diffusion.schedulers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from pygen.ops import dpmpp_2m_step, euler_ancestral_step, euler_step, randn

from backends_under_test import BACKEND_DEVICES, dtypes_for

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
TOL_DPM64 = dict(rtol=1e-9, atol=1e-9)
STEP_BACKENDS = BACKEND_DEVICES
KINDS = ("euler", "ancestral", "dpm")
HAS_CPP = "cpp" in pygen.available_backends()


def _params():
    for backend, device in STEP_BACKENDS:
        for dtype in dtypes_for(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


def _sigmas(kind, schedule, device):
    """A realistic sigma table: the scheduler's (float32, last entry 0) or Karras sigmas in float64."""
    if schedule == "karras_f64":
        return torch.cat([S.karras_sigmas(0.0292, 14.6146, 12), torch.zeros(1, dtype=torch.float64)]).to(device)
    if kind == "dpm":
        sched = DPMSolverMultistepScheduler()
        sched.set_timesteps(10)
    else:
        sched = EulerDiscreteScheduler()
        sched.set_timesteps(20)
    return sched.sigmas.to(device)


def _indices(b, n, gen, device):
    """(B,) int64 indices in [0, n - 2]: the last valid index (sigma_next = 0) and 0 where the batch allows."""
    idx = torch.randint(1, n - 2, (b,), generator=gen)
    if b >= 2:
        idx[0] = n - 2
    if b >= 3:
        idx[1] = 0
    return idx.to(device)


def _gathered(sigmas, index, ndim):
    """float64 CPU (sigma, sigma_next, sigma_prev) per sample, shaped to broadcast against the sample."""
    s, i = sigmas.double().cpu(), torch.as_tensor(index).cpu()
    return R.gather(s, i, ndim), R.gather(s, i + 1, ndim), R.gather(s, (i - 1).clamp(min=0), ndim)


def _scale(sigmas, index, ndim):
    s, _, _ = _gathered(sigmas, index, ndim)
    return (s * s + 1).sqrt()


def _reference(kind, mo, x, sigmas, index, noise=None, prev_x0=None, **kw):
    """The float64 reference step with per-sample sigmas gathered from ``sigmas`` at ``index``."""
    mo, x = mo.double().cpu(), x.double().cpu()
    index = torch.as_tensor(index).cpu()
    s, sn, sp = _gathered(sigmas, index, x.dim())
    if noise is not None:
        noise = noise.double().cpu()
    if kind == "euler":
        kw = dict(kw)
        gamma, lo, hi = kw.pop("gamma", 0.0), kw.pop("s_tmin", 0.0), kw.pop("s_tmax", math.inf)
        g = torch.where((s >= lo) & (s <= hi), torch.full_like(s, gamma), torch.zeros_like(s))
        return R.euler_step_ref(mo, x, s, sn, noise, gamma=g, **kw)
    if kind == "ancestral":
        return R.euler_ancestral_step_ref(mo, x, s, sn, noise, **kw)
    first = R.dpmpp_2m_step_ref(mo, x, s, sn, **kw)
    if prev_x0 is None:
        return first
    # second order only where there is a previous step and the step does not land on sigma = 0
    second = R.dpmpp_2m_step_ref(mo, x, s, sn, prev_x0.double().cpu(), sp, **kw)
    use2 = (index.reshape(-1, *([1] * (x.dim() - 1))) > 0) & (sn > 0)
    return tuple(torch.where(use2, b, a) for a, b in zip(first, second))


def _step(kind, mo, x, sigmas, index, prev_x0=None, **kw):
    if kind == "euler":
        return euler_step(mo, x, sigmas, index, **kw)
    if kind == "ancestral":
        return euler_ancestral_step(mo, x, sigmas, index, **kw)
    return dpmpp_2m_step(mo, x, sigmas, index, prev_x0, **kw)


def _close(got, want, scale, dtype, kind=None):
    tol = TOL_DPM64 if (kind == "dpm" and dtype == torch.float64) else TOL[dtype]
    torch.testing.assert_close(got.double().cpu() / scale, want.double().cpu() / scale, **tol)


def _inputs(kind, shape, sigmas, index, device, dtype, gen):
    """model output ~1, sample at its level (sigma space: ~sqrt(sigma^2+1); VP for DPM: ~1), prev x0 ~1."""
    mo = torch.randn(shape, dtype=torch.float64, generator=gen)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    if kind != "dpm":
        x = x * _scale(sigmas, index, len(shape))
    prev = torch.randn(shape, dtype=torch.float64, generator=gen)
    return (v.to(device, dtype) for v in (mo, x, prev))


CASES = [
    ("euler", dict()),
    ("euler", dict(prediction_type="v_prediction", gamma=0.25, s_tmin=0.5, s_tmax=8.0, s_noise=1.003)),
    ("euler", dict(prediction_type="sample", gamma=2**0.5 - 1, s_noise=0.7)),
    ("euler", dict(gamma=0.1, s_tmin=1.2, s_noise=1.0)),
    ("ancestral", dict()),
    ("ancestral", dict(prediction_type="v_prediction")),
    ("ancestral", dict(prediction_type="sample")),
    ("dpm", dict(prev=True)),
    ("dpm", dict(prev=True, solver_type="heun", prediction_type="v_prediction")),
    ("dpm", dict(prev=True, solver_type="midpoint", prediction_type="sample")),
    ("dpm", dict(prev=True, solver_type="heun")),
    ("dpm", dict(prev=False, prediction_type="v_prediction")),
]
CASE_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("schedule", ["scheduler", "karras_f64"])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (2, 4099), (1, 1)], ids=str)
def test_step_matches_reference_with_per_sample_index(backend, device, dtype, kind, kw, schedule, shape):
    kw = dict(kw)
    use_prev = kw.pop("prev", False)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, kw, schedule, shape)).encode()))
    sigmas = _sigmas(kind, schedule, device)
    b, nd = shape[0], len(shape)
    index = _indices(b, sigmas.shape[0], gen, device)
    mo, x, prev_x0 = _inputs(kind, shape, sigmas, index, device, dtype, gen)
    prev_x0 = prev_x0 if use_prev else None
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    noise = randn(*shape, seed=seed, device=device, dtype=dtype, backend=backend)  # the stream this backend draws
    scale = _scale(sigmas, index, nd)
    if kind == "dpm":
        outs = [dpmpp_2m_step(mo, x, sigmas, index, prev_x0, backend=backend, **kw)]
    else:
        outs = [_step(kind, mo, x, sigmas, index, seed=seed, backend=backend, **kw),
                _step(kind, mo, x, sigmas, index, noise=noise, backend=backend, **kw)]
    ref_prev, ref_x0 = _reference(kind, mo, x, sigmas, index, noise, prev_x0, **kw)
    for prev, x0 in outs:
        for got in (prev, x0):
            assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
            assert torch.isfinite(got).all(), "an output element was not written (or is not finite)"
        _close(prev, ref_prev, scale, dtype, kind)
        _close(x0, ref_x0, scale, dtype, kind)

    # stepping each sample alone, with its index as a Python int, gives the same result
    prev_n, x0_n = outs[-1]
    per = x[0].numel()
    for i in range(b):
        sl = slice(i, i + 1)
        if kind == "dpm":
            alone = [dpmpp_2m_step(mo[sl], x[sl], sigmas, int(index[i]), prev_x0[sl] if use_prev else None,
                                   backend=backend, **kw)]
        else:
            alone = [_step(kind, mo[sl], x[sl], sigmas, int(index[i]), noise=noise[sl], backend=backend, **kw),
                     # the in-kernel stream: element j of sample i sits at counter i * per + j
                     _step(kind, mo[sl], x[sl], sigmas, int(index[i]), seed=seed, offset=i * per, backend=backend,
                           **kw)]
        for p_i, x0_i in alone:
            _close(p_i, prev_n[sl], scale[sl], dtype, kind)
            _close(x0_i, x0_n[sl], scale[sl], dtype, kind)


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
def test_euler_churn_gate_is_per_sample_and_inclusive(backend, device, dtype):
    """gamma applies where s_tmin <= sigma <= s_tmax (sigma = sigmas[index] of the row, bounds included)."""
    gen = torch.Generator().manual_seed(6)
    sigmas = _sigmas("euler", "scheduler", device)  # float32: the bounds below are exact
    index = torch.tensor([3, 4, 5, 6, 7], device=device)
    shape = (5, 2, 6)
    mo, x, _ = _inputs("euler", shape, sigmas, index, device, dtype, gen)
    noise = randn(*shape, seed=21, device=device, dtype=dtype, backend=backend)
    kw = dict(gamma=0.3, s_tmin=float(sigmas[6]), s_tmax=float(sigmas[4]), s_noise=1.0)
    prev, x0 = euler_step(mo, x, sigmas, index, noise=noise, backend=backend, **kw)
    plain, _ = euler_step(mo, x, sigmas, index, noise=noise, backend=backend)
    scale = _scale(sigmas, index, 3)
    ref_prev, ref_x0 = _reference("euler", mo, x, sigmas, index, noise, **kw)
    _close(prev, ref_prev, scale, dtype)
    _close(x0, ref_x0, scale, dtype)
    churned = torch.tensor([False, True, True, True, False])
    for i in range(5):
        same = torch.allclose(prev[i].double().cpu(), plain[i].double().cpu(), rtol=1e-3, atol=1e-3)
        assert same != bool(churned[i]), f"row {i} (sigma={float(sigmas[index[i]])}) churned={not same}"


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_int_index_equals_tensor_index(backend, device, kind):
    gen = torch.Generator().manual_seed(3)
    sigmas = _sigmas(kind, "scheduler", device)
    n = sigmas.shape[0]
    shape = (3, 5, 4)
    mo = torch.randn(shape, generator=gen).to(device)
    x = (torch.randn(shape, generator=gen) * 4).to(device)
    prev_x0 = torch.randn(shape, generator=gen).to(device)
    kw = dict(prev_x0=prev_x0) if kind == "dpm" else dict(seed=11, **({"gamma": 0.3} if kind == "euler" else {}))
    for i in (0, 4, n - 2):
        want = _step(kind, mo, x, sigmas, i, backend=backend, **kw)
        for index in (torch.full((3,), i, device=device), torch.tensor(i, device=device)):
            got = _step(kind, mo, x, sigmas, index, backend=backend, **kw)
            for a, b in zip(got, want):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("kind", ["euler", "ancestral"])
def test_noise_seed_offset_and_generator(backend, device, kind):
    gen = torch.Generator().manual_seed(4)
    sigmas = _sigmas(kind, "scheduler", device)
    shape = (4, 3, 5)
    index = torch.tensor([2, 5, 9, 13], device=device)
    mo = torch.randn(shape, generator=gen).to(device)
    x = (torch.randn(shape, generator=gen) * 5).to(device)
    kw = dict(gamma=0.3, s_noise=1.0) if kind == "euler" else {}

    def step(**rng):
        return _step(kind, mo, x, sigmas, index, backend=backend, **kw, **rng)

    a, b = step(seed=123), step(seed=123)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a seed tensor is the same stream as the int
    torch.testing.assert_close(step(seed=torch.tensor([123], device=device)), a, rtol=0, atol=0)
    # the offset moves the stream: seed + offset is the noise randn draws with that offset
    c = step(seed=123, offset=1000)
    assert not torch.allclose(c[0], a[0])
    noise = randn(*shape, seed=123, offset=1000, device=device, backend=backend)
    torch.testing.assert_close(step(noise=noise)[0], c[0], rtol=1e-6, atol=1e-5)
    d = step(seed=124)
    assert not torch.allclose(d[0], a[0])
    # x0 does not depend on the noise for ancestral steps
    if kind == "ancestral":
        torch.testing.assert_close(c[1], a[1], rtol=0, atol=0)
    # generator= (and the default generator) honour manual seeds
    torch.manual_seed(77)
    e = step()
    torch.manual_seed(77)
    f = step()
    torch.testing.assert_close(e, f, rtol=0, atol=0)
    g1, g2 = torch.Generator(device).manual_seed(5), torch.Generator(device).manual_seed(5)
    h1, h2 = step(generator=g1), step(generator=g2)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    h3 = step(generator=g1)  # the generator advanced: fresh noise
    assert not torch.allclose(h3[0], h1[0])
    # no churn: euler is deterministic whatever the seed
    if kind == "euler":
        p1 = _step(kind, mo, x, sigmas, index, seed=1, backend=backend)
        p2 = _step(kind, mo, x, sigmas, index, seed=2, backend=backend)
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_and_empty(backend, device, kind):
    gen = torch.Generator().manual_seed(5)
    sigmas = _sigmas(kind, "scheduler", device)
    n = sigmas.shape[0]
    shape = (4, 3, 7, 9)
    # (B, W, H, C) storage viewed as (B, C, H, W); a strided sigma table and index
    mo_t = torch.randn(4, 9, 7, 3, generator=gen).to(device).permute(0, 3, 2, 1)
    x_t = (torch.randn(4, 9, 7, 3, generator=gen) * 3).to(device).permute(0, 3, 2, 1)
    p_t = torch.randn(4, 3, 14, 9, generator=gen).to(device)[:, :, ::2]
    z_t = torch.randn(4, 3, 7, 18, generator=gen).to(device)[..., 1::2]
    s_t = torch.stack([sigmas, sigmas + 1], 1)[:, 0]
    i_t = torch.tensor([0, 7, 7, 3, n - 2, 1, 5, 9], device=device)[::2]
    views = (mo_t, x_t, p_t, z_t, s_t, i_t)
    assert mo_t.shape == x_t.shape == p_t.shape == z_t.shape == shape
    assert not any(v.is_contiguous() for v in views)
    copies = [v.clone() for v in views]
    if kind == "dpm":
        got = dpmpp_2m_step(mo_t, x_t, s_t, i_t, p_t, backend=backend)
        want = dpmpp_2m_step(*(v.contiguous() for v in (mo_t, x_t, s_t, i_t, p_t)), backend=backend)
    else:
        kw = dict(gamma=0.3) if kind == "euler" else {}
        got = _step(kind, mo_t, x_t, s_t, i_t, noise=z_t, backend=backend, **kw)
        want = _step(kind, *(v.contiguous() for v in (mo_t, x_t, s_t, i_t)), noise=z_t.contiguous(),
                     backend=backend, **kw)
        # and the in-kernel noise does not depend on the layout of the inputs
        torch.testing.assert_close(_step(kind, mo_t, x_t, s_t, i_t, seed=9, backend=backend, **kw),
                                   _step(kind, mo_t.contiguous(), x_t.contiguous(), sigmas, i_t.contiguous(),
                                         seed=9, backend=backend, **kw))
    for a, b in zip(got, want):
        assert a.shape == shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    for v, c in zip(views, copies):  # the inputs are not written
        torch.testing.assert_close(v, c, rtol=0, atol=0)

    # empty batch, and an empty non-batch dimension
    for eshape, index in (((0, 3, 4), torch.zeros(0, dtype=torch.int64, device=device)), ((0, 3, 4), 0),
                          ((2, 0, 3), torch.tensor([0, n - 2], device=device))):
        e = torch.zeros(eshape, device=device)
        if kind == "dpm":
            outs = dpmpp_2m_step(e, e, sigmas, index, e.clone(), backend=backend)
        else:
            outs = _step(kind, e, e, sigmas, index, seed=1, backend=backend)
        for o in outs:
            assert o.shape == eshape and o.dtype == e.dtype


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input(backend, device, kind):
    sigmas = _sigmas(kind, "scheduler", device)
    n = sigmas.shape[0]
    x = torch.zeros(2, 3, device=device)

    def step(mo=x, sample=x, sig=sigmas, index=1, **kw):
        return _step(kind, mo, sample, sig, index, backend=backend, **kw)

    for bad in (n - 1, n, -1):
        with pytest.raises(ValueError, match="index"):
            step(index=bad)
    for bad in ([0, n - 1], [-1, 2]):
        with pytest.raises(ValueError, match="index"):
            step(index=torch.tensor(bad, device=device))
    with pytest.raises(TypeError, match="index"):
        step(index=torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(TypeError, match="index"):
        step(index=torch.tensor([1, 2], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="index"):
        step(index=1.0)
    for bad_shape in ([1, 2, 3], [[1], [2]], [1]):
        with pytest.raises(TypeError, match="index"):
            step(index=torch.tensor(bad_shape, device=device))
    with pytest.raises(ValueError, match="model_output"):
        step(mo=torch.zeros(2, 4, device=device))
    with pytest.raises(TypeError, match="model_output"):
        step(mo=x.long())  # mixed floating dtypes promote; integers are refused
    with pytest.raises(TypeError, match="sigmas"):
        step(sig=sigmas.reshape(1, -1))
    with pytest.raises(TypeError, match="sigmas"):
        step(sig=torch.arange(n, 0, -1, device=device))  # integer table
    with pytest.raises(ValueError, match="prediction_type"):
        step(prediction_type="x0")
    if kind == "dpm":
        with pytest.raises(ValueError, match="prev_x0"):
            step(prev_x0=torch.zeros(2, 4, device=device))
        with pytest.raises(TypeError, match="prev_x0"):
            step(prev_x0=x.long())
        with pytest.raises(ValueError, match="solver_type"):
            step(solver_type="dpmsolver")
    else:
        with pytest.raises(ValueError, match="noise"):
            step(noise=torch.zeros(2, 4, device=device))
        with pytest.raises(TypeError, match="noise"):
            step(noise=x.long())
        churn = dict(gamma=0.5) if kind == "euler" else {}  # euler without churn draws no noise
        with pytest.raises(ValueError, match="seed"):
            step(seed=1, generator=torch.Generator(device), **churn)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_sigma_steps_compile():
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(6)
    sigmas = sched.sigmas
    dsched = DPMSolverMultistepScheduler()
    dsched.set_timesteps(4)
    dsigmas = dsched.sigmas
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 5, generator=gen) * 10
    mo, prev_x0, noise = (torch.randn(3, 5, generator=gen) for _ in range(3))
    index = torch.tensor([0, 2, 4])
    # (model_output, sample, sigmas, index, prev_x0, kind, prediction, gamma, s_tmin, s_tmax, s_noise, noise, seed,
    #  offset); kind 0 euler, 1 euler-ancestral, 2 midpoint, 3 heun
    op = torch.ops.pygen.sigma_step
    torch.library.opcheck(op, (mo, x, sigmas, index, None, 0, 2, 0.3, 0.5, 20.0, 1.0, None, torch.tensor([3]), 5))
    torch.library.opcheck(op, (mo, x, sigmas, index, None, 1, 0, 0.0, 0.0, 0.0, 1.0, noise, None, 0))
    torch.library.opcheck(op, (mo, x / 10, dsigmas, torch.tensor([1, 3, 2]), prev_x0, 3, 1, 0.0, 0.0, 0.0, 1.0,
                               None, None, 0))

    def loop(x, seed):
        for i in range(3):
            x, _ = euler_step(torch.tanh(x), x, sigmas, i, gamma=0.2, seed=seed, backend="cpp")
            x, _ = euler_ancestral_step(torch.tanh(x), x, sigmas, torch.tensor([i + 2, i, 5]), seed=seed,
                                        offset=15, backend="cpp")
        y, p = x / 10, None
        for i in range(4):
            y, p = dpmpp_2m_step(torch.tanh(y), y, dsigmas, i, p, backend="cpp")
        return x, y

    seed = torch.tensor([7])
    # inductor's tanh differs from eager's in the last bits (and the steps scale it by sigma ~ 100)
    torch.testing.assert_close(torch.compile(loop, fullgraph=True)(x, seed), loop(x, seed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_loop_matches_reference(backend, device, solver_type, prediction_type):
    """10 DPM-Solver++(2M) steps, x0 passed along, vs the same loop with the float64 reference."""
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().to(device)
    n = sigmas.shape[0]
    target = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device)

    def model(x, i):  # a smooth, nonlinear stand-in for a network
        return torch.tanh(x + 0.1 * i) * 0.8 + 0.2 * target

    x = x_ref = randn(3, 8, seed=1, device=device, dtype=torch.float64)
    p = p_ref = None
    kw = dict(solver_type=solver_type, prediction_type=prediction_type)
    for i in range(n - 1):
        x, p = dpmpp_2m_step(model(x, i), x, sigmas, i, p, backend=backend, **kw)
        s, sn = sigmas[i].cpu(), sigmas[i + 1].cpu()
        second = i > 0 and float(sn) > 0
        x_ref, p_new = R.dpmpp_2m_step_ref(model(x_ref, i).cpu(), x_ref.cpu(), s, sn, p_ref if second else None,
                                           sigmas[i - 1].cpu() if second else None, **kw)
        p_ref = p_new
        torch.testing.assert_close(x.cpu(), x_ref, **TOL_DPM64)
        torch.testing.assert_close(p.cpu(), p_ref, **TOL_DPM64)
        x_ref = x_ref.to(device)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_loop_with_exact_model_lands_on_the_data_point(backend, device, kind):
    """An exact epsilon model for data that is one point x0*: every sampler ends on x0*."""
    sigmas = _sigmas(kind, "scheduler", device).double()
    target = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(device)
    z = randn(3, 8, seed=1, device=device, dtype=torch.float64)
    x, p = (z if kind == "dpm" else z * sigmas[0]), None
    for i in range(sigmas.shape[0] - 1):
        s = sigmas[i]
        if kind == "dpm":  # VP sample: x = alpha x0 + sigma_t eps
            a = 1 / (s * s + 1).sqrt()
            x, p = dpmpp_2m_step((x - a * target) / (s * a), x, sigmas, i, p, backend=backend)
        elif kind == "euler":
            x, _ = euler_step((x - target) / s, x, sigmas, i, backend=backend)
        else:
            x, _ = euler_ancestral_step((x - target) / s, x, sigmas, i, seed=i, backend=backend)
    torch.testing.assert_close(x, target, rtol=1e-8, atol=1e-8)


def test_raw_ops_check_or_clamp_table_indices():
    """The C++ ops reject out-of-range indices of CPU tensors with a clear error; the Triton
    ops (which cannot check on a GPU without a sync) clamp them into the table instead of
    reading out of bounds."""
    sigmas = torch.tensor([3.0, 1.0, 0.0])
    mo, x = torch.randn(2, 5), torch.randn(2, 5)
    args = (None, 1, 0, 0.0, 0.0, 0.0, 1.0, None, torch.tensor([3]), 0)
    if HAS_CPP:
        with pytest.raises(RuntimeError, match=r"index must be in \[0, 1\]; got 7"):
            torch.ops.pygen.sigma_step(mo, x, sigmas, torch.tensor([0, 7]), *args)
        table = torch.linspace(0.99, 0.01, 10)
        with pytest.raises(RuntimeError, match=r"t must be in \[0, 9\]; got 10"):
            torch.ops.pygen.alpha_step(mo, x, table, torch.tensor([10, 0]), torch.tensor([0, -1]), 1.0, 0, 0, 0.0, 0.0,
                                       False, None, None, 0)
        with pytest.raises(RuntimeError, match=r"prev_t must be <= 9 \(negative: the final step\); got 10"):
            torch.ops.pygen.alpha_step(mo, x, table, torch.tensor([1, 0]), torch.tensor([10, -1]), 1.0, 0, 0, 0.0, 0.0,
                                       False, None, None, 0)
        with pytest.raises(RuntimeError, match=r"index must be an int64 tensor of shape \(\), \(1,\) or \(2,\)"):
            torch.ops.pygen.sigma_step(mo, x, sigmas, torch.tensor([0, 1, 1]), *args)
    if "triton" in pygen.available_backends():
        got = torch.ops.pygen.triton_sigma_step(mo, x, sigmas, torch.tensor([-4, 7]), *args)
        want = torch.ops.pygen.triton_sigma_step(mo, x, sigmas, torch.tensor([0, 1]), *args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
def test_churn_gate_reads_a_float64_table_in_float64(backend, device):
    """A float32 sample with a float64 sigma table: the s_tmin/s_tmax gate compares the
    table's float64 values on every backend (1.1 is not a float32 number)."""
    sigmas = torch.tensor([1.1, 0.5, 0.0], dtype=torch.float64, device=device)
    mo = torch.randn(3, 4, device=device)
    x = torch.randn(3, 4, device=device)
    noise = torch.randn(3, 4, device=device)
    idx = torch.tensor([0, 0, 1], device=device)
    got, _ = euler_step(mo, x, sigmas, idx, gamma=0.3, s_tmax=1.1, noise=noise, backend=backend)
    ref, _ = euler_step(mo.double(), x.double(), sigmas, idx, gamma=0.3, s_tmax=1.1, noise=noise.double(),
                        backend="torch")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    plain, _ = euler_step(mo.double(), x.double(), sigmas, idx, noise=noise.double(), backend="torch")
    assert not torch.allclose(ref[:2], plain[:2])  # the churn is on for sigma = 1.1 (the gate is inclusive)

"""Triton backend hardening, one section per fixed bug class:

1. launch grids within CUDA's limits (the spline's column chunks);
2. chunked row reductions (rows longer than one tile) apply their sign / scale once;
3. every launcher honours its inputs' strides (transposed, step-2, channels_last, stride 0);
4. NaN policy: a NaN input makes its element's outputs and its row's reduction NaN, and
   touches no other row (clamps must not swallow it);
5. accuracy near zero: Gaussian KL (e^x - 1 - x) and the soft clamp's tanh, relative error;
6. (B,) reductions come back in float32 (float64 for float64) and backward launchers take
   the incoming gradient in that dtype.

Small shapes and shrunken tiles (monkeypatched) keep the interpreter fast.
"""

import math

import pytest
import torch

import pygen
from pygen.ops import (
    affine_coupling,
    affine_coupling_ref,
    ddim_step,
    ddpm_step,
    diffusion_mse,
    diffusion_mse_ref,
    euler_ancestral_step,
    gaussian_kl,
    q_sample,
    randn,
    reparameterize,
    rq_spline,
    rq_spline_ref,
)

pytestmark = pytest.mark.skipif("triton" not in pygen.available_backends(), reason="triton unavailable")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
T = "triton"


def _kernels():
    from pygen.kernels import _rowwise, coupling, diffusion, gaussian, spline

    return _rowwise, coupling, diffusion, gaussian, spline


def _table(n=1000):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, n, dtype=torch.float64), 0).to(DEV)


def _spline_params(shape, k, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w, h = (torch.randn(*shape, k, generator=g, dtype=torch.float64) for _ in range(2))
    d = torch.randn(*shape, k - 1, generator=g, dtype=torch.float64)
    return (t.to(DEV, dtype) for t in (w, h, d))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements (spline: 64 element x K lanes): short rows span several chunks."""
    rw, _, _, _, sp = _kernels()
    monkeypatch.setattr(rw, "_TILE", 64)
    monkeypatch.setattr(sp, "_TILE_ELEMS", 64)


# ---- 1. launch grids ---------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [2**20 + 1, 2**24 + 3, 3 * 2**28])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("tile_elems", [1024, 1 << 14], ids=["gpu", "interp"])
def test_spline_grid_within_cuda_limits(monkeypatch, rows, cols, tile_elems):
    sp = _kernels()[4]
    monkeypatch.setattr(sp, "_TILE_ELEMS", tile_elems)
    for k in (2, 8, 64):
        kp, block_r, block_c, chunks, grid = sp._spline_tiles(rows, cols, k)
        assert grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:]), grid
        assert chunks * block_c >= cols and math.prod(grid) >= -(-rows // block_r) * chunks
        assert block_r * block_c * kp <= max(tile_elems, kp)  # the register tile did not grow


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_spline_multi_chunk_rows_match_reference(small_tiles, inverse):
    x = (torch.rand(3, 37, dtype=torch.float64) * 7 - 3.5).to(DEV)  # some in the tails
    w, h, d = _spline_params((3, 37), 8, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, ld = rq_spline(*leaves, inverse=inverse, backend=T)
    ref = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y_ref, ld_ref = rq_spline_ref(*ref, inverse=inverse)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)
    gy, gl = torch.randn_like(y), torch.randn_like(ld)
    got = torch.autograd.grad((y, ld), leaves, (gy, gl))
    for a, b in zip(got, torch.autograd.grad((y_ref, ld_ref), ref, (gy, gl))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


# ---- 2. chunked reductions: sign and scale once -------------------------------------------------


def test_affine_inverse_logdet_sign_two_tiles_plus_one():
    torch.manual_seed(0)
    n = 2 * 65536 + 1 if DEV == "cpu" else 2 * 2048 + 1  # the interpreter's tile is 65536, the GPU's 2048
    x, t, s = torch.randn(1, n, device=DEV), torch.randn(1, n, device=DEV), torch.rand(1, n, device=DEV) * 0.1
    for inverse in (False, True):
        y, ld = affine_coupling(x, t, s, inverse=inverse, backend=T)
        y_ref, ld_ref = affine_coupling_ref(x.double(), t.double(), s.double(), inverse=inverse)
        torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("clamp", [None, 1.9], ids=["noclamp", "clamp"])
def test_chunked_reductions_match_reference(small_tiles, inverse, clamp):
    g = torch.Generator().manual_seed(1)
    x, t, s, mu, lv, pm, pl = (torch.randn(3, 5, 41, generator=g, dtype=torch.float64).to(DEV) for _ in range(7))
    mask = (torch.arange(41) % 3 > 0).to(DEV, torch.float64)
    y, ld = affine_coupling(x, t, s, inverse=inverse, soft_clamp=clamp, mask=mask, backend=T)
    y_ref, ld_ref = affine_coupling_ref(x, t, s, inverse=inverse, soft_clamp=clamp, mask=mask)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    if inverse:
        return
    torch.testing.assert_close(gaussian_kl(mu, lv, backend=T), _kl64(mu, lv), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gaussian_kl(mu, lv, pm, pl, backend=T), _kl64(mu, lv, pm, pl), rtol=1e-10, atol=1e-10)
    table, tt = _table(), torch.tensor([0, 500, 999], device=DEV)
    eps = randn(*x.shape, seed=5, offset=3, device=DEV, dtype=torch.float64, backend=T)
    for pred in ("epsilon", "v_prediction"):
        loss = diffusion_mse(mu, x, tt, table, seed=5, offset=3, prediction_type=pred, snr_gamma=5.0, backend=T)
        torch.testing.assert_close(loss, diffusion_mse_ref(mu, x, tt, table, eps, pred, 5.0), rtol=1e-10, atol=1e-10)


# ---- 3. strides ---------------------------------------------------------------------------------


def _layouts(base):
    """base's values (B, C, H, W) in several memory layouts (expanded: stride-0 copies of a slice)."""
    b, c, h, w = shape = base.shape
    dtype = base.dtype
    return [
        ("contiguous", base),
        ("transposed", base.transpose(2, 3).contiguous().transpose(2, 3)),
        ("step2", torch.zeros(b, c, h, 2 * w, dtype=dtype, device=DEV)[..., ::2].copy_(base)),
        ("channels_last", base.contiguous(memory_format=torch.channels_last)),
        ("expanded", base[:, :1, :1, :].expand(shape)),
    ]


SHAPE = (2, 3, 4, 5)


@pytest.mark.parametrize("kind", ["ddim", "fixed_small", "fixed_large"])
def test_alpha_step_honours_noise_strides(kind):
    mo, x = torch.randn(SHAPE, dtype=torch.float64, device=DEV), torch.randn(SHAPE, dtype=torch.float64, device=DEV)
    table = _table()
    step = ddim_step if kind == "ddim" else ddpm_step
    kw = dict(eta=1.0) if kind == "ddim" else dict(variance_type=kind)
    for name, noise in _layouts(torch.randn(SHAPE, dtype=torch.float64, device=DEV)):
        want = step(mo, x, 500, table, 480, noise=noise.contiguous(), backend=T, **kw)
        got = step(mo, x, 500, table, 480, noise=noise, backend=T, **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_every_launcher_honours_input_strides():
    """Each tensor argument in each layout gives the result of its contiguous copy, bit for bit."""
    table = _table()
    sig = torch.linspace(10.0, 0.0, 11, dtype=torch.float64, device=DEV)

    def ops(a, b, c):
        return {
            "affine": affine_coupling(a, b, c, inverse=True, soft_clamp=1.5, mask=(c > 0).double(), backend=T),
            "spline": rq_spline(a, *_spline_params(SHAPE, 4, torch.float64), backend=T),
            "kl": gaussian_kl(a, b, c, a * 0.5, backend=T),
            "z": reparameterize(a, b, seed=3, backend=T),
            "ddim": ddim_step(a, b, 500, table, 450, eta=0.5, noise=c, clip_sample=True, backend=T),
            "ddpm": ddpm_step(a, b, torch.tensor([500, 3], device=DEV), table, 450, noise=c, backend=T),
            "euler_a": euler_ancestral_step(a, b, sig, 2, noise=c, backend=T),
            "q": q_sample(a, torch.tensor([500, 7], device=DEV), table, seed=4, backend=T),
            "mse": diffusion_mse(a, b, torch.tensor([500, 7], device=DEV), table, seed=4, backend=T),
        }

    bases = [torch.randn(SHAPE, dtype=torch.float64, device=DEV) for _ in range(3)]
    for which in range(3):
        for name, t in _layouts(bases[which])[1:]:
            args = list(bases)
            args[which] = t
            want, got = ops(*(a.contiguous() for a in args)), ops(*args)
            for key in want:
                w, g = want[key], got[key]
                for a, b in zip(g if isinstance(g, tuple) else (g,), w if isinstance(w, tuple) else (w,)):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key}: argument {which} {name}")


def test_shared_timestep_training_launchers_read_one_value():
    """A (1,) t (one timestep for every sample) is read with stride 0, never past its end: here
    a view into a longer tensor whose next values differ."""
    kd = _kernels()[2]
    table, x0 = _table(), torch.randn(4, 8, dtype=torch.float64, device=DEV)
    mo, seed = x0 * 0.5, torch.tensor([3], device=DEV)
    one, full = torch.tensor([500, 3, 999, 7], device=DEV)[:1], torch.full((4,), 500, device=DEV)
    torch.testing.assert_close(kd.q_sample(x0, table, one, seed, 0), kd.q_sample(x0, table, full, seed, 0))
    for grad in (None, torch.randn(4, dtype=torch.float64, device=DEV)):
        for a, b in zip(kd.diffusion_mse(grad, mo, x0, table, one, seed, 0, 2, 5.0),
                        kd.diffusion_mse(grad, mo, x0, table, full, seed, 0, 2, 5.0)):
            torch.testing.assert_close(a, b)


def test_backward_launchers_honour_grad_strides():
    _, kc, kd, kg, ks = _kernels()
    x, t, s = (torch.randn(3, 4, 6, dtype=torch.float64, device=DEV) for _ in range(3))
    gy = torch.randn(3, 6, 4, dtype=torch.float64, device=DEV).transpose(1, 2)
    gl = torch.randn(3, 2, dtype=torch.float64, device=DEV)[:, 0]
    for a, b in zip(kc.affine_backward(gy, gl, x, t, s, None, True, 1.5),
                    kc.affine_backward(gy.contiguous(), gl.contiguous(), x, t, s, None, True, 1.5)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    seed = torch.tensor([3], device=DEV)
    for a, b in zip(kg.gaussian_backward(gy, gl, x, t, s, s, seed, 0, True),
                    kg.gaussian_backward(gy.contiguous(), gl.contiguous(), x, t, s, s, seed, 0, True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    w, h, d = _spline_params((3, 4, 6), 4, torch.float64)
    args = (x, w, h, d, False, 3.0, 1e-3, 1e-3, 1e-3)
    for a, b in zip(ks.spline_backward(gy, gl, *args), ks.spline_backward(gy.contiguous(), gl.contiguous(), *args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    seed, tt = torch.tensor([3], device=DEV), torch.tensor([1, 500, 999], device=DEV)
    for a, b in zip(kd.diffusion_mse(gl, x, t, _table(), tt, seed, 0, 0, 5.0),
                    kd.diffusion_mse(gl.contiguous(), x, t, _table(), tt, seed, 0, 0, 5.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- 4. NaN policy ------------------------------------------------------------------------------


def _nan_at(t, idx=(1, 2)):
    t = t.clone()
    t[idx] = float("nan")
    return t


def _assert_nan_row(out, idx=(1, 2), row_sum=None, name=""):
    """out's element idx is NaN, every other row is finite; row_sum (B,) is NaN in row idx[0] only."""
    r = idx[0]
    assert torch.isnan(out[idx]).all(), f"{name}: the element's output is not NaN"
    others = torch.cat([out[:r].flatten(), out[r + 1:].flatten()])
    assert torch.isfinite(others).all(), f"{name}: a NaN leaked into another row"
    if row_sum is not None:
        assert torch.isnan(row_sum[r]), f"{name}: the row's reduction swallowed the NaN"
        assert torch.isfinite(torch.cat([row_sum[:r], row_sum[r + 1:]])).all(), f"{name}: other rows' reductions"


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("clamp", [None, 2.0], ids=["noclamp", "clamp"])
def test_nan_policy_affine(inverse, clamp):
    x, t, s = (torch.randn(3, 5, device=DEV) for _ in range(3))
    for i, name in enumerate(("x", "shift", "log_scale")):
        args = [x, t, s]
        args[i] = _nan_at(args[i])
        y, ld = affine_coupling(*args, inverse=inverse, soft_clamp=clamp, backend=T)
        # logdet sums s: it depends on log_scale only
        _assert_nan_row(y, row_sum=ld if name == "log_scale" else None, name=name)
        if name != "log_scale":
            assert torch.isfinite(ld).all()


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_nan_policy_spline(inverse):
    k = 4  # uniform bins on [-3, 3]: knots -3, -1.5, 0, 1.5, 3
    x = torch.full((3, 5), 0.75, device=DEV)  # in bin 2 of x and of y (uniform widths and heights)
    w, h, d = (torch.zeros(3, 5, n, device=DEV) for n in (k, k, k - 1))
    for name, pos in (("x", (1, 2)), ("widths", (1, 2, 0)), ("heights", (1, 2, 3)), ("derivatives", (1, 2, 1)),
                      ("derivatives", (1, 2, 2))):  # d_2 and d_3: the two knots of bin 2
        args = dict(x=x, widths=w, heights=h, derivatives=d)
        args[name] = _nan_at(args[name], pos)
        y, ld = rq_spline(args["x"], args["widths"], args["heights"], args["derivatives"], inverse=inverse, backend=T)
        _assert_nan_row(y, row_sum=ld, name=f"{name}{pos}")


def test_nan_policy_gaussian():
    mu, lv, pm, pl = (torch.randn(3, 5, device=DEV) for _ in range(4))
    for i, name in enumerate(("mu", "logvar", "prior_mu", "prior_logvar")):
        args = [mu, lv, pm, pl]
        args[i] = _nan_at(args[i])
        kl = gaussian_kl(*args, backend=T)
        assert torch.isnan(kl[1]) and torch.isfinite(kl[[0, 2]]).all(), name
        if i < 2:
            kl0 = gaussian_kl(args[0], args[1], backend=T)
            assert torch.isnan(kl0[1]) and torch.isfinite(kl0[[0, 2]]).all(), name
            _assert_nan_row(reparameterize(args[0], args[1], seed=1, backend=T), name=name)


@pytest.mark.parametrize("kind,kw", [
    ("ddim", dict(eta=0.5, clip_sample=True, clip_sample_range=1.0)),
    ("ddim", dict(eta=0.0, clip_sample=True, use_clipped_model_output=True, prediction_type="sample")),
    ("fixed_small", dict(clip_sample=True, clip_sample_range=0.5)),
    ("fixed_large", dict(clip_sample=True, prediction_type="v_prediction")),
], ids=["ddim-clip", "ddim-clip-sample", "ddpm-small-clip", "ddpm-large-clip-v"])
def test_nan_policy_alpha_steps(kind, kw):
    mo, x, z = (torch.randn(3, 5, device=DEV) * 3 for _ in range(3))
    table = _table()
    step = ddim_step if kind == "ddim" else ddpm_step
    if kind != "ddim":
        kw = dict(kw, variance_type=kind)
    x0_reads_sample = kw.get("prediction_type") != "sample"
    noisy = kw.get("eta", 1.0) > 0
    for i, name in enumerate(("model_output", "sample", "noise")):
        if name == "noise" and not noisy:
            continue
        args = [mo, x, z]
        args[i] = _nan_at(args[i])
        prev, x0 = step(args[0], args[1], 500, table, 450, noise=args[2], backend=T, **kw)
        _assert_nan_row(prev, name=f"{name} prev")
        if name == "model_output" or (name == "sample" and x0_reads_sample):
            _assert_nan_row(x0, name=f"{name} x0")  # the clip must not turn NaN into +-range


def test_nan_policy_sigma_steps_and_training():
    mo, x, z = (torch.randn(3, 5, device=DEV) for _ in range(3))
    sig = torch.linspace(10.0, 0.0, 11, device=DEV)
    for i in range(3):
        args = [mo, x, z]
        args[i] = _nan_at(args[i])
        prev, _ = euler_ancestral_step(args[0], args[1], sig, 2, noise=args[2], backend=T)
        _assert_nan_row(prev, name=f"euler_a arg {i}")
    table, tt = _table(), torch.tensor([10, 500, 999], device=DEV)
    for i in range(2):
        args = [mo, x]
        args[i] = _nan_at(args[i])
        for snr in (None, 5.0):  # v-prediction: the target reads x0 (the epsilon target does not)
            loss = diffusion_mse(args[0], args[1], tt, table, seed=2, snr_gamma=snr, prediction_type="v_prediction",
                                 backend=T)
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    _assert_nan_row(q_sample(_nan_at(x), tt, table, seed=2, backend=T))


# ---- 5. accuracy near zero ----------------------------------------------------------------------


def _f64(x):
    """e^x - 1 - x in float64 (expm1 keeps it accurate: 2 eps / |x| relative, ample here)."""
    return torch.expm1(x) - x


def _kl64(mu, lv, pm=None, pl=None):
    mu, lv = mu.double(), lv.double()
    if pm is None:
        term = _f64(lv) + mu * mu
    else:
        d = mu - pm.double()
        term = _f64(lv - pl.double()) + d * d * torch.exp(-pl.double())
    return 0.5 * term.reshape(mu.shape[0], -1).sum(1)


def _rel_close(got, want, rtol, name=""):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bad = err > rtol * want.abs() + 1e-300
    assert not bad.any(), f"{name}: max rel err {(err / want.abs().clamp_min(1e-300)).max().item():.3g}"


SMALL = [s * v for v in (1e-2, 1e-4, 1e-6) for s in (1, -1)]


@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_gaussian_kl_relative_accuracy_near_zero(prior):
    # one row per (logvar, mu) case, 3 equal elements each: the row's sum keeps the relative error
    cases = [(v, m) for v in SMALL for m in (0.0, 1e-4, -3e-3)]
    lv = torch.tensor([[v] * 3 for v, _ in cases], dtype=torch.float32, device=DEV)
    mu = torch.tensor([[m] * 3 for _, m in cases], dtype=torch.float32, device=DEV)
    pm = pl = None
    if prior:  # lv - plv is the small number; plv itself is not
        pl = torch.full_like(lv, 0.375)
        lv = lv + pl  # rounded in float32; lv - pl is then exact (Sterbenz) and the reference reads the same values
        pm = torch.full_like(mu, 0.25)
        mu = mu + pm
    leaves = [t.clone().requires_grad_(True) for t in (mu, lv, pm, pl) if t is not None]
    kl = gaussian_kl(*leaves, backend=T)
    _rel_close(kl, _kl64(mu, lv, pm, pl), 1e-5, "kl")
    gk = torch.linspace(0.5, 2.0, len(cases), device=DEV)
    grads = torch.autograd.grad(kl, leaves, gk)
    g = gk.double()[:, None]
    m64, l64 = mu.double(), lv.double()
    if prior:
        d, p64 = m64 - pm.double(), pl.double()
        want = [g * d * torch.exp(-p64), 0.5 * g * torch.expm1(l64 - p64)]
        want += [-want[0], -0.5 * g * (torch.expm1(l64 - p64) + d * d * torch.exp(-p64))]
    else:
        want = [g * m64, 0.5 * g * torch.expm1(l64)]
    for name, a, b in zip(("mu", "logvar", "prior_mu", "prior_logvar"), grads, want):
        _rel_close(a, b, 1e-5, f"grad {name}")


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_soft_clamp_relative_accuracy_near_zero(inverse):
    vals = [s * v for v in (1e-5, 1e-7, 3e-3, 0.7, 2.5, 30.0) for s in (1, -1)]
    ls = torch.tensor([[v] * 4 for v in vals], dtype=torch.float32, device=DEV)
    x, t = torch.randn_like(ls), torch.randn_like(ls)
    for clamp in (1.0, 1.9):
        leaves = [v.clone().requires_grad_(True) for v in (x, t, ls)]
        y, ld = affine_coupling(*leaves, inverse=inverse, soft_clamp=clamp, backend=T)
        ref = [v.double().requires_grad_(True) for v in (x, t, ls)]
        y_ref, ld_ref = affine_coupling_ref(*ref, inverse=inverse, soft_clamp=clamp)
        _rel_close(ld, ld_ref, 1e-5, f"logdet clamp={clamp}")
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
        gy, gl = torch.randn_like(y), torch.randn_like(ld)
        got = torch.autograd.grad((y, ld), leaves, (gy, gl))
        want = torch.autograd.grad((y_ref, ld_ref), ref, (gy.double(), gl.double()))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


# ---- 6. reduction dtypes ------------------------------------------------------------------------


def _rdt(dtype):
    return torch.promote_types(dtype, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_reductions_are_float32_or_float64(dtype):
    """Launchers allocate (B,) reductions in promote_types(dtype, float32); float16 under the
    interpreter too (bfloat16 is not testable there: numpy has no bfloat16)."""
    _, kc, kd, kg, ks = _kernels()
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(4, 4, 64, 64, generator=g) * 3).to(DEV, dtype)
    lv = torch.randn(4, 4, 64, 64, generator=g).to(DEV, dtype)
    # a 4x64x64 latent: the KL rows are ~1e5, beyond float16's range
    _, kl = kg.gaussian_forward(mu, lv, None, None, None, 0, sample=False, kl=True)
    assert kl.dtype == _rdt(dtype) and torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), _kl64(mu, lv), rtol=1e-5, atol=0)
    _, ld = kc.affine_forward(mu, lv, lv, None, True, 0.0)
    assert ld.dtype == _rdt(dtype) and torch.isfinite(ld).all()
    torch.testing.assert_close(ld.double(), -lv.double().reshape(4, -1).sum(1), rtol=1e-5, atol=1e-2)
    table, tt = _table(), torch.tensor([0, 10, 500, 999], device=DEV)
    mo = mu * 40  # "sample" prediction: the loss is mean((mo - x0)^2)
    (loss,) = kd.diffusion_mse(None, mo, lv, table, tt, torch.tensor([3], device=DEV), 0, 1, 0.0)
    assert loss.dtype == _rdt(dtype) and torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ((mo.double() - lv.double()) ** 2).reshape(4, -1).mean(1),
                               rtol=1e-5, atol=0)
    xs = (torch.randn(3, 40, generator=g) * 2).to(DEV, dtype)
    w, h, d = _spline_params((3, 40), 4, dtype)
    _, sld = ks.spline_forward(xs, w, h, d, False, 3.0, 1e-3, 1e-3, 1e-3)
    assert sld.dtype == _rdt(dtype)
    ref = rq_spline_ref(xs.double(), w.double(), h.double(), d.double())[1]
    torch.testing.assert_close(sld.double(), ref, rtol=1e-2 if dtype == torch.float16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_backward_launchers_take_float32_grads(dtype):
    _, kc, kd, kg, ks = _kernels()
    x, t, s = (torch.randn(3, 7, device=DEV).to(dtype) for _ in range(3))
    gy = torch.randn(3, 7, device=DEV).to(dtype)
    g32 = torch.randn(3, device=DEV)  # the reduction's gradient comes in the reduction's dtype
    g_in = g32.to(dtype)  # what the same gradient was before: the grads must agree
    for a, b in zip(kc.affine_backward(gy, g32, x, t, s, None, True, 1.5),
                    kc.affine_backward(gy, g_in, x, t, s, None, True, 1.5)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    for a, b in zip(kg.gaussian_backward(None, g32, x, t, None, None, None, 0, True),
                    kg.gaussian_backward(None, g_in, x, t, None, None, None, 0, True)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    w, h, d = _spline_params((3, 7), 4, dtype)
    args = (x, w, h, d, False, 3.0, 1e-3, 1e-3, 1e-3)
    for a, b in zip(ks.spline_backward(gy, g32, *args), ks.spline_backward(gy, g_in, *args)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    seed, tt = torch.tensor([3], device=DEV), torch.tensor([1, 500, 999], device=DEV)
    for a, b in zip(kd.diffusion_mse(g32, x, t, _table(), tt, seed, 0, 0, 0.0),
                    kd.diffusion_mse(g_in, x, t, _table(), tt, seed, 0, 0, 0.0)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

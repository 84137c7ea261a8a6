"""Fused DDIM / DDPM steps (pygen.ops.ddim_step, ddpm_step) on every backend against the
float64 reference steps of pygen.ops.diffusion; per-sample timesteps; in-kernel noise.

Tolerances vs float64: float64 1e-10, float32 1e-5 (relative to the values ~1),
float16/bfloat16 (GPU) 1e-2 / 2e-2.
"""

import pytest
import torch

from pygen.diffusion import schedules as S
from pygen.ops import diffusion as R
from pygen.ops import ddim_step, ddpm_step, randn

from backends_under_test import BACKEND_DEVICES, dtypes_for

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
STEP_BACKENDS = BACKEND_DEVICES


def _params():
    for backend, device in STEP_BACKENDS:
        for dtype in dtypes_for(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


def _table(device, n=1000):
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device)


def _reference(kind, mo, x, t, tp, table, noise, **kw):
    n = table.shape[0]
    ab = R.gather(table.double().cpu(), t.cpu(), x.dim())
    prev_table = torch.cat([table.double().cpu(), torch.ones(1, dtype=torch.float64)])
    ab_prev = R.gather(prev_table, torch.where(tp.cpu() < 0, n, tp.cpu()), x.dim())
    args = (mo.double().cpu(), x.double().cpu(), ab, ab_prev)
    if kind == "ddim":
        return R.ddim_step_ref(*args, noise.double().cpu(), **kw)
    gate = (t.cpu() > 0).double().reshape(-1, *([1] * (x.dim() - 1)))
    return R.ddpm_step_ref(*args, noise.double().cpu() * gate, variance_type=kind, **kw)


CASES = [
    ("ddim", dict(eta=0.0)),
    ("ddim", dict(eta=1.0, prediction_type="v_prediction")),
    ("ddim", dict(eta=0.3, prediction_type="sample", clip_sample=True, clip_sample_range=1.5)),
    ("ddim", dict(eta=0.5, clip_sample=True, use_clipped_model_output=True)),
    ("fixed_small", dict()),
    ("fixed_large", dict(prediction_type="v_prediction", clip_sample=True)),
]


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (2, 4099), (1, 1)], ids=str)
def test_step_matches_reference_with_per_sample_timesteps(backend, device, dtype, kind, kw, shape):
    table = _table(device)
    b = shape[0]
    t = torch.randint(0, 1000, (b,), device=device)
    t[0] = 0 if b > 1 else t[0]  # the last step: no noise for DDPM, prev is the final alpha
    tp = torch.where(t - 37 >= 0, t - 37, torch.full_like(t, -1))
    mo = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    x = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    seed = int(torch.randint(0, 2**62, ()))
    noise = randn(*shape, seed=seed, device=device, dtype=dtype, backend=backend)  # the stream this backend draws
    step = ddim_step if kind == "ddim" else ddpm_step
    extra = {} if kind == "ddim" else {"variance_type": kind}
    prev, x0 = step(mo, x, t, table, tp, seed=seed, backend=backend, **extra, **kw)
    prev_n, x0_n = step(mo, x, t, table, tp, noise=noise, backend=backend, **extra, **kw)
    ref_prev, ref_x0 = _reference(kind, mo, x, t, tp, table, noise, **kw)
    # the step divides by sqrt(1 - ab_t): a kernel computing its coefficients in float32 (Triton)
    # has its rounding amplified by up to that factor at small t; tolerances scale with it (a
    # wrong coefficient is off by O(0.1))
    ab = R.gather(table.double().cpu(), t.cpu(), x.dim())
    cond = 1 + 1 / (1 - ab).clamp_min(1e-12).sqrt() if dtype != torch.float64 else torch.ones_like(ab)
    tol = TOL[dtype]
    for got, want in ((prev, ref_prev), (prev_n, ref_prev), (x0, ref_x0), (x0_n, ref_x0)):
        err = (got.double().cpu() - want).abs()
        bound = (tol["atol"] + tol["rtol"] * want.abs()) * cond
        assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}, at most {float((err / bound).max()):.3g} x the bound"
    # stepping each sample alone gives the same result
    for i in range(b):
        p_i, _ = step(mo[i:i + 1], x[i:i + 1], t[i:i + 1], table, tp[i:i + 1], noise=noise[i:i + 1],
                      backend=backend, **extra, **kw)
        torch.testing.assert_close(p_i, prev_n[i:i + 1])


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
def test_ddim_loop_recovers_the_data_point(backend, device):
    """An exact epsilon model for data that is one point x0*: DDIM (eta = 0) lands on x0*."""
    table = _table(device)
    target = torch.randn(3, 8, device=device, dtype=torch.float64)
    ts = list(range(999, -1, -50))
    x = randn(3, 8, seed=1, device=device, dtype=torch.float64)
    for i, t in enumerate(ts):
        ab = table[t]
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        x, _ = ddim_step(eps, x, t, table, prev_t, backend=backend)
    torch.testing.assert_close(x, target, rtol=1e-8, atol=1e-8)


def test_step_bad_input():
    table = _table("cpu")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1000\)"):
        ddim_step(x, x, 1000, table, 0)
    with pytest.raises(TypeError, match="t must be an int or an int64 tensor"):
        ddim_step(x, x, torch.tensor([1.0, 2.0]), table, 0)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample"):
        ddim_step(torch.zeros(2, 4), x, 10, table, 0)
    with pytest.raises(ValueError, match=r"prev_t must be in \[-1, 1000\)"):
        ddpm_step(x, x, 10, table, 1000)
    with pytest.raises(TypeError, match=r"t must be an int or an int64 tensor of shape \(\) or \(2,\)"):
        ddim_step(x, x, torch.tensor([5, 6, 7]), table, 0)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(x, x, 10, table, 0, variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(x, x, 10, table, 0, prediction_type="x0")
    with pytest.raises(ValueError, match=r"t must be in \[0, 1000\)"):
        ddim_step(x, x, torch.tensor([5, 1000]), table, 0)


@pytest.mark.skipif("cpp" not in __import__("pygen").available_backends(), reason="C++ extension not built")
def test_step_opcheck_and_compile():
    table = _table("cpu").float()
    mo, x = torch.randn(3, 5), torch.randn(3, 5)
    t, tp = torch.tensor([10, 500, 0]), torch.tensor([0, 400, -1])
    torch.library.opcheck(torch.ops.pygen.alpha_step, (mo, x, table, t, tp, 1.0, 0, 0, 0.5, 0.0, False, None,
                                                       torch.tensor([3]), 0))
    torch.library.opcheck(torch.ops.pygen.alpha_step, (mo, x, table, t, tp, 1.0, 1, 2, 0.0, 1.0, False, None,
                                                       torch.tensor([3]), 0), {"write_x0": False})

    def loop(x, seed):
        for t_, tp_ in ((900, 600), (600, 300), (300, -1)):
            x, _ = ddim_step(torch.tanh(x), x, t_, table, tp_, eta=0.5, seed=seed, backend="cpp")
        return x

    seed = torch.tensor([7])
    torch.testing.assert_close(torch.compile(loop, fullgraph=True)(x, seed), loop(x, seed))


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
def test_return_x0_false_skips_x0_and_keeps_prev(backend, device):
    """return_x0=False: the same prev_sample bit for bit, None for x0, and the x0 buffer is
    not allocated (the op's second output is empty), on every step op."""
    from pygen.diffusion import EulerDiscreteScheduler
    from pygen.ops import dpmpp_2m_step, euler_ancestral_step, euler_step

    table = _table(device).float()
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(10)
    sigmas = sched.sigmas.to(device)
    mo, x = torch.randn(4, 3, 5, device=device), torch.randn(4, 3, 5, device=device)
    t, tp = torch.tensor([10, 500, 0, 999], device=device), torch.tensor([0, 400, -1, 950], device=device)
    idx = torch.tensor([0, 3, 9, 5], device=device)
    calls = [
        lambda **kw: ddim_step(mo, x, t, table, tp, eta=0.7, seed=11, backend=backend, **kw),
        lambda **kw: ddpm_step(mo, x, t, table, tp, seed=11, backend=backend, **kw),
        lambda **kw: euler_step(mo, x, sigmas, idx, gamma=0.3, seed=11, backend=backend, **kw),
        lambda **kw: euler_ancestral_step(mo, x, sigmas, idx, seed=11, backend=backend, **kw),
    ]
    for call in calls:
        prev, x0 = call()
        prev_only, none = call(return_x0=False)
        assert none is None and x0.shape == x.shape
        assert torch.isfinite(prev_only).all()
        torch.testing.assert_close(prev_only, prev, rtol=0, atol=0)
    # DPM-Solver++ 2M always needs x0 for its next step: its default keeps returning it
    assert dpmpp_2m_step(mo, x, sigmas, idx, backend=backend)[1] is not None
    if backend in ("cpp", "cuda"):
        out = torch.ops.pygen.alpha_step(mo, x, table, t, tp, 1.0, 0, 0, 0.0, 0.0, False, None, None, 0, write_x0=False)
        assert out[1].numel() == 0


@pytest.mark.parametrize("backend,device", STEP_BACKENDS, ids=str)
def test_shared_timestep_forms_agree(backend, device):
    """One timestep for all samples may be an int, a 0-dim tensor or a (B,) tensor (the
    kernels read a single value with stride 0); any negative prev_t is the final step."""
    table = _table(device).float()
    mo, x = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 5, device=device)
    want = ddim_step(mo, x, 700, table, 650, eta=0.5, seed=9, backend=backend)
    for t, tp in ((torch.tensor(700, device=device), torch.tensor(650, device=device)),
                  (torch.full((3,), 700, device=device), 650)):
        got = ddim_step(mo, x, t, table, tp, eta=0.5, seed=9, backend=backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    final = ddpm_step(mo, x, 20, table, -1, seed=9, backend=backend)
    for tp in (-7, torch.tensor([-1, -3, -100], device=device)):
        got = ddpm_step(mo, x, 20, table, tp, seed=9, backend=backend)
        for g, w in zip(got, final):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    if backend in ("cpp", "cuda"):  # the raw op takes a (1,) tensor for every sample
        one = torch.ops.pygen.alpha_step(mo, x, table, torch.tensor([700], device=device),
                                         torch.tensor([650], device=device), 1.0, 0, 0, 0.0, 0.0, False, None, None, 0)
        torch.testing.assert_close(one[0], ddim_step(mo, x, 700, table, 650, backend=backend)[0], rtol=0, atol=0)


# ---- training: q_sample and the weighted MSE -------------------------------------------------

from pygen.ops import diffusion_loss, diffusion_mse, diffusion_mse_ref, q_sample, q_sample_ref  # noqa: E402

TRAIN_BACKENDS = BACKEND_DEVICES


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_training_ops_match_reference(backend, device, prediction_type, snr_gamma, dtype):
    table = _table(device)
    shape = (6, 3, 5, 7)
    x0 = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    mo = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    t = torch.randint(0, 1000, (6,), device=device)
    t[0], t[1] = 0, 999
    seed, offset = int(torch.randint(0, 2**62, ())), 11
    eps = randn(*shape, seed=seed, offset=offset, device=device, dtype=torch.float64, backend=backend)
    leaves = [mo.clone().requires_grad_(True), x0.clone().requires_grad_(True)]
    xt = q_sample(leaves[1], t, table, seed=seed, offset=offset, backend=backend)
    loss = diffusion_mse(*leaves, t, table, seed=seed, offset=offset, prediction_type=prediction_type,
                         snr_gamma=snr_gamma, backend=backend)
    ref = [v.detach().double().requires_grad_(True) for v in (mo, x0)]
    xt_ref = q_sample_ref(ref[1], t, table.double(), eps)
    loss_ref = diffusion_mse_ref(*ref, t, table.double(), eps, prediction_type, snr_gamma)
    tol = TOL[dtype]
    torch.testing.assert_close(xt.double(), xt_ref, **tol)
    torch.testing.assert_close(loss.double(), loss_ref, **tol)
    g_xt, g_loss = torch.randn_like(xt), torch.randn_like(loss)
    got = torch.autograd.grad((xt, loss), leaves, (g_xt, g_loss))
    want = torch.autograd.grad((xt_ref, loss_ref), ref, (g_xt.double(), g_loss.double()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("backend,device", TRAIN_BACKENDS, ids=str)
def test_training_ops_gradcheck_memory_and_loss(backend, device):
    table = _table(device)
    x0 = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    mo = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([3, 700], device=device)
    for pt in ("epsilon", "v_prediction", "sample"):
        assert torch.autograd.gradcheck(
            lambda m, x: diffusion_mse(m, x, t, table, seed=5, prediction_type=pt, snr_gamma=2.0, backend=backend),
            (mo, x0))
    assert torch.autograd.gradcheck(lambda x: q_sample(x, t, table, seed=5, backend=backend), (x0,))
    # saved for backward beyond the inputs: no eps-sized buffer
    if backend != "torch":
        big_x0 = torch.randn(8, 256, device=device, requires_grad=True)
        big_mo = torch.randn(8, 256, device=device, requires_grad=True)
        inputs = {big_x0.data_ptr(), big_mo.data_ptr()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
            diffusion_mse(big_mo, big_x0, torch.zeros(8, dtype=torch.int64, device=device), table.float(), seed=1,
                          backend=backend)
        extra = sum(v.numel() * v.element_size() for v in saved if v.data_ptr() not in inputs)
        assert extra < big_x0.numel() * 4, extra
    # the composed loss trains a model: a linear denoiser's loss decreases
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 8).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = torch.randn(64, 8, device=device) * 0.5 + 1.0
    losses = []
    for _ in range(60):
        loss = diffusion_loss(lambda x, tt: net(x), data, table.float(), backend=backend).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_training_ops_bad_input_and_compile():
    table = _table("cpu")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        diffusion_mse(x, x, 1, table, seed=1, snr_gamma=-1.0)
    with pytest.raises(ValueError, match=r"model_output must have the shape of x0"):
        diffusion_mse(torch.zeros(2, 4), x, 1, table, seed=1)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1000\)"):
        q_sample(x, 1000, table, seed=1)
    if "cpp" in __import__("pygen").available_backends():
        t, seed = torch.tensor([1, 500]), torch.tensor([3])
        torch.library.opcheck(torch.ops.pygen.q_sample, (x.clone().requires_grad_(True), table.float(), t, seed, 0))
        torch.library.opcheck(torch.ops.pygen.diffusion_mse, (torch.randn(2, 3, requires_grad=True),
                                                              torch.randn(2, 3, requires_grad=True), table.float(),
                                                              t, seed, 0, 2, 5.0))

        def f(x0, mo):
            xt = q_sample(x0, t, table.float(), seed=seed, backend="cpp")
            return diffusion_mse(mo * xt, x0, t, table.float(), seed=seed, prediction_type="v_prediction",
                                 snr_gamma=5.0, backend="cpp")

        x0, mo = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
        eager = f(x0, mo)
        out = torch.compile(f, fullgraph=True)(x0, mo)
        torch.testing.assert_close(out, eager)
        for a, b in zip(torch.autograd.grad(out.sum(), (x0, mo)), torch.autograd.grad(eager.sum(), (x0, mo))):
            torch.testing.assert_close(a, b)

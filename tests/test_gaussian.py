"""reparameterize, gaussian_kl and reparameterize_kl on every backend against the
float64 pure-torch reference: values, gradients, gradcheck, layouts, edge cases, errors.

Tolerances (relative to the float64 reference, inputs ~ N(0, 1)):
float64 1e-10, float32 1e-5, float16/bfloat16 (GPU) 1e-2 / 2e-2 on values and gradients.
Every output starts as NaN (conftest), so an unwritten element fails.
"""

import pytest
import torch

import pygen
from pygen.ops import gaussian_kl, gaussian_kl_ref, reparameterize, reparameterize_kl, reparameterize_ref

from backends_under_test import COMPILED, dtypes_for

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# odd sizes, a single column, rows longer than one CPU chunk (4096) and one Triton tile
SHAPES = [(1, 1), (3, 37), (5, 4, 3), (2, 4099), (7, 1), (4, 2, 2, 3), (33,)]


def _inputs(shape, dtype, device, layout="contiguous"):
    """mu, logvar of `shape`; non-contiguous layouts are views of larger tensors."""
    if layout == "contiguous":
        mk = lambda: torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    elif layout == "strided":  # every other column of a wider tensor
        mk = lambda: torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64).to(device=device, dtype=dtype)[..., ::2]  # noqa: E731
    else:  # "transposed": the batch dim is not the outer one in memory
        mk = lambda: torch.randn(shape[::-1], dtype=torch.float64).to(device=device, dtype=dtype).permute(  # noqa: E731
            *reversed(range(len(shape)))
        )
    mu, lv = mk(), mk()
    assert mu.shape == torch.Size(shape)
    return mu, lv


def _eps(backend, device, shape, dtype, seed, offset=0):
    """The backend's own noise: z for mu = 0, logvar = 0 is eps exactly."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return reparameterize(zeros, zeros, seed=seed, offset=offset, backend=backend)


def _grad_outputs(*outs):
    return [torch.randn_like(o) for o in outs]


def _ref_grads(fn, inputs, grads):
    leaves = [x.detach().to(torch.float64).requires_grad_(True) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, leaves, [g.to(torch.float64) for g in grads])
    return [o.detach() for o in outs], got


def _check_close(actual, expected, dtype):
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(), **TOL[dtype])


def _check_kl(kl, kl_ref, dtype, mu, lv, pm=None, pl=None):
    """KL is a sum with cancellation: its rounding error scales with the sum of the terms'
    magnitudes, not with the result. Allow rtol(dtype) times that scale."""
    m, v = mu.double().cpu(), lv.double().cpu()
    pm = torch.zeros(()) if pm is None else pm.double().cpu()
    pl = torch.zeros(()) if pl is None else pl.double().cpu()
    parts = torch.exp(v - pl) + (m - pm) ** 2 * torch.exp(-pl) + 1 + v.abs() + pl.abs()
    scale = 0.5 * parts.reshape(mu.shape[0], -1).sum(1)
    err = (kl.double().cpu() - kl_ref.double().cpu()).abs()
    bound = TOL[dtype]["rtol"] * scale + TOL[dtype]["atol"]
    assert bool((err <= bound).all()), f"KL error {err.max().item():.3g} over bound {bound.min().item():.3g}"


def _params():
    for backend, device in COMPILED + [("torch", "cpu")]:
        for dtype in dtypes_for(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reparameterize_kl_matches_reference(backend, device, dtype, layout, shape):
    mu, lv = _inputs(shape, dtype, device, layout)
    seed = int(torch.randint(0, 2**62, ()))
    offset = int(torch.randint(0, 1000, ()))
    eps = _eps(backend, device, shape, dtype, seed, offset).to(torch.float64)

    leaves = [mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)]
    z, kl = reparameterize_kl(*leaves, seed=seed, offset=offset, backend=backend)
    z_only = reparameterize(mu, lv, seed=seed, offset=offset, backend=backend)
    kl_only = gaussian_kl(mu, lv, backend=backend)
    assert z.shape == mu.shape and kl.shape == (shape[0],) and z.dtype == kl.dtype == dtype

    gz, gkl = _grad_outputs(z, kl)
    (z_ref, kl_ref), (gmu_ref, glv_ref) = _ref_grads(
        lambda m, v: (reparameterize_ref(m, v, eps), gaussian_kl_ref(m, v)), [mu, lv], [gz, gkl]
    )
    _check_close(z, z_ref, dtype)
    _check_kl(kl, kl_ref, dtype, mu, lv)
    assert torch.equal(z_only, z) and torch.equal(kl_only, kl)
    gmu, glv = torch.autograd.grad((z, kl), leaves, (gz, gkl))
    _check_close(gmu, gmu_ref, dtype)
    _check_close(glv, glv_ref, dtype)

    # each op alone, through its own backward kernel
    leaves = [mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)]
    z = reparameterize(*leaves, seed=seed, offset=offset, backend=backend)
    _, (gmu_ref, glv_ref) = _ref_grads(lambda m, v: reparameterize_ref(m, v, eps), [mu, lv], [gz])
    for got, want in zip(torch.autograd.grad(z, leaves, gz), (gmu_ref, glv_ref)):
        _check_close(got, want, dtype)
    kl = gaussian_kl(*leaves, backend=backend)
    _, (gmu_ref, glv_ref) = _ref_grads(gaussian_kl_ref, [mu, lv], [gkl])
    for got, want in zip(torch.autograd.grad(kl, leaves, gkl), (gmu_ref, glv_ref)):
        _check_close(got, want, dtype)


PRIORS = {
    "full": lambda b, d, dt, dev: (torch.randn(b, d, dtype=dt, device=dev), torch.randn(b, d, dtype=dt, device=dev)),
    "per_dim": lambda b, d, dt, dev: (torch.randn(d, dtype=dt, device=dev), torch.randn(d, dtype=dt, device=dev)),
    "per_sample": lambda b, d, dt, dev: (torch.randn(b, 1, dtype=dt, device=dev), torch.randn(b, 1, dtype=dt, device=dev)),
    "mu_only": lambda b, d, dt, dev: (torch.randn(d, dtype=dt, device=dev), None),
    "logvar_only": lambda b, d, dt, dev: (None, torch.randn(b, d, dtype=dt, device=dev)),
}


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("b,d", [(3, 37), (2, 4099)])
def test_gaussian_kl_with_prior_matches_reference(backend, device, dtype, prior, b, d):
    mu, lv = _inputs((b, d), dtype, device)
    pm, pl = PRIORS[prior](b, d, dtype, device)
    args = [mu, lv, pm, pl]
    leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    kl = gaussian_kl(*leaves, backend=backend)
    given = [i for i, a in enumerate(args) if a is not None]
    gkl = torch.randn_like(kl)

    def ref(*xs):
        full = [None] * 4
        for i, x in zip(given, xs):
            full[i] = x
        return gaussian_kl_ref(*full)

    (kl_ref,), grads_ref = _ref_grads(ref, [args[i] for i in given], [gkl])
    _check_kl(kl, kl_ref, dtype, mu, lv, pm, pl)
    grads = torch.autograd.grad(kl, [leaves[i] for i in given], gkl)
    for got, want, i in zip(grads, grads_ref, given):
        assert got.shape == args[i].shape
        _check_close(got, want, dtype)


@pytest.mark.parametrize("backend,device", COMPILED + [("torch", "cpu")], ids=lambda x: str(x))
def test_gradcheck_float64(backend, device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    mu, lv = torch.randn(2, 3, **kw), torch.randn(2, 3, **kw)
    pm, pl = torch.randn(3, **kw), torch.randn(2, 3, **kw)
    seed = int(torch.randint(0, 2**62, ()))
    assert torch.autograd.gradcheck(lambda m, v: reparameterize(m, v, seed=seed, backend=backend), (mu, lv))
    assert torch.autograd.gradcheck(lambda m, v: reparameterize_kl(m, v, seed=seed, backend=backend), (mu, lv))
    assert torch.autograd.gradcheck(lambda m, v, a, b: gaussian_kl(m, v, a, b, backend=backend), (mu, lv, pm, pl))
    assert torch.autograd.gradcheck(lambda m, v: gaussian_kl(m, v, backend=backend), (mu, lv))


@pytest.mark.parametrize("backend,device", COMPILED + [("torch", "cpu")], ids=lambda x: str(x))
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,), (3, 0, 2)], ids=str)
def test_empty_tensors(backend, device, shape):
    mu = torch.randn(shape, device=device, requires_grad=True)
    lv = torch.randn(shape, device=device, requires_grad=True)
    z, kl = reparameterize_kl(mu, lv, backend=backend)
    assert z.shape == mu.shape and kl.shape == (shape[0],)
    assert torch.equal(kl, torch.zeros(shape[0], device=device))  # no elements: KL is 0
    assert torch.equal(gaussian_kl(mu, lv, torch.zeros(shape, device=device), backend=backend), kl)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == mu.shape and lv.grad.shape == lv.shape


@pytest.mark.parametrize("backend,device", COMPILED + [("torch", "cpu")], ids=lambda x: str(x))
def test_nan_and_inf_follow_ieee(backend, device):
    """Documented behaviour: no clamping, no checks; NaN/inf propagate like the formulas.

    NaN in an element -> that element of z and that sample's KL are NaN (other samples
    are untouched); logvar = -inf -> z = mu and KL = +inf; logvar = +inf -> z = +-inf and
    KL = NaN (exp(lv) - lv is inf - inf), exactly as the formula evaluated in torch.
    """
    mu = torch.randn(4, 6, device=device)
    lv = torch.randn(4, 6, device=device)
    mu[0, 1] = float("nan")
    lv[1, 2] = float("-inf")
    lv[2, 3] = float("inf")
    z, kl = reparameterize_kl(mu, lv, seed=3, backend=backend)
    assert torch.isnan(z[0, 1]) and torch.isnan(kl[0])
    assert z[1, 2] == mu[1, 2] and kl[1] == float("inf")
    assert torch.isinf(z[2, 3]) and torch.isnan(kl[2])
    assert torch.isfinite(z[3]).all() and torch.isfinite(kl[3])
    eps = _eps(backend, device, (4, 6), torch.float32, 3)
    torch.testing.assert_close(z, reparameterize_ref(mu, lv, eps), equal_nan=True)
    torch.testing.assert_close(kl, gaussian_kl_ref(mu, lv), equal_nan=True)


def test_backends_agree_end_to_end():
    """Same seed: every available backend lands on the same z and KL (float32)."""
    from backends_under_test import BACKEND_DEVICES

    mu, lv = torch.randn(6, 129, dtype=torch.float64), torch.randn(6, 129, dtype=torch.float64)
    outs = {}
    for backend, device in BACKEND_DEVICES:
        z, kl = reparameterize_kl(mu.float().to(device), lv.float().to(device), seed=11, backend=backend)
        outs[backend] = (z.cpu(), kl.cpu())
    z0, kl0 = outs["torch"]
    for backend, (z, kl) in outs.items():
        torch.testing.assert_close(z, z0, rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(kl, kl0, rtol=1e-5, atol=1e-4, msg=backend)


@pytest.mark.parametrize("backend,device", COMPILED, ids=lambda x: str(x))
def test_backward_stores_no_noise(backend, device):
    """Saved for backward beyond the inputs: the 8-byte seed (pygen) vs eps-sized buffers (eager)."""
    mu = torch.randn(64, 256, device=device, requires_grad=True)
    lv = torch.randn(64, 256, device=device, requires_grad=True)
    inputs = {mu.data_ptr(), lv.data_ptr()}

    def extra_saved_bytes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in inputs)

    def eager():
        eps = torch.randn_like(mu)
        std = torch.exp(0.5 * lv)
        return mu + std * eps, 0.5 * (torch.exp(lv) + mu * mu - 1 - lv).sum(1)

    pygen_bytes = extra_saved_bytes(lambda: reparameterize_kl(mu, lv, backend=backend))
    eager_bytes = extra_saved_bytes(eager)
    assert pygen_bytes == 8, pygen_bytes
    assert eager_bytes >= 2 * mu.numel() * 4, eager_bytes


# ---- registration: opcheck and torch.compile ---------------------------------------------


def _op_samples(prefix, device):
    ops = torch.ops.pygen
    op = lambda name: getattr(ops, prefix + name)  # noqa: E731
    mu, lv = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    pm, pl = torch.randn(5, device=device).expand(3, 5), torch.randn(3, 5, device=device)
    seed = torch.tensor([42], device=device)
    g, gk = torch.randn(3, 5, device=device), torch.randn(3, device=device)
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (op("reparameterize"), (leaf(mu), leaf(lv), seed, 7)),
        (op("reparameterize_kl"), (leaf(mu), leaf(lv), seed, 0)),
        (op("gaussian_kl"), (leaf(mu), leaf(lv), None, None)),
        (op("gaussian_kl"), (leaf(mu), leaf(lv), pm.clone().requires_grad_(True), leaf(pl))),
        (op("reparameterize_backward"), (g, lv, seed, 7)),
        (op("reparameterize_kl_backward"), (g, gk, mu, lv, seed, 0)),
        (op("gaussian_kl_backward"), (gk, mu, lv, None, None)),
        (op("gaussian_kl_backward"), (gk, mu, lv, pm, pl)),
    ]


@pytest.mark.parametrize("backend,device", COMPILED, ids=lambda x: str(x))
def test_opcheck(backend, device):
    prefix = "triton_" if backend == "triton" else ""
    for op, args in _op_samples(prefix, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", COMPILED, ids=lambda x: str(x))
def test_torch_compile_fullgraph(backend, device):
    def loss_fn(mu, lv, pm, seed):
        z, kl = reparameterize_kl(mu, lv, seed=seed, backend=backend)
        kl_prior = gaussian_kl(mu, lv, pm, backend=backend)
        return (z * z).sum(1) + kl + kl_prior

    mu = torch.randn(4, 9, device=device, requires_grad=True)
    lv = torch.randn(4, 9, device=device, requires_grad=True)
    pm = torch.randn(9, device=device)
    seed = torch.tensor([1234], device=device)
    eager = loss_fn(mu, lv, pm, seed)
    g_eager = torch.autograd.grad(eager.sum(), (mu, lv))
    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(mu, lv, pm, seed)
    g_out = torch.autograd.grad(out.sum(), (mu, lv))
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_out, g_eager):
        torch.testing.assert_close(a, b)


# ---- backend selection -----------------------------------------------------------------------


def test_backend_selection():
    avail = pygen.available_backends()
    assert "torch" in avail
    mu = torch.randn(2, 3)
    with pygen.use_backend("torch"):
        z = reparameterize(mu, mu, seed=1)
    torch.testing.assert_close(z, reparameterize(mu, mu, seed=1, backend="torch"))
    if "cpp" in avail:
        with pygen.use_backend("torch"):  # an explicit argument wins over the context
            assert torch.equal(reparameterize(mu, mu, seed=1, backend="cpp"), reparameterize(mu, mu, seed=1, backend="cpp"))
    with pytest.raises(ValueError, match="backend must be one of"):
        reparameterize(mu, mu, backend="numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        with pygen.use_backend("fast"):
            pass
    if "cuda" not in avail:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            reparameterize(mu, mu, backend="cuda")
    if "cpp" in avail:
        # CPU halves run on the C++ kernels in float32 (explicitly and under auto), stored back in the half dtype
        z = reparameterize(mu.bfloat16(), mu.bfloat16(), seed=2, backend="cpp")
        assert z.dtype == torch.bfloat16
        assert torch.equal(z, reparameterize(mu.bfloat16(), mu.bfloat16(), seed=2))


# ---- bad input -------------------------------------------------------------------------------

BAD = [
    ("mu not a tensor", lambda: reparameterize([1.0], torch.zeros(1)), TypeError, "mu must be a torch.Tensor"),
    ("integer mu", lambda: reparameterize(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)), TypeError, "mu must be a floating-point tensor"),
    ("integer logvar", lambda: gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32)), TypeError, "logvar must be a floating-point tensor"),
    ("scalar mu", lambda: reparameterize(torch.tensor(0.0), torch.tensor(0.0)), ValueError, r"mu must have shape \(B, ...\)"),
    ("shape mismatch", lambda: reparameterize_kl(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, r"logvar must have the shape of mu, \(2, 3\); got \(2, 4\)"),
    ("integer logvar", lambda: gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logvar must be a floating-point tensor"),
    ("device mismatch", lambda: reparameterize(torch.zeros(2, 3), torch.zeros(2, 3, device="meta")), ValueError, "logvar is on meta but mu is on cpu"),
    ("prior shape", lambda: gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4)), ValueError, r"prior_mu must broadcast to the shape of mu, \(2, 3\); got \(4,\)"),
    ("integer prior", lambda: gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(3, dtype=torch.int64)), TypeError, "prior_logvar must be a floating-point tensor"),
    ("prior type", lambda: gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), TypeError, "prior_mu must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("what,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_errors(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif("cpp" not in pygen.available_backends(), reason="C++ extension not built")
def test_direct_op_misuse_raises_not_crashes():
    ops = torch.ops.pygen
    seed = torch.tensor([1])
    with pytest.raises(RuntimeError, match="logvar must have shape"):
        ops.reparameterize(torch.zeros(2, 3), torch.zeros(3, 2), seed, 0)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        ops.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0]), 0)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.gaussian_kl(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16), None, None)
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        ops.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), seed, -1)
    with pytest.raises(RuntimeError, match="grad_kl must have shape"):
        ops.gaussian_kl_backward(torch.zeros(5), torch.zeros(2, 3), torch.zeros(2, 3), None, None)

"""Coupling ops: affine_coupling on every backend against the float64 reference (values,
gradients, gradcheck, masks, soft clamp, layouts, edge cases, opcheck, compile, errors),
and the rational-quadratic spline reference (round trip, log|det J|, extremes, errors).

Tolerances vs the float64 reference: float64 1e-10, float32 1e-5 (logdet: scaled by the
sum of |s|, a sum's rounding), float16/bfloat16 (GPU) 1e-2 / 2e-2.
"""

import pytest
import torch

from pygen.ops import affine_coupling, affine_coupling_ref, rq_spline, rq_spline_ref

from backends_under_test import COMPILED, dtypes_for

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
SHAPES = [(1, 1), (3, 37), (5, 4, 3), (2, 9001), (33,), (4, 2, 2, 3)]


def _close(a, b, dtype, scale=None):
    a, b = a.double().cpu(), b.double().cpu()
    if scale is None:
        torch.testing.assert_close(a, b, **TOL[dtype])
    else:  # sums: error relative to the sum of magnitudes
        assert bool(((a - b).abs() <= TOL[dtype]["rtol"] * scale.double().cpu() + TOL[dtype]["atol"]).all())


def _params():
    for backend, device in COMPILED + [("torch", "cpu")]:
        for dtype in dtypes_for(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


def _rand(shape, dtype, device, layout):
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64).to(device, dtype)[..., ::2]
    return torch.randn(shape, dtype=torch.float64).to(device, dtype)


MASKS = {
    "none": lambda shape: None,
    "alternate": lambda shape: (torch.arange(shape[-1]) % 2).to(torch.float64),  # broadcast over rows
    "random_bool": lambda shape: torch.rand(shape) > 0.5,
}


@pytest.mark.parametrize("backend,device,dtype", list(_params()))
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("soft_clamp", [None, 1.9], ids=["noclamp", "clamp"])  # 1.9: not a float32 number
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_affine_coupling_matches_reference(backend, device, dtype, inverse, soft_clamp, mask, shape):
    layout = "strided" if shape[-1] > 1 and len(shape) % 2 == 0 else "contiguous"
    x, t, s = (_rand(shape, dtype, device, layout) for _ in range(3))
    m = MASKS[mask](shape)
    m = m.to(device) if m is not None else None
    if m is not None and m.dtype != torch.bool:
        m = m.to(dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, t, s)]
    y, logdet = affine_coupling(*leaves, inverse=inverse, soft_clamp=soft_clamp, mask=m, backend=backend)
    assert y.shape == x.shape and logdet.shape == (shape[0],) and y.dtype == logdet.dtype == dtype

    ref_leaves = [v.detach().double().requires_grad_(True) for v in (x, t, s)]
    m64 = m.double() if m is not None else None
    y_ref, ld_ref = affine_coupling_ref(*ref_leaves, inverse=inverse, soft_clamp=soft_clamp, mask=m64)
    _close(y, y_ref, dtype)
    s_abs = s.double().abs().reshape(shape[0], -1).sum(1)
    _close(logdet, ld_ref, dtype, scale=s_abs)

    gy, gld = torch.randn_like(y), torch.randn_like(logdet)
    grads = torch.autograd.grad((y, logdet), leaves, (gy, gld))
    grads_ref = torch.autograd.grad((y_ref, ld_ref), ref_leaves, (gy.double(), gld.double()))
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, dtype)


@pytest.mark.parametrize("backend,device", COMPILED + [("torch", "cpu")], ids=str)
def test_affine_coupling_gradcheck_and_round_trip(backend, device):
    kw = dict(dtype=torch.float64, device=device)
    x, t, s = (torch.randn(2, 7, **kw, requires_grad=True) for _ in range(3))
    m = (torch.arange(7, device=device) % 2).double()
    for inverse in (False, True):
        for soft_clamp in (None, 1.5):
            for mask in (None, m):
                f = lambda a, b, c: affine_coupling(a, b, c, inverse=inverse, soft_clamp=soft_clamp, mask=mask, backend=backend)  # noqa: E731
                assert torch.autograd.gradcheck(f, (x, t, s))
    y, ld = affine_coupling(x, t, s, soft_clamp=1.5, mask=m, backend=backend)
    x2, ld2 = affine_coupling(y, t, s, inverse=True, soft_clamp=1.5, mask=m, backend=backend)
    torch.testing.assert_close(x2, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld + ld2, torch.zeros_like(ld), rtol=0, atol=1e-12)
    assert torch.equal(y[:, 0::2], x[:, 0::2])  # mask 0: passed through exactly


@pytest.mark.parametrize("backend,device", COMPILED + [("torch", "cpu")], ids=str)
def test_affine_coupling_edge_cases(backend, device):
    # empty batch, empty features
    for shape in [(0, 4), (3, 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y, ld = affine_coupling(x, torch.zeros(shape, device=device), torch.zeros(shape, device=device), backend=backend)
        assert y.shape == shape and torch.equal(ld, torch.zeros(shape[0], device=device))
        (y.sum() + ld.sum()).backward()
    # a huge log_scale with a soft clamp stays finite; without one it overflows like exp
    x = torch.randn(2, 5, device=device)
    big = torch.full((2, 5), 1e4, device=device)
    y, ld = affine_coupling(x, torch.zeros_like(x), big, soft_clamp=3.0, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(ld, torch.full((2,), 15.0, device=device))
    y, _ = affine_coupling(x, torch.zeros_like(x), -big, soft_clamp=3.0, inverse=True, backend=backend)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend,device", COMPILED, ids=str)
def test_affine_coupling_opcheck_and_compile(backend, device):
    prefix = "triton_" if backend == "triton" else ""
    fwd = getattr(torch.ops.pygen, prefix + "affine_coupling")
    bwd = getattr(torch.ops.pygen, prefix + "affine_coupling_backward")
    x, t, s = (torch.randn(3, 6, device=device, requires_grad=True) for _ in range(3))
    m = (torch.arange(6, device=device) % 2).float().expand(3, 6)
    for mask in (None, m):
        for inverse in (False, True):
            torch.library.opcheck(fwd, (x, t, s, mask, inverse, 2.0))
            torch.library.opcheck(bwd, (torch.randn(3, 6, device=device), torch.randn(3, device=device),
                                        x.detach(), t.detach(), s.detach(), mask, inverse, 0.0))

    def f(x, t, s):
        y, ld = affine_coupling(x, t, s, soft_clamp=2.0, mask=m, backend=backend)
        x2, ld2 = affine_coupling(y, t, s, soft_clamp=2.0, mask=m, inverse=True, backend=backend)
        return (x2 * y).sum(1) + ld + 2 * ld2

    eager = f(x, t, s)
    out = torch.compile(f, fullgraph=True)(x, t, s)
    torch.testing.assert_close(out, eager)
    for a, b in zip(torch.autograd.grad(out.sum(), (x, t, s)), torch.autograd.grad(eager.sum(), (x, t, s))):
        torch.testing.assert_close(a, b)


def test_affine_coupling_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"shift must have the shape of x, \(2, 3\); got \(2, 4\)"):
        affine_coupling(x, torch.zeros(2, 4), x)
    with pytest.raises(TypeError, match="log_scale must be a floating-point tensor"):
        affine_coupling(x, x, x.long())
    with pytest.raises(ValueError, match="soft_clamp must be a positive number"):
        affine_coupling(x, x, x, soft_clamp=-1.0)
    with pytest.raises(ValueError, match=r"mask must broadcast to the shape of x"):
        affine_coupling(x, x, x, mask=torch.ones(4))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        affine_coupling(x.long(), x, x)


# ---- rational-quadratic spline ------------------------------------------------------------------

SPLINE_BACKENDS = COMPILED + [("torch", "cpu")]


def _spline_inputs(b, d, k, dtype=torch.float64, scale=2.0, device="cpu"):
    mk = lambda *s: torch.randn(*s, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return mk(b, d) * scale, mk(b, d, k), mk(b, d, k), mk(b, d, k - 1)


def _close_spline(a, b, dtype, atol_scale=1.0):
    """float64: every element to 1e-10. float32 is ill-conditioned for a spline: knots come
    from a K-term cumsum (error ~K eps B) and a bin can be ~1e-3 wide, so theta = (x - x_k) /
    w_k, and gradients through it, carry ~1e-4 relative error, more at rare near-degenerate
    bins (whose K parameter gradients then all drift). Require 99% of elements within
    (1e-3, 2e-4) and none non-finite: a wrong formula fails most elements, conditioning a few."""
    a, b = a.double().cpu(), b.double().cpu()
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * atol_scale)
        return
    assert bool(torch.isfinite(a).all())
    rtol, atol = max(1e-3, TOL[dtype]["rtol"]), max(2e-4, TOL[dtype]["atol"])  # half types: their rounding
    bad = (a - b).abs() > rtol * b.abs() + atol * atol_scale
    assert bad.double().mean().item() <= 1e-2, f"{int(bad.sum())} of {bad.numel()} elements off"


def _spline_params():
    for backend, device in SPLINE_BACKENDS:
        for dtype in dtypes_for(backend, device):
            yield pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend,device,dtype", list(_spline_params()))
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("k", [2, 8, 16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 9001), (4, 2, 3)], ids=str)
def test_rq_spline_matches_reference(backend, device, dtype, inverse, k, shape):
    b, rest = shape[0], shape[1:]
    x, w, h, d = _spline_inputs(b, int(torch.tensor(rest).prod()), k, dtype, device=device)
    x, w, h, d = x.reshape(shape), w.reshape(*shape, k), h.reshape(*shape, k), d.reshape(*shape, k - 1)
    x.view(-1)[:3] = torch.tensor([7.0, -3.0, 3.0], dtype=dtype)  # a tail and both boundaries
    leaves = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, ld = rq_spline(*leaves, inverse=inverse, backend=backend)
    ref = [t.detach().double().requires_grad_(True) for t in (x, w, h, d)]
    y_ref, ld_ref = rq_spline_ref(*ref, inverse=inverse)
    _close_spline(y, y_ref, dtype)
    _close_spline(ld, ld_ref, dtype, atol_scale=1 + x.numel() // b)  # a sum of per-element terms ~1
    gy, gl = torch.randn_like(y), torch.randn_like(ld)
    grads = torch.autograd.grad((y, ld), leaves, (gy, gl))
    grads_ref = torch.autograd.grad((y_ref, ld_ref), ref, (gy.double(), gl.double()))
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape
        _close_spline(g, g_ref, dtype)


@pytest.mark.parametrize("backend,device", SPLINE_BACKENDS, ids=str)
@pytest.mark.parametrize("k", [2, 8, 16])
def test_rq_spline_round_trip_and_jacobian(backend, device, k):
    x, w, h, d = _spline_inputs(3, 5, k, device=device)
    x[0, 0], x[1, 1], x[2, 2] = 50.0, -7.0, 3.0  # tails and the boundary itself
    y, ld = rq_spline(x, w, h, d, backend=backend)
    x2, ld2 = rq_spline(y, w, h, d, inverse=True, backend=backend)
    torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld + ld2, torch.zeros(3, dtype=torch.float64, device=device), rtol=0, atol=1e-10)
    assert y[0, 0] == 50.0 and y[1, 1] == -7.0  # identity tails
    jac = torch.autograd.functional.jacobian(lambda t: rq_spline(t, w, h, d, backend=backend)[0].sum(0), x)
    for b in range(3):
        torch.testing.assert_close(torch.logdet(jac[:, b, :]), ld[b], rtol=1e-10, atol=1e-10)
    # monotone increasing
    n = 801
    grid = torch.linspace(-4, 4, n, dtype=torch.float64, device=device)[:, None]
    yg, _ = rq_spline(grid, w[:1, :1].expand(n, 1, k), h[:1, :1].expand(n, 1, k), d[:1, :1].expand(n, 1, k - 1),
                      backend=backend)
    assert bool((yg[1:] >= yg[:-1]).all())


@pytest.mark.parametrize("backend,device", SPLINE_BACKENDS, ids=str)
def test_rq_spline_gradcheck_and_extremes(backend, device):
    x, w, h, d = _spline_inputs(2, 3, 5, device=device)
    args = [t.requires_grad_(True) for t in (x, w, h, d)]
    assert torch.autograd.gradcheck(lambda *a: rq_spline(*a, backend=backend), args)
    assert torch.autograd.gradcheck(lambda *a: rq_spline(*a, inverse=True, backend=backend), args)
    x = torch.tensor([[1e30, -1e30, 2.999999, -3.0, 3.0]], device=device)
    w, h, d = (torch.randn(1, 5, 8, device=device) * 20, torch.randn(1, 5, 8, device=device) * 20,
               torch.randn(1, 5, 7, device=device) * 20)
    for inverse in (False, True):
        y, ld = rq_spline(x, w, h, d, inverse=inverse, backend=backend)
        assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    for shape in [(0, 3), (2, 0)]:  # empty
        x, w, h, d = (torch.zeros(*shape, *e, device=device, requires_grad=True) for e in [(), (4,), (4,), (3,)])
        y, ld = rq_spline(x, w, h, d, backend=backend)
        assert y.shape == shape and torch.equal(ld, torch.zeros(shape[0], device=device))
        (y.sum() + ld.sum()).backward()


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in SPLINE_BACKENDS if b != "torch"], ids=str)
def test_rq_spline_opcheck_and_compile(backend, device):
    x, w, h, d = (t.float().requires_grad_(True) for t in _spline_inputs(3, 4, 6, device=device))
    consts = (3.0, 1e-3, 1e-3, 1e-3)
    prefix = "triton_" if backend == "triton" else ""
    fwd = getattr(torch.ops.pygen, prefix + "rq_spline")
    bwd = getattr(torch.ops.pygen, prefix + "rq_spline_backward")
    for inverse in (False, True):
        torch.library.opcheck(fwd, (x, w, h, d, inverse, *consts))
        torch.library.opcheck(bwd,
                              (torch.randn(3, 4, device=device), torch.randn(3, device=device),
                               x.detach(), w.detach(), h.detach(), d.detach(), inverse, *consts))

    def f(x, w, h, d):
        y, ld = rq_spline(x, w, h, d, backend=backend)
        x2, ld2 = rq_spline(y, w, h, d, inverse=True, backend=backend)
        return (x2 * y).sum(1) + ld + 2 * ld2

    eager = f(x, w, h, d)
    out = torch.compile(f, fullgraph=True)(x, w, h, d)
    torch.testing.assert_close(out, eager)
    for a, b in zip(torch.autograd.grad(out.sum(), (x, w, h, d)), torch.autograd.grad(eager.sum(), (x, w, h, d))):
        torch.testing.assert_close(a, b)


def test_rq_spline_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"widths must have shape x.shape \+ \(K,\)"):
        rq_spline(x, torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="K >= 2"):
        rq_spline(x, torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match="heights must have the shape of widths"):
        rq_spline(x, torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"derivatives must have shape x.shape \+ \(K-1,\)"):
        rq_spline(x, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="min_bin_width and min_bin_height"):
        rq_spline(x, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 3), min_bin_width=0.3)
    with pytest.raises(ValueError, match="K <= 64"):
        rq_spline(x, torch.zeros(2, 3, 65), torch.zeros(2, 3, 65), torch.zeros(2, 3, 64), min_bin_width=1e-3, min_bin_height=1e-3)

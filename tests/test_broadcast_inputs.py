"""Broadcast (stride-0) inputs of the sampling op, read in place by a flat elementwise path
(issue 22: ``randn`` went through a (N, 1)-row view at one element per task, 16x slower than
torch): every layout gives the reference's values and gradients, on every backend."""

from __future__ import annotations

import pytest
import torch

from backends_under_test import BACKEND_DEVICES
from pygen.ops import affine_coupling, gaussian_kl, randn, reparameterize, reparameterize_kl
from pygen.ops.gaussian import reparameterize_ref
from pygen._rng import philox_normal


def _layouts(shape: tuple[int, ...], device: str, scale: float) -> dict[str, tuple[torch.Tensor, object]]:
    """name -> (leaf, leaf -> the op's input of ``shape`` in that layout)."""
    g = torch.Generator().manual_seed(len(shape))
    r = lambda *s: (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device)  # noqa: E731
    out = {
        "contiguous": (r(*shape), lambda t: t),
        "scalar expanded (all strides 0)": (r(), lambda t: t.expand(shape)),
        "row expanded": (r(1, *shape[1:]), lambda t: t.expand(shape)),
    }
    if len(shape) > 1:
        out["transposed"] = (r(*reversed(shape)), lambda t: t.permute(*reversed(range(len(shape)))))
    return out


@pytest.mark.parametrize("shape", [(1,), (37,), (5, 1), (3, 7), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=lambda p: str(p))
def test_every_layout_of_mu_and_logvar(shape, backend, device):
    eps = philox_normal(torch.tensor(11, device=device), 5, shape).double()
    w = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    for nm, (pm, fm) in _layouts(shape, device, 1.0).items():
        for nl, (pl, fl) in _layouts(shape, device, 0.3).items():
            m, v = pm.clone().requires_grad_(True), pl.clone().requires_grad_(True)
            z = reparameterize(fm(m), fl(v), seed=11, offset=5, backend=backend)
            (z * w).sum().backward()
            mr, vr = pm.clone().requires_grad_(True), pl.clone().requires_grad_(True)
            want = reparameterize_ref(fm(mr), fl(vr), eps)
            (want * w).sum().backward()
            what = f"mu {nm} / logvar {nl}"
            torch.testing.assert_close(z.detach(), want.detach(), rtol=1e-6, atol=1e-7, msg=what)
            torch.testing.assert_close(m.grad, mr.grad, rtol=1e-6, atol=1e-7, msg=what)
            torch.testing.assert_close(v.grad, vr.grad, rtol=1e-6, atol=1e-7, msg=what)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=lambda p: str(p))
def test_randn_any_shape_equals_the_stream(backend, device):
    for shape in [(0,), (1,), (4099,), (3, 0), (7, 513), (2, 3, 4, 5)]:
        got = randn(*shape, seed=9, offset=3, device=device, backend=backend)
        want = philox_normal(torch.tensor(9, device=device), 3, shape)
        assert got.shape == shape and got.is_contiguous()
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)


# ops with per-row sums read a batch-broadcast input through one materialised row
ROW_OPS = {
    "reparameterize_kl": lambda a, b, backend: reparameterize_kl(a, b * 0.3, seed=2, backend=backend),
    "gaussian_kl": lambda a, b, backend: gaussian_kl(a, b * 0.3, backend=backend),
    "affine_coupling": lambda a, b, backend: affine_coupling(a, b, b * 0.2, backend=backend),
}


@pytest.mark.parametrize("op", list(ROW_OPS))
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5)], ids=str)
@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p[0] != "torch"], ids=lambda p: str(p))
def test_row_ops_on_every_layout(op, shape, backend, device):
    f = ROW_OPS[op]
    for na, (pa, fa) in _layouts(shape, device, 1.0).items():
        for nb, (pb, fb) in _layouts(shape, device, 0.5).items():
            outs = {}
            for b in (backend, "torch"):
                a_, b_ = pa.clone().requires_grad_(True), pb.clone().requires_grad_(True)
                out = f(fa(a_), fb(b_), b)
                out = out if isinstance(out, tuple) else (out,)
                sum(o.double().sum() * (k + 1) for k, o in enumerate(out)).backward()
                outs[b] = ([o.detach() for o in out], a_.grad, b_.grad)
            what = f"{op}: {na} / {nb}"
            (got, ga, gb), (want, wa, wb) = outs[backend], outs["torch"]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=what)
            torch.testing.assert_close(ga, wa, rtol=1e-6, atol=1e-7, msg=what)
            torch.testing.assert_close(gb, wb, rtol=1e-6, atol=1e-7, msg=what)

"""One tensor passed as two inputs of an op (x as both x and log_scale, mu as mu and prior_mu,
...): first and second derivatives under ``create_graph=True`` on every backend equal the
pure-torch reference's (autograd through plain torch ops, which handles aliasing by
construction). A double-backward path that recomputed through the reference with the aliased
tensor as two inputs used to return each slot the total derivative: 2x the true gradient
(issue 22)."""

from __future__ import annotations

import pytest
import torch

from backends_under_test import COMPILED
from pygen.ops import affine_coupling, diffusion_mse, gaussian_kl, reparameterize, reparameterize_kl, rq_spline
from pygen.diffusion.schedules import alphas_cumprod_from_betas, make_betas

AC = alphas_cumprod_from_betas(make_betas(1000, beta_schedule="squaredcos_cap_v2", dtype=torch.float64))
T = torch.tensor([10, 500, 990])


def _sum(out) -> torch.Tensor:
    """A scalar of all outputs with fixed non-trivial weights (grad_output != 1)."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    return sum((o * torch.rand(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


# op name -> f(a, backend) with the one tensor a used as two (or more) inputs
CASES = {
    "reparameterize(mu=logvar)": lambda a, b: reparameterize(a, a, seed=3, backend=b),
    "reparameterize_kl(mu=logvar)": lambda a, b: reparameterize_kl(a, a, seed=3, backend=b),
    "gaussian_kl(mu=logvar)": lambda a, b: gaussian_kl(a, a, backend=b),
    "gaussian_kl(mu=prior_mu)": lambda a, b: gaussian_kl(a, 0.3 * a.detach(), a, -a * 0.5, backend=b),
    "gaussian_kl(logvar=prior_logvar)": lambda a, b: gaussian_kl(a * 0.2, a, a.detach() * 0.1, a, backend=b),
    "affine_coupling(x=log_scale)": lambda a, b: affine_coupling(a, a.detach() * 0.5, a, backend=b),
    "affine_coupling(shift=log_scale)": lambda a, b: affine_coupling(a.detach(), a, a, backend=b),
    "affine_coupling(x=shift, inverse)": lambda a, b: affine_coupling(a, a * 0.5, a * 0.3, inverse=True, backend=b),
    "rq_spline(widths=heights)": lambda a, b: rq_spline(a.detach()[..., 0] * 2, a, a, a.detach()[..., :-1], backend=b),
    "diffusion_mse(model_output=x0)": lambda a, b: diffusion_mse(a.flatten(1), a.flatten(1), T, AC, seed=5,
                                                                 prediction_type="v_prediction", backend=b),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,device", COMPILED, ids=lambda p: str(p))
def test_aliased_inputs_first_and_second_order(case, backend, device):
    f = CASES[case]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 6, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)

    def derivatives(b: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = base.to(device).clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(_sum(f(a, b)), a, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * v.to(device)).sum(), a, allow_unused=True)
        return g1.detach().cpu(), (torch.zeros_like(base) if g2 is None else g2.cpu())

    want1, want2 = derivatives("torch")
    got1, got2 = derivatives(backend)
    # float64, the same formulas; the noise of the sampling ops is drawn in float32 by the
    # kernels and in float64 by the reference (relative 1e-7): the aliasing bug was a factor 2
    tol = dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got1, want1, **tol)
    torch.testing.assert_close(got2, want2, **tol)
    # and without create_graph (the fused backward kernels)
    a = base.to(device).clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(_sum(f(a, backend)), a)
    torch.testing.assert_close(g0.cpu(), want1, **tol)

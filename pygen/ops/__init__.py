"""pygen's fused ops. Each has a pure-torch reference ``<op>_ref`` beside it."""

from pygen.ops.coupling import affine_coupling, affine_coupling_ref, rq_spline, rq_spline_ref
from pygen.ops.diffusion import ddim_step, ddpm_step
from pygen.ops.gaussian import (
    gaussian_kl,
    gaussian_kl_ref,
    reparameterize,
    randn,
    reparameterize_kl,
    reparameterize_ref,
)

__all__ = [
    "randn",
    "affine_coupling",
    "affine_coupling_ref",
    "rq_spline",
    "rq_spline_ref",
    "ddim_step",
    "ddpm_step",
    "reparameterize", "gaussian_kl", "reparameterize_kl", "reparameterize_ref", "gaussian_kl_ref"]

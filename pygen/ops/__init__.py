"""pygen's fused ops. Each has a pure-torch reference ``<op>_ref`` beside it."""

from pygen.ops.coupling import affine_coupling, affine_coupling_ref, rq_spline, rq_spline_ref
from pygen.ops.diffusion import (
    ddim_step_ref,
    ddpm_step_ref,
    dpmpp_2m_step_ref,
    euler_ancestral_step_ref,
    euler_step_ref,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    diffusion_loss,
    diffusion_mse,
    diffusion_mse_ref,
    q_sample,
    q_sample_ref,
)
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
    "ddim_step_ref",
    "ddpm_step",
    "ddpm_step_ref",
    "euler_step_ref",
    "euler_ancestral_step_ref",
    "dpmpp_2m_step_ref",
    "euler_step",
    "euler_ancestral_step",
    "dpmpp_2m_step",
    "q_sample",
    "q_sample_ref",
    "diffusion_mse",
    "diffusion_mse_ref",
    "diffusion_loss",
    "reparameterize", "gaussian_kl", "reparameterize_kl", "reparameterize_ref", "gaussian_kl_ref"]

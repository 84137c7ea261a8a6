"""Diffusion sampling: noise schedules, reference sampler steps and diffusers-compatible schedulers.

- :mod:`pygen.diffusion.schedules`: beta schedules, alphas_cumprod, timestep spacing, sigmas,
  Karras sigmas.
- the pure-torch reference steps (``ddpm_step_ref``, ``ddim_step_ref``, ``euler_step_ref``,
  ``euler_ancestral_step_ref``, ``dpmpp_2m_step_ref``) live beside their fused ops in
  :mod:`pygen.ops.diffusion` and are re-exported here; this package builds on pygen.ops only.
- :mod:`pygen.diffusion.schedulers`: ``DDPMScheduler``, ``DDIMScheduler``,
  ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
    ``DPMSolverMultistepScheduler`` with diffusers' constructor keywords and loop protocol.
- :mod:`pygen.diffusion.solvers`: ``FlowMatchEulerDiscreteScheduler``, ``HeunDiscreteScheduler``,
  ``LCMScheduler``, ``UniPCMultistepScheduler``.
- :mod:`pygen.diffusion.config`: diffusers' ``scheduler_config.json`` format (``from_config``,
  ``from_pretrained``, ``save_pretrained``), with no dependency on diffusers.
"""

from pygen.diffusion.config import ConfigMixin, FrozenConfig
from pygen.diffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerConfig,
    SchedulerOutput,
    threshold_sample,
)
from pygen.diffusion.solvers import (
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from pygen.diffusion.schedules import (
    alphas_cumprod_from_betas,
    cosine_betas,
    final_alpha_cumprod,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    lu_lambdas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from pygen.ops.diffusion import (
    ddim_step_ref,
    ddpm_step_ref,
    dpmpp_2m_step_ref,
    euler_ancestral_step_ref,
    euler_step_ref,
    gather,
)

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "UniPCMultistepScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "ConfigMixin",
    "FrozenConfig",
    "threshold_sample",
    "make_betas",
    "cosine_betas",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas",
    "final_alpha_cumprod",
    "spaced_timesteps",
    "sigmas_from_alphas_cumprod",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "lu_lambdas",
    "sigma_to_t",
    "gather",
    "ddpm_step_ref",
    "ddim_step_ref",
    "euler_step_ref",
    "euler_ancestral_step_ref",
    "dpmpp_2m_step_ref",
]

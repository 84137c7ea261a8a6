"""Noise schedules of discrete-time diffusion models, with diffusers' option names and semantics.

All functions are pure torch and return tensors; the schedulers in
:mod:`pygen.diffusion.schedulers` build their (device-resident) tables from them.

- :func:`make_betas`: ``beta_schedule`` = ``"linear"``, ``"scaled_linear"`` or
  ``"squaredcos_cap_v2"`` (the cosine schedule of Nichol & Dhariwal 2021), or explicit
  ``trained_betas``; optionally rescaled to zero terminal SNR (Lin et al. 2023).
- :func:`alphas_cumprod_from_betas`: abar_t = prod_{s<=t} (1 - beta_s).
- :func:`final_alpha_cumprod`: the abar of "timestep -1" used by DDIM's last step
  (``set_alpha_to_one``).
- :func:`spaced_timesteps`: inference timesteps for ``timestep_spacing`` = ``"leading"``
  (plus ``steps_offset``), ``"trailing"`` or ``"linspace"`` (Lin et al. 2023, table 2).
- :func:`sigmas_from_alphas_cumprod`: sigma_t = sqrt((1 - abar_t) / abar_t), the noise level
  of the variance-exploding parameterisation x / sqrt(abar) = x0 + sigma * eps.
- :func:`karras_sigmas`: the rho-spaced sigmas of Karras et al. 2022 (eq. 5, rho = 7).
- :func:`sigma_to_t`: fractional timestep of a sigma by interpolation in log sigma.

Precision follows diffusers so that configs carry over number for number: betas and
alphas_cumprod are built in float32 by default (``dtype=`` changes that).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "make_betas",
    "cosine_betas",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas",
    "final_alpha_cumprod",
    "spaced_timesteps",
    "sigmas_from_alphas_cumprod",
    "interp_sigmas",
    "karras_sigmas",
    "sigma_to_t",
    "exponential_sigmas",
    "beta_sigmas",
    "lu_lambdas",
    "flow_shift",
    "time_shift",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


#: more training timesteps than any published schedule uses (1000, 4000): a larger count in a
#: config is a mistake or a hostile file, and would allocate tables of that length
MAX_TRAIN_TIMESTEPS = 100_000


def _check_positive_int(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    if name == "num_train_timesteps" and n > MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"{name} must be <= {MAX_TRAIN_TIMESTEPS}, got {n}")
    return n


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999, dtype: torch.dtype = torch.float32) -> Tensor:
    """Betas of the cosine schedule ("squaredcos_cap_v2").

    abar(u) = cos^2((u + s) / (1 + s) * pi / 2) with s = 0.008 for u in [0, 1];
    beta_i = min(1 - abar((i + 1) / N) / abar(i / N), max_beta), computed in float64.
    """
    n = _check_positive_int(num_train_timesteps, "num_train_timesteps")

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu").to(dtype)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that abar_T = 0 (zero terminal SNR) keeping abar_0 (Lin et al. 2023, alg. 1).

    sqrt(abar) is shifted so that its last entry is 0 and scaled so that its first entry is
    unchanged; betas are recovered from the ratios of consecutive abar.
    """
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    abar = s * s
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Tensor | list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Betas (num_train_timesteps,) of a named schedule.

    - ``"linear"``: beta_i evenly spaced from beta_start to beta_end (both included).
    - ``"scaled_linear"``: sqrt(beta_i) evenly spaced from sqrt(beta_start) to sqrt(beta_end)
      (Stable Diffusion's schedule).
    - ``"squaredcos_cap_v2"``: :func:`cosine_betas` (beta_start / beta_end unused).

    ``trained_betas`` (a sequence) overrides the named schedule; its length sets N. Computed
    on the CPU whatever the default device (the same values everywhere; a model built on the
    meta device to size it still gets its schedule).
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64, device="cpu").to(dtype).flatten()
        if betas.numel() == 0:
            raise ValueError("trained_betas must not be empty")
        if betas.numel() > MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"trained_betas must hold <= {MAX_TRAIN_TIMESTEPS} values, got {betas.numel()}")
    else:
        n = _check_positive_int(num_train_timesteps, "num_train_timesteps")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=dtype, device="cpu")
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype, device="cpu") ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(n, dtype=dtype)
        elif beta_schedule == "exp":  # abar(u) = exp(-12 u) (diffusers' Heun / k-diffusion "exp")
            b = [min(1.0 - math.exp(-12.0 * (i + 1) / n) / math.exp(-12.0 * i / n), 0.999) for i in range(n)]
            betas = torch.tensor(b, dtype=torch.float64, device="cpu").to(dtype)
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    if not bool(((betas >= 0) & (betas <= 1)).all()):  # NaN fails too
        what = "trained_betas" if trained_betas is not None else f"beta_start={beta_start}, beta_end={beta_end}"
        raise ValueError(f"betas must lie in [0, 1] (a variance fraction per step); {what} gives "
                         f"[{float(betas.min()):.4g}, {float(betas.max()):.4g}]")  # fmt: skip
    return betas


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), shape of betas."""
    return torch.cumprod(1.0 - betas, dim=0)


def final_alpha_cumprod(alphas_cumprod: Tensor, set_alpha_to_one: bool = True) -> Tensor:
    """abar at "timestep -1" (DDIM's last step): 1 if ``set_alpha_to_one`` else abar_0 (0-dim)."""
    if set_alpha_to_one:
        return torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    return alphas_cumprod[0].clone()


def spaced_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> Tensor:
    """Descending int64 inference timesteps (num_inference_steps,) in [0, num_train_timesteps).

    With N = num_train_timesteps, n = num_inference_steps:

    - ``"leading"``: k * (N // n) for k = n-1, ..., 0, plus ``steps_offset``
      (N=1000, n=10: 900, 800, ..., 0).
    - ``"trailing"``: round(N - k * N / n) - 1 for k = 0, ..., n-1
      (N=1000, n=10: 999, 899, ..., 99): the first step starts from the last trained t.
    - ``"linspace"``: round(linspace(0, N - 1, n)) reversed (N=1000, n=10: 999, 888, ..., 0).
    """
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    N = _check_positive_int(num_train_timesteps, "num_train_timesteps")
    if n > N:
        raise ValueError(f"num_inference_steps ({n}) must be <= num_train_timesteps ({N})")
    if timestep_spacing == "leading":
        ts = torch.arange(n - 1, -1, -1, dtype=torch.int64) * (N // n) + int(steps_offset)
    elif timestep_spacing == "trailing":
        ts = torch.round(N - torch.arange(n, dtype=torch.float64) * (N / n)).to(torch.int64) - 1
    elif timestep_spacing == "linspace":
        ts = torch.round(torch.linspace(0, N - 1, n, dtype=torch.float64)).flip(0).to(torch.int64)
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    return ts


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), ascending in t."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def interp_sigmas(timesteps: Tensor, sigmas: Tensor) -> Tensor:
    """Piecewise-linear interpolation of the table ``sigmas`` (indexed by integer t) at real ``timesteps``."""
    t = timesteps.to(torch.float64).clamp(0, sigmas.numel() - 1)
    s = sigmas.to(torch.float64)
    lo = t.floor().long().clamp(max=max(sigmas.numel() - 2, 0))
    hi = (lo + 1).clamp(max=sigmas.numel() - 1)
    w = t - lo.to(torch.float64)
    return s[lo] * (1 - w) + s[hi] * w


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho.

    Descending float64 (n,), from sigma_max to sigma_min (both included).
    """
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """Fractional timesteps of ``sigmas``: linear interpolation in log sigma of the ascending table.

    Values outside the table's range clamp to 0 or N-1.
    """
    log_table = train_sigmas.to(torch.float64).log()
    log_s = sigmas.to(torch.float64).clamp(min=1e-10).log()
    n = log_table.numel()
    # lo: the last index whose log sigma is <= log_s (0 when none), at most n-2
    lo = (torch.searchsorted(log_table, log_s, right=True) - 1).clamp(0, n - 2)
    hi = lo + 1
    w = ((log_table[lo] - log_s) / (log_table[lo] - log_table[hi])).clamp(0, 1)
    return (1 - w) * lo.to(torch.float64) + w * hi.to(torch.float64)


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> Tensor:
    """sigmas evenly spaced in log sigma, from sigma_max down to sigma_min (both included), float64."""
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> Tensor:
    """sigma_min + ppf(1 - i/(n-1)) (sigma_max - sigma_min), ppf the Beta(alpha, beta) quantile
    function ("Beta Sampling is All You Need", Lee et al. 2024), float64. Needs scipy (as diffusers does)."""
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # pragma: no cover - scipy is present wherever diffusers' option is used
        raise ImportError("use_beta_sigmas needs scipy (pip install scipy)") from e
    u = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    ppf = torch.as_tensor(beta_dist.ppf(u.numpy(), alpha, beta), dtype=torch.float64)
    return sigma_min + ppf * (sigma_max - sigma_min)


def lu_lambdas(lambda_min: float, lambda_max: float, num_inference_steps: int) -> Tensor:
    """Lu et al. (2022)'s schedule: log-SNR values evenly spaced from lambda_max to lambda_min, float64."""
    n = _check_positive_int(num_inference_steps, "num_inference_steps")
    return torch.linspace(lambda_max, lambda_min, n, dtype=torch.float64)


def flow_shift(sigmas: Tensor, shift: float) -> Tensor:
    """Rectified-flow timestep shift (SD3): shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: Tensor, kind: str = "exponential", sigma: float = 1.0) -> Tensor:
    """Resolution-dependent shift (Flux): e^mu / (e^mu + (1/s - 1)^sigma) ("exponential") or
    mu / (mu + (1/s - 1)^sigma) ("linear")."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** sigma)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")

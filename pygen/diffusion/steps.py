"""Pure-torch reference sampler steps: the functions pygen.ops' fused steps are tested against.

Each ``*_step_ref`` takes the model output, the current sample (B, ...) and the schedule
coefficients of the step *already gathered* for each sample (tensors that broadcast to the
sample: 0-dim for one timestep, (B, 1, ..., 1) for per-sample timesteps; see
:func:`gather`), plus explicit noise where the step is stochastic. Each returns
``(prev_sample, pred_original_sample)``. Computation is in float32 (float64 for float64
samples); outputs have the dtype of ``model_output``.

Notation: abar = alphas_cumprod[t], abar_prev = alphas_cumprod[prev_t] (the final alpha when
prev_t < 0), sigma = sqrt((1 - abar) / abar).

Prediction types (``prediction_type``): ``"epsilon"`` (the model predicts the noise),
``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1 - abar) x0) and ``"sample"`` (x0 itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "gather",
    "predict_x0_eps",
    "ddpm_step_ref",
    "ddim_step_ref",
    "euler_step_ref",
    "euler_ancestral_step_ref",
    "dpmpp_2m_step_ref",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _ct(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _c(v, ct: torch.dtype, device) -> Tensor:
    """A coefficient (number or tensor) as a tensor of dtype ct on device."""
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=ct)
    return torch.tensor(float(v), dtype=ct, device=device)


def gather(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] shaped to broadcast against a (B, ...) tensor of ``ndim`` dims.

    ``t``: 0-dim or (B,) integer tensor on table's device. A 0-dim t gives a 0-dim result;
    (B,) gives (B, 1, ..., 1). An index on the device: no host synchronisation.
    """
    # index_select, not table[t]: a 0-dim index tensor would be read back to the host as an int
    v = table.index_select(0, t.reshape(-1)).reshape(t.shape)
    if t.dim() == 1:
        v = v.reshape(t.shape[0], *([1] * (ndim - 1)))
    return v


def predict_x0_eps(
    model_output: Tensor, sample: Tensor, alpha_prod_t: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by the model output at noise level abar (float tensors of one dtype).

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    """
    _check_prediction_type(prediction_type)
    a = alpha_prod_t.sqrt()
    b = (1 - alpha_prod_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - b * eps) / a
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a * x0) / b
    else:  # v_prediction
        x0 = a * sample - b * model_output
        eps = a * model_output + b * sample
    return x0, eps


def _sqrt0(x: Tensor) -> Tensor:
    """sqrt(x) where x > 0, else 0 (also for NaN): the kernels' rule (``step_sqrt`` in
    csrc/include/pygen/diffusion.h, ``_sqrt0`` in kernels/diffusion.py) for coefficients that
    are 0/0 or a rounding below 0 at degenerate steps."""
    return torch.where(x > 0, x, torch.zeros_like(x)).sqrt()


def _clip(x0: Tensor, clip_sample: bool, clip_sample_range: float) -> Tensor:
    return x0.clamp(-clip_sample_range, clip_sample_range) if clip_sample else x0


def ddpm_step_ref(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_t_prev: Tensor,
    noise: Tensor | None = None,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """DDPM ancestral step (Ho et al. 2020, eqs. 6-7) from t to prev_t.

    With beta = 1 - abar / abar_prev (the effective beta of the possibly-strided step):
    mean = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar) x_t,
    variance ``"fixed_small"`` = max((1 - abar_prev) / (1 - abar) beta, 1e-20) (the posterior
    variance), ``"fixed_large"`` = beta. prev_sample = mean + sqrt(variance) * noise;
    ``noise=None`` (or zero noise, as on the last step) adds none.
    """
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
    ct, dev = _ct(sample), sample.device
    x, mo = sample.to(ct), model_output.to(ct)
    ab, ab_prev = _c(alpha_prod_t, ct, dev), _c(alpha_prod_t_prev, ct, dev)
    x0, _ = predict_x0_eps(mo, x, ab, prediction_type)
    x0 = _clip(x0, clip_sample, clip_sample_range)
    alpha = ab / ab_prev
    beta = 1 - alpha
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x
    if noise is not None:
        if variance_type == "fixed_small":
            var = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
        else:
            var = beta
        mean = mean + var.sqrt() * noise.to(ct)
    return mean.to(model_output.dtype), x0.to(model_output.dtype)


def ddim_step_ref(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_t_prev: Tensor,
    noise: Tensor | None = None,
    *,
    eta: float | Tensor = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """DDIM step (Song et al. 2021, eq. 12) from t to prev_t.

    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev));
    prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t noise.
    ``eta=0`` is deterministic (noise unused); ``eta=1`` is DDPM's posterior variance.
    With ``use_clipped_model_output`` eps is recomputed from the clipped x0.

    Where the variance is undefined (abar = abar_prev = 1: 0/0) or below 0 (abar > abar_prev,
    or a rounding below 0 when abar = abar_prev) sigma_t is 0, as in the kernels: the step is
    then the deterministic one for any eta.
    """
    ct, dev = _ct(sample), sample.device
    x, mo = sample.to(ct), model_output.to(ct)
    ab, ab_prev = _c(alpha_prod_t, ct, dev), _c(alpha_prod_t_prev, ct, dev)
    x0, eps = predict_x0_eps(mo, x, ab, prediction_type)
    x0 = _clip(x0, clip_sample, clip_sample_range)
    if use_clipped_model_output:
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = _c(eta, ct, dev) * _sqrt0(var)  # not eta * NaN = NaN at eta = 0
    prev = _sqrt0(ab_prev) * x0 + _sqrt0(1 - ab_prev - std * std) * eps
    if noise is not None:
        prev = prev + std * noise.to(ct)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def _x0_sigma_space(mo: Tensor, x: Tensor, sigma: Tensor, sigma_hat: Tensor, prediction_type: str) -> Tensor:
    """x0 from the model output for the sigma-space sample x = x0 + sigma eps (input scaled by 1/sqrt(sigma^2+1))."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x - sigma_hat * mo
    if prediction_type == "sample":
        return mo
    s2 = sigma * sigma + 1
    return mo * (-sigma / s2.sqrt()) + x / s2


def euler_step_ref(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise: Tensor | None = None,
    *,
    gamma: float | Tensor = 0.0,
    s_noise: float = 1.0,
    prediction_type: str = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 2).

    ``sample`` is in sigma space (x = x0 + sigma eps, the scheduler's un-normalised sample).
    With churn ``gamma`` > 0 the sample is first moved to sigma_hat = sigma (1 + gamma) by
    adding sqrt(sigma_hat^2 - sigma^2) * s_noise * noise. Then x0 from the model output
    (epsilon: x - sigma_hat eps; v: -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)), and
    prev = x + (x - x0) / sigma_hat * (sigma_next - sigma_hat).
    """
    ct, dev = _ct(sample), sample.device
    x, mo = sample.to(ct), model_output.to(ct)
    s, sn = _c(sigma, ct, dev), _c(sigma_next, ct, dev)
    g = _c(gamma, ct, dev)
    s_hat = s * (g + 1)
    if noise is not None:
        x = x + (s_hat * s_hat - s * s).clamp(min=0).sqrt() * (noise.to(ct) * s_noise)
    x0 = _x0_sigma_space(mo, x, s, s_hat, prediction_type)
    prev = x + (x - x0) / s_hat * (sn - s_hat)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def euler_ancestral_step_ref(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise: Tensor | None = None,
    *,
    prediction_type: str = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Euler-ancestral step in sigma space (k-diffusion's ``sample_euler_ancestral``, eta = 1).

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2);
    prev = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * noise.
    """
    ct, dev = _ct(sample), sample.device
    x, mo = sample.to(ct), model_output.to(ct)
    s, sn = _c(sigma, ct, dev), _c(sigma_next, ct, dev)
    x0 = _x0_sigma_space(mo, x, s, s, prediction_type)
    s_up = (sn * sn * (s * s - sn * sn) / (s * s)).clamp(min=0).sqrt()
    s_down = (sn * sn - s_up * s_up).clamp(min=0).sqrt()
    prev = x + (x - x0) / s * (s_down - s)
    if noise is not None:
        prev = prev + s_up * noise.to(ct)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha_t, sigma_t, lambda_t) of the VP process at VE noise level sigma (lambda = log alpha/sigma)."""
    alpha = 1 / (sigma * sigma + 1).sqrt()
    sig = sigma * alpha
    return alpha, sig, alpha.log() - sig.log()


def dpmpp_2m_step_ref(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    prev_x0: Tensor | None = None,
    sigma_prev: Tensor | None = None,
    *,
    prediction_type: str = "epsilon",
    solver_type: str = "midpoint",
) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) step (Lu et al. 2022, alg. 2), data prediction, VP sample.

    ``sample`` is the VP sample x_t = alpha_t x0 + sigma_t eps at VE level ``sigma``
    (alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma alpha_t). x0 = D from the model output;
    with h = lambda_next - lambda_t, the first-order (DDIM) update is
    x_next = sigma_t,next / sigma_t x - alpha_next (e^-h - 1) D. Given the previous step's
    x0 ``prev_x0`` at level ``sigma_prev`` (r = h_prev / h, D1 = (D - prev_x0) / r) the
    second-order update subtracts 0.5 alpha_next (e^-h - 1) D1 (``"midpoint"``) or adds
    alpha_next ((e^-h - 1)/h + 1) D1 (``"heun"``). ``sigma_next = 0`` lands on x0 (first
    order there, also when ``prev_x0`` is given).

    Returns (prev_sample, x0); the caller keeps x0 as the next step's ``prev_x0``.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    ct, dev = _ct(sample), sample.device
    x, mo = sample.to(ct), model_output.to(ct)
    s, sn = _c(sigma, ct, dev), _c(sigma_next, ct, dev)
    a_s, sig_s, lam_s = _alpha_sigma(s)
    a_n, sig_n, lam_n = _alpha_sigma(sn)
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        x0 = (x - sig_s * mo) / a_s
    elif prediction_type == "sample":
        x0 = mo
    else:
        x0 = a_s * x - sig_s * mo
    h = lam_n - lam_s
    em1 = torch.expm1(-h)  # e^-h - 1
    prev = (sig_n / sig_s) * x - (a_n * em1) * x0
    if prev_x0 is not None:
        if sigma_prev is None:
            raise ValueError("dpmpp_2m_step_ref: sigma_prev is required with prev_x0")
        _, _, lam_p = _alpha_sigma(_c(sigma_prev, ct, dev))
        r = (lam_s - lam_p) / h
        d1 = (x0 - prev_x0.to(ct)) / r
        if solver_type == "midpoint":
            second = prev - (0.5 * a_n * em1) * d1
        else:
            second = prev + (a_n * (em1 / h + 1)) * d1
        prev = torch.where(sn > 0, second, prev)  # landing on sigma = 0 is first order (x0)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)

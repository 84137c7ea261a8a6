"""Fused diffusion sampler steps and training ops.

Steps: DDIM and DDPM (ancestral) in alpha space; Euler, Euler-ancestral and
DPM-Solver++ 2M in sigma space. One kernel pass per step over a whole batch in which
every sample may sit at its own timestep: the coefficients are gathered from the schedule
table on the device (no host sync, so a sampling loop can be captured in a CUDA graph),
the noise is drawn in-kernel from pygen's Philox stream (or passed in), and the step
writes ``prev_sample`` and ``pred_original_sample`` only. References: the ``*_step_ref``
functions of this module (the tests compare against them).

Shapes: model_output and sample (B, ...); t and prev_t ints or (B,) int64 tensors;
alphas_cumprod (T,) float32/float64 on the sample's device; sigma-space steps take the
sampler's sigma table (n + 1,) and a step ``index`` (int or (B,) int64).

Training: q_sample and diffusion_mse (eps drawn in-kernel, never stored), diffusion_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pygen import _backend, _ext, _rng
from pygen.ops._autograd import grads_via_reference, wants_graph
from pygen.ops._checks import cast, check_like, check_tensor, compute_dtype, kernel_dtype, row_dtype

__all__ = ["ddim_step", "ddpm_step", "euler_step", "euler_ancestral_step", "dpmpp_2m_step", "q_sample", "diffusion_mse",
           "diffusion_loss", "q_sample_ref", "diffusion_mse_ref", "PREDICTION_TYPES", "gather", "predict_x0_eps",
           "ddpm_step_ref", "ddim_step_ref", "euler_step_ref", "euler_ancestral_step_ref", "dpmpp_2m_step_ref"]

_PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_KIND = {"ddim": 0, "fixed_small": 1, "fixed_large": 2}


# ---- pure-torch reference steps ------------------------------------------------------
# Pure-torch reference sampler steps: the functions pygen.ops' fused steps are tested against.
## Each ``*_step_ref`` takes the model output, the current sample (B, ...) and the schedule
# coefficients of the step *already gathered* for each sample (tensors that broadcast to the
# sample: 0-dim for one timestep, (B, 1, ..., 1) for per-sample timesteps; see
# :func:`gather`), plus explicit noise where the step is stochastic. Each returns
# ``(prev_sample, pred_original_sample)``. Computation is in float32 (float64 for float64
# samples); outputs have the dtype of ``model_output``.
## Notation: abar = alphas_cumprod[t], abar_prev = alphas_cumprod[prev_t] (the final alpha when
# prev_t < 0), sigma = sqrt((1 - abar) / abar).
## Prediction types (``prediction_type``): ``"epsilon"`` (the model predicts the noise),
# ``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1 - abar) x0) and ``"sample"`` (x0 itself).

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


def _fake_step(model_output, sample, *args, write_x0=True) -> tuple[Tensor, Tensor]:
    """Fake (meta) outputs of every step op: prev_sample, and x0 (empty when not asked for).
    write_x0 is the 15th argument of both step schemas, positional or keyword."""
    write_x0 = args[12] if len(args) > 12 else write_x0
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape if write_x0 else (0,))


def _register_step_fakes(*names: str) -> None:
    for name in names:
        torch.library.register_fake(f"pygen::{name}")(_fake_step)


_STEP_OPS: dict = {}
if _ext.HAS_CPP:
    _register_step_fakes("alpha_step")
    _STEP_OPS["cpp"] = _STEP_OPS["cuda"] = torch.ops.pygen.alpha_step

if "triton" in _backend.available_backends():
    from pygen.kernels import diffusion as _tkd

    @torch.library.custom_op("pygen::triton_alpha_step", mutates_args=())
    def _triton_alpha_step(
        model_output: Tensor, sample: Tensor, alphas_cumprod: Tensor, t: Tensor, prev_t: Tensor,
        final_alpha_cumprod: float, kind: int, prediction: int, eta: float, clip_range: float, clipped_eps: bool,
        noise: Tensor | None, seed: Tensor | None, offset: int, write_x0: bool = True,
    ) -> tuple[Tensor, Tensor]:
        return _tkd.alpha_step(model_output, sample, alphas_cumprod, t, prev_t, final_alpha_cumprod, kind, prediction,
                               eta, clip_range, clipped_eps, noise, seed, offset, write_x0)

    _register_step_fakes("triton_alpha_step")
    _STEP_OPS["triton"] = torch.ops.pygen.triton_alpha_step


def _timesteps(t, name: str, sample: Tensor, num_timesteps: int, allow_final: bool) -> Tensor:
    """t as an int64 tensor on the sample's device: (B,) per-sample values, or (1,) for one
    value shared by every sample (the kernels read it with stride 0, so no kernel expands it).

    Ints are range-checked here; tensors only on CPU, where the check needs no device sync,
    and not while compiling, where it would be a data-dependent branch. With ``allow_final``
    any negative value means the final step."""
    b = sample.shape[0]
    if isinstance(t, Tensor):
        if t.dtype != torch.int64 or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != b):
            raise TypeError(f"{name} must be an int or an int64 tensor of shape () or ({b},); "
                            f"got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != sample.device:
            raise ValueError(f"{name} is on {t.device} but sample is on {sample.device}")
        if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(t))  # one op: this runs on every step
            if (lo < 0 and not allow_final) or hi >= num_timesteps:
                raise ValueError(f"{name} must be in [{-1 if allow_final else 0}, {num_timesteps}); "
                                 f"got values {lo}..{hi}")
        return t.reshape(1) if t.dim() == 0 else t.contiguous()
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(t).__name__}")
    if (t < 0 and not allow_final) or t >= num_timesteps:
        raise ValueError(f"{name} must be in [{-1 if allow_final else 0}, {num_timesteps}), got {t}")
    return torch.full((1,), t, dtype=torch.int64, device=sample.device)


def _number(v, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """v as a float, checked to be a real number in range (a string or a NaN is refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise TypeError(f"{name} must be a real number, got {v!r}")
    v = float(v)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def _step(kind, model_output, sample, t, alphas_cumprod, prev_t, final_alpha_cumprod, eta, prediction_type,
          clip_sample, clip_sample_range, clipped_eps, noise, generator, seed, offset, backend, return_x0):
    check_tensor(sample, "sample")
    check_like(model_output, sample, "model_output", "sample")
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod must be a 1-D floating tensor (the schedule's cumulative alphas)")
    if alphas_cumprod.device != sample.device:
        raise ValueError(f"alphas_cumprod is on {alphas_cumprod.device} but sample is on {sample.device}")
    if prediction_type not in _PREDICTION:
        raise ValueError(f"prediction_type must be one of {list(_PREDICTION)}, got {prediction_type!r}")
    final_alpha_cumprod = _number(final_alpha_cumprod, "final_alpha_cumprod", low=0.0, high=1.0)
    eta = _number(eta, "eta", low=0.0)
    if clip_sample:
        clip_sample_range = _number(clip_sample_range, "clip_sample_range", low=0.0, low_open=True)
    n = alphas_cumprod.shape[0]
    tt = _timesteps(t, "t", sample, n, allow_final=False)
    tp = _timesteps(prev_t, "prev_t", sample, n, allow_final=True)
    seed_t = None
    if noise is not None:
        check_like(noise, sample, "noise", "sample")
    elif kind != "ddim" or eta > 0:  # deterministic DDIM draws no seed
        seed_t = _rng.as_seed(seed, sample.device, generator)
    offset = _rng.check_offset(offset)
    # mixed dtypes (a bf16 model output with a float32 sample) promote; CPU halves run in float32
    dt = compute_dtype(sample, model_output)
    kt = kernel_dtype(dt, sample.device)
    model_output, sample, noise = cast(model_output, kt), cast(sample, kt), cast(noise, kt)
    prev, x0 = _alpha_step(kind, model_output, sample, tt, alphas_cumprod, tp, final_alpha_cumprod, eta,
                           prediction_type, clip_sample, clip_sample_range, clipped_eps, noise, seed_t, offset,
                           backend, return_x0)
    return prev.to(dt), (x0.to(dt) if return_x0 else None)


def _alpha_step(kind, model_output, sample, tt, alphas_cumprod, tp, final_alpha_cumprod, eta, prediction_type,
                clip_sample, clip_sample_range, clipped_eps, noise, seed_t, offset, backend, return_x0):
    n = alphas_cumprod.shape[0]
    name = _backend.resolve(backend, sample.device, sample.dtype)
    op = _STEP_OPS.get(name)
    if op is None and name != "torch" and _backend.requested(backend) != "auto":
        raise RuntimeError(f"{kind} steps have no {name!r} kernel yet; use backend='torch' or 'auto'")
    clip = float(clip_sample_range) if clip_sample else 0.0
    if op is not None:
        table = alphas_cumprod if alphas_cumprod.dtype in (torch.float32, torch.float64) else alphas_cumprod.float()
        prev, x0 = op(model_output, sample, table, tt, tp, float(final_alpha_cumprod), _KIND[kind],
                      _PREDICTION[prediction_type], float(eta), clip, bool(clipped_eps), noise, seed_t, offset,
                      write_x0=bool(return_x0))
        return prev, (x0 if return_x0 else None)
    # reference path: the same noise stream as the kernels
    ab = gather(alphas_cumprod, tt, sample.dim())
    table_prev = torch.cat([alphas_cumprod, alphas_cumprod.new_tensor([final_alpha_cumprod])])
    ab_prev = gather(table_prev, torch.where(tp < 0, n, tp), sample.dim())
    z = noise
    if z is None and seed_t is not None:
        z = _rng.philox_normal(seed_t, offset, sample.shape).to(sample.dtype)
    if kind == "ddim":
        prev, x0 = ddim_step_ref(model_output, sample, ab, ab_prev, z, eta=eta, prediction_type=prediction_type,
                                 clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                                 use_clipped_model_output=clipped_eps)
    else:
        z = z * (tt > 0).to(z.dtype).reshape(-1, *([1] * (sample.dim() - 1)))  # no noise at t = 0
        prev, x0 = ddpm_step_ref(model_output, sample, ab, ab_prev, z, prediction_type=prediction_type,
                                 variance_type=kind, clip_sample=clip_sample, clip_sample_range=clip_sample_range)
    return prev, (x0 if return_x0 else None)


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    t: int | Tensor,
    alphas_cumprod: Tensor,
    prev_t: int | Tensor,
    *,
    final_alpha_cumprod: float = 1.0,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
    return_x0: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One DDIM step (Song et al. 2021) from t to prev_t for every sample; see the module doc.

    prev_t < 0 means the final step (ab_prev = final_alpha_cumprod, diffusers'
    ``set_alpha_to_one``). ``eta = 0`` is deterministic. Returns (prev_sample, pred_original_sample);
    ``return_x0=False`` skips writing x0 (a quarter of the step's memory traffic) and returns None for it.
    """
    return _step("ddim", model_output, sample, t, alphas_cumprod, prev_t, final_alpha_cumprod, eta, prediction_type,
                 clip_sample, clip_sample_range, use_clipped_model_output, noise, generator, seed, offset, backend,
                 return_x0)


def ddpm_step(
    model_output: Tensor,
    sample: Tensor,
    t: int | Tensor,
    alphas_cumprod: Tensor,
    prev_t: int | Tensor,
    *,
    variance_type: str = "fixed_small",
    final_alpha_cumprod: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
    return_x0: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One DDPM ancestral step (Ho et al. 2020) from t to prev_t (strided schedules allowed).

    variance_type "fixed_small" (posterior variance) or "fixed_large" (beta); no noise
    where t == 0. Returns (prev_sample, pred_original_sample); ``return_x0=False``: (prev_sample, None).
    """
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
    return _step(variance_type, model_output, sample, t, alphas_cumprod, prev_t, final_alpha_cumprod, 0.0,
                 prediction_type, clip_sample, clip_sample_range, False, noise, generator, seed, offset, backend,
                 return_x0)


# ---- sigma-space steps: Euler, Euler-ancestral, DPM-Solver++ 2M ----------------------------

_SIGMA_KIND = {"euler": 0, "euler_ancestral": 1, "midpoint": 2, "heun": 3}
_SIGMA_OPS: dict = {}
if _ext.HAS_CPP:
    _register_step_fakes("sigma_step")
    _SIGMA_OPS["cpp"] = _SIGMA_OPS["cuda"] = torch.ops.pygen.sigma_step

if "triton" in _backend.available_backends():

    @torch.library.custom_op("pygen::triton_sigma_step", mutates_args=())
    def _triton_sigma_step(
        model_output: Tensor, sample: Tensor, sigmas: Tensor, index: Tensor, prev_x0: Tensor | None, kind: int,
        prediction: int, gamma: float, s_tmin: float, s_tmax: float, s_noise: float, noise: Tensor | None,
        seed: Tensor | None, offset: int, write_x0: bool = True,
    ) -> tuple[Tensor, Tensor]:
        return _tkd.sigma_step(model_output, sample, sigmas, index, prev_x0, kind, prediction, gamma, s_tmin, s_tmax,
                               s_noise, noise, seed, offset, write_x0)

    _register_step_fakes("triton_sigma_step")
    _SIGMA_OPS["triton"] = torch.ops.pygen.triton_sigma_step


def _sigma_step(kind: str, model_output, sample, sigmas, index, prev_x0, prediction_type, gamma, s_tmin, s_tmax,
                s_noise, noise, generator, seed, offset, backend, return_x0=True):
    check_tensor(sample, "sample")
    check_like(model_output, sample, "model_output", "sample")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or not sigmas.is_floating_point() or sigmas.shape[0] < 2:
        raise TypeError("sigmas must be a 1-D floating tensor of at least 2 entries (the sampler's sigma table)")
    if sigmas.device != sample.device:
        raise ValueError(f"sigmas is on {sigmas.device} but sample is on {sample.device}")
    if prediction_type not in _PREDICTION:
        raise ValueError(f"prediction_type must be one of {list(_PREDICTION)}, got {prediction_type!r}")
    idx = _timesteps(index, "index", sample, sigmas.shape[0] - 1, allow_final=False)
    if prev_x0 is not None:
        check_like(prev_x0, sample, "prev_x0", "sample")
    gamma, s_noise = _number(gamma, "gamma", low=0.0), _number(s_noise, "s_noise", low=0.0)
    s_tmin, s_tmax = _number(s_tmin, "s_tmin"), _number(s_tmax, "s_tmax")
    noisy = kind == "euler_ancestral" or (kind == "euler" and gamma > 0)
    seed_t = None
    if noise is not None:
        check_like(noise, sample, "noise", "sample")
    elif noisy:
        seed_t = _rng.as_seed(seed, sample.device, generator)
    offset = _rng.check_offset(offset)
    dt = compute_dtype(sample, model_output)
    kt = kernel_dtype(dt, sample.device)
    model_output, sample, noise, prev_x0 = cast(model_output, kt), cast(sample, kt), cast(noise, kt), cast(prev_x0, kt)
    name = _backend.resolve(backend, sample.device, sample.dtype)
    op = _SIGMA_OPS.get(name)
    if op is None and name != "torch" and _backend.requested(backend) != "auto":
        raise RuntimeError(f"{kind} steps have no {name!r} kernel; use backend='torch' or 'auto'")
    if op is not None:
        table = sigmas if sigmas.dtype in (torch.float32, torch.float64) else sigmas.float()
        prev, x0 = op(model_output, sample, table, idx, prev_x0, _SIGMA_KIND[kind], _PREDICTION[prediction_type],
                      float(gamma), float(s_tmin), float(s_tmax), float(s_noise), noise if noisy else None, seed_t,
                      offset, write_x0=bool(return_x0))
    else:
        prev, x0 = _sigma_step_torch(kind, model_output, sample, sigmas, idx, prev_x0, prediction_type, gamma, s_tmin,
                                     s_tmax, s_noise, noise, seed_t, offset)
    return prev.to(dt), (x0.to(dt) if return_x0 else None)


def _sigma_step_torch(kind, model_output, sample, sigmas, idx, prev_x0, prediction_type, gamma, s_tmin, s_tmax,
                      s_noise, noise, seed_t, offset):
    """The reference path: per-sample sigmas gathered, then the reference steps' formulas."""
    nd = sample.dim()
    s, sn = gather(sigmas, idx, nd), gather(sigmas, idx + 1, nd)
    z = noise
    if z is None and seed_t is not None:
        z = _rng.philox_normal(seed_t, offset, sample.shape).to(sample.dtype)
    if kind == "euler":
        ct = torch.promote_types(sample.dtype, torch.float32)  # gamma is not rounded to a float32 table
        s64 = s.double()  # the gate compares the table's values in float64, as the kernels do
        g = torch.where((s64 >= s_tmin) & (s64 <= s_tmax), torch.full_like(s, gamma, dtype=ct), torch.zeros_like(s, dtype=ct))
        return euler_step_ref(model_output, sample, s, sn, z if gamma > 0 else None, gamma=g, s_noise=s_noise,
                                prediction_type=prediction_type)
    if kind == "euler_ancestral":
        return euler_ancestral_step_ref(model_output, sample, s, sn, z, prediction_type=prediction_type)
    first = dpmpp_2m_step_ref(model_output, sample, s, sn, prediction_type=prediction_type, solver_type=kind)
    if prev_x0 is None:
        return first
    sp = gather(sigmas, (idx - 1).clamp(min=0), nd)
    second = dpmpp_2m_step_ref(model_output, sample, s, sn, prev_x0, sp, prediction_type=prediction_type,
                                 solver_type=kind)
    use = (idx >= 1).reshape(-1, *([1] * (nd - 1)))  # index 0 has no previous step
    return torch.where(use, second[0], first[0]), first[1]


def euler_step(
    model_output: Tensor,
    sample: Tensor,
    sigmas: Tensor,
    index: int | Tensor,
    *,
    gamma: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
    return_x0: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One Euler step (Karras et al. 2022, alg. 2) from sigmas[index] to sigmas[index + 1].

    ``sample`` is in sigma space (x = x0 + sigma eps). Churn: where s_tmin <= sigma <= s_tmax
    the sample is first raised to sigma (1 + gamma) with fresh noise (diffusers'
    ``gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)``); gamma = 0 is deterministic
    and draws nothing. See :func:`euler_step_ref`.
    Returns (prev_sample, pred_original_sample); ``return_x0=False``: (prev_sample, None), x0 not written.
    """
    return _sigma_step("euler", model_output, sample, sigmas, index, None, prediction_type, gamma, s_tmin, s_tmax,
                       s_noise, noise, generator, seed, offset, backend, return_x0)


def euler_ancestral_step(
    model_output: Tensor,
    sample: Tensor,
    sigmas: Tensor,
    index: int | Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
    return_x0: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One Euler-ancestral step (k-diffusion's ``sample_euler_ancestral``, eta = 1) from
    sigmas[index] to sigmas[index + 1], sample in sigma space, noise drawn in-kernel.
    See :func:`euler_ancestral_step_ref`. Returns (prev_sample, pred_original_sample);
    ``return_x0=False``: (prev_sample, None), x0 not written.
    """
    return _sigma_step("euler_ancestral", model_output, sample, sigmas, index, None, prediction_type, 0.0, 0.0, 0.0,
                       1.0, noise, generator, seed, offset, backend, return_x0)


def dpmpp_2m_step(
    model_output: Tensor,
    sample: Tensor,
    sigmas: Tensor,
    index: int | Tensor,
    prev_x0: Tensor | None = None,
    *,
    solver_type: str = "midpoint",
    prediction_type: str = "epsilon",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step (Lu et al. 2022) from sigmas[index] to sigmas[index + 1] on
    the VP sample x = alpha x0 + sigma_t eps (alpha = 1/sqrt(sigma^2 + 1)).

    Second order where ``prev_x0`` (the x0 this function returned on the previous step) is
    given, index >= 1 and sigmas[index + 1] > 0; first order (DDIM) elsewhere.
    ``solver_type`` "midpoint" or "heun". See :func:`dpmpp_2m_step_ref`.
    Returns (prev_sample, pred_original_sample); keep the second for the next step.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _sigma_step(solver_type, model_output, sample, sigmas, index, prev_x0, prediction_type, 0.0, 0.0, 0.0,
                       1.0, None, None, None, 0, backend)


# ---- training: noising and the weighted MSE, eps drawn in-kernel and never stored ----------


def _weights(ab: Tensor, prediction_type: str, snr_gamma: float | None) -> Tensor:
    if not snr_gamma:
        return torch.ones_like(ab)
    snr = ab / (1 - ab)
    m = snr.clamp(max=snr_gamma)
    return {"epsilon": m / snr, "v_prediction": m / (snr + 1), "sample": m}[prediction_type]


def q_sample_ref(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, eps: Tensor) -> Tensor:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; t (B,) int64."""
    ct = torch.promote_types(x0.dtype, torch.float32)
    ab = alphas_cumprod.to(ct)[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return (ab.sqrt() * x0.to(ct) + (1 - ab).sqrt() * eps.to(ct)).to(x0.dtype)


def diffusion_mse_ref(model_output: Tensor, x0: Tensor, t: Tensor, alphas_cumprod: Tensor, eps: Tensor,
                      prediction_type: str = "epsilon", snr_gamma: float | None = None) -> Tensor:
    """Per-sample w_t * mean((model_output - target)^2), (B,); target eps / x0 / v by prediction type."""
    ct = row_dtype(compute_dtype(x0, model_output))
    ab = alphas_cumprod.to(ct)[t]
    ab_b = ab.reshape(-1, *([1] * (x0.dim() - 1)))
    e, x = eps.to(ct), x0.to(ct)
    target = {"epsilon": lambda: e, "sample": lambda: x,
              "v_prediction": lambda: ab_b.sqrt() * e - (1 - ab_b).sqrt() * x}[prediction_type]()
    err = (model_output.to(ct) - target) ** 2
    mse = err.reshape(x0.shape[0], -1).mean(dim=1) if x0.numel() else torch.zeros(x0.shape[0], dtype=ct, device=x0.device)
    return _weights(ab, prediction_type, snr_gamma) * mse  # (B,) float32, or float64


_TRAIN_OPS: dict = {}
if _ext.HAS_CPP:
    _TRAIN_OPS["cpp"] = _TRAIN_OPS["cuda"] = (torch.ops.pygen.q_sample, torch.ops.pygen.diffusion_mse,
                                              torch.ops.pygen.diffusion_mse_backward)


if "triton" in _backend.available_backends():

    @torch.library.custom_op("pygen::triton_q_sample", mutates_args=())
    def _triton_q_sample(x0: Tensor, alphas_cumprod: Tensor, t: Tensor, seed: Tensor, offset: int) -> Tensor:
        return _tkd.q_sample(x0, alphas_cumprod, t, seed, offset)

    @torch.library.custom_op("pygen::triton_diffusion_mse", mutates_args=())
    def _triton_diffusion_mse(model_output: Tensor, x0: Tensor, alphas_cumprod: Tensor, t: Tensor, seed: Tensor,
                              offset: int, prediction: int, snr_gamma: float) -> Tensor:
        return _tkd.diffusion_mse(None, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma)[0]

    @torch.library.custom_op("pygen::triton_diffusion_mse_backward", mutates_args=())
    def _triton_diffusion_mse_backward(grad_loss: Tensor, model_output: Tensor, x0: Tensor, alphas_cumprod: Tensor,
                                       t: Tensor, seed: Tensor, offset: int, prediction: int,
                                       snr_gamma: float, write_grad_x0: bool = True) -> tuple[Tensor, Tensor]:
        return _tkd.diffusion_mse(grad_loss, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma,
                                  write_grad_x0)

    _TRAIN_OPS["triton"] = (torch.ops.pygen.triton_q_sample, torch.ops.pygen.triton_diffusion_mse,
                            torch.ops.pygen.triton_diffusion_mse_backward)


def _register_train(prefix: str) -> None:
    ops = torch.ops.pygen
    bwd = getattr(ops, prefix + "diffusion_mse_backward")

    @torch.library.register_fake(f"pygen::{prefix}q_sample")
    def _(x0, alphas_cumprod, t, seed, offset):
        return x0.new_empty(x0.shape)

    @torch.library.register_fake(f"pygen::{prefix}diffusion_mse")
    def _(model_output, x0, *args):
        return x0.new_empty(x0.shape[:1], dtype=row_dtype(x0.dtype))

    @torch.library.register_fake(f"pygen::{prefix}diffusion_mse_backward")
    def _(grad_loss, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma, write_grad_x0=True):
        return x0.new_empty(x0.shape), x0.new_empty(x0.shape if write_grad_x0 else (0,))

    # q_sample: d x_t / d x0 = sqrt(ab_t); eps is not needed.
    def q_setup(ctx, inputs, output):
        x0, alphas_cumprod, t, seed, offset = inputs
        ctx.save_for_backward(alphas_cumprod, t)
        ctx.ndim = x0.dim()

    def q_backward(ctx, grad):
        alphas_cumprod, t = ctx.saved_tensors
        scale = alphas_cumprod[t].sqrt().reshape(-1, *([1] * (ctx.ndim - 1))).to(grad.dtype)
        return grad * scale, None, None, None, None

    torch.library.register_autograd(f"pygen::{prefix}q_sample", q_backward, setup_context=q_setup)

    # diffusion_mse: eps regenerated from (seed, offset) by the backward kernel.
    def mse_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.rest = inputs[5:]

    def mse_backward(ctx, grad):
        mo, x0, ac, t, seed = ctx.saved_tensors
        if wants_graph():
            offset, prediction, snr_gamma = ctx.rest
            pred = {v: k for k, v in _PREDICTION.items()}[prediction]
            eps = _rng.philox_normal(seed, offset, x0.shape)
            grads = grads_via_reference(lambda m, x: diffusion_mse_ref(m, x, t, ac, eps, pred, snr_gamma or None),
                                        (mo, x0), ctx.needs_input_grad[:2], (grad,))
            return (*grads, None, None, None, None, None, None)
        need_x0 = ctx.needs_input_grad[1]  # grad_x0 is not even written unless x0 needs it
        g_mo, g_x0 = bwd(grad, mo, x0, ac, t, seed, *ctx.rest, need_x0)
        return g_mo, g_x0 if need_x0 else None, None, None, None, None, None, None

    torch.library.register_autograd(f"pygen::{prefix}diffusion_mse", mse_backward, setup_context=mse_setup)


for _prefix in ([""] if _ext.HAS_CPP else []) + (["triton_"] if "triton" in _TRAIN_OPS else []):
    _register_train(_prefix)


def _train_args(x0: Tensor, t, alphas_cumprod: Tensor, prediction_type: str, snr_gamma):
    check_tensor(x0, "x0")
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod must be a 1-D floating tensor")
    if alphas_cumprod.device != x0.device:
        raise ValueError(f"alphas_cumprod is on {alphas_cumprod.device} but x0 is on {x0.device}")
    if prediction_type not in _PREDICTION:
        raise ValueError(f"prediction_type must be one of {list(_PREDICTION)}, got {prediction_type!r}")
    if snr_gamma is not None and not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 or None, got {snr_gamma}")
    tt = _timesteps(t, "t", x0, alphas_cumprod.shape[0], allow_final=False)
    # one t for every sample (an int or a 0-dim tensor): the training kernels read (B,) t
    tt = tt.expand(x0.shape[0]).contiguous() if tt.shape[0] != x0.shape[0] else tt
    table = alphas_cumprod if alphas_cumprod.dtype in (torch.float32, torch.float64) else alphas_cumprod.float()
    return tt, table


def _train_op(backend, x0, dtype):
    name = _backend.resolve(backend, x0.device, dtype)
    ops = _TRAIN_OPS.get(name)
    if ops is None and name != "torch" and _backend.requested(backend) != "auto":
        raise RuntimeError(f"diffusion training ops have no {name!r} kernel yet; use backend='torch' or 'auto'")
    return ops


def q_sample(x0: Tensor, t: int | Tensor, alphas_cumprod: Tensor, *, generator: torch.Generator | None = None,
             seed: int | Tensor | None = None, offset: int = 0, backend: str | None = None) -> Tensor:
    """Noise data to level t: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, eps in-kernel from (seed, offset).

    x0 (B, ...); t an int or (B,) int64. Pass the same seed/offset to :func:`diffusion_mse`
    so that its target sees the same eps. Differentiable in x0.
    """
    tt, table = _train_args(x0, t, alphas_cumprod, "epsilon", None)
    seed_t = _rng.as_seed(seed, x0.device, generator)
    offset = _rng.check_offset(offset)
    kt = kernel_dtype(x0.dtype, x0.device)
    ops = _train_op(backend, x0, kt)
    if ops is None:
        return q_sample_ref(x0, tt, table, _rng.philox_normal(seed_t, offset, x0.shape))
    return ops[0](cast(x0, kt), table, tt, seed_t, offset).to(x0.dtype)


def diffusion_mse(model_output: Tensor, x0: Tensor, t: int | Tensor, alphas_cumprod: Tensor, *,
                  seed: int | Tensor, offset: int = 0, prediction_type: str = "epsilon",
                  snr_gamma: float | None = None, backend: str | None = None) -> Tensor:
    """Per-sample loss w_t mean((model_output - target)^2), (B,), target from the eps of (seed, offset).

    Targets: eps ("epsilon"), x0 ("sample"), v = sqrt(ab) eps - sqrt(1 - ab) x0 ("v_prediction").
    ``snr_gamma``: Min-SNR-gamma weights (Hang et al. 2023). Differentiable in model_output and x0;
    the backward regenerates eps instead of storing it.
    """
    tt, table = _train_args(x0, t, alphas_cumprod, prediction_type, snr_gamma)
    check_like(model_output, x0, "model_output", "x0")
    if seed is None:  # a fresh seed would silently break the pairing with q_sample's eps
        raise ValueError("diffusion_mse needs seed= (and offset=): the ones q_sample drew x_t with")
    seed_t = _rng.as_seed(seed, x0.device, None)
    offset = _rng.check_offset(offset)
    kt = kernel_dtype(compute_dtype(x0, model_output), x0.device)
    ops = _train_op(backend, x0, kt)
    if ops is None:
        eps = _rng.philox_normal(seed_t, offset, x0.shape)
        return diffusion_mse_ref(model_output, x0, tt, table, eps, prediction_type, snr_gamma)
    return ops[1](cast(model_output, kt), cast(x0, kt), table, tt, seed_t, offset, _PREDICTION[prediction_type],
                  float(snr_gamma or 0.0))


def diffusion_loss(model, x0: Tensor, alphas_cumprod: Tensor, *, t: int | Tensor | None = None,
                   prediction_type: str = "epsilon", snr_gamma: float | None = None,
                   generator: torch.Generator | None = None, backend: str | None = None, **model_kwargs) -> Tensor:
    """One training loss evaluation: t ~ U{0..T-1} per sample (unless given), x_t by
    :func:`q_sample`, ``model(x_t, t, **model_kwargs)``, then :func:`diffusion_mse`. Returns (B,)."""
    check_tensor(x0, "x0")
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
        raise TypeError(f"alphas_cumprod must be a 1-D floating tensor, got {type(alphas_cumprod).__name__}")
    if t is None:
        t = torch.randint(0, alphas_cumprod.shape[0], (x0.shape[0],), device=x0.device, generator=generator)
    seed = _rng.draw_seed(x0.device, generator)
    x_t = q_sample(x0, t, alphas_cumprod, seed=seed, backend=backend)
    tt, _ = _train_args(x0, t, alphas_cumprod, prediction_type, snr_gamma)  # (B,) for the model
    out = model(x_t, tt, **model_kwargs)
    return diffusion_mse(out, x0, tt, alphas_cumprod, seed=seed, prediction_type=prediction_type,
                         snr_gamma=snr_gamma, backend=backend)

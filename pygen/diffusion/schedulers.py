"""Diffusion schedulers with diffusers' names, constructor keywords and loop protocol.

Moving over from diffusers is a one-line change (``from pygen.diffusion import DDIMScheduler``)::

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    x = pygen.ops.randn(B, C, H, W, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=g).prev_sample

``step(model_output, timestep, sample, *, generator=None, noise=None, return_dict=True)``
returns a :class:`SchedulerOutput` (``prev_sample``, ``pred_original_sample``). Every step
is one fused op of :mod:`pygen.ops` (``use_backend("torch")`` gives the reference); a model
output of another dtype than the sample (autocast) is cast to the sample's, and the step
returns the sample's dtype. Noise that is not passed is drawn in the step from pygen's
Philox stream (``generator`` honoured), so it differs from diffusers' ``torch.randn`` draws:
pass ``noise=`` (alias ``variance_noise=``) to reproduce a given noise sequence.

Stateless steps: :class:`DDPMScheduler` and :class:`DDIMScheduler` take ``timestep`` as a
Python int, a 0-dim or (1,) integer tensor (one for all) or a (B,) one (per-sample timesteps).
Coefficient tables live on the sample's device and are gathered there: a step makes no host synchronisation
(range checks of tensor timesteps are done only for CPU tensors).

Multistep / sigma-space schedulers (:class:`EulerDiscreteScheduler`,
:class:`EulerAncestralDiscreteScheduler`, :class:`DPMSolverMultistepScheduler`) keep
diffusers' ``step_index`` state: the first step finds its index by matching ``timestep``
in ``timesteps`` (one host read, as diffusers does), unless ``set_begin_index`` was called.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from pygen import ops
from pygen.diffusion import schedules as S
from pygen.diffusion.config import ConfigMixin, FrozenConfig
from pygen.ops import diffusion as R

__all__ = [
    "SchedulerConfig",
    "SchedulerOutput",
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]


SchedulerConfig = FrozenConfig  # the name pygen used before the config layer


class SchedulerOutput(OrderedDict):
    """What ``step`` returns, dict-like as diffusers' ``BaseOutput``: ``out.prev_sample``,
    ``out["prev_sample"]``, ``out[0]``, ``out.to_tuple()``, ``out.keys()`` / ``.values()``.

    Entries that are None are left out (``pred_original_sample`` of a scheduler that has none),
    so integer indices and ``to_tuple()`` follow diffusers' outputs. Extra fields (LCM's
    ``denoised``) are keyword arguments."""

    def __init__(self, prev_sample: Tensor | None = None, pred_original_sample: Tensor | None = None, **extra: Tensor | None):
        super().__init__()
        for k, v in (("prev_sample", prev_sample), ("pred_original_sample", pred_original_sample), *extra.items()):
            if v is not None:
                super().__setitem__(k, v)

    def __getattr__(self, name: str):
        if name in ("prev_sample", "pred_original_sample", "denoised"):
            return self.get(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, k):
        if isinstance(k, str):
            return super().__getitem__(k)
        return self.to_tuple()[k]

    def __setattr__(self, name, value):
        super().__setitem__(name, value)

    def __reduce__(self):
        return (type(self), (), None, None, iter(self.items()))

    def to_tuple(self) -> tuple[Tensor, ...]:
        return tuple(self.values())


def threshold_sample(x0: Tensor, ratio: float = 0.995, max_value: float = 1.0) -> Tensor:
    """diffusers' ``_threshold_sample``: per-sample s = quantile(|x0|, ratio) over all but the batch
    dimension, clamped to [1, max_value]; returns clamp(x0, -s, s) / s in x0's dtype (computed in
    float32 for half inputs)."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def _noise_for(noise: Tensor | None, sample: Tensor, generator, dtype=None) -> Tensor:
    """The given noise on the sample's device, or fresh noise from pygen's Philox stream (``generator`` honoured)."""
    if noise is not None:
        return _like(noise, sample).to(dtype or sample.dtype)
    z = ops.randn(*sample.shape, generator=generator, device=sample.device)
    return z.to(dtype or sample.dtype)


def _like(x: Tensor | None, sample: Tensor, name: str = "noise") -> Tensor | None:
    """x (noise, a previous x0) on the sample's device and in its dtype, as the fused ops take them."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    return x.to(device=sample.device, dtype=sample.dtype)


def _check_io(model_output, sample) -> Tensor:
    """Checks the step's inputs; returns model_output in the sample's dtype.

    The fused ops take one dtype. A model output in another (a bf16 UNet under autocast with a
    float32 sample) is cast, a cheap elementwise pass, rather than leaving the fused path: the
    step computes and returns in the sample's precision, which is the one the loop carries."""
    for name, x in (("model_output", model_output), ("sample", sample)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape (B, ...) with a batch dimension, got a 0-dim tensor")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output must have the shape of sample, {tuple(sample.shape)}; got {tuple(model_output.shape)}"
        )
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    return model_output.to(sample.dtype)


class _Base(ConfigMixin):
    """Config registration, the alpha tables and device caching shared by the schedulers."""

    order = 1
    _unsupported: dict[str, Any] = {}
    _extra_prediction_types: tuple[str, ...] = ()  # beyond the fused ops' PREDICTION_TYPES
    _compatibles = (
        "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "LCMScheduler",
    )

    def _register(self, kwargs: dict[str, Any], betas: bool = True) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("self", "__class__")}
        kwargs = self._map_deprecated_values(kwargs)
        for k, bad in self._unsupported.items():
            if k in kwargs and kwargs[k] not in bad[0]:
                raise NotImplementedError(
                    f"{type(self).__name__}: {k}={kwargs[k]!r} is not supported yet (supported: {bad[0]})"
                )
        self._internal_dict = FrozenConfig()
        self.register_to_config(**kwargs)
        self._note_defaults(kwargs)
        self.num_inference_steps: int | None = None
        self._cache: dict[tuple[str, torch.device], Tensor] = {}
        if not betas:
            return
        c = self.config
        kinds = R.PREDICTION_TYPES + self._extra_prediction_types
        if c.prediction_type not in kinds:
            raise ValueError(f"prediction_type must be one of {kinds}, got {c.prediction_type!r}")
        if c.timestep_spacing not in S.TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {S.TIMESTEP_SPACINGS}, got {c.timestep_spacing!r}")
        if sum(bool(c.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used")
        self.betas = S.make_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
            c.get("rescale_betas_zero_snr", False),
        )
        self.alphas = 1.0 - self.betas
        # rescale_betas_zero_snr: abar_T = 0 exactly here, as in diffusers' DDIM and DDPM (with
        # v_prediction the step at t = T is finite; with epsilon x0 is undetermined there, inf/nan
        # as in diffusers). The sigma-space schedulers lift it to 2**-24 (see _init_sigmas).
        self.alphas_cumprod = S.alphas_cumprod_from_betas(self.betas)

    def _threshold(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding (Saharia et al. 2022): per sample s = quantile(|x0|, ratio) clamped
        to [1, sample_max_value]; x0 -> clamp(x0, -s, s) / s. One torch quantile per step (the
        fused step kernels take no per-sample scale): the schedulers feed the thresholded x0 to
        their fused step, see each step."""
        return threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _on(self, name: str, device: torch.device) -> Tensor:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one cache entry
            device = torch.device("cuda", torch.cuda.current_device())
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def _prefetch(self, device) -> None:
        """Copy the tables a step reads to ``device`` now (set_timesteps(n, device=...)), so that
        the steps themselves copy nothing from the host (CUDA graph capture forbids such copies)."""
        if device is None:
            return
        for name in ("alphas_cumprod", "prev_timesteps", "sigmas", "step_indices"):
            if isinstance(getattr(self, name, None), Tensor):
                self._on(name, device)

    def _t(self, timestep, sample: Tensor) -> Tensor:
        """timestep as an int64 0-dim or (B,) tensor on sample's device, checked."""
        N = self.num_train_timesteps
        if isinstance(timestep, bool) or not isinstance(timestep, (int, Tensor)):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        if isinstance(timestep, int):
            if not 0 <= timestep < N:
                raise ValueError(f"timestep must be in [0, {N}), got {timestep}")
            # torch.full is a fill kernel (fine while a CUDA graph is being captured); torch.tensor on
            # a CUDA device would be a host-to-device copy, which capture does not allow
            return torch.full((), timestep, dtype=torch.int64, device=sample.device)
        if timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool:
            raise TypeError(
                f"timestep must be an integer tensor (int64), got {timestep.dtype}; "
                "these schedulers index their tables with discrete timesteps"
            )
        if timestep.shape == (1,):  # one timestep for every sample: diffusers broadcasts it
            timestep = timestep.reshape(())
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] != sample.shape[0]):
            raise ValueError(
                f"timestep must be 0-dim or of shape (B,) = ({sample.shape[0]},), got {tuple(timestep.shape)}"
            )
        if timestep.device.type == "cpu" and timestep.numel() and (timestep.min() < 0 or timestep.max() >= N):
            raise ValueError(f"timestep must be in [0, {N}), got values in [{int(timestep.min())}, {int(timestep.max())}]")
        if timestep.device.type == "cpu" and sample.device.type != "cpu" and timestep.dim() == 0:
            return torch.full((), int(timestep), dtype=torch.int64, device=sample.device)  # no host-to-device copy
        return timestep.to(device=sample.device, dtype=torch.int64)

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per-sample ``timesteps`` (B,) or one."""
        t = self._t(timesteps, original_samples)
        ab = R.gather(self._on("alphas_cumprod", original_samples.device), t, original_samples.dim())
        ab = ab.to(original_samples.dtype)
        return ab.sqrt() * original_samples + (1 - ab).sqrt() * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (the v_prediction training target)."""
        t = self._t(timesteps, sample)
        ab = R.gather(self._on("alphas_cumprod", sample.device), t, sample.dim()).to(sample.dtype)
        return ab.sqrt() * noise - (1 - ab).sqrt() * sample


def _out(prev: Tensor, x0: Tensor | None, return_dict: bool, **extra):
    if return_dict:
        return SchedulerOutput(prev, x0, **extra)
    return tuple(v for v in (prev, x0, *extra.values()) if v is not None)


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(_Base):
    """Ancestral sampling of Ho et al. (2020), strided over the inference timesteps.

    ``variance_type``: ``"fixed_small"`` (posterior variance; ``"fixed_small_log"`` is the same
    number) or ``"fixed_large"`` (beta) run the fused step; ``"fixed_large_log"``, ``"learned"`` and
    ``"learned_range"`` (the model output carries 2C channels: prediction, then the variance or its
    interpolation weight v in [-1, 1], log var = (v+1)/2 log beta + (1-v)/2 log posterior var, as in
    improved DDPM) run in torch, the mean from the reference step. ``thresholding=True``: x0 is
    thresholded in torch (:func:`threshold_sample`) and fed to the fused step as an x0
    (``"sample"``) prediction, exact since DDPM's mean reads only x0 and x_t.
    A step from t goes to the next entry of ``timesteps`` (-1 after the last one, where
    abar = 1 and no noise is added); a t that is not in ``timesteps`` (or before
    ``set_timesteps``) steps to t - 1. Stateless: ``timestep`` may be a (B,) tensor.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._register(locals())
        self.init_noise_sigma = 1.0
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        N = self.num_train_timesteps
        self.timesteps = torch.arange(N - 1, -1, -1, dtype=torch.int64)
        self.prev_timesteps = torch.arange(-1, N - 1, dtype=torch.int64)
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Inference timesteps from ``timestep_spacing``, or a custom descending list ``timesteps``."""
        N = self.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.int64).flatten()
            if ts.numel() == 0 or (ts[1:] >= ts[:-1]).any() or ts[0] >= N or ts[-1] < 0:
                raise ValueError(f"timesteps must be strictly descending integers in [0, {N})")
            self.custom_timesteps = True
        else:
            ts = S.spaced_timesteps(num_inference_steps, N, self.config.timestep_spacing, self.config.steps_offset)
            if ts.max() >= N:
                raise ValueError(f"steps_offset={self.config.steps_offset} puts timesteps past {N - 1}")
            self.custom_timesteps = False
        prev = torch.arange(-1, N - 1, dtype=torch.int64)
        prev[ts[:-1]] = ts[1:]
        prev[ts[-1]] = -1
        self.prev_timesteps = prev
        self.num_inference_steps = int(ts.numel())
        self.timesteps = ts.to(device) if device is not None else ts
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "prev_timesteps"}
        self._prefetch(device)

    def previous_timestep(self, timestep):
        """The timestep a step from ``timestep`` goes to (-1 after the last); int or tensor like the input."""
        if isinstance(timestep, Tensor):
            return self._on("prev_timesteps", timestep.device)[timestep.long()]
        return int(self.prev_timesteps[timestep])

    def _get_variance(self, t, predicted_variance: Tensor | None = None, variance_type: str | None = None) -> Tensor:
        """diffusers' ``DDPMScheduler._get_variance`` (the step's variance term at ``t``, before the
        noise): the posterior variance clamped at 1e-20 for ``"fixed_small"`` (and any other name),
        its square root for ``"fixed_small_log"``, beta_t for ``"fixed_large"``, log beta_t for
        ``"fixed_large_log"``, ``predicted_variance`` for ``"learned"``, the log-variance interpolation
        for ``"learned_range"``. The step itself computes these fused; this is for inspection."""
        prev_t = self.previous_timestep(t)
        ab = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta = 1 - ab / ab_prev
        var = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
        vt = self.config.variance_type if variance_type is None else variance_type
        if vt == "fixed_small_log":
            return torch.exp(0.5 * torch.log(var))
        if vt == "fixed_large":
            return beta
        if vt == "fixed_large_log":
            return torch.log(beta)
        if vt == "learned":
            return predicted_variance
        if vt == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta) + (1 - frac) * torch.log(var)
        return var

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ):
        c = self.config
        predicted_variance = None
        if (isinstance(model_output, Tensor) and isinstance(sample, Tensor) and model_output.dim() > 1
                and sample.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1]
                and c.variance_type in ("learned", "learned_range")):
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
            predicted_variance = predicted_variance.to(sample.dtype)
        model_output = _check_io(model_output, sample)
        t = self._t(timestep, sample)
        dev = sample.device
        prev = R.gather(self._on("prev_timesteps", dev), t, 1)
        pred, x0_thr = c.prediction_type, None
        if c.thresholding:
            ab = R.gather(self._on("alphas_cumprod", dev), t, sample.dim()).to(R._ct(sample))
            x0, _ = R.predict_x0_eps(model_output.to(ab.dtype), sample.to(ab.dtype), ab, pred)
            x0_thr = self._threshold(x0.to(sample.dtype))
            model_output, pred = x0_thr, "sample"  # the fused step takes the thresholded x0 as its prediction
        clip = c.clip_sample and not c.thresholding
        given = noise if noise is not None else variance_noise
        fused = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
        if (c.variance_type in fused or c.variance_type not in VARIANCE_TYPES
                or (c.variance_type == "learned_range" and predicted_variance is None)):
            # a variance_type diffusers does not name ("other", None: DPM-Solver's option, met in
            # from_config) falls through its _get_variance to the posterior variance: fixed_small
            # the fused step (backend="torch" is the reference); no noise where t == 0 (the step to -1).
            # learned_range without the variance channels: diffusers' _get_variance gives the
            # fixed_small value then (frac = (None + 1) / 2 fails there; pygen takes fixed_small)
            prev_sample, x0 = ops.ddpm_step(
                model_output, sample, t, self._on("alphas_cumprod", dev), prev,
                variance_type=fused.get(c.variance_type, "fixed_small"), final_alpha_cumprod=1.0,
                prediction_type=pred, clip_sample=clip, clip_sample_range=c.clip_sample_range,
                noise=_like(given, sample), generator=generator,
            )
            return _out(prev_sample, x0, return_dict)
        # learned / learned_range / fixed_large_log: torch, the mean from the reference step
        nd = sample.dim()
        ac = self._on("alphas_cumprod", dev)
        ab = R.gather(ac, t, nd)
        ab_prev = R.gather(torch.cat([ac, ac.new_ones(1)]), torch.where(prev < 0, ac.shape[0], prev), nd)
        mean, x0 = R.ddpm_step_ref(model_output, sample, ab, ab_prev, None, prediction_type=pred,
                                   clip_sample=clip, clip_sample_range=c.clip_sample_range)
        ct = R._ct(sample)
        ab, ab_prev = ab.to(ct), ab_prev.to(ct)
        beta = 1 - ab / ab_prev
        small = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20)
        if c.variance_type == "fixed_large_log":
            std = beta.log() ** 0.5  # sqrt of a log < 0: NaN, as diffusers computes it
        elif c.variance_type == "learned":
            std = predicted_variance.to(ct) ** 0.5 if predicted_variance is not None else small.sqrt()
        else:  # learned_range
            frac = (predicted_variance.to(ct) + 1) / 2
            std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * small.log()))
        z = _noise_for(given, sample, generator, ct)
        mask = (t > 0).to(ct)  # no noise at t = 0
        z = z * (mask.reshape(-1, *([1] * (nd - 1))) if t.dim() == 1 else mask)
        prev_sample = (mean.to(ct) + std * z).to(sample.dtype)
        return _out(prev_sample, x0, return_dict)


class DDIMScheduler(_Base):
    """DDIM (Song et al. 2021) over the inference timesteps; ``eta`` in [0, 1] interpolates to DDPM.

    A step from t goes to t - num_train_timesteps // num_inference_steps (diffusers'
    semantics, also for ``"trailing"``/``"linspace"`` spacing); below 0 it uses the final
    abar (1 with ``set_alpha_to_one``, else abar_0). ``eta`` may be given to the constructor
    (pygen extension, default 0) or per step. Stateless: ``timestep`` may be a (B,) tensor.

    ``thresholding=True``: x0 is thresholded in torch (:func:`threshold_sample`, one quantile per
    sample) and the fused step is fed a (sample, v) pair rebuilt from (thresholded x0, the model's
    eps) as a v prediction, so that the kernel's x0 is the thresholded one and its eps the model's,
    as in diffusers (with ``use_clipped_model_output`` the thresholded x0 is fed as an x0 prediction,
    eps then follows from it, as in diffusers).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        eta: float = 0.0,
    ) -> None:
        self._register(locals())
        if eta == 0:  # pygen's extension stays out of the config (and diffusers' files) unless used
            kept = [d for d in self.config.get("_use_default_values", ()) if d != "eta"]
            self._internal_dict = FrozenConfig(
                (k, kept if k == "_use_default_values" else v)
                for k, v in self.config.items() if k != "eta" and (k != "_use_default_values" or kept)
            )
        self.final_alpha_cumprod = S.final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def _get_variance(self, timestep, prev_timestep) -> Tensor:
        """diffusers' ``DDIMScheduler._get_variance``: (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev),
        abar_prev = ``final_alpha_cumprod`` for a negative ``prev_timestep`` (sigma_t^2 = eta^2 times it)."""
        ab = self.alphas_cumprod[timestep]
        ab_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        N = self.num_train_timesteps
        ts = S.spaced_timesteps(num_inference_steps, N, self.config.timestep_spacing, self.config.steps_offset)
        if ts.max() >= N:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timesteps past {N - 1}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = ts.to(device) if device is not None else ts
        self._prefetch(device)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        eta: float | None = None,
        use_clipped_model_output: bool = False,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise RuntimeError("DDIMScheduler.step: call set_timesteps(num_inference_steps) first")
        model_output = _check_io(model_output, sample)
        c = self.config
        eta = c.get("eta", 0.0) if eta is None else eta
        t = self._t(timestep, sample)
        given = _like(noise if noise is not None else variance_noise, sample)
        pred, x_in, x0_thr = c.prediction_type, sample, None
        if c.thresholding:
            ab = R.gather(self._on("alphas_cumprod", sample.device), t, sample.dim()).to(R._ct(sample))
            x0, eps = R.predict_x0_eps(model_output.to(ab.dtype), sample.to(ab.dtype), ab, pred)
            x0_thr = self._threshold(x0)
            if use_clipped_model_output:  # eps from the thresholded x0: an x0 prediction is exact
                model_output, pred = x0_thr.to(sample.dtype), "sample"
            else:  # x = a x0 + b eps, v = a eps - b x0: the kernel recovers (x0_thr, eps) from them
                a, b = ab.sqrt(), (1 - ab).sqrt()
                x_in = (a * x0_thr + b * eps).to(sample.dtype)
                model_output, pred = (a * eps - b * x0_thr).to(sample.dtype), "v_prediction"
        # coefficients gathered on the device, noise drawn in-kernel; a negative prev_t is the
        # final step (final_alpha_cumprod)
        prev_sample, x0 = ops.ddim_step(
            model_output, x_in, t, self._on("alphas_cumprod", sample.device),
            t - self.num_train_timesteps // self.num_inference_steps,
            final_alpha_cumprod=float(self.final_alpha_cumprod), eta=eta, prediction_type=pred,
            clip_sample=c.clip_sample and not c.thresholding, clip_sample_range=c.clip_sample_range,
            use_clipped_model_output=use_clipped_model_output, noise=given,
            generator=generator if (given is None and eta > 0) else None,
        )
        if x0_thr is not None:
            x0 = x0_thr.to(sample.dtype)
        return _out(prev_sample, x0, return_dict)


class _SigmaBase(_Base):
    """sigma tables, step_index bookkeeping of the multistep / sigma-space schedulers."""

    def _init_sigmas(self) -> None:
        if self.config.get("rescale_betas_zero_snr"):
            # sigma_T = sqrt((1 - abar_T) / abar_T) would be inf: diffusers' Euler, Euler-ancestral
            # and DPM-Solver++ keep abar_T just above 0 (the smallest float16 subnormal); so do we
            self.alphas_cumprod[-1] = 2**-24
        self.train_sigmas = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = torch.cat([self.train_sigmas.flip(0), self.train_sigmas.new_zeros(1)])
        self._sigmas_host = self.sigmas.tolist()
        self.step_indices = torch.arange(len(self._sigmas_host))
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _set_sigmas(self, timesteps: Tensor, sigmas: Tensor, device, num_inference_steps: int | None = None) -> None:
        self.sigmas = sigmas.to(torch.float32)
        self._sigmas_host = self.sigmas.tolist()
        self.step_indices = torch.arange(len(self._sigmas_host))
        self._timesteps_host = timesteps
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self.num_inference_steps = int(timesteps.numel()) if num_inference_steps is None else num_inference_steps
        self._step_index = None
        self._begin_index = None
        self._cache = {k: v for k, v in self._cache.items() if k[0] not in ("sigmas", "step_indices")}

    def _convert_sigmas(self, sig: Tensor, n: int, in_min: float, in_max: float) -> Tensor | None:
        """Karras / exponential / beta sigmas (n, float64) between the config's sigma_min / sigma_max
        (default ``in_min`` / ``in_max``), or None when the config asks for none of them."""
        c = self.config
        smin = c.get("sigma_min") if c.get("sigma_min") is not None else in_min
        smax = c.get("sigma_max") if c.get("sigma_max") is not None else in_max
        if c.get("use_karras_sigmas"):
            return S.karras_sigmas(smin, smax, n)
        if c.get("use_exponential_sigmas"):
            return S.exponential_sigmas(smin, smax, n)
        if c.get("use_beta_sigmas"):
            return S.beta_sigmas(smin, smax, n)
        return None

    def _check_custom(self, timesteps, what: str = "timesteps") -> None:
        c = self.config
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            if timesteps is not None and c.get(k):
                raise ValueError(f"Cannot set `{what}` with `config.{k} = True`.")

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        host = getattr(self, "_timesteps_host", self.timesteps.cpu()) if schedule_timesteps is None \
            else schedule_timesteps.cpu()
        tv = timestep.detach().cpu() if isinstance(timestep, Tensor) else torch.tensor(timestep)
        if tv.numel() != 1:
            raise ValueError(
                f"{type(self).__name__} takes one timestep per step (it keeps a step index), got shape {tuple(tv.shape)}"
            )
        idx = (host == tv.to(host.dtype).reshape(())).nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"timestep {tv.item()} is not one of this scheduler's timesteps; call set_timesteps first")
        return int(idx[1 if idx.numel() > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _sigma(self, i: int, device) -> Tensor:
        return self._on("sigmas", device)[i]

    def _index(self, i: int, device) -> Tensor:
        """Step index i as a 0-dim device tensor: a view into a table copied once, so a step
        launches nothing to make it (and copies nothing from the host)."""
        return self._on("step_indices", device)[i]

    _needs_set_timesteps = True

    def _ready(self) -> None:
        if self._needs_set_timesteps and self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}.step: call set_timesteps(num_inference_steps) first")
        if self._step_index is not None and self._step_index >= len(self._sigmas_host) - 1:
            raise RuntimeError(f"{type(self).__name__}.step: all {self.num_inference_steps} steps were taken")

    def _step_indices(self, timesteps, n: int) -> list[int]:
        if self._begin_index is None:
            ts = timesteps.reshape(-1) if isinstance(timesteps, Tensor) else torch.as_tensor(timesteps).reshape(-1)
            if ts.numel() == 1:
                return [self.index_for_timestep(ts[0])] * n
            return [self.index_for_timestep(x) for x in ts]
        i = self._step_index if self._step_index is not None else self._begin_index
        return [i] * n

    def _bcast(self, v: Tensor, x: Tensor) -> Tensor:
        return v.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _float_timesteps(n: int, N: int, spacing: str, steps_offset: int) -> Tensor:
    """Euler's (float) inference timesteps: linspace is not rounded, leading/trailing are."""
    if spacing == "linspace":
        if n > N:
            raise ValueError(f"num_inference_steps ({n}) must be <= num_train_timesteps ({N})")
        return torch.linspace(0, N - 1, n, dtype=torch.float64).to(torch.float32).flip(0)
    return S.spaced_timesteps(n, N, spacing, steps_offset).to(torch.float32)


class _KarrasSigmaSchedule(_SigmaBase):
    """Euler's and Heun's sigma schedule: float timesteps, VE sample, scale_model_input."""

    _needs_set_timesteps = False  # diffusers steps on the training schedule before set_timesteps

    @property
    def init_noise_sigma(self) -> Tensor:
        """The initial noise's std, a 0-dim tensor as in diffusers: max sigma (linspace / trailing),
        else sqrt(max sigma^2 + 1)."""
        m = self.sigmas.max()
        return m if self.config.timestep_spacing in ("linspace", "trailing") else (m * m + 1) ** 0.5

    def _schedule(self, num_inference_steps, timesteps=None, sigmas=None) -> tuple[Tensor, Tensor, int]:
        """(timesteps float32 (n,), sigmas float64 (n + 1,), n) of diffusers' Euler set_timesteps."""
        c = self.config
        N = self.num_train_timesteps
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        given = sum(x is not None for x in (num_inference_steps, timesteps, sigmas))
        if given != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas")
        self._check_custom(timesteps)
        if sigmas is not None:
            sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten().to(torch.float32).to(torch.float64)
            ts = S.sigma_to_t(sig[:-1], self.train_sigmas).to(torch.float32)
            return ts, sig, int(sig.numel()) - 1
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().to(torch.float32)
            n = int(ts.numel())
        else:
            n = S._check_positive_int(num_inference_steps, "num_inference_steps")
            ts = _float_timesteps(n, N, c.timestep_spacing, c.steps_offset)
        if c.get("interpolation_type", "linear") == "log_linear":
            # diffusers: n + 1 log-spaced sigmas from the largest training sigma to the smallest,
            # whatever the timesteps (float32 as there; with the final sigma, n + 2 entries)
            lo, hi = torch.log(self.train_sigmas.to(torch.float32)[[0, -1]]).tolist()
            sig = torch.linspace(hi, lo, n + 1, dtype=torch.float32).exp().to(torch.float64)
        elif c.get("interpolation_type", "linear") == "linear":
            sig = S.interp_sigmas(ts, self.train_sigmas)
        else:
            raise ValueError(
                f"{c.interpolation_type} is not implemented. Please specify interpolation_type to either 'linear' or 'log_linear'"
            )
        conv = self._convert_sigmas(sig, n, float(sig[-1]), float(sig[0])) if timesteps is None else None
        if conv is not None:
            sig = conv
            ts = S.sigma_to_t(sig, self.train_sigmas).to(torch.float32)
        last = 0.0 if c.get("final_sigmas_type", "zero") == "zero" else float(self.train_sigmas[0])
        return ts, torch.cat([sig, sig.new_tensor([last])]), n

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        self._init_step_index(timestep)
        s = self._sigma(self._step_index, sample.device)
        return sample / (s * s + 1).sqrt()

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = x0 + sigma noise with sigma of ``timesteps`` in the current schedule (sigma space);
        one timestep (a number, 0-dim or (1,) tensor) is broadcast over the batch."""
        idx = self._step_indices(timesteps, original_samples.shape[0])
        return original_samples + noise * self._bcast(self.sigmas[idx], original_samples)


class EulerDiscreteScheduler(_KarrasSigmaSchedule):
    """Euler sampler of the probability-flow ODE in sigma space (Karras et al. 2022, alg. 2).

    The sample lives in sigma space (x = x0 + sigma eps); ``scale_model_input`` divides by
    sqrt(sigma^2 + 1) for the model. ``timesteps`` are float32 (fractional for linspace
    spacing and Karras sigmas), as in diffusers. ``s_churn`` > 0 adds Karras' stochastic churn.
    Sigmas: interpolated, Karras, exponential or beta (``use_*_sigmas``); ``set_timesteps``
    takes custom ``timesteps=`` or ``sigmas=`` (n + 1 values, the last the final one).
    ``interpolation_type="log_linear"`` (log-spaced sigmas) and ``timestep_type="continuous"``
    (with v_prediction, timesteps 0.25 log sigma) as in diffusers.
    """

    _unsupported = {
        "interpolation_type": (("linear", "log_linear"),),
        "timestep_type": (("discrete", "continuous"),),
        "final_sigmas_type": (("zero", "sigma_min"),),
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        self._register(locals())
        self._init_sigmas()
        N = self.num_train_timesteps
        self.timesteps = torch.linspace(0, N - 1, N, dtype=torch.float64).flip(0).to(torch.float32)
        if self._continuous:
            self.timesteps = self._continuous_timesteps(self.sigmas)
        self._timesteps_host = self.timesteps

    @property
    def _continuous(self) -> bool:
        """timestep_type="continuous" with v_prediction: diffusers' timesteps are 0.25 log sigma
        (the EDM / k-diffusion c_noise) instead of discrete training steps."""
        c = self.config
        return c.get("timestep_type") == "continuous" and c.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: Tensor) -> Tensor:
        return 0.25 * sigmas[:-1].to(torch.float32).log()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        if timesteps is not None and self._continuous:
            raise ValueError(
                "Cannot set `timesteps` with `config.timestep_type = 'continuous'` and `config.prediction_type = 'v_prediction'`."
            )
        ts, sig, n = self._schedule(num_inference_steps, timesteps, sigmas)
        if self._continuous:
            ts = self._continuous_timesteps(sig)
        self._set_sigmas(ts, sig, device, n)
        self._prefetch(device)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        noise: Tensor | None = None,
    ):
        self._ready()
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        churn = min(s_churn / (len(self._sigmas_host) - 1), 2**0.5 - 1)
        # the fused step gates the churn on s_tmin <= sigma <= s_tmax itself and draws its noise in-kernel
        prev, x0 = ops.euler_step(
            model_output, sample, self._on("sigmas", sample.device), self._index(i, sample.device), gamma=churn,
            s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, prediction_type=self.config.prediction_type,
            noise=_like(noise, sample), generator=generator,
        )
        self._step_index += 1
        return _out(prev, x0, return_dict)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler-ancestral sampler in sigma space (k-diffusion's ``sample_euler_ancestral``)."""

    _unsupported = {}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._register(locals())
        self._init_sigmas()
        N = self.num_train_timesteps
        self.timesteps = torch.linspace(0, N - 1, N, dtype=torch.float64).flip(0).to(torch.float32)
        self._timesteps_host = self.timesteps

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        ts, sig, n = self._schedule(num_inference_steps)
        self._set_sigmas(ts, sig, device, n)
        self._prefetch(device)

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        noise: Tensor | None = None,
    ):
        self._ready()
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        prev, x0 = ops.euler_ancestral_step(
            model_output, sample, self._on("sigmas", sample.device), self._index(i, sample.device),
            prediction_type=self.config.prediction_type, noise=_like(noise, sample), generator=generator,
        )
        self._step_index += 1
        return _out(prev, x0, return_dict)


def _alpha_sigma_lambda(s: Tensor | float):
    """(alpha_t, sigma_t, lambda_t) of the VP process at VE level s (lambda = log alpha - log sigma)."""
    s = torch.as_tensor(s, dtype=torch.float32) if not isinstance(s, Tensor) else s
    alpha = 1 / (s * s + 1) ** 0.5
    sig = s * alpha
    return alpha, sig, torch.log(alpha) - torch.log(sig)


def _vp_timesteps(c, N: int, n: int, last: int) -> Tensor:
    """DPM-Solver's / UniPC's integer timesteps (n,) for ``timestep_spacing`` over [0, last)."""
    if c.timestep_spacing == "linspace":
        return torch.round(torch.linspace(0, last - 1, n + 1, dtype=torch.float64)).flip(0)[:-1].to(torch.int64)
    if c.timestep_spacing == "leading":
        ratio = last // (n + 1)
        return (torch.arange(n, 0, -1, dtype=torch.int64) * ratio) + c.steps_offset
    v = last - torch.arange(n, dtype=torch.float64) * (N / n)  # trailing
    return torch.round(v[v > 0]).to(torch.int64) - 1


class _VPMultistep(_SigmaBase):
    """The VP-sample multistep schedulers (DPM-Solver, UniPC): schedule and add_noise."""

    def _vp_schedule(self, n: int, timesteps=None, lambda_min_clipped: float = -float("inf"),
                     round_converted: bool = True) -> tuple[Tensor, Tensor]:
        c = self.config
        N = self.num_train_timesteps
        if timesteps is not None:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().to(torch.int64)
        else:
            lam = (self.alphas_cumprod.sqrt().log() - (1 - self.alphas_cumprod).sqrt().log()).to(torch.float64)
            clipped = int(torch.searchsorted(lam.flip(0), torch.tensor(float(lambda_min_clipped), dtype=torch.float64)))
            ts = _vp_timesteps(c, N, n, N - clipped)
        n = int(ts.numel())
        table = self.train_sigmas.to(torch.float64)
        conv = None
        if timesteps is None:
            if c.get("use_lu_lambdas"):
                conv = S.lu_lambdas(float(table[0].log()), float(table[-1].log()), n).exp()
            else:
                conv = self._convert_sigmas(None, n, float(table[0]), float(table[-1]))
        if conv is not None:
            sig = conv
            t = S.sigma_to_t(sig, self.train_sigmas)
            rounded = c.get("use_karras_sigmas") or c.get("use_lu_lambdas")
            if rounded and round_converted and c.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
            ts = t.to(torch.int64)  # truncation, as diffusers' astype(int64)
        else:
            sig = S.interp_sigmas(ts.to(torch.float64), self.train_sigmas)
        return ts, sig

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """As the sigma-space schedulers, but a timestep that is not in the schedule takes the last
        index (diffusers' DPM-Solver / UniPC: e.g. ``step`` at t = 0 on a schedule without 0)."""
        try:
            return super().index_for_timestep(timestep, schedule_timesteps)
        except ValueError as e:
            if "is not one of" not in str(e):
                raise
            host = getattr(self, "_timesteps_host", self.timesteps) if schedule_timesteps is None else schedule_timesteps
            return len(host) - 1

    def _alpha_sigma(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) of the table level s: VP (alpha = 1 / sqrt(s^2 + 1), sigma = s alpha),
        or with ``use_flow_sigmas`` the rectified flow's (1 - s, s)."""
        if self.config.get("use_flow_sigmas"):
            return 1 - s, s
        alpha = 1 / (s * s + 1) ** 0.5
        return alpha, s * alpha

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = alpha x0 + sigma_t noise at the level sigma of ``timesteps`` in the current schedule;
        one timestep (a number, 0-dim or (1,) tensor) is broadcast over the batch."""
        idx = self._step_indices(timesteps, original_samples.shape[0])
        s = self.sigmas[idx].to(torch.float64)
        alpha, sig = self._alpha_sigma(s)
        return self._bcast(alpha, original_samples) * original_samples + self._bcast(sig, original_samples) * noise


class DPMSolverMultistepScheduler(_VPMultistep):
    """DPM-Solver (Lu et al. 2022) multistep, orders 1-3, ``algorithm_type`` "dpmsolver++" (data
    prediction), "sde-dpmsolver++", "dpmsolver" and "sde-dpmsolver" (noise prediction).

    The sample is the VP sample (``init_noise_sigma`` = 1, ``scale_model_input`` is the
    identity). Fused path: "dpmsolver++" steps of order 1 and 2 (``pygen.ops.dpmpp_2m_step``;
    with ``thresholding`` the thresholded x0 is fed to it as an x0 prediction, exact since the
    update reads only x0, the previous x0 and the sample). Torch path (elementwise, scalar
    coefficients from the sigma table; one kernel launch per term): third-order steps and the
    SDE / noise-prediction algorithms. The first step is first order, and so is the last when
    ``lower_order_final`` (and fewer than 15 steps), ``euler_at_final`` or
    ``final_sigmas_type="zero"`` asks for it (diffusers' rules). Stochastic algorithms draw
    pygen's Philox noise unless ``variance_noise=`` (alias ``noise=``) is given.
    Deprecated values are mapped as diffusers does: ``algorithm_type="deis"`` -> "dpmsolver++",
    ``solver_type`` "logrho" / "bh1" / "bh2" -> "midpoint".
    """

    _unsupported = {
        "use_flow_sigmas": ((False,),),
        "final_sigmas_type": (("zero", "sigma_min"),),
        "use_dynamic_shifting": ((False,),),
    }
    _deprecated_values = {"algorithm_type": {"deis": "dpmsolver++"},
                          "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        self._register(locals())
        c = self.config
        if c.algorithm_type not in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"):
            raise NotImplementedError(f"algorithm_type {c.algorithm_type!r} is not implemented for {type(self).__name__}")
        if c.solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"solver_type {c.solver_type!r} is not implemented for {type(self).__name__}")
        if c.solver_order not in (1, 2, 3):
            raise NotImplementedError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}")
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and c.final_sigmas_type == "zero":
            raise ValueError(
                f"`final_sigmas_type` {c.final_sigmas_type} is not supported for `algorithm_type` "
                f"{c.algorithm_type}. Please choose `sigma_min` instead."
            )
        self._init_sigmas()
        self.init_noise_sigma = 1.0
        N = self.num_train_timesteps
        self.timesteps = torch.arange(N - 1, -1, -1, dtype=torch.int64)
        self._timesteps_host = self.timesteps
        self.model_outputs: list[Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps=None) -> None:
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if mu is not None:
            raise NotImplementedError("mu (dynamic shifting) needs use_flow_sigmas, which pygen does not support yet")
        self._check_custom(timesteps)
        n = S._check_positive_int(num_inference_steps, "num_inference_steps") if timesteps is None else None
        ts, sig = self._vp_schedule(n, timesteps, c.lambda_min_clipped)
        last_sigma = 0.0 if c.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self._set_sigmas(ts, torch.cat([sig, sig.new_tensor([last_sigma])]), device)
        self._prefetch(device)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0

    def convert_model_output(self, model_output: Tensor, *args, sample: Tensor | None = None, **kwargs) -> Tensor:
        """x0 (data-prediction algorithms, thresholded when asked) or eps (noise prediction) at the current step."""
        c = self.config
        if sample is None:
            sample = args[1] if len(args) > 1 else None
        if sample is None:
            raise ValueError("missing `sample` as a required keyword argument")
        if c.variance_type in ("learned", "learned_range") and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        ct = torch.float32 if sample.dtype != torch.float64 else torch.float64
        alpha, sig, _ = _alpha_sigma_lambda(self._sigma(self._step_index, sample.device).to(ct))
        mo, x = model_output.to(ct), sample.to(ct)
        pred = c.prediction_type
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = {"epsilon": lambda: (x - sig * mo) / alpha, "sample": lambda: mo,
                  "v_prediction": lambda: alpha * x - sig * mo}[pred]()
            return (self._threshold(x0) if c.thresholding else x0).to(model_output.dtype)
        eps = {"epsilon": lambda: mo, "sample": lambda: (x - alpha * mo) / sig,
               "v_prediction": lambda: alpha * mo + sig * x}[pred]()
        if c.thresholding:
            x0 = self._threshold((x - sig * eps) / alpha)
            eps = (x - alpha * x0) / sig
        return eps.to(model_output.dtype)

    def _update(self, order: int, ms: list[Tensor], x: Tensor, noise: Tensor | None) -> Tensor:
        """diffusers' first / second / third order multistep updates, in torch (float32)."""
        c = self.config
        i, dev = self._step_index, x.device
        sg = self._on("sigmas", dev)
        a_t, s_t, l_t = _alpha_sigma_lambda(sg[i + 1])
        a_0, s_0, l_0 = _alpha_sigma_lambda(sg[i])
        h = l_t - l_0
        algo = c.algorithm_type
        m0 = ms[-1]
        if order == 1:
            D = [m0]
        elif order == 2:
            _, _, l_1 = _alpha_sigma_lambda(sg[i - 1])
            r0 = (l_0 - l_1) / h
            D = [m0, (1.0 / r0) * (m0 - ms[-2])]
        else:
            _, _, l_1 = _alpha_sigma_lambda(sg[i - 1])
            _, _, l_2 = _alpha_sigma_lambda(sg[i - 2])
            r0, r1 = (l_0 - l_1) / h, (l_1 - l_2) / h
            d10, d11 = (1.0 / r0) * (m0 - ms[-2]), (1.0 / r1) * (ms[-2] - ms[-3])
            D = [m0, d10 + (r0 / (r0 + r1)) * (d10 - d11), (1.0 / (r0 + r1)) * (d10 - d11)]
        mid = c.solver_type == "midpoint" and order == 2
        if algo == "dpmsolver++":
            em = torch.exp(-h) - 1.0
            x_t = (s_t / s_0) * x - (a_t * em) * D[0]
            if order >= 2:
                x_t = x_t - 0.5 * (a_t * em) * D[1] if mid else x_t + (a_t * (em / h + 1.0)) * D[1]
            if order == 3:
                x_t = x_t - (a_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D[2]
        elif algo == "dpmsolver":
            ep = torch.exp(h) - 1.0
            x_t = (a_t / a_0) * x - (s_t * ep) * D[0]
            if order >= 2:
                x_t = x_t - 0.5 * (s_t * ep) * D[1] if mid else x_t - (s_t * (ep / h - 1.0)) * D[1]
            if order == 3:
                x_t = x_t - (s_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D[2]
        elif algo == "sde-dpmsolver++":
            e2 = 1.0 - torch.exp(-2.0 * h)
            x_t = (s_t / s_0 * torch.exp(-h)) * x + (a_t * e2) * D[0]
            if order >= 2:
                x_t = x_t + 0.5 * (a_t * e2) * D[1] if mid else x_t + (a_t * (e2 / (-2.0 * h) + 1.0)) * D[1]
            if order == 3:
                x_t = x_t + (a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D[2]
            x_t = x_t + s_t * torch.sqrt(e2) * noise
        else:  # sde-dpmsolver (diffusers has no third order for it: second order there)
            ep = torch.exp(h) - 1.0
            x_t = (a_t / a_0) * x - 2.0 * (s_t * ep) * D[0]
            if order >= 2:
                x_t = x_t - (s_t * ep) * D[1] if c.solver_type == "midpoint" else x_t - 2.0 * (s_t * (ep / h - 1.0)) * D[1]
            x_t = x_t + s_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        return x_t

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
        *,
        noise: Tensor | None = None,
    ):
        self._ready()
        c = self.config
        if c.variance_type in ("learned", "learned_range") and isinstance(model_output, Tensor) \
                and isinstance(sample, Tensor) and model_output.dim() > 1 and model_output.shape[1] != sample.shape[1]:
            model_output = model_output[:, : sample.shape[1]]
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i, n = self._step_index, self.num_inference_steps
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        dev = sample.device
        if c.algorithm_type == "dpmsolver++" and order <= 2:
            prev_x0 = None if order == 1 else _like(self.model_outputs[-1], sample, "prev_x0")
            mo, pred = model_output, c.prediction_type
            if c.thresholding:  # the fused step takes the thresholded x0 as an x0 prediction
                mo, pred = self.convert_model_output(model_output, sample=sample), "sample"
            # second order in the kernel where prev_x0 is given (i >= 1 here) and sigma_next > 0
            prev, x0 = ops.dpmpp_2m_step(
                mo, sample, self._on("sigmas", dev), self._index(i, dev), prev_x0, solver_type=c.solver_type,
                prediction_type=pred,
            )
            m = x0
        else:
            m = self.convert_model_output(model_output, sample=sample)
            z = None
            if c.algorithm_type.startswith("sde"):
                given = variance_noise if variance_noise is not None else noise
                z = _noise_for(given, sample, generator, torch.float32 if sample.dtype != torch.float64 else None)
            ms = [v for v in self.model_outputs if v is not None] + [m]
            ct = torch.float32 if sample.dtype != torch.float64 else torch.float64
            prev = self._update(order, [v.to(ct) for v in ms], sample.to(ct), z).to(sample.dtype)
            x0 = m if c.algorithm_type.endswith("++") else None
        self.model_outputs = self.model_outputs[1:] + [m]
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return _out(prev, x0, return_dict)

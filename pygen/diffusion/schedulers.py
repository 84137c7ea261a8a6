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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pygen import ops
from pygen.diffusion import schedules as S
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


class SchedulerConfig(dict):
    """The constructor keywords of a scheduler: a dict with attribute access (like diffusers' FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x at the previous timestep) and ``pred_original_sample`` (x0)."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def __getitem__(self, i):
        return (self.prev_sample, self.pred_original_sample)[i]

    def to_tuple(self) -> tuple[Tensor, Tensor | None]:
        return (self.prev_sample, self.pred_original_sample)


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


class _Base:
    """Config registration, the alpha tables and device caching shared by the schedulers."""

    order = 1
    _unsupported: dict[str, Any] = {}

    def _register(self, kwargs: dict[str, Any]) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("self", "__class__")}
        for k, bad in self._unsupported.items():
            if k in kwargs and kwargs[k] not in bad[0]:
                raise NotImplementedError(
                    f"{type(self).__name__}: {k}={kwargs[k]!r} is not supported yet (supported: {bad[0]})"
                )
        self.config = SchedulerConfig(kwargs)
        c = self.config
        if c.prediction_type not in R.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {R.PREDICTION_TYPES}, got {c.prediction_type!r}")
        if c.timestep_spacing not in S.TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {S.TIMESTEP_SPACINGS}, got {c.timestep_spacing!r}")
        self.betas = S.make_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
            c.rescale_betas_zero_snr,
        )
        self.alphas = 1.0 - self.betas
        # rescale_betas_zero_snr: abar_T = 0 exactly here, as in diffusers' DDIM and DDPM (with
        # v_prediction the step at t = T is finite; with epsilon x0 is undetermined there, inf/nan
        # as in diffusers). The sigma-space schedulers lift it to 2**-24 (see _init_sigmas).
        self.alphas_cumprod = S.alphas_cumprod_from_betas(self.betas)
        self.num_inference_steps: int | None = None
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs: Any):
        """Build from a (diffusers or pygen) config dict; keys this class does not take are ignored."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        merged = {**dict(config), **kwargs}
        return cls(**{k: v for k, v in merged.items() if k in params and k != "self"})

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


def _out(prev: Tensor, x0: Tensor, return_dict: bool):
    return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class DDPMScheduler(_Base):
    """Ancestral sampling of Ho et al. (2020), strided over the inference timesteps.

    ``variance_type``: ``"fixed_small"`` (posterior variance) or ``"fixed_large"`` (beta).
    A step from t goes to the next entry of ``timesteps`` (-1 after the last one, where
    abar = 1 and no noise is added); a t that is not in ``timesteps`` (or before
    ``set_timesteps``) steps to t - 1. Stateless: ``timestep`` may be a (B,) tensor.
    """

    _unsupported = {"variance_type": (("fixed_small", "fixed_large"),), "thresholding": ((False,),)}

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
        model_output = _check_io(model_output, sample)
        c = self.config
        t = self._t(timestep, sample)
        prev = R.gather(self._on("prev_timesteps", sample.device), t, 1)
        # the fused step (backend="torch" is the reference); no noise where t == 0 (the step to -1)
        prev_sample, x0 = ops.ddpm_step(
            model_output, sample, t, self._on("alphas_cumprod", sample.device), prev, variance_type=c.variance_type,
            final_alpha_cumprod=1.0, prediction_type=c.prediction_type, clip_sample=c.clip_sample,
            clip_sample_range=c.clip_sample_range, noise=_like(noise if noise is not None else variance_noise, sample),
            generator=generator,
        )
        return _out(prev_sample, x0, return_dict)


class DDIMScheduler(_Base):
    """DDIM (Song et al. 2021) over the inference timesteps; ``eta`` in [0, 1] interpolates to DDPM.

    A step from t goes to t - num_train_timesteps // num_inference_steps (diffusers'
    semantics, also for ``"trailing"``/``"linspace"`` spacing); below 0 it uses the final
    abar (1 with ``set_alpha_to_one``, else abar_0). ``eta`` may be given to the constructor
    (pygen extension, default 0) or per step. Stateless: ``timestep`` may be a (B,) tensor.
    """

    _unsupported = {"thresholding": ((False,),)}

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
        self.final_alpha_cumprod = S.final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

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
        eta = c.eta if eta is None else eta
        t = self._t(timestep, sample)
        given = _like(noise if noise is not None else variance_noise, sample)
        # coefficients gathered on the device, noise drawn in-kernel; a negative prev_t is the
        # final step (final_alpha_cumprod)
        prev_sample, x0 = ops.ddim_step(
            model_output, sample, t, self._on("alphas_cumprod", sample.device),
            t - self.num_train_timesteps // self.num_inference_steps,
            final_alpha_cumprod=float(self.final_alpha_cumprod), eta=eta, prediction_type=c.prediction_type,
            clip_sample=c.clip_sample, clip_sample_range=c.clip_sample_range,
            use_clipped_model_output=use_clipped_model_output, noise=given,
            generator=generator if (given is None and eta > 0) else None,
        )
        return _out(prev_sample, x0, return_dict)


class _SigmaBase(_Base):
    """sigma tables, step_index bookkeeping of the multistep / sigma-space schedulers."""

    def _init_sigmas(self) -> None:
        if self.config.rescale_betas_zero_snr:
            # sigma_T = sqrt((1 - abar_T) / abar_T) would be inf: diffusers' Euler, Euler-ancestral
            # and DPM-Solver++ keep abar_T just above 0 (the smallest float16 subnormal); so do we
            self.alphas_cumprod[-1] = 2**-24
        self.train_sigmas = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = torch.cat([self.train_sigmas.flip(0), self.train_sigmas.new_zeros(1)])
        self._sigmas_host = self.sigmas.tolist()
        self.step_indices = torch.arange(len(self._sigmas_host))
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _set_sigmas(self, timesteps: Tensor, sigmas: Tensor, device) -> None:
        self.sigmas = sigmas.to(torch.float32)
        self._sigmas_host = self.sigmas.tolist()
        self.step_indices = torch.arange(len(self._sigmas_host))
        self._timesteps_host = timesteps
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self.num_inference_steps = int(timesteps.numel())
        self._step_index = None
        self._begin_index = None
        self._cache = {k: v for k, v in self._cache.items() if k[0] not in ("sigmas", "step_indices")}

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        host = getattr(self, "_timesteps_host", self.timesteps.cpu())
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

    def _ready(self) -> None:
        if self.num_inference_steps is None:
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


def _float_timesteps(n: int, N: int, spacing: str, steps_offset: int) -> Tensor:
    """Euler's (float) inference timesteps: linspace is not rounded, leading/trailing are."""
    if spacing == "linspace":
        if n > N:
            raise ValueError(f"num_inference_steps ({n}) must be <= num_train_timesteps ({N})")
        return torch.linspace(0, N - 1, n, dtype=torch.float64).to(torch.float32).flip(0)
    return S.spaced_timesteps(n, N, spacing, steps_offset).to(torch.float32)


class EulerDiscreteScheduler(_SigmaBase):
    """Euler sampler of the probability-flow ODE in sigma space (Karras et al. 2022, alg. 2).

    The sample lives in sigma space (x = x0 + sigma eps); ``scale_model_input`` divides by
    sqrt(sigma^2 + 1) for the model. ``timesteps`` are float32 (fractional for linspace
    spacing and Karras sigmas), as in diffusers. ``s_churn`` > 0 adds Karras' stochastic churn.
    """

    _unsupported = {
        "interpolation_type": (("linear",),),
        "use_exponential_sigmas": ((False,),),
        "use_beta_sigmas": ((False,),),
        "timestep_type": (("discrete",),),
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
        self._timesteps_host = self.timesteps

    @property
    def init_noise_sigma(self) -> float:
        m = max(self._sigmas_host)
        return m if self.config.timestep_spacing in ("linspace", "trailing") else (m * m + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        c = self.config
        N = self.num_train_timesteps
        ts = _float_timesteps(num_inference_steps, N, c.timestep_spacing, c.steps_offset)
        sig = S.interp_sigmas(ts, self.train_sigmas)
        if c.use_karras_sigmas:
            smin = c.sigma_min if c.sigma_min is not None else float(sig[-1])
            smax = c.sigma_max if c.sigma_max is not None else float(sig[0])
            sig = S.karras_sigmas(smin, smax, num_inference_steps)
            ts = S.sigma_to_t(sig, self.train_sigmas).to(torch.float32)
        last = 0.0 if c.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self._set_sigmas(ts, torch.cat([sig, sig.new_tensor([last])]), device)
        self._prefetch(device)

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        self._init_step_index(timestep)
        s = self._sigma(self._step_index, sample.device)
        return sample / (s * s + 1).sqrt()

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        return_dict: bool = True,
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

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = x0 + sigma noise with sigma of ``timesteps`` in the current schedule (sigma space)."""
        idx = self._step_indices(timesteps, original_samples.shape[0])
        sig = self.sigmas[idx].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sig.reshape(-1, *([1] * (original_samples.dim() - 1)))


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
        self.config.update(use_karras_sigmas=False, sigma_min=None, sigma_max=None, final_sigmas_type="zero")
        self._init_sigmas()
        N = self.num_train_timesteps
        self.timesteps = torch.linspace(0, N - 1, N, dtype=torch.float64).flip(0).to(torch.float32)
        self._timesteps_host = self.timesteps

    def step(
        self,
        model_output: Tensor,
        timestep,
        sample: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        return_dict: bool = True,
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


class DPMSolverMultistepScheduler(_SigmaBase):
    """DPM-Solver++ multistep (Lu et al. 2022), orders 1 and 2 (``solver_order=2``: 2M).

    The sample is the VP sample (``init_noise_sigma`` = 1, ``scale_model_input`` is the
    identity); the step converts the model output to x0 and keeps the previous x0 for the
    second-order update. The first step is first order, and so is the last when
    ``lower_order_final`` (and fewer than 15 steps), ``euler_at_final`` or
    ``final_sigmas_type="zero"`` asks for it (diffusers' rules).
    """

    _unsupported = {
        "solver_order": ((1, 2),),
        "algorithm_type": (("dpmsolver++",),),
        "thresholding": ((False,),),
        "use_exponential_sigmas": ((False,),),
        "use_beta_sigmas": ((False,),),
        "use_lu_lambdas": ((False,),),
        "use_flow_sigmas": ((False,),),
        "variance_type": ((None,),),
        "final_sigmas_type": (("zero", "sigma_min"),),
    }

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
    ) -> None:
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self._register(locals())
        self._init_sigmas()
        self.init_noise_sigma = 1.0
        N = self.num_train_timesteps
        self.timesteps = torch.arange(N - 1, -1, -1, dtype=torch.int64)
        self._timesteps_host = self.timesteps
        self.model_outputs: list[Tensor | None] = [None] * solver_order
        self._prev_sigma_index: int | None = None
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        c = self.config
        N = self.num_train_timesteps
        n = S._check_positive_int(num_inference_steps, "num_inference_steps")
        lam = (self.alphas_cumprod.sqrt().log() - (1 - self.alphas_cumprod).sqrt().log()).to(torch.float64)
        clipped = int(torch.searchsorted(lam.flip(0), torch.tensor(float(c.lambda_min_clipped), dtype=torch.float64)))
        last = N - clipped
        if c.timestep_spacing == "linspace":
            ts = torch.round(torch.linspace(0, last - 1, n + 1, dtype=torch.float64)).flip(0)[:-1].to(torch.int64)
        elif c.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (torch.arange(n, 0, -1, dtype=torch.int64) * ratio) + c.steps_offset
        else:  # trailing
            v = last - torch.arange(n, dtype=torch.float64) * (N / n)
            ts = torch.round(v[v > 0]).to(torch.int64) - 1
        if c.use_karras_sigmas:
            smin = c.sigma_min if c.get("sigma_min") is not None else float(self.train_sigmas[0])
            smax = c.sigma_max if c.get("sigma_max") is not None else float(self.train_sigmas[-1])
            sig = S.karras_sigmas(smin, smax, n)
            ts = S.sigma_to_t(sig, self.train_sigmas).round().to(torch.int64)
        else:
            sig = S.interp_sigmas(ts.to(torch.float64), self.train_sigmas)
        last_sigma = 0.0 if c.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self._set_sigmas(ts, torch.cat([sig, sig.new_tensor([last_sigma])]), device)
        self._prefetch(device)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0

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
        self._ready()
        model_output = _check_io(model_output, sample)
        c = self.config
        self._init_step_index(timestep)
        i, n = self._step_index, self.num_inference_steps
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        first = c.solver_order == 1 or self.lower_order_nums < 1 or lower_final
        dev = sample.device
        prev_x0 = None if first else _like(self.model_outputs[-1], sample, "prev_x0")
        # second order in the kernel where prev_x0 is given (i >= 1 here) and sigma_next > 0
        prev, x0 = ops.dpmpp_2m_step(
            model_output, sample, self._on("sigmas", dev), self._index(i, dev), prev_x0, solver_type=c.solver_type,
            prediction_type=c.prediction_type,
        )
        self.model_outputs = self.model_outputs[1:] + [x0]
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return _out(prev, x0, return_dict)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """x = alpha x0 + sigma_t noise at the VE level sigma of ``timesteps`` in the current schedule."""
        idx = self._step_indices(timesteps, original_samples.shape[0])
        s = self.sigmas[idx].to(torch.float64)
        alpha = 1 / (s * s + 1).sqrt()
        shape = (-1, *([1] * (original_samples.dim() - 1)))
        a = alpha.to(original_samples.device, original_samples.dtype).reshape(shape)
        st = (s * alpha).to(original_samples.device, original_samples.dtype).reshape(shape)
        return a * original_samples + st * noise

"""More diffusers-compatible schedulers: flow matching (SD3, Flux), Heun, LCM and UniPC.

Which parts run fused (one pygen.ops kernel per step) and which in torch:

- :class:`FlowMatchEulerDiscreteScheduler`: fused. The rectified-flow Euler step
  x + (s_next - s) v is ``pygen.ops.euler_step`` with an epsilon prediction on the flow sigma
  table (x0 = x - s v, prev = x + (x - x0) (s_next - s) / s); its x0 output is the flow's x0.
  ``stochastic_sampling`` and ``invert_sigmas`` (a first sigma of 0) run in torch.
- :class:`HeunDiscreteScheduler`: the first (Euler) evaluation of each step is fused
  (``pygen.ops.euler_step`` on diffusers' doubled sigma table); the second (the trapezoid
  correction, two stored tensors) is torch; ``clip_sample`` runs the first in torch too.
- :class:`LCMScheduler` and :class:`UniPCMultistepScheduler`: torch (elementwise, with scalar
  coefficients computed on the host from the schedule; UniPC solves its small Vandermonde
  systems in float64 on the host). No existing fused op has their update; a fused kernel is future work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pygen import ops
from pygen.diffusion import schedules as S
from pygen.diffusion.schedulers import (
    _Base,
    _check_io,
    _KarrasSigmaSchedule,
    _like,
    _noise_for,
    _out,
    _SigmaBase,
    _VPMultistep,
    SchedulerOutput,
    threshold_sample,
)
from pygen.ops import diffusion as R

__all__ = ["FlowMatchEulerDiscreteScheduler", "HeunDiscreteScheduler", "LCMScheduler", "UniPCMultistepScheduler"]


class _FlowShift:
    """diffusers' flow-matching time shift helpers, shared by FlowMatchEuler and UniPC's flow sigmas."""

    def time_shift(self, mu: float, sigma: float, t: Tensor) -> Tensor:
        return S.time_shift(mu, t, self.config.time_shift_type, sigma)

    def stretch_shift_to_terminal(self, t: Tensor) -> Tensor:
        one_minus_z = 1 - t
        scale = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - one_minus_z / scale


class FlowMatchEulerDiscreteScheduler(_FlowShift, _SigmaBase):
    """Euler sampler of rectified-flow models (SD3, Flux): x_s = (1 - s) x0 + s noise, the model
    predicts v = noise - x0, and a step is x + (s_next - s) v (fused, see the module doc).

    Sigmas: linspace(1, 1/N) shifted by ``shift`` (s' = shift s / (1 + (shift - 1) s)) or, with
    ``use_dynamic_shifting``, by ``time_shift(mu)`` with the ``mu`` given to ``set_timesteps``
    (Flux computes it from the image sequence length); then ``shift_terminal``, Karras /
    exponential / beta sigmas, ``invert_sigmas`` as in diffusers. ``timesteps`` = sigmas * N (float).
    """

    _compatibles = ("FlowMatchEulerDiscreteScheduler",)
    _needs_set_timesteps = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        self._register(locals(), betas=False)
        if sum(bool(x) for x in (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) > 1:
            raise ValueError("Only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be used")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError("`time_shift_type` must either be 'exponential' or 'linear'.")
        N = S._check_positive_int(num_train_timesteps, "num_train_timesteps")
        ts = torch.linspace(1, N, N, dtype=torch.float64).to(torch.float32).flip(0)
        sig = ts / N
        if not use_dynamic_shifting:
            sig = shift * sig / (1 + (shift - 1) * sig)
        self._shift = shift
        self.sigma_min, self.sigma_max = float(sig[-1]), float(sig[0])
        self._step_index = self._begin_index = None
        self.init_noise_sigma = 1.0
        self._set_sigmas(sig * N, sig, None)
        self.num_inference_steps = None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.num_train_timesteps)

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None) -> None:
        c = self.config
        N = self.num_train_timesteps
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        n = int(num_inference_steps)
        given_ts = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64).to(torch.float32)
        # diffusers computes this part in numpy float64 from float32 inputs
        if sigmas is None:
            if given_ts is None:
                t = torch.linspace(self.sigma_max * N, self.sigma_min * N, n, dtype=torch.float64)
            else:
                t = given_ts.to(torch.float64)
            sig = t / N
        else:
            sig = torch.as_tensor(sigmas, dtype=torch.float64).to(torch.float32).to(torch.float64)
        if c.use_dynamic_shifting:
            sig = self.time_shift(mu, 1.0, sig)
        else:
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
        if c.shift_terminal:
            sig = self.stretch_shift_to_terminal(sig)
        if c.use_karras_sigmas:
            sig = S.karras_sigmas(float(sig[-1]), float(sig[0]), n)
        elif c.use_exponential_sigmas:
            sig = S.exponential_sigmas(float(sig[-1]), float(sig[0]), n)
        elif c.use_beta_sigmas:
            sig = S.beta_sigmas(float(sig[-1]), float(sig[0]), n)
        sig = sig.to(torch.float32)
        ts = given_ts if given_ts is not None else sig * N
        if c.invert_sigmas:
            sig = 1.0 - sig
            ts = sig * N
            sig = torch.cat([sig, sig.new_ones(1)])
        else:
            sig = torch.cat([sig, sig.new_zeros(1)])
        self._set_sigmas(ts, sig, device, n)
        self._prefetch(device)

    def scale_noise(self, sample: Tensor, timestep, noise: Tensor | None = None) -> Tensor:
        """Forward process x_s = s noise + (1 - s) x0 at the sigma of ``timestep`` (one, or one per sample)."""
        idx = self._step_indices(timestep, sample.shape[0])
        s = self._bcast(self.sigmas[idx], sample)
        return s * noise + (1.0 - s) * sample

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

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
        per_token_timesteps: Tensor | None = None,
        return_dict: bool = True,
        *,
        noise: Tensor | None = None,
    ):
        if isinstance(timestep, int) or (isinstance(timestep, Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                "`scheduler.timesteps` as a timestep."
            )
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps is not supported by pygen's FlowMatchEulerDiscreteScheduler yet")
        self._ready()
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i, dev = self._step_index, sample.device
        if self.config.stochastic_sampling:  # torch: x0 = x - s v, prev = (1 - s_next) x0 + s_next noise
            s, sn = self._sigma(i, dev), self._sigma(i + 1, dev)
            x0 = sample - s.to(sample.dtype) * model_output
            z = _noise_for(noise, sample, generator)
            prev = (1.0 - sn.to(sample.dtype)) * x0 + sn.to(sample.dtype) * z
        elif self.config.invert_sigmas:  # sigmas ascend from 0: the fused Euler form divides by s; torch
            s, sn = self._sigma(i, dev), self._sigma(i + 1, dev)
            prev = sample + (sn - s).to(sample.dtype) * model_output
            x0 = sample - s.to(sample.dtype) * model_output
        else:  # fused: Euler with an epsilon prediction is exactly x + (s_next - s) v
            prev, x0 = ops.euler_step(model_output, sample, self._on("sigmas", dev), self._index(i, dev),
                                      prediction_type="epsilon")
        self._step_index += 1
        return _out(prev, x0, return_dict)


class HeunDiscreteScheduler(_KarrasSigmaSchedule):
    """Heun's second-order sampler in sigma space (Karras et al. 2022, alg. 1 without churn).

    Two model evaluations per step on diffusers' doubled tables (``timesteps`` and ``sigmas``
    repeat every interior entry; ``order = 2``): the first is an Euler step (fused), the second
    averages the two derivatives (torch). The last step is Euler. ``clip_sample`` clips x0 (both
    evaluations then torch).
    """

    order = 2
    _unsupported = {}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._register(locals())
        self._init_sigmas()
        self.set_timesteps(self.num_train_timesteps)  # diffusers' initial schedule

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps=None,
                      timesteps=None) -> None:
        if num_train_timesteps not in (None, self.num_train_timesteps):
            raise NotImplementedError("num_train_timesteps other than the config's is not supported")
        ts, sig, n = self._schedule(num_inference_steps, timesteps)
        sig = sig.to(torch.float32)
        sig2 = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        ts2 = torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(torch.float32)
        self._set_sigmas(ts2, sig2, device, n)
        self._prefetch(device)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._x0_first = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def _x0(self, mo: Tensor, x: Tensor, s: Tensor) -> Tensor:
        p = self.config.prediction_type
        if p == "epsilon":
            x0 = x - s * mo
        elif p == "v_prediction":
            x0 = mo * (-s / (s * s + 1) ** 0.5) + x / (s * s + 1)
        else:
            x0 = mo
        c = self.config
        return x0.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x0

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        self._ready()
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i, dev = self._step_index, sample.device
        if self.state_in_first_order:
            s, sn = self._sigma(i, dev), self._sigma(i + 1, dev)
            if self.config.clip_sample:
                x0 = self._x0(model_output, sample, s.to(sample.dtype))
                prev = sample + (sample - x0) / s * (sn - s)
            else:  # fused Euler step from sigmas[i] to sigmas[i + 1]
                prev, x0 = ops.euler_step(model_output, sample, self._on("sigmas", dev), self._index(i, dev),
                                          prediction_type=self.config.prediction_type)
            self.prev_derivative = (sample, x0, s)  # d1 = (x - x0) / s, formed in the second stage
            self.dt = sn - s
            self.sample = sample
        else:
            s_next = self._sigma(i, dev).to(sample.dtype)
            x0 = self._x0(model_output, sample, s_next)
            x_prev, x0_1, s1 = self.prev_derivative
            d = ((x_prev - x0_1) / s1 + (sample - x0) / s_next) / 2
            prev = self.sample + d * self.dt
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        return _out(prev, x0, return_dict)


class LCMScheduler(_Base):
    """Latent consistency models' multistep sampler (Luo et al. 2023), torch (see the module doc).

    A step: x0 from the model output (thresholded or clipped), denoised = c_out x0 + c_skip x
    with the consistency boundary scalings at ``timestep_scaling`` t, then, unless it is the
    last step, prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) noise. Returns
    ``prev_sample`` and ``denoised``. Stateless in the timestep: ``timestep`` may be a (B,) tensor
    (each sample's next timestep from the schedule; no noise where it is the last).
    """

    _compatibles = ("LCMScheduler", "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler",
                    "UniPCMultistepScheduler")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._register(locals())
        self.final_alpha_cumprod = S.final_alpha_cumprod(self.alphas_cumprod, set_alpha_to_one)
        self.init_noise_sigma = 1.0
        N = self.num_train_timesteps
        self.timesteps = torch.arange(N - 1, -1, -1, dtype=torch.int64)
        self.custom_timesteps = False
        self._step_index = self._begin_index = None
        self._next_table(self.timesteps)

    def _next_table(self, ts: Tensor) -> None:
        N = self.num_train_timesteps
        nxt = torch.full((N,), -1, dtype=torch.int64)
        nxt[ts[:-1]] = ts[1:]
        self.prev_timesteps = nxt
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "prev_timesteps"}

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, original_inference_steps=None,
                      timesteps=None, strength: float = 1.0) -> None:
        c = self.config
        N = self.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        orig = original_inference_steps if original_inference_steps is not None else c.original_inference_steps
        if orig > N:
            raise ValueError(f"original_inference_steps ({orig}) cannot be larger than num_train_timesteps ({N})")
        k = N // orig
        origin = torch.arange(1, int(orig * strength) + 1, dtype=torch.int64) * k - 1
        if timesteps is not None:
            ts = torch.as_tensor(list(timesteps), dtype=torch.int64)
            if (ts[1:] >= ts[:-1]).any():
                raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= N:
                raise ValueError(f"`timesteps` must start before num_train_timesteps: {N}.")
            self.num_inference_steps = int(ts.numel())
            self.custom_timesteps = True
            init = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            ts = ts[max(self.num_inference_steps - init, 0) * self.order:]
        else:
            n = S._check_positive_int(num_inference_steps, "num_inference_steps")
            if n > N:
                raise ValueError(f"num_inference_steps ({n}) cannot be larger than num_train_timesteps ({N})")
            skip = origin.numel() // n
            if skip < 1:
                raise ValueError(f"original_inference_steps x strength ({orig} x {strength}) is smaller than "
                                 f"num_inference_steps ({n})")
            if n > orig:
                raise ValueError(f"num_inference_steps ({n}) cannot be larger than original_inference_steps ({orig})")
            self.num_inference_steps = n
            origin = origin.flip(0)
            idx = torch.floor(torch.linspace(0, origin.numel(), n + 1, dtype=torch.float64)[:-1]).to(torch.int64)
            ts = origin[idx]
            self.custom_timesteps = False
        self._next_table(ts)
        self.timesteps = ts.to(device) if device is not None else ts
        self._timesteps_host = ts
        self._step_index = self._begin_index = None
        self._prefetch(device)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        self.sigma_data = 0.5
        t = timestep * self.config.timestep_scaling
        return self.sigma_data**2 / (t**2 + self.sigma_data**2), t / (t**2 + self.sigma_data**2) ** 0.5

    def previous_timestep(self, timestep):
        if isinstance(timestep, Tensor):
            return self._on("prev_timesteps", timestep.device)[timestep.long()]
        return int(self.prev_timesteps[timestep])

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, *, noise: Tensor | None = None):
        if self.num_inference_steps is None:
            raise RuntimeError("LCMScheduler.step: call set_timesteps(num_inference_steps) first")
        model_output = _check_io(model_output, sample)
        c = self.config
        t = self._t(timestep, sample)
        if self._step_index is None and t.dim() == 0:
            host = self._timesteps_host
            hit = (host == int(timestep)).nonzero().flatten()
            self._step_index = int(hit[1 if hit.numel() > 1 else 0]) if hit.numel() else 0
        dev, nd = sample.device, sample.dim()
        ct = R._ct(sample)
        ac = self._on("alphas_cumprod", dev)
        prev_t = R.gather(self._on("prev_timesteps", dev), t, 1)
        ab = R.gather(ac, t, nd).to(ct)
        last = prev_t < 0
        ab_prev = R.gather(torch.cat([ac, ac.new_ones(1) * float(self.final_alpha_cumprod)]),
                           torch.where(last, ac.shape[0], prev_t), nd).to(ct)
        x, mo = sample.to(ct), model_output.to(ct)
        x0, _ = R.predict_x0_eps(mo, x, ab, c.prediction_type)
        if c.thresholding:
            x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        tt = t.to(ct).reshape(-1, *([1] * (nd - 1))) if t.dim() == 1 else t.to(ct)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(tt)
        denoised = c_out * x0 + c_skip * x
        z = _noise_for(noise, sample, generator, ct)
        keep = (~last).to(ct).reshape(-1, *([1] * (nd - 1))) if t.dim() == 1 else (~last).to(ct).reshape(())
        prev = denoised + keep * ((ab_prev.sqrt() - 1) * denoised + (1 - ab_prev).sqrt() * z)
        if self._step_index is not None:
            self._step_index += 1
        prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return prev, denoised
        return SchedulerOutput(prev, None, denoised=denoised)


def _fdiv(a: float, b: float) -> float:
    """a / b with IEEE semantics (inf, nan) where Python raises ZeroDivisionError."""
    if b != 0:
        return a / b
    if a != a or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


class UniPCMultistepScheduler(_FlowShift, _VPMultistep):
    """UniPC (Zhao et al. 2023): unified predictor-corrector multistep sampler, orders 1-3,
    ``solver_type`` "bh1" / "bh2", data (``predict_x0``) or noise prediction; torch (see the module doc).

    The corrector refines the sample of the previous step with the new model output (skipped for
    steps in ``disable_corrector``); the predictor then steps. Coefficients (the rho vectors from
    the small Vandermonde systems) are computed on the host in float64 from the sigma table.
    Deprecated ``solver_type`` "midpoint" / "heun" / "logrho" map to "bh2", as in diffusers.
    ``use_flow_sigmas`` (Wan-style rectified-flow schedules: alpha = 1 - sigma, ``flow_shift``,
    dynamic shifting with ``mu``, ``shift_terminal``, custom ``sigmas=``, with Karras sigmas mapped
    s / (s + 1)) and ``prediction_type="flow_prediction"`` follow diffusers.
    """

    _unsupported = {"solver_p": ((None,),), "final_sigmas_type": (("zero", "sigma_min"),)}
    _extra_prediction_types = ("flow_prediction",)
    _deprecated_values = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' signature
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ) -> None:
        self._register(locals())
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")
        if self.config.solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"solver_type {self.config.solver_type!r} is not implemented for UniPC")
        if solver_order not in (1, 2, 3):
            raise NotImplementedError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        self._init_sigmas()
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = None
        N = self.num_train_timesteps
        self.timesteps = torch.arange(N - 1, -1, -1, dtype=torch.int64)
        self._timesteps_host = self.timesteps
        self._reset()

    def _reset(self) -> None:
        k = self.config.solver_order
        self.model_outputs: list[Tensor | None] = [None] * k
        self.timestep_list: list = [None] * k
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None

    def _flow_schedule(self, n: int, sigmas, mu) -> tuple[Tensor, Tensor]:
        """diffusers' use_flow_sigmas schedule: rectified-flow sigmas in (0, 1) (shifted by
        ``flow_shift``, or by ``mu`` with dynamic shifting), timesteps = sigma * N (truncated)."""
        c = self.config
        N = self.num_train_timesteps
        if sigmas is None:
            sig = torch.linspace(1, 1 / N, n + 1, dtype=torch.float64)[:-1]
        else:
            sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if c.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
            sig = self.time_shift(mu, 1.0, sig)
        else:
            sig = S.flow_shift(sig, c.flow_shift)
        if c.shift_terminal:
            sig = self.stretch_shift_to_terminal(sig)
        if abs(float(sig[0]) - 1) < 1e-6:  # as diffusers: keeps log(alpha) finite in the first updates
            sig = sig.clone()
            sig[0] -= 1e-6
        return (sig * N).to(torch.int64), sig

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None) -> None:
        c = self.config
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError(
                    "Passing `sigmas` is only supported when `use_flow_sigmas=True`. "
                    "Please set `use_flow_sigmas=True` during scheduler initialization."
                )
            num_inference_steps = len(sigmas)
        n = S._check_positive_int(num_inference_steps, "num_inference_steps")
        if c.use_flow_sigmas and not c.use_karras_sigmas and not c.use_exponential_sigmas and not c.use_beta_sigmas:
            ts, sig = self._flow_schedule(n, sigmas, mu)
        else:
            ts, sig = self._vp_schedule(n, None, round_converted=not c.use_flow_sigmas)
            if c.use_flow_sigmas and c.use_karras_sigmas:  # Karras sigmas mapped to the flow: s / (s + 1)
                sig = sig / (sig + 1)
                ts = (sig * self.num_train_timesteps).to(torch.int64)
        if c.use_exponential_sigmas or c.use_beta_sigmas:
            ts = S.sigma_to_t(sig, self.train_sigmas).to(torch.int64)
        if c.final_sigmas_type == "zero":
            last = 0.0
        elif c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas or c.use_flow_sigmas:
            last = float(sig[-1])
        else:
            last = float(self.train_sigmas[0])
        self._set_sigmas(ts, torch.cat([sig, sig.new_tensor([last])]), device)
        self._prefetch(device)
        self._reset()

    def convert_model_output(self, model_output: Tensor, *args, sample: Tensor | None = None, **kwargs) -> Tensor:
        c = self.config
        if sample is None:
            sample = args[1] if len(args) > 1 else None
        ct = torch.float64 if sample.dtype == torch.float64 else torch.float32
        s = self._sigma(self._step_index, sample.device).to(ct)
        alpha, sig = self._alpha_sigma(s)
        mo, x = model_output.to(ct), sample.to(ct)
        p = c.prediction_type
        if not self.predict_x0 and p == "flow_prediction":
            raise ValueError(
                f"prediction_type given as {p} must be one of `epsilon`, `sample`, or `v_prediction` for the UniPCMultistepScheduler."
            )
        if self.predict_x0:
            x0 = {"epsilon": lambda: (x - sig * mo) / alpha, "sample": lambda: mo,
                  "v_prediction": lambda: alpha * x - sig * mo, "flow_prediction": lambda: x - s * mo}[p]()
            if c.thresholding:
                x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0.to(model_output.dtype)
        eps = {"epsilon": lambda: mo, "sample": lambda: (x - alpha * mo) / sig,
               "v_prediction": lambda: alpha * mo + sig * x}[p]()
        return eps.to(model_output.dtype)

    def _lam(self, i: int) -> tuple[float, float, float]:
        s = self._sigmas_host[i]
        s32 = torch.tensor(s, dtype=torch.float32)
        alpha, sig = self._alpha_sigma(s32)  # as diffusers: float32 alpha / sigma, then float64 here
        a, g = float(alpha), float(sig)
        return a, g, math.log(a) - math.log(g) if g > 0 else math.inf

    def _coeffs(self, i_t: int, i_0: int, prev_idx: list[int], order: int, corrector: bool):
        """(x coefficient, m0 coefficient, rhos, B_h, scale) of the UniPC predictor / corrector."""
        a_t, s_t, l_t = self._lam(i_t)
        a_0, s_0, l_0 = self._lam(i_0)
        h = l_t - l_0
        # h = 0 (a repeated sigma: Karras sigmas with final_sigmas_type="sigma_min" end on one) gives
        # IEEE inf / nan as diffusers' tensor arithmetic does, not a ZeroDivisionError; an order-1
        # predictor then leaves the sample as is (h_phi_1 = 0, no rho term), as there
        rks = [_fdiv(self._lam(j)[2] - l_0, h) for j in prev_idx] + [1.0]
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        h_phi_k = _fdiv(h_phi_1, hh) - 1
        fact = 1
        B_h = hh if self.config.solver_type == "bh1" else math.expm1(hh)
        Rm, b = [], []
        for k in range(1, order + 1):
            Rm.append([r ** (k - 1) for r in rks])
            b.append(_fdiv(h_phi_k * fact, B_h))
            fact *= k + 1
            h_phi_k = _fdiv(h_phi_k, hh) - 1 / fact
        Rt = torch.tensor(Rm, dtype=torch.float64)
        bt = torch.tensor(b, dtype=torch.float64)
        if corrector:
            rhos = [0.5] if order == 1 else torch.linalg.solve(Rt, bt).tolist()
        elif order == 1:
            rhos = []
        elif order == 2:
            rhos = [0.5]
        else:
            rhos = torch.linalg.solve(Rt[:-1, :-1], bt[:-1]).tolist()
        if self.predict_x0:
            cx, cm, scale = s_t / s_0, -a_t * h_phi_1, -a_t * B_h
        else:
            cx, cm, scale = a_t / a_0, -s_t * h_phi_1, -s_t * B_h
        return cx, cm, rhos, scale, rks

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise RuntimeError("UniPCMultistepScheduler.step: call set_timesteps(num_inference_steps) first")
        model_output = _check_io(model_output, sample)
        self._init_step_index(timestep)
        i = self._step_index
        c = self.config
        ct = torch.float64 if sample.dtype == torch.float64 else torch.float32
        m_new = self.convert_model_output(model_output, sample=sample)
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        if use_corrector:  # UniC: refine this step's sample with the new model output
            order = self.this_order
            ms = self.model_outputs
            cx, cm, rhos, scale, rks = self._coeffs(i, i - 1, [i - 1 - k for k in range(1, order)], order, True)
            m0 = ms[-1].to(ct)
            x = cx * self.last_sample.to(ct) + cm * m0
            corr = 0
            for k in range(1, order):
                corr = corr + rhos[k - 1] * ((ms[-(k + 1)].to(ct) - m0) / rks[k - 1])
            sample = (x + scale * (corr + rhos[-1] * (m_new.to(ct) - m0))).to(sample.dtype)
        self.model_outputs = self.model_outputs[1:] + [m_new]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        n = len(self._timesteps_host)
        this_order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        # UniP: the predictor
        order = self.this_order
        cx, cm, rhos, scale, rks = self._coeffs(i + 1, i, [i - k for k in range(1, order)], order, False)
        m0 = m_new.to(ct)
        prev = cx * sample.to(ct) + cm * m0
        if rhos:
            res = 0
            for k in range(1, order):
                res = res + rhos[k - 1] * ((self.model_outputs[-(k + 1)].to(ct) - m0) / rks[k - 1])
            prev = prev + scale * res
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return _out(prev.to(sample.dtype), None, return_dict)

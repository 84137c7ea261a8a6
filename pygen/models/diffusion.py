"""Diffusion models: one denoiser parametric in the noise level, every sampler, guidance and
inpainting (:class:`Diffusion`); the image-conditioned stages live in
:mod:`pygen.models.conditioned`.

The forward process is the discrete VP chain of DDPM: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t)
eps over ``num_train_timesteps`` levels (ab = alphas_cumprod of a named beta schedule), with
sigma_t = sqrt((1 - ab_t) / ab_t) the same level in sigma space (x_t / sqrt(ab_t) = x0 +
sigma_t eps). The network sees x_t and the level:

- ``precond="edm"`` (default; Karras et al. 2022) or ``"vp"`` (the network predicts
  ``prediction_type`` from the timestep; optional Min-SNR-gamma weights): wrappers around the
  network in :mod:`pygen.models.precond`.

Training goes through :func:`pygen.ops.diffusion_loss` (q_sample and the weighted MSE fused,
eps drawn in-kernel and never stored). Sampling runs the loops of
:mod:`pygen.diffusion.samplers` on pygen's fused steps: DDPM (ancestral, the full 1000-step
chain), DDIM, Euler, Euler-ancestral, DPM-Solver++ 2M, all on the same network. Sample i of a call depends only
on (seed, offset + i): its initial noise reads Philox stream positions [i D, (i + 1) D) of
the seed, each stochastic step k reads the same positions of a seed derived from (seed, k),
and random labels come from another derived stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from pygen.diffusion.samplers import ALPHA_SAMPLERS, DEFAULT_STEPS, SIGMA_SAMPLERS, repaint_schedule, sample_repaint
from pygen.diffusion.schedules import alphas_cumprod_from_betas, make_betas, sigmas_from_alphas_cumprod, spaced_timesteps
from pygen.models.base import GenerativeModel
from pygen.models.cuda_graphs import GraphCache
from pygen.models.custom import NetSpec, build_network, normalize_spec
from pygen.models.inference import sampling
from pygen.models.labels import Batch, conditional_by_default, sample_labels, split_batch
from pygen.models.precond import EDM, VP
from pygen.models.seeding import Stream, derive_seed, resolve_seed
from pygen.models.networks import is_image
from pygen.models.unet import MLPDenoiser, UNet
from pygen.ops import randn
from pygen.ops.diffusion import diffusion_loss

__all__ = ["Diffusion", "SAMPLERS", "DEFAULT_STEPS", "repaint_schedule"]

SAMPLERS = tuple(DEFAULT_STEPS)  # the sampler names, DEFAULT_STEPS their step counts
_REPAINT = {"step": Stream.REPAINT_STEP, "known": Stream.REPAINT_KNOWN, "jump": Stream.REPAINT_JUMP}



def _default_net(shape: tuple[int, ...]) -> dict[str, Any]:
    """Network size from the data shape: the UNet's levels stop at 4x4 (at most 3 levels)."""
    if not is_image(shape):
        return {"hidden": 256, "layers": 3}
    size = min(shape[1:])
    levels = max(1, min(3, int(math.log2(max(size, 4))) - 2 + 1))
    mults = [1, 2, 2][:levels]
    return {"width": 32, "mults": mults, "blocks": 2, "attention": True}


class Diffusion(GenerativeModel, family="diffusion"):
    """A denoising diffusion model of (C, H, W) images (UNet) or (D,) vectors (MLP).

    Args:
        shape: one example's shape.
        num_classes: class-conditional with label dropout ``label_dropout`` (the null label
            then serves the unconditional model, used by classifier-free guidance).
        precond: "edm" or "vp" (see the module doc); prediction_type / snr_gamma for "vp".
        sigma_data: the data's standard deviation in model space (EDM's sd).
        num_train_timesteps, beta_schedule: the discrete VP chain (diffusers' names).
        data_range: (lo, hi) of the data, mapped to [-1, 1] in the model (samples are mapped
            back and clamped); None: no mapping (points). "auto": (0, 1) for images.
        width, mults, blocks, attention, dropout: the UNet; hidden, layers: the MLP.
        cond_channels, aug_conditioning: an image condition (see the conditioned stages).
        ema_decay: the trainer keeps an EMA of the weights; :func:`pygen.models.load` uses it.
        sampler, steps: the defaults of :meth:`sample` (steps None: ``DEFAULT_STEPS``).
        net: your own denoiser instead of the UNet / MLP, as an import spec
            (:mod:`pygen.models.custom`): an ``nn.Module`` whose ``forward(x, c_noise,
            labels=None, cond=None, aug_level=None)`` maps x (B, *shape) in model space and the
            noise-level input c_noise (B,) to a tensor of x's shape (what the preconditioning
            expects: EDM's F_theta, or the VP prediction); labels (B,) in [0, num_classes],
            num_classes being the null label. Its constructor gets ``shape`` / ``num_classes``
            when it takes them.
    """

    default_lr: ClassVar[float] = 5e-4
    ema_warmup: ClassVar[bool] = True  # short runs sample from a useful average
    #: what ``pygen train diffusion`` uses unless told otherwise (measured on the digits)
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 6000, "batch_size": 128, "lr": 5e-4}
    #: on a GPU: the UNet twice as wide (~4x the FLOPs), 40k steps (the 20-minute cap cuts
    #: them to what fits there); not yet measured on a GPU
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "gpu": {"train": {"steps": 40000, "batch_size": 128}, "model": {"width": 64}}}

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        *,
        num_classes: int | None = None,
        precond: str = "edm",
        prediction_type: str = "epsilon",
        snr_gamma: float | None = None,
        sigma_data: float = 0.5,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        label_dropout: float = 0.1,
        data_range: Any = "auto",
        width: int | None = None,
        mults: list[int] | None = None,
        blocks: int | None = None,
        attention: bool | None = None,
        dropout: float = 0.0,
        hidden: int | None = None,
        layers: int | None = None,
        cond_channels: int = 0,
        aug_conditioning: bool = False,
        ema_decay: float | None = 0.999,
        sampler: str = "dpmpp_2m",
        steps: int | None = None,
        net: NetSpec | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if precond not in ("edm", "vp"):
            raise ValueError(f"precond must be 'edm' or 'vp', got {precond!r}")
        if precond == "edm" and snr_gamma is not None:  # EDM weights its loss by lambda(sigma): Min-SNR is VP's
            raise ValueError(f"snr_gamma (Min-SNR weighting) is for precond='vp'; EDM weights its loss itself, "
                             f"got snr_gamma={snr_gamma!r} with precond='edm'")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout!r}")
        if data_range == "auto":
            data_range = [0.0, 1.0] if is_image(shape) else None
        arch = _default_net(shape)
        given = {"width": width, "mults": mults, "blocks": blocks, "attention": attention, "hidden": hidden,
                 "layers": layers}
        arch.update({k: v for k, v in given.items() if v is not None and (k in arch)})
        self.shape, self.num_classes = shape, num_classes
        self.prediction_type = prediction_type
        self.sigma_data, self.snr_gamma, self.label_dropout = float(sigma_data), snr_gamma, float(label_dropout)
        self.data_range = None if data_range is None else [float(data_range[0]), float(data_range[1])]
        self.ema_decay = ema_decay
        self.config = {
            "shape": list(shape), "num_classes": num_classes, "precond": precond, "prediction_type": prediction_type,
            "snr_gamma": snr_gamma, "sigma_data": self.sigma_data, "num_train_timesteps": num_train_timesteps,
            "beta_schedule": beta_schedule, "label_dropout": self.label_dropout, "data_range": self.data_range,
            **{k: arch[k] for k in arch}, "dropout": dropout, "cond_channels": cond_channels,
            "aug_conditioning": aug_conditioning, "ema_decay": ema_decay, "sampler": sampler, "steps": steps,
        }  # fmt: skip
        if net is not None:  # the user's denoiser (saved as its import spec: load rebuilds it)
            self.config["net"] = normalize_spec(net, "net")
            self.net = build_network(net, "net", shape=shape, num_classes=num_classes)
        elif is_image(shape):
            self.net = UNet(shape[0], width=arch["width"], mults=arch["mults"], blocks=arch["blocks"],
                            attention=arch["attention"], dropout=dropout, num_classes=num_classes,
                            cond_channels=cond_channels, aug_conditioning=aug_conditioning)
        else:
            self.net = MLPDenoiser(math.prod(shape), hidden=arch["hidden"], layers=arch["layers"],
                                   num_classes=num_classes)
        ac = alphas_cumprod_from_betas(make_betas(num_train_timesteps, beta_schedule=beta_schedule,
                                                  dtype=torch.float64))
        # derived from the config: not saved in the state dict
        self.register_buffer("alphas_cumprod", ac.float(), persistent=False)
        self.register_buffer("train_sigmas", sigmas_from_alphas_cumprod(ac), persistent=False)  # float64
        self.precond = EDM(self.sigma_data) if precond == "edm" else VP(prediction_type, self.train_sigmas.clone())

    # ---- construction from data --------------------------------------------------------
    @classmethod
    def for_data(cls, data: Any, *, unconditional: bool = False, **options: Any) -> Diffusion:
        """The default model for a :class:`pygen.data.Data` (its shape; class-conditional
        when it has labels unless ``unconditional``), ``options`` overriding constructor arguments."""
        return cls(tuple(data.shape), **conditional_by_default(data, options, unconditional))

    @property
    def output_type(self) -> str:
        """The prediction type of :meth:`denoise`'s output, what the sampler steps are told."""
        return self.precond.output_type

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    # ---- data space <-> model space --------------------------------------------------------
    def to_model(self, x: Tensor) -> Tensor:
        if self.data_range is None:
            return x
        lo, hi = self.data_range
        return (x - lo) * (2.0 / (hi - lo)) - 1.0

    def from_model(self, x: Tensor) -> Tensor:
        if self.data_range is None:
            return x
        lo, hi = self.data_range
        return (x.clamp(-1, 1) + 1.0) * ((hi - lo) / 2.0) + lo

    # ---- the denoiser ------------------------------------------------------------------
    def denoise(self, x_t: Tensor, sigma: Tensor, labels: Tensor | None = None, cond: Tensor | None = None,
                aug_level: Tensor | None = None) -> Tensor:
        """The network's prediction of type :attr:`output_type` for alpha-space samples
        x_t (B, *shape) at noise levels ``sigma`` (B,) (labels (B,) with ``num_classes`` the
        null label; cond / aug_level for image-conditioned models), through the preconditioning."""
        return self.precond(self.net, x_t, sigma, labels, cond, aug_level)

    # ---- training ------------------------------------------------------------------------
    def _split(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        return split_batch(batch, self.num_classes, type(self).__name__, self.shape)

    def training_inputs(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(x0 in model space, extra network inputs) of a data batch; image-conditioned
        models add their condition here."""
        return self.to_model(x), {}

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        x, labels = self._split(batch)
        x0, extra = self.training_inputs(x)
        b = x0.shape[0]
        if labels is not None:
            drop = torch.rand(b, device=x0.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels.to(x0.device))
        t = torch.randint(0, self.num_train_timesteps, (b,), device=x0.device)

        def net(x_t: Tensor, tt: Tensor, **kw: Tensor) -> Tensor:
            return self.denoise(x_t, self.train_sigmas[tt], **kw)

        edm = isinstance(self.precond, EDM)
        per = diffusion_loss(net, x0, self.alphas_cumprod, t=t, prediction_type=self.output_type,
                             snr_gamma=self.snr_gamma, labels=labels, **extra)
        if edm:
            per = per * self.precond.loss_weight(self.train_sigmas[t])
        return {"loss": per.mean()}

    # ---- sampling ------------------------------------------------------------------------
    def _labels(self, labels: Tensor | int | None, n: int, seed: int, offset: int) -> Tensor | None:
        return sample_labels(labels, n, self.num_classes, seed=seed, offset=offset,
                             device=self.alphas_cumprod.device, owner="Diffusion model")

    def guided(self, x_t: Tensor, sigma: Tensor, labels: Tensor | None, guidance_scale: float = 1.0,
               **extra: Tensor) -> Tensor:
        """The denoiser with classifier-free guidance: u + s (c - u), the conditional and
        unconditional (null-label) halves in one batched forward. s = 1: the conditional
        model alone; s = 0: the unconditional one."""
        if labels is None or guidance_scale == 1.0:
            return self.denoise(x_t, sigma, labels, **extra)
        null = torch.full_like(labels, self.num_classes)
        if guidance_scale == 0.0:
            return self.denoise(x_t, sigma, null, **extra)
        both = self.denoise(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([labels, null]),
                            **{k: torch.cat([v, v]) for k, v in extra.items()})
        c, u = both.chunk(2)
        return u + guidance_scale * (c - u)

    def _check_sampler(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        sampler = self.config["sampler"] if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps is None:
            steps = self.config["steps"] if sampler == self.config["sampler"] and self.config["steps"] else None
        steps = DEFAULT_STEPS[sampler] if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be an int in [1, {self.num_train_timesteps}], got {steps!r}")
        return sampler, steps

    def sample_settings(self, *, sampler: str | None = None, steps: int | None = None,
                        guidance_scale: float | None = None, **given: Any) -> dict[str, Any]:
        """The sampler and step count that ``sample(sampler=, steps=)`` uses (defaults filled in
        and checked) and the guidance scale (default 1)."""
        sampler, steps = self._check_sampler(sampler, steps)
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        return {**super().sample_settings(**given), "sampler": sampler, "steps": steps, "guidance_scale": scale}

    def step_seeds(self, seed: int, steps: int, device: torch.device | str | None = None) -> Tensor:
        """(steps,) int64: the seed of each step's noise, derived from the sample seed (a
        device tensor, so that a captured loop reads them without a host copy)."""
        return torch.tensor([derive_seed(seed, Stream.STEP + k) for k in range(steps)], dtype=torch.int64,
                            device=device)

    def sample_loop(self, noise: Tensor, *, seeds: Tensor, offset: int, sampler: str, steps: int,
                    model: Callable[[Tensor, Tensor], Tensor], eta: float = 0.0, progress: bool = False) -> Tensor:
        """Run ``sampler`` (:mod:`pygen.diffusion.samplers`) for ``steps`` steps from unit noise
        (n, *shape) (stream offset ``offset`` elements: the chunk's first element; step k's
        noise from ``seeds[k]``, see :meth:`step_seeds`) with ``model(x_t, sigma) -> output``
        (alpha-space input, :attr:`output_type` output), over the training chain's levels with
        trailing spacing. Returns x0 in model space. No host synchronisation: the loop can be
        captured in a CUDA graph."""
        ts = spaced_timesteps(steps, self.num_train_timesteps, "trailing")
        kw: dict[str, Any] = {"prediction_type": self.output_type, "progress": progress}
        if sampler in ALPHA_SAMPLERS:
            kw.update(seeds=seeds, offset=offset, **({"eta": eta} if sampler == "ddim" else {}))
            return ALPHA_SAMPLERS[sampler](model, noise, [int(t) for t in ts], self.alphas_cumprod,
                                           self.train_sigmas, **kw)
        sigmas = torch.cat([self.train_sigmas[ts], self.train_sigmas.new_zeros(1)]).float().to(noise.device)
        if sampler == "euler_ancestral":
            kw.update(seeds=seeds, offset=offset)
        return SIGMA_SAMPLERS[sampler](model, noise, sigmas, **kw)

    def _chunks(self, n: int, batch_size: int | None) -> list[tuple[int, int]]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        bs = n if not batch_size else int(batch_size)
        return [(i, min(n, i + bs)) for i in range(0, n, max(bs, 1))]

    @sampling
    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        offset: int = 0,
        labels: Tensor | int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        batch_size: int | None = None,
        progress: bool = False,
        cuda_graph: bool = False,
        **extra: Tensor,
    ) -> Tensor:
        """(n, *shape) samples in the data's range; sample i depends on (seed, offset + i) only.

        ``sampler`` one of :data:`SAMPLERS` with ``steps`` (defaults: the model's config, then
        :data:`DEFAULT_STEPS`: DDPM 1000, DDIM / Euler / Euler-ancestral 50, DPM-Solver++ 20);
        all start from the last trained level (trailing spacing). A class-conditional model
        samples ``labels`` (an int or (n,)), or labels drawn uniformly from a derived stream
        of the seed when None; ``guidance_scale`` s: eps = eps_u + s (eps_c - eps_u)
        (1: conditional, 0: unconditional). ``eta``: DDIM's stochasticity. ``batch_size``:
        chunk the n samples (memory), the result does not depend on it.

        ``cuda_graph`` (CUDA only): capture the whole loop of a chunk in a CUDA graph once and
        replay it (no per-step launch overhead). Graphs are cached on the model per (sampler,
        steps, guidance, chunk size, and for stochastic samplers the chunk's offset, which the
        kernels take as a launch argument); the first call pays a warm-up loop and the capture.
        Deterministic samplers (DDIM eta=0, Euler, DPM-Solver++) reuse one graph for every chunk
        of a size.
        """
        sampler, steps = self._check_sampler(sampler, steps)
        s = resolve_seed(seed, generator)
        labels = self._labels(labels, n, s, offset)
        d = math.prod(self.shape)
        dev = self.alphas_cumprod.device
        dtype = next(self.parameters()).dtype
        if cuda_graph and dev.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {dev}")
        seeds = self.step_seeds(s, steps, dev)
        out = []
        for i0, i1 in self._chunks(n, batch_size):
            lab = None if labels is None else labels[i0:i1]
            ext = {k: v[i0:i1].to(dev) for k, v in extra.items() if v is not None}
            noise = randn(i1 - i0, *self.shape, seed=s, offset=(offset + i0) * d, device=dev, dtype=dtype)

            def run(noise: Tensor, lab: Tensor | None, ext: dict[str, Tensor], seeds: Tensor, i0: int = i0) -> Tensor:
                def model(x_t: Tensor, sigma: Tensor) -> Tensor:
                    return self.guided(x_t, sigma, lab, guidance_scale, **ext)

                return self.sample_loop(noise, seeds=seeds, offset=(offset + i0) * d, sampler=sampler, steps=steps,
                                        model=model, eta=eta, progress=progress)

            if cuda_graph:  # the stream offset is a launch argument: stochastic samplers capture per offset
                stochastic = sampler in ("ddpm", "euler_ancestral") or (sampler == "ddim" and eta > 0)
                key = (sampler, steps, guidance_scale, eta, i1 - i0, (offset + i0) if stochastic else None,
                       lab is None, tuple(sorted(ext)))
                graphs = self.__dict__.setdefault("_cuda_graphs", GraphCache())  # not a module attribute
                x0 = graphs(key, run, noise, lab, ext, seeds)
            else:
                x0 = run(noise, lab, ext, seeds)
            out.append(self.from_model(x0))
        if not out:
            return torch.empty(0, *self.shape, device=dev, dtype=dtype)
        return torch.cat(out)

    # ---- inpainting ------------------------------------------------------------------------
    @sampling
    def inpaint(
        self,
        x: Tensor,
        mask: Tensor,
        n: int = 4,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        steps: int = 100,
        jump_length: int = 10,
        jump_n_sample: int = 5,
        labels: Tensor | int | None = None,
        guidance_scale: float = 1.0,
        progress: bool = False,
    ) -> Tensor:
        """``n`` completions of each image: (B, n, *shape), known pixels (mask 1) kept exactly.

        RePaint (Lugmayr et al. 2022) on the DDPM chain with ``steps`` spaced levels: at each
        denoising step the known region is replaced by the data noised to the new level, and
        every ``jump_length`` steps the chain goes back up ``jump_length`` levels
        (``jump_n_sample - 1`` times) so that the unknown region harmonises with the known one.
        x (B, *shape) in the data's range; mask broadcastable to x, 1 = known, 0 = to fill.
        Completion j of image b is stream index b * n + j of ``seed``.
        """
        if x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if n < 1 or steps < 1 or jump_length < 1 or jump_n_sample < 1:
            raise ValueError("n, steps, jump_length and jump_n_sample must be >= 1")
        dev = self.alphas_cumprod.device
        b = x.shape[0]
        m = torch.as_tensor(mask, dtype=x.dtype, device=dev).expand_as(x).repeat_interleave(n, 0)
        x0 = self.to_model(x.to(dev)).repeat_interleave(n, 0)
        s = resolve_seed(seed, generator)
        lab = self._labels(labels, b, s, 0) if (labels is not None or self.num_classes is None) else None
        if self.num_classes is not None and lab is None:
            lab = self._labels(None, b * n, s, 0)  # random labels per completion
        elif lab is not None:
            lab = lab.repeat_interleave(n, 0)
        ts = spaced_timesteps(steps, self.num_train_timesteps, "trailing")
        noise = randn(b * n, *self.shape, seed=s, offset=0, device=dev, dtype=x0.dtype)

        def model(x_t: Tensor, sigma: Tensor) -> Tensor:
            return self.guided(x_t, sigma, lab, guidance_scale)

        xt = sample_repaint(model, noise, x0, m, [int(t) for t in ts], self.alphas_cumprod, self.train_sigmas,
                            prediction_type=self.output_type, jump_length=min(jump_length, steps),
                            jump_n_sample=jump_n_sample, seed_of=lambda kind, e: derive_seed(s, _REPAINT[kind] + e),
                            progress=progress)
        return self.from_model(xt).reshape(b, n, *self.shape)

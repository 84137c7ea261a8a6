"""Latent diffusion (Rombach et al. 2022): a diffusion model on the latents of an autoencoder.

One model, one run, two stages by training step:

1. steps [0, ``ae_steps``): the autoencoder (:class:`pygen.models.autoencoder.KLAutoencoder`,
   e.g. 28x28x1 -> 7x7x4) learns to reconstruct, L1 per image plus ``kl_weight`` times the
   KL of Q(z|x) to N(0, I) (fused reparameterize + KL kernel);
2. at step ``ae_steps`` the encoder is frozen and the latent scale fixed to 1 / std of that
   batch's latents (so the diffusion model sees unit-variance latents, EDM's sigma_data = 1);
   from then on a :class:`pygen.models.Diffusion` learns the scaled latents, class-conditional
   when the data has labels. Its EMA lives in the model (``diffusion_ema``), like the GAN's:
   a whole-model EMA would also average the autoencoder and the latent scale.

Sampling draws latents with any of Diffusion's samplers (guidance included) and decodes them;
sample i depends on (seed, offset + i) only, as in every family. The run's step count must
exceed ``ae_steps`` (the default count does, with room for the diffusion stage).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from pygen.models.autoencoder import KLAutoencoder, l1_per_example
from pygen.models.base import GenerativeModel
from pygen.models.diffusion import Diffusion
from pygen.models.inference import sampling
from pygen.models.labels import Batch, conditional_by_default, split_batch
from pygen.models.seeding import resolve_seed
from pygen.models.update import Update, ema_warmup_fn

__all__ = ["LatentDiffusion", "latent_by_default"]


def latent_by_default(shape: Sequence[int], device: str | torch.device | None = None) -> bool:
    """Whether pygen trains diffusion on (C, H, W) examples of ``shape`` in latent space when
    not told: images whose short side is at least 28 pixels, trained on the CPU (``device``;
    None: CUDA when available). Measured on Fashion-MNIST with the 20-minute defaults on a
    2-core CPU (README "Real data"): latent diffusion FD 9.1, pixel diffusion 16.9 (303
    steps of its 1.7M-parameter UNet fit), and latent sampling over 10x faster."""
    on_cpu = torch.device(device).type == "cpu" if device else not torch.cuda.is_available()
    return len(shape) == 3 and min(shape[1:]) >= 28 and on_cpu


class LatentDiffusion(GenerativeModel, family="latent-diffusion"):
    """Latent diffusion of (C, H, W) images (see the module docstring).

    Args:
        shape: one image's (C, H, W).
        num_classes: class-conditional diffusion (classifier-free guidance at sampling).
        latent_channels, levels, ae_width: the autoencoder: (latent_channels, H / 2^levels,
            W / 2^levels) latents, ``ae_width`` channels at full resolution.
        kl_weight: the KL term's weight beside the per-image L1 reconstruction.
        ae_steps: the training steps of stage 1 (the autoencoder).
        ae_lr: stage 1's learning rate (stage 2 uses the run's ``lr``, default 5e-4).
        data_range: (lo, hi) of the images ("auto": (0, 1)); samples are clamped to it.
        width, mults, blocks, attention, label_dropout, sampler, steps: the latent
            :class:`pygen.models.Diffusion` (its UNet and sampling defaults).
        ema_decay: the EMA of the diffusion model that :meth:`sample` uses (None: none).
    """

    default_lr: ClassVar[float] = 5e-4
    #: each stage leaves the other's parameters without gradients (DistributedDataParallel must
    #: know); the latent scale set at the switch is a buffer, so DDP broadcasts rank 0's
    ddp_find_unused_parameters: ClassVar[bool] = True
    #: measured on Fashion-MNIST (benchmarks/quality/latent_autoencoder.py, fashion_mnist.py;
    #: a 2-core Intel Xeon): 2500 autoencoder steps (its test reconstructions' FD 1.8, against
    #: 6.3 after 800), then the diffusion model's steps (1.7x as dear) still help: FD 4.85 after
    #: 4000 (17 minutes), 4.38 after 5189 (``--minutes 20``); so at most 2500 + 7500, and the
    #: 20-minute cap binds on a 2-core CPU
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 10000, "batch_size": 128, "lr": 5e-4}
    ema_copies: ClassVar[tuple[str, ...]] = ("diffusion_ema",)
    #: on a GPU (where pixel diffusion is the default): 20k steps of 256 (capped at 20
    #: minutes); not yet measured on a GPU
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "gpu": {"train": {"steps": 20000, "batch_size": 256}, "model": {}}}

    def __init__(
        self,
        shape: Sequence[int],
        *,
        num_classes: int | None = None,
        latent_channels: int = 4,
        levels: int = 2,
        ae_width: int = 16,
        kl_weight: float = 1e-4,
        ae_steps: int = 2500,
        ae_lr: float = 1e-3,
        data_range: Any = "auto",
        width: int = 32,
        mults: Sequence[int] = (1, 2),
        blocks: int = 2,
        attention: bool = True,
        label_dropout: float = 0.1,
        ema_decay: float | None = 0.999,
        sampler: str = "dpmpp_2m",
        steps: int | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"latent diffusion models (C, H, W) images, got shape {shape}")
        if isinstance(ae_steps, bool) or not isinstance(ae_steps, int) or ae_steps < 0:
            raise ValueError(f"ae_steps must be an int >= 0, got {ae_steps!r}")
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        if data_range == "auto":
            data_range = [0.0, 1.0]
        self.config = {"shape": list(shape), "num_classes": num_classes, "latent_channels": latent_channels,
                       "levels": levels, "ae_width": ae_width, "kl_weight": kl_weight, "ae_steps": ae_steps,
                       "ae_lr": ae_lr, "data_range": None if data_range is None else list(data_range),
                       "width": width, "mults": list(mults), "blocks": blocks, "attention": attention,
                       "label_dropout": label_dropout, "ema_decay": ema_decay, "sampler": sampler, "steps": steps}
        self.shape, self.num_classes = shape, num_classes
        self.kl_weight, self.ae_steps, self.ae_lr = float(kl_weight), ae_steps, float(ae_lr)
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        self.autoencoder = KLAutoencoder(shape, latent_channels=latent_channels, levels=levels, width=ae_width)
        self.diffusion = Diffusion(self.autoencoder.latent_shape, num_classes=num_classes, data_range=None,
                                   sigma_data=1.0, width=width, mults=list(mults), blocks=blocks, attention=attention,
                                   label_dropout=label_dropout, ema_decay=None, sampler=sampler, steps=steps)
        self.diffusion_ema: AveragedModel | None = None
        if ema_decay is not None:
            self.diffusion_ema = AveragedModel(self.diffusion, multi_avg_fn=ema_warmup_fn(ema_decay))
            self.diffusion_ema.requires_grad_(False)
        # 0: training the autoencoder, 1: the diffusion model; the scale that makes latents unit-variance
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("latent_scale", torch.ones(()))

    @classmethod
    def for_data(cls, data: Any, *, unconditional: bool = False, **options: Any) -> LatentDiffusion:
        """The default model for a :class:`pygen.data.Data` of images: f = 4 (f = 2 below
        16 pixels a side), class-conditional when it has labels unless ``unconditional``."""
        shape = tuple(data.shape)
        if len(shape) != 3:
            raise ValueError(f"latent diffusion needs (C, H, W) images, got examples of shape {shape}")
        options = conditional_by_default(data, options, unconditional)
        options.setdefault("levels", 2 if min(shape[1:]) >= 16 else 1)
        return cls(shape, **options)

    # ---- the two stages ----------------------------------------------------------------------
    def configure_optimizers(self, lr: float | None = None) -> list[torch.optim.Optimizer]:
        """[the autoencoder's Adam (``ae_lr``), the diffusion model's Adam (``lr``)]."""
        return [torch.optim.Adam(self.autoencoder.parameters(), lr=self.ae_lr),
                torch.optim.Adam(self.diffusion.parameters(), lr=self.default_lr if lr is None else lr)]

    def _split(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        return split_batch(batch, self.num_classes, type(self).__name__, self.shape)

    @torch.no_grad()
    def latents(self, x: Tensor, *, sample: bool = True) -> Tensor:
        """(B, *latent_shape): scaled latents of images x (B, C, H, W), drawn from Q(z|x)
        (its mean when not ``sample``), what the diffusion model learns."""
        return self.autoencoder.encode(x, sample=sample)[0] * self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, *latent_shape) -> images (B, C, H, W) in the data's range."""
        x = self.autoencoder.decode(z / self.latent_scale)
        return x if self.data_range is None else x.clamp(*self.data_range)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """Stage 1: {"loss", "l1" (per element), "kl" (per image)}; stage 2: the diffusion loss."""
        x, labels = self._split(batch)
        if int(self.stage) == 0:
            rec, kl = self.autoencoder(x)
            l1 = l1_per_example(rec, x)
            return {"loss": (l1 + self.kl_weight * kl).mean(), "l1": l1.mean() / x[0].numel(), "kl": kl.mean()}
        z = self.latents(x)
        return self.diffusion.loss(z if labels is None else (z, labels))

    @torch.no_grad()
    def start_diffusion(self, batch: Batch) -> None:
        """Stage 2 begins: the latent scale from this batch (1 / std of its latents), frozen."""
        x, _ = self._split(batch)
        z = self.autoencoder.encode(x)[0].float()
        self.latent_scale.fill_(1.0 / z.std().clamp_min(1e-6))
        self.stage.fill_(1)

    def training_step(self, batch: Batch, step: int, optimizers: Sequence[torch.optim.Optimizer], *,
                      update: Update | None = None) -> dict[str, Tensor]:
        """One update of the autoencoder (step < ``ae_steps``) or of the diffusion model (then
        its EMA); ``optimizers`` = :meth:`configure_optimizers`'s pair."""
        update = Update() if update is None else update
        stage = int(step >= self.ae_steps)
        if stage and int(self.stage) == 0:
            self.start_diffusion(batch)
        opt = optimizers[stage]
        opt.zero_grad(set_to_none=True)
        out = update.backward(self, batch)
        norm = update.step(opt, [p for group in opt.param_groups for p in group["params"]])
        if update.grad_clip is not None:
            out["grad_norm"] = norm
        if stage and self.diffusion_ema is not None:
            self.diffusion_ema.update_parameters(self.diffusion)
        return out

    def stage_steps_for(self, steps: int) -> int:
        """``ae_steps`` for a run of ``steps`` steps: this model's, at most half of the run
        (what ``pygen train`` uses when not told, so that a short run still trains both stages)."""
        return min(self.ae_steps, steps // 2)  # a 1-step run: diffusion only

    def first_stage_probe(self) -> tuple[int, LatentDiffusion]:
        """(``ae_steps``, a throwaway copy that trains only the autoencoder): the --minutes
        budget times this stage apart: its steps cost less than a diffusion step."""
        probe = copy.deepcopy(self)
        probe.ae_steps = 2**62
        return self.ae_steps, probe

    def probe_copy(self) -> LatentDiffusion:
        """The --minutes probe's copy: it trains the diffusion stage from its first step (the
        dearer stage, so the step count it sets errs on the safe side)."""
        probe = copy.deepcopy(self)
        probe.ae_steps = 0
        return probe

    # ---- sampling ------------------------------------------------------------------------
    def denoiser(self, ema: bool | None = None) -> Diffusion:
        """The latent :class:`Diffusion` that sampling uses: its EMA unless ``ema`` is False
        (None: :meth:`use_ema`'s choice)."""
        averaged = None if self.diffusion_ema is None else self.diffusion_ema.module
        return self.pick_ema(ema, averaged, self.diffusion, "model keeps no EMA")

    def sample_settings(self, **given: Any) -> dict[str, Any]:
        """The sampler, step count and guidance scale that ``sample(**given)`` uses."""
        return self.diffusion.sample_settings(**given)

    @sampling
    def sample(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, offset: int = 0,
               labels: Tensor | int | None = None, sampler: str | None = None, steps: int | None = None,
               guidance_scale: float = 1.0, eta: float = 0.0, batch_size: int | None = None,
               progress: bool = False, ema: bool | None = None) -> Tensor:
        """(n, C, H, W) images: latents from :meth:`Diffusion.sample` (same arguments: labels,
        sampler, steps, guidance_scale, eta, batch_size), decoded; sample i depends on
        (seed, offset + i) only."""
        s = resolve_seed(seed, generator)
        z = self.denoiser(ema).sample(n, seed=s, offset=offset, labels=labels, sampler=sampler, steps=steps,
                                      guidance_scale=guidance_scale, eta=eta, batch_size=batch_size,
                                      progress=progress)
        bs = n if not batch_size else int(batch_size)
        return torch.cat([self.decode(c) for c in z.split(max(bs, 1))]) if n else self.decode(z)

    @sampling
    def inpaint(self, x: Tensor, mask: Tensor, n: int = 4, *, seed: int | None = None,
                generator: torch.Generator | None = None, ema: bool | None = None, **options: Any) -> Tensor:
        """``n`` completions of each image: (B, n, C, H, W), the known pixels (mask 1) kept.

        RePaint in latent space (:meth:`Diffusion.inpaint`'s ``options``): a latent position
        counts as known when every pixel it encodes is; x (B, C, H, W) in the data's range,
        mask broadcastable to x, 1 = known."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        dev = self.latent_scale.device
        x = x.to(dev)
        m = torch.as_tensor(mask, dtype=x.dtype, device=dev).expand_as(x)
        f = 2 ** int(self.config["levels"])
        known = F.pad(m.amin(1, keepdim=True), self.autoencoder.pad, value=1.0)  # padding counts as known
        known = -F.max_pool2d(-known, f)  # a latent cell is known when all its f x f pixels are
        z = self.latents(x, sample=False)
        zs = self.denoiser(ema).inpaint(z, known.expand_as(z), n, seed=resolve_seed(seed, generator), **options)
        out = self.decode(zs.flatten(0, 1)).view(x.shape[0], n, *self.shape)
        mk = m[:, None]
        return mk * x[:, None] + (1 - mk) * out

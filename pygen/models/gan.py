"""Generative adversarial networks behind the :class:`GenerativeModel` interface.

A DCGAN-style generator (:func:`pygen.models.networks.decoder`, output link ``tanh`` mapped
to [0, 1] or ``sigmoid`` for images, none for vectors) and a discriminator
(:func:`~pygen.models.networks.encoder` with ``norm=None, act="lrelu"`` to one logit,
spectral-normed with ``torch.nn.utils.parametrizations.spectral_norm``); MLPs for (D,)
vectors such as 2-D points. Both networks see data in the data's range: the discriminator
maps images to [-1, 1] itself.

Training (:meth:`GAN.training_step`, called by :func:`pygen.train.fit`), per trainer step:

1. ``n_dis`` discriminator steps, all on the trainer's batch of real data (the same real
   batch each time) with fresh z and fresh augmentations for each; the generator is frozen
   (``requires_grad_(False)``: its parameters get no ``.grad`` at all).
2. one generator step with the discriminator frozen the same way.
3. the EMA of the generator (``g_ema``) is updated (``ema_decay``), if enabled.

Losses (``loss=``), with D(x) the discriminator's logit:

- ``"ns"``: D: softplus(-D(x)) + softplus(D(G(z))); G: softplus(-D(G(z))) (non-saturating).
- ``"hinge"``: D: relu(1 - D(x)) + relu(1 + D(G(z))); G: -D(G(z)).
- ``"wgan-gp"``: D: D(G(z)) - D(x) + gp_weight (||grad D(x_hat)|| - 1)^2 on interpolates
  x_hat = e x + (1 - e) G(z), e ~ U[0, 1] per example; G: -D(G(z)).

plus, for any loss, the R1 penalty gamma/2 E||grad_x D(x)||^2 on real data (``r1_gamma``),
lazy: computed every ``r1_every`` discriminator steps and multiplied by ``r1_every``.
Gradients are taken with respect to the data-range input, before augmentation (the
augmentation is differentiable), as in StyleGAN2-ADA.

``diffaugment=True`` (images only) applies DiffAugment's translation (1/8 of the size,
zero padding) and cutout (half the size) to every real and fake batch before the
discriminator, independently drawn for each batch, in both phases.

``num_classes`` makes the GAN class-conditional: the generator's input is z concatenated
with a label embedding; the discriminator is a projection discriminator, logit =
head(phi(x)) + <embed(y), phi(x)> with phi the encoder's features (Miyato & Koyama 2018).
Batches are then (x, labels); an unconditional GAN ignores labels in a batch.

Sampling (:meth:`GAN.sample`) uses the EMA generator when the model has one (``ema=False``
for the raw one), in eval mode; sample i's z is pygen's Philox stream at positions
[(offset + i) z_dim, (offset + i + 1) z_dim), so samples depend on (seed, offset + i) only.

The EMA lives inside the model (``g_ema``, in its state dict and checkpoints) rather than in
the trainer's whole-model EMA: it averages only the generator, is there after ``fit``
returns, and resumes exactly. ``model.ema_decay`` (the trainer's hook) is therefore None.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from pygen.models.base import GenerativeModel, TrainingDiverged
from pygen.models.custom import NetSpec, build_network, normalize_spec
from pygen.models.inference import sampling
from pygen.models.labels import Batch, num_classes_of, sample_labels, split_batch
from pygen.models.seeding import resolve_seed
from pygen.models.update import Update
from pygen.models.networks import ConvEncoder, decoder, encoder, is_image
from pygen.ops import randn

__all__ = [
    "GAN",
    "Generator",
    "Discriminator",
    "LOSSES",
    "diff_augment",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "r1_penalty",
]

LOSSES = ("ns", "hinge", "wgan-gp")


# ---- loss terms ---------------------------------------------------------------------------


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """The adversarial part of D's loss from logits on real (B,) and fake (B,) data (no penalty)."""
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def generator_loss(kind: str, fake: Tensor) -> Tensor:
    """G's loss from D's logits on fake data (B,)."""
    if kind == "ns":
        return F.softplus(-fake).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def _grad_sq_norm(out: Tensor, x: Tensor) -> Tensor:
    """(B,) ||d out_b / d x_b||^2, differentiable (create_graph=True)."""
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return g.square().flatten(1).sum(1)


def r1_penalty(d: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(E||grad_x D(x)||^2 (scalar, differentiable), D(x) (B,)) for real data x.

    The caller weighs the penalty by gamma / 2; D(x) is returned so that the adversarial loss
    can reuse the same forward pass.
    """
    x = x.detach().requires_grad_(True)
    out = d(x)
    return _grad_sq_norm(out, x).mean(), out


def gradient_penalty(d: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP's E (||grad D(x_hat)|| - 1)^2, x_hat = e real + (1 - e) fake, e ~ U[0, 1] per example."""
    e = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype,
                   generator=generator)
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    norm = (_grad_sq_norm(d(x_hat), x_hat) + 1e-12).sqrt()  # eps: finite gradient at 0
    return (norm - 1).square().mean()


# ---- DiffAugment ----------------------------------------------------------------------------


def _translate(x: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Shift each image by a random integer (dy, dx) in [-r, r] (r = round(ratio * size)),
    filling with zeros. A gather: differentiable (the gradient is the reverse shift)."""
    b, _, h, w = x.shape
    ry, rx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-ry, ry + 1, (b, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(-rx, rx + 1, (b, 1, 1), device=x.device, generator=generator)
    iy = torch.arange(h, device=x.device).view(1, h, 1) - dy  # output (i, j) reads input (i - dy, j - dx)
    ix = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = ((iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)).unsqueeze(1)  # (B, 1, H, W)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    out = x.reshape(b, x.shape[1], h * w).gather(2, flat).view_as(x)
    return out * inside.to(x.dtype)


def _cutout(x: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Zero one random square of side round(ratio * size) per image (centre uniform over the
    image, the square clipped at the border): x times a 0/1 mask."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - sy % 2), (b, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - sx % 2), (b, 1, 1), device=x.device, generator=generator)
    y0, x0 = cy - sy // 2, cx - sx // 2
    iy = torch.arange(h, device=x.device).view(1, h, 1)
    ix = torch.arange(w, device=x.device).view(1, 1, w)
    cut = (iy >= y0) & (iy < y0 + sy) & (ix >= x0) & (ix < x0 + sx)
    return x * (~cut).unsqueeze(1).to(x.dtype)


def diff_augment(x: Tensor, policy: Sequence[str] = ("translation", "cutout"), *, translation: float = 0.125,
                 cutout: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """DiffAugment (Zhao et al. 2020) of images (B, C, H, W): the same shape, differentiable in x.

    ``policy``: "translation" (random integer shift of up to ``translation`` x size, zero
    fill) and/or "cutout" (a zeroed square of ``cutout`` x size), each drawn independently
    per image from ``generator`` (default: torch's global RNG). A size of 0 skips that transform.
    """
    if x.dim() != 4:
        raise ValueError(f"diff_augment needs images (B, C, H, W), got shape {tuple(x.shape)}")
    for p in policy:
        if p == "translation":
            x = _translate(x, translation, generator) if translation > 0 else x
        elif p == "cutout":
            x = _cutout(x, cutout, generator) if cutout > 0 else x
        else:
            raise ValueError(f"unknown DiffAugment policy {p!r}: 'translation' or 'cutout'")
    return x


# ---- networks ---------------------------------------------------------------------------------


class Generator(nn.Module):
    """(z (B, z_dim)[, labels (B,)]) -> (B, *shape) in the data's range.

    ``output``: "tanh" ((tanh(h) + 1) / 2, in [0, 1]), "sigmoid" or None (unbounded, for points).
    """

    def __init__(self, z_dim: int, shape: Sequence[int], *, num_classes: int | None = None, embed_dim: int = 0,
                 width: int = 32, hidden: int = 256, act: str = "relu", norm: str | None = "batch",
                 output: str | None = "tanh") -> None:
        super().__init__()
        if output not in ("tanh", "sigmoid", None):
            raise ValueError(f"output must be 'tanh', 'sigmoid' or None, got {output!r}")
        self.output = output
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.net = decoder(z_dim + (embed_dim if num_classes else 0), shape, width=width, hidden=hidden, act=act,
                           norm=norm)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: pass labels")
            z = torch.cat([z, self.embed(labels)], 1)
        h = self.net(z)
        if self.output == "tanh":
            return torch.tanh(h).add(1).mul(0.5)
        if self.output == "sigmoid":
            return torch.sigmoid(h)
        return h


class Discriminator(nn.Module):
    """(x (B, *shape) in the data's range[, labels (B,)]) -> (B,) logits.

    ``encoder(shape, 1, norm=None, act="lrelu")`` split into its features phi and its final
    linear head; images are mapped to [-1, 1] first. With ``num_classes``, a projection
    term <embed(y), phi(x)> is added. ``spectral``: spectral norm on every conv, linear and
    embedding weight.
    """

    def __init__(self, shape: Sequence[int], *, num_classes: int | None = None, width: int = 32,
                 hidden: int = 256, spectral: bool = True) -> None:
        super().__init__()
        self.image = is_image(shape)
        self.net = encoder(shape, 1, width=width, hidden=hidden, act="lrelu", norm=None)
        head = self.net.head if isinstance(self.net, ConvEncoder) else self.net[1][-1]
        self.embed = nn.Embedding(num_classes, head.in_features) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=head.in_features**-0.5)
        if spectral:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    _spectral_norm(m)

    def _phi_head(self) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
        if isinstance(self.net, ConvEncoder):
            return self.net.phi, self.net.head
        *body, head = [self.net[0], *self.net[1]]  # Flatten, then the MLP's layers

        def phi(x: Tensor) -> Tensor:
            for m in body:
                x = m(x)
            return x

        return phi, head

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.image:
            x = x * 2 - 1
        phi, head = self._phi_head()
        h = phi(x)
        out = head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            out = out + (self.embed(labels) * h).sum(1)
        return out


# ---- the model ----------------------------------------------------------------------------------


#: below this "fake_spread", G's batch is one image: a collapse (see GAN's max_loss)
COLLAPSE_SPREAD = 1e-6


class GAN(GenerativeModel, family="gan"):
    """A GAN for images (DCGAN-style conv nets) or vectors (MLPs); see the module docstring.

    Args:
        data_shape: one example's shape: (C, H, W) images in [0, 1] or (D,) vectors.
        z_dim: latent size.
        loss: "ns", "hinge" or "wgan-gp".
        n_dis: discriminator steps per generator step (the same real batch, fresh z).
        r1_gamma, r1_every: the R1 penalty's gamma (0: off) and its lazy interval (in D steps).
        gp_weight: the WGAN-GP penalty weight (loss="wgan-gp" only).
        spectral_norm: on every discriminator weight.
        diffaugment: DiffAugment translation + cutout before D (images only); ``cutout``,
            ``translation``: their sizes as fractions of the image size.
        num_classes: class-conditional (label embedding into G, projection discriminator).
        g_width, d_width: conv base widths; g_hidden, d_hidden: MLP widths (vectors).
        g_norm: the generator's conv norm (None, "group", "batch").
        output: the generator's output link: "tanh" or "sigmoid" (images; default "tanh"),
            None (vectors; default).
        ema_decay: the EMA of the generator used by :meth:`sample` (None: no EMA).
        lr_ratio: D's learning rate over G's (TTUR); betas: Adam's (both optimizers).
        max_loss: |D or G loss| above this raises :class:`pygen.train.TrainingDiverged`; so
            does a collapsed G, whose batch of fakes is one image (the logged "fake_spread",
            the per-value std over the batch averaged over values, below 1e-6).
        generator, discriminator: your own networks as import specs (:mod:`pygen.models.custom`):
            G(z (B, z_dim), labels (B,) or None) -> (B, *data_shape) in the data's range;
            D(x (B, *data_shape), labels or None) -> (B,) logits. Constructors get ``z_dim`` /
            ``shape`` / ``num_classes`` when they take them. The built-in options of the
            replaced network (widths, norms, spectral_norm for D) then do not apply.
    """

    default_lr = 2e-4
    #: both networks are frozen in turn, so each DDP forward leaves half the parameters unused
    ddp_find_unused_parameters = True

    #: ``pygen train gan``: benchmarks/quality/gan_digits.py's default, 4000 steps of 64 at lr 5e-4
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 4000, "batch_size": 64, "lr": 5e-4}
    #: on Fashion-MNIST (benchmarks/quality/fashion_mnist.py, a 2-core Intel Xeon): FD 5.08 after
    #: 4000 steps (12 minutes), 4.85 after 6574 (``--minutes 20``); so at most 8000, and the
    #: 20-minute cap binds on a 2-core CPU
    large_train: ClassVar[dict[str, Any]] = {"steps": 8000}
    ema_copies: ClassVar[tuple[str, ...]] = ("g_ema",)
    #: on a GPU: both networks twice as wide, batch 128, 20k steps (capped at 20 minutes);
    #: not yet measured on a GPU
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "gpu": {"train": {"steps": 20000, "batch_size": 128}, "model": {"g_width": 64, "d_width": 64}}}
    #: the constructor options :meth:`for_data` starts from (hinge loss, spectral norm, lazy R1
    #: 0.1 every 4, EMA 0.999, Adam betas (0, 0.99))
    data_defaults: ClassVar[dict[str, Any]] = {"z_dim": 32, "loss": "hinge", "n_dis": 1, "r1_gamma": 0.1,
                                               "r1_every": 4, "g_width": 32, "d_width": 32, "g_norm": "batch",
                                               "ema_decay": 0.999, "lr_ratio": 1.0, "betas": [0.0, 0.99]}

    @classmethod
    def for_data(cls, data: Any, *, conditional: bool | None = None, unconditional: bool = False,
                 width: int | None = None, **options: Any) -> GAN:
        """The default GAN for a :class:`pygen.data.Data` (:attr:`data_defaults`, ``options``
        overriding them); ``width``: both networks' conv width; ``conditional``: on the labels.
        By default (neither ``conditional`` nor ``unconditional``) labelled data of large
        examples (:meth:`is_large`: 28x28 images and up) trains class-conditional: on
        Fashion-MNIST in 20 minutes of a 2-core CPU, FD 2.42 against the unconditional GAN's
        4.85 (benchmarks/results/fashion-mnist-intel-xeon-2threads-20261207.json); the digits
        keep the unconditional GAN they were tuned with."""
        if conditional and unconditional:
            raise ValueError("conditional and unconditional: give one of them, not both")
        if conditional is None:
            conditional = not unconditional and getattr(data, "labels", None) is not None and cls.is_large(data)
        opts = {**cls.data_defaults, **options}
        if width is not None:
            opts["g_width"] = opts["d_width"] = width
        if conditional and "num_classes" not in options:
            opts["num_classes"] = num_classes_of(data)
        return cls(data.shape, **opts)

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        *,
        z_dim: int = 32,
        loss: str = "hinge",
        n_dis: int = 1,
        r1_gamma: float = 0.0,
        r1_every: int = 4,
        gp_weight: float = 10.0,
        spectral_norm: bool = True,
        diffaugment: bool = False,
        translation: float = 0.125,
        cutout: float = 0.5,
        num_classes: int | None = None,
        g_width: int = 32,
        d_width: int = 32,
        g_hidden: int = 256,
        d_hidden: int = 256,
        g_norm: str | None = "batch",
        output: str | None = "auto",
        ema_decay: float | None = 0.999,
        lr_ratio: float = 1.0,
        betas: Sequence[float] = (0.0, 0.99),
        max_loss: float = 1e4,
        generator: NetSpec | None = None,
        discriminator: NetSpec | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in data_shape)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not isinstance(n_dis, int) or n_dis < 1:
            raise ValueError(f"n_dis must be an int >= 1, got {n_dis!r}")
        if not isinstance(r1_every, int) or r1_every < 1:
            raise ValueError(f"r1_every must be an int >= 1, got {r1_every!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        image = is_image(shape)
        if diffaugment and not image:
            raise ValueError(f"diffaugment needs image data (C, H, W), got data_shape {shape}")
        if output == "auto":
            output = "tanh" if image else None
        self.config = {
            "data_shape": list(shape), "z_dim": z_dim, "loss": loss, "n_dis": n_dis, "r1_gamma": r1_gamma,
            "r1_every": r1_every, "gp_weight": gp_weight, "spectral_norm": spectral_norm,
            "diffaugment": diffaugment, "translation": translation, "cutout": cutout,
            "num_classes": num_classes, "g_width": g_width, "d_width": d_width, "g_hidden": g_hidden,
            "d_hidden": d_hidden, "g_norm": g_norm, "output": output, "ema_decay": ema_decay,
            "lr_ratio": lr_ratio, "betas": list(betas), "max_loss": max_loss,
        }  # fmt: skip
        self.data_shape, self.z_dim, self.kind, self.n_dis = shape, z_dim, loss, n_dis
        self.r1_gamma, self.r1_every, self.gp_weight = float(r1_gamma), r1_every, float(gp_weight)
        self.diffaugment, self.translation, self.cutout = diffaugment, translation, cutout
        self.num_classes, self.lr_ratio, self.betas = num_classes, float(lr_ratio), tuple(betas)
        self.g_ema_decay, self.max_loss = ema_decay, float(max_loss)
        self.ema_decay = None  # the trainer's whole-model EMA: not used, g_ema is ours (module docstring)

        embed = min(z_dim, 32) if num_classes else 0
        self.generator = Generator(z_dim, shape, num_classes=num_classes, embed_dim=embed, width=g_width,
                                   hidden=g_hidden, norm=g_norm, output=output)
        self.discriminator = Discriminator(shape, num_classes=num_classes, width=d_width, hidden=d_hidden,
                                           spectral=spectral_norm)
        for role, spec in (("generator", generator), ("discriminator", discriminator)):
            if spec is not None:  # the user's network, saved as its import spec (load rebuilds it)
                self.config[role] = normalize_spec(spec, role)
                known = {"shape": shape, "num_classes": num_classes} | ({"z_dim": z_dim} if role == "generator" else {})
                setattr(self, role, build_network(spec, role, **known))
        self.g_ema: Generator | None = None
        if ema_decay is not None:
            self.g_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        # the last lazily computed R1, logged between R1 steps: persistent, so a resumed run logs the same
        self.register_buffer("last_r1", torch.zeros(()))

    # ---- helpers ----------------------------------------------------------------------------
    def _split(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        return split_batch(batch, self.num_classes, "GAN")

    def _augment(self, x: Tensor) -> Tensor:
        if not self.diffaugment:
            return x
        return diff_augment(x, translation=self.translation, cutout=self.cutout)

    def _d(self, labels: Tensor | None) -> Callable[[Tensor], Tensor]:
        """x -> D(augment(x), labels): what every loss term sees."""
        return lambda x: self.discriminator(self._augment(x), labels)

    def _fake(self, n: int, labels: Tensor | None, like: Tensor) -> Tensor:
        z = torch.randn(n, self.z_dim, device=like.device, dtype=like.dtype)  # torch's RNG: seeded, checkpointed
        return self.generator(z, labels)

    @contextmanager
    def frozen(self, net: nn.Module) -> Iterator[None]:
        """``net.requires_grad_(False)`` inside the block; every parameter's flag restored after."""
        flags = [p.requires_grad for p in net.parameters()]
        net.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(net.parameters(), flags):
                p.requires_grad_(f)

    # ---- losses -------------------------------------------------------------------------------
    def loss(self, batch: Batch, *, phase: str | None = None, d_step: int = 0) -> dict[str, Tensor]:
        """Loss terms of a batch.

        phase="d": D's loss (adversarial + penalties): {"loss", "loss_d", "d_real", "d_fake",
        ["r1"], ["gp"]}; the R1 penalty when ``d_step % r1_every == 0`` (times r1_every).
        phase="g": G's loss {"loss", "loss_g", "d_fake"}.
        phase=None (evaluation): both adversarial losses, no penalties: {"loss" = loss_d +
        loss_g, "loss_d", "loss_g", "d_real", "d_fake"}.
        z is drawn first, from torch's RNG, then the augmentations and the interpolation weights.
        """
        x, labels = self._split(batch)
        d = self._d(labels)
        if phase == "g":
            fake = self._fake(x.shape[0], labels, x)
            fake_logits = d(fake)
            lg = generator_loss(self.kind, fake_logits)
            terms = {"loss": lg, "loss_g": lg.detach(), "d_fake": fake_logits.detach().mean()}
            if fake.shape[0] > 1:  # how different G's samples are: 0 when G has collapsed to one output
                terms["fake_spread"] = fake.detach().flatten(1).float().std(0).mean()
            return terms
        if phase not in ("d", None):
            raise ValueError(f"phase must be 'd', 'g' or None, got {phase!r}")
        fake = self._fake(x.shape[0], labels, x)
        lazy_r1 = phase == "d" and self.r1_gamma > 0 and d_step % self.r1_every == 0
        if lazy_r1:
            r1, real_logits = r1_penalty(d, x)
        else:
            real_logits = d(x)
        fake_logits = d(fake.detach())
        ld = discriminator_loss(self.kind, real_logits, fake_logits)
        terms = {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        if phase is None:
            lg = generator_loss(self.kind, fake_logits)
            return {"loss": ld + lg, "loss_d": ld, "loss_g": lg, **terms}
        total = ld
        if self.kind == "wgan-gp":
            gp = gradient_penalty(d, x, fake)
            total = total + self.gp_weight * gp
            terms["gp"] = gp.detach()
        if lazy_r1:
            total = total + (self.r1_gamma / 2 * self.r1_every) * r1
            self.last_r1 = r1.detach()
        if self.r1_gamma > 0:
            terms["r1"] = self.last_r1.clone()
        return {"loss": total, "loss_d": ld.detach(), **terms}

    # ---- training -----------------------------------------------------------------------------
    def configure_optimizers(self, lr: float | None = None) -> list[torch.optim.Optimizer]:
        """[Adam over D (lr x lr_ratio), Adam over G (lr)], betas from the config."""
        lr = self.default_lr if lr is None else lr
        return [
            torch.optim.Adam(self.discriminator.parameters(), lr=lr * self.lr_ratio, betas=self.betas),
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=self.betas),
        ]

    def _check(self, name: str, value: Tensor, step: int) -> bool:
        """False for a non-finite loss (the trainer stops on it); raises on an exploding one."""
        v = value.detach().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            v = v.clone()  # all ranks decide together: one raising alone would hang the others
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
        v = float(v)
        if not math.isfinite(v):
            return False
        if abs(v) > self.max_loss:
            raise TrainingDiverged(
                f"GAN training diverged at training step {step + 1}: |{name}| = {abs(v):.4g} > max_loss "
                f"{self.max_loss:g} (loss={self.kind})",
                step=step + 1,
                checkpoint=None,
            )
        return True

    def _check_spread(self, spread: Tensor, step: int) -> None:
        """Raise on a collapsed G (every fake of the batch the same image, on every rank):
        its losses can stay finite and moderate while it samples one constant image."""
        v = spread.detach().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            v = v.clone()
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
        if float(v) < COLLAPSE_SPREAD:
            raise TrainingDiverged(
                f"GAN training collapsed at training step {step + 1}: every generated sample of the batch is the "
                f"same (spread {float(v):.3g} < {COLLAPSE_SPREAD:g}); try a lower --lr",
                step=step + 1,
                checkpoint=None,
            )

    def discriminator_step(self, batch: Batch, step: int, optimizer: torch.optim.Optimizer, *,
                           update: Update | None = None) -> dict[str, Tensor]:
        """``n_dis`` D updates on ``batch`` with G frozen; the terms averaged over them.

        Returns NaN/inf terms without stepping as soon as a loss is non-finite.
        """
        update = Update() if update is None else update
        params = list(self.discriminator.parameters())
        sums: dict[str, Tensor] = {}
        self.generator.zero_grad(set_to_none=True)
        with self.frozen(self.generator):
            for i in range(self.n_dis):
                optimizer.zero_grad(set_to_none=True)
                terms = update.backward(self, batch, phase="d", d_step=step * self.n_dis + i)
                if not self._check("loss_d", terms["loss"], step):
                    return terms
                terms["grad_norm_d"] = update.step(optimizer, params)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v
        return {k: v / self.n_dis for k, v in sums.items()}

    def generator_step(self, batch: Batch, step: int, optimizer: torch.optim.Optimizer, *,
                       update: Update | None = None) -> dict[str, Tensor]:
        """One G update with D frozen, then the EMA update of G."""
        update = Update() if update is None else update
        self.discriminator.zero_grad(set_to_none=True)
        with self.frozen(self.discriminator):
            optimizer.zero_grad(set_to_none=True)
            terms = update.backward(self, batch, phase="g")
            if not self._check("loss_g", terms["loss"], step):
                return terms
            if "fake_spread" in terms:
                self._check_spread(terms["fake_spread"], step)
            terms["grad_norm_g"] = update.step(optimizer, list(self.generator.parameters()))
        self.update_ema(step)
        return terms

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """g_ema <- beta g_ema + (1 - beta) G, beta = min(ema_decay, (1 + step) / (10 + step))
        (the ramp forgets the initial weights early); buffers (batch-norm statistics) copied."""
        if self.g_ema is None:
            return
        beta = min(self.g_ema_decay, (1 + step) / (10 + step))
        ema_p, p = list(self.g_ema.parameters()), list(self.generator.parameters())
        torch._foreach_lerp_(ema_p, [q.detach() for q in p], 1 - beta)
        for be, b in zip(self.g_ema.buffers(), self.generator.buffers()):
            be.copy_(b)

    def training_step(self, batch: Batch, step: int, optimizers: Sequence[torch.optim.Optimizer], *,
                      update: Update | None = None) -> dict[str, Tensor]:
        """``n_dis`` D steps, one G step, the EMA update. ``optimizers`` = [D's, G's].

        Returns the detached terms: "loss" (D's loss with its penalties + G's loss: NaN if
        either is), "loss_d" (D's adversarial loss), "loss_g", "d_real", "d_fake" (D's mean
        logits on the real and fake batches of the D steps, averaged over them), "d_fake_g"
        (on the G step's fakes), "fake_spread" (how different the G step's fakes are; below
        1e-6, a collapse, raises), "grad_norm_d", "grad_norm_g" (total norms before clipping),
        "r1" (the last lazily computed value) / "gp" where used. A non-finite D loss skips the
        G step and returns "loss" NaN; an exploding one (|loss| > max_loss) raises.
        """
        opt_d, opt_g = optimizers
        out = self.discriminator_step(batch, step, opt_d, update=update)
        if torch.isfinite(out["loss"]):
            g = self.generator_step(batch, step, opt_g, update=update)
        else:  # the trainer stops on the NaN: no G step on a broken D
            g = {"loss": torch.full_like(out["loss"], math.nan)}
        out["loss"] = out["loss"] + g.pop("loss")
        g["d_fake_g"] = g.pop("d_fake", None)
        return {**out, **{k: v for k, v in g.items() if v is not None}}

    @torch.no_grad()
    def evaluate_step(self, batch: Batch) -> dict[str, Tensor]:
        return self.loss(batch)

    # ---- sampling -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        # checkpoints of pygen <= 0.x kept last_r1 out of the state dict: start those at 0
        state_dict.setdefault(prefix + "last_r1", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @sampling
    def sample(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, offset: int = 0,
               labels: Tensor | int | None = None, ema: bool | None = None) -> Tensor:
        """(n, *data_shape) samples in the data's range, from the EMA generator when there is one
        (``ema=False``: the trained generator; None: :meth:`use_ema`'s choice, the EMA by
        default), in eval mode.

        z of sample i is ``pygen.ops.randn`` at stream positions [(offset + i) z_dim, (offset +
        i + 1) z_dim) of ``seed``; random labels (conditional GAN, ``labels=None``) come from
        a derived seed by the same rule: sample i depends on (seed, offset + i) only.
        """
        net = self.pick_ema(ema, self.g_ema, self.generator, "GAN keeps no EMA generator")
        p = next(self.generator.parameters())
        s = resolve_seed(seed, generator)
        z = randn(n, self.z_dim, seed=s, offset=offset * self.z_dim, device=p.device, dtype=p.dtype)
        y = sample_labels(labels, n, self.num_classes, seed=s, offset=offset, device=p.device, owner="GAN")
        return net(z, y)

    def train(self, mode: bool = True) -> GAN:
        super().train(mode)
        if self.g_ema is not None:
            self.g_ema.eval()  # never trained: batch-norm statistics stay the copied ones
        return self

"""Variational autoencoders: :class:`VAE` (optionally conditional on a class label).

Q(z|X) = N(mu(X), diag e^logvar(X)) from an encoder (:func:`pygen.models.networks.encoder`:
conv for (C, H, W) images, MLP for vectors), z drawn through
:class:`pygen.nn.GaussianReparameterize` (the fused reparameterize + KL kernel: what trains),
P(X|z) from a decoder (:func:`~pygen.models.networks.decoder`), prior P(z) = N(0, I).

Likelihoods (``likelihood=``):

- ``"bernoulli"``: the decoder emits logits; -log P(x|z) = sum BCE-with-logits (data in [0, 1]).
- ``"gaussian"``: N(x; m(z), gamma^2 I) with a decoder standard deviation gamma that is
  ``gamma="fixed"`` (``gamma_init``), ``"learned"`` (a scalar parameter log gamma, Dai &
  Wipf 2019) or ``"running"`` (Asperti & Trentin 2020: gamma^2 is a running MSE, updated
  after each training batch as ``mse <- min(mse, 0.99 mse + 0.01 mse_batch)`` with no
  gradient; a buffer, so it is saved in the state dict). -log P(x|z) = ||x - m||^2 /
  (2 gamma^2) + D log gamma + D/2 log 2 pi. The mean m is sigmoid-squashed for images
  (``output="auto"``), unbounded for vectors.

All likelihood numbers are per example in nats: sums over the data dims, averaged over the
batch.

The remedies of the four classic VAE problems are switches of the constructor (the
measurements live in :mod:`pygen.metrics.vae`):

1. reconstruction vs KL balance: ``beta``, ``kl_warmup_steps`` (the KL weight rises
   linearly from 0 at step 0 to ``beta`` at step ``kl_warmup_steps``; the trainer's
   ``training_step`` tells the model its step), ``gamma="running"``;
2. variable collapse: ``free_bits`` (lambda per latent dimension: the KL term is
   sum_u max(lambda, mean over the batch of KL_u)) and the warm-up;
3. aggregate posterior vs prior mismatch: :meth:`VAE.fit_second_stage` fits a Gaussian mixture
   or a small NSF flow to Q(z) after training; :meth:`VAE.sample` then draws latents from it;
4. blurriness: :meth:`VAE.calibrate_variance` sets one stored factor by which
   :meth:`VAE.sample` then rescales each generated image's deviation from its own mean, so
   that the average per-image variance of the samples matches the data's.

The post-hoc stages of 3 and 4 live in :mod:`pygen.models.vae_stages`; ``post_hoc=True``
(the default of :meth:`VAE.for_data`, so of ``pygen train vae``) fits both when training
ends.

Samples depend on (seed, index) only: the latent of sample i is pygen's Philox stream at
positions [(offset + i) D, (offset + i + 1) D); a mixture's component choice and random
labels of a conditional model read derived seeds with the offset rule (one position per
sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pygen.models.base import GenerativeModel
from pygen.models.flow import Flow
from pygen.models.inference import sampling
from pygen.models.labels import Batch, num_classes_of, one_hot, sample_labels, split_batch
from pygen.models.custom import NetSpec, build_network, normalize_spec
from pygen.models.networks import decoder as build_decoder, encoder as build_encoder, is_image
from pygen.models.seeding import resolve_seed
from pygen.models.vae_stages import PostHocStages
from pygen.nn.gaussian import GaussianReparameterize
from pygen.ops.gaussian import gaussian_kl, randn

__all__ = ["VAE", "LIKELIHOODS", "GAMMAS"]

LIKELIHOODS = ("bernoulli", "gaussian")
GAMMAS = ("fixed", "learned", "running")
_LOG_2PI = math.log(2 * math.pi)
# elements of a chunk of importance samples (k_chunk * B * data numel) in log_likelihood
_IWAE_CHUNK_ELEMENTS = 1 << 22


class VAE(PostHocStages, GenerativeModel, family="vae"):
    """A VAE with Bernoulli or Gaussian likelihood (see the module docstring).

    Args:
        data_shape: one example's shape: (C, H, W) images (H = W a power of two >= 4) or (D,).
        latent_dim: D, the number of latent variables.
        likelihood: "bernoulli" (data in [0, 1]) or "gaussian".
        gamma: the Gaussian decoder's standard deviation: "fixed", "learned" or "running".
        gamma_init: gamma's value ("fixed"), initial value ("learned"), or sqrt of the
            initial running MSE ("running").
        output: the Gaussian mean's link: "auto" (sigmoid for images, identity for vectors),
            "sigmoid" or "identity".
        network: "auto" (conv for images, MLP for vectors), "conv" or "mlp".
        width, hidden, act, norm: passed to :func:`~pygen.models.networks.encoder` /
            ``decoder`` (conv base width, MLP width, activation, conv normalisation).
        num_classes: condition on one-hot labels (concatenated to the encoder input as
            constant channels / features, and to the decoder's latent); batches are
            (x, labels).
        beta: the KL weight after warm-up.
        kl_warmup_steps: linear KL warm-up from 0 to ``beta`` over this many steps (0: none).
        free_bits: lambda, the per-dimension KL floor in nats (0: none).
        logvar_range: optional (low, high) clamp of the encoder's logvar.
        ema_decay: the trainer keeps an EMA of the weights with this decay when set.
        second_stage: set by :meth:`fit_second_stage` (``{"kind": "gmm", "components": K}``
            or ``{"kind": "flow", ...flow kwargs}``) so that :func:`pygen.models.load`
            rebuilds it; leave None when constructing.
        post_hoc: when training ends (:func:`pygen.train.fit`), fit the second stage (a
            Gaussian mixture on Q(z)) and calibrate the variance (:meth:`fit_post_hoc`);
            :meth:`for_data` (``pygen train vae``) turns it on.
        encoder, decoder: your own networks as import specs (:mod:`pygen.models.custom`). The
            encoder maps what the built-in one gets — images (B, C + num_classes, H, W) with
            network "conv"/"auto" (one-hot labels as constant channels), else flattened
            (B, D + num_classes) — to (B, 2 latent_dim) (mu, then logvar); the decoder maps
            (B, latent_dim + num_classes) to B x prod(data_shape) values (reshaped): logits
            (Bernoulli) or the mean before the output link. Constructors get ``shape`` /
            ``latent_dim`` / ``num_classes`` when they take them.
    """

    default_lr = 1e-3
    #: ``pygen train vae``: benchmarks/quality/vae_digits.py's "gaussian-running" VAE (MLP, 16 latents,
    #: running-MSE decoder variance), 2000 steps of 128 at lr 2e-3: FD 5.0 vs the Gaussian bar's
    #: 14.85 on the digits, ~95 s on one thread
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 128, "lr": 2e-3}
    #: measured on Fashion-MNIST (FD with the post-hoc stages, 2000 samples, floor 0.317): 256 wide,
    #: 16 latents, 2000 steps 14.5; 512 wide, 32 latents, 10000 steps 7.4, 25000 steps 6.7 (a 2-core
    #: AMD EPYC, 10 minutes); with a 50-component second stage on a 2-core Intel Xeon, 25000 steps
    #: 4.92 (5 minutes), 112042 steps 4.28 (``--minutes 20``); so at most 120000, and the
    #: 20-minute cap binds on a 2-core CPU. On its 8000-image subset (10 components) 2500 steps
    #: 9.3, 10000 steps 5.7, 15729 steps 5.4 (floor 0.396).
    large_model: ClassVar[dict[str, Any]] = {"hidden": 512, "latent_dim": 32}
    large_train: ClassVar[dict[str, Any]] = {"steps": 120000}
    #: on a GPU: twice the CPU's widest and longest, batch 256 (capped at 20 minutes); not yet
    #: measured on a GPU
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "gpu": {"train": {"steps": 50000, "batch_size": 256}, "model": {"hidden": 1024}}}
    #: the constructor options :meth:`for_data` starts from
    #: (logvar_range: without it, a 512-wide VAE diverged near step 3100 on Fashion-MNIST, one
    #: example's logvar jumping from 0.3 to 54 in a step and the gradients overflowing; a
    #: posterior wider than e^2 times the prior's carries nothing)
    data_defaults: ClassVar[dict[str, Any]] = {"latent_dim": 16, "likelihood": "gaussian", "gamma": "running",
                                               "network": "mlp", "hidden": 256, "logvar_range": [-20.0, 4.0],
                                               "post_hoc": True}

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 8, 8),
        latent_dim: int = 16,
        *,
        likelihood: str = "bernoulli",
        gamma: str = "fixed",
        gamma_init: float = 1.0,
        output: str = "auto",
        network: str = "auto",
        width: int = 32,
        hidden: int = 256,
        act: str = "silu",
        norm: str | None = "group",
        num_classes: int | None = None,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        logvar_range: Sequence[float] | None = None,
        ema_decay: float | None = None,
        second_stage: dict[str, Any] | None = None,
        post_hoc: bool = False,
        encoder: NetSpec | None = None,
        decoder: NetSpec | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in data_shape)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if gamma not in GAMMAS:
            raise ValueError(f"gamma must be one of {GAMMAS}, got {gamma!r}")
        if not gamma_init > 0:
            raise ValueError(f"gamma_init must be > 0, got {gamma_init}")
        if output not in ("auto", "sigmoid", "identity"):
            raise ValueError(f"output must be 'auto', 'sigmoid' or 'identity', got {output!r}")
        if network not in ("auto", "conv", "mlp"):
            raise ValueError(f"network must be 'auto', 'conv' or 'mlp', got {network!r}")
        if network == "conv" and not is_image(shape):
            raise ValueError(f"network='conv' needs (C, H, W) data, got data_shape {shape}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if beta < 0 or free_bits < 0 or kl_warmup_steps < 0:
            raise ValueError("beta, free_bits and kl_warmup_steps must be >= 0")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
        self.config = {
            "data_shape": list(shape), "latent_dim": latent_dim, "likelihood": likelihood, "gamma": gamma,
            "gamma_init": float(gamma_init), "output": output, "network": network, "width": width,
            "hidden": hidden, "act": act, "norm": norm, "num_classes": num_classes, "beta": float(beta),
            "kl_warmup_steps": int(kl_warmup_steps), "free_bits": float(free_bits),
            "logvar_range": list(logvar_range) if logvar_range is not None else None,
            "ema_decay": ema_decay, "second_stage": None, "post_hoc": bool(post_hoc),
        }  # fmt: skip
        self.data_shape, self.latent_dim, self.likelihood, self.gamma_mode = shape, latent_dim, likelihood, gamma
        self.num_classes, self.beta, self.kl_warmup_steps = num_classes, float(beta), int(kl_warmup_steps)
        self.free_bits, self.ema_decay = float(free_bits), ema_decay
        self.image = is_image(shape)
        self.sigmoid_mean = output == "sigmoid" or (output == "auto" and self.image)
        self.step: int | None = None  # the trainer's step (training_step sets it): drives the warm-up

        k = num_classes or 0
        conv = self.image and network != "mlp"
        kw = dict(width=width, hidden=hidden, act=act, norm=norm)
        if conv:
            enc_shape: tuple[int, ...] = (shape[0] + k, *shape[1:])
        else:  # flattened (MLP); labels appended as features
            enc_shape = (math.prod(shape) + k,)
        self._conv = conv
        user = {"encoder": encoder, "decoder": decoder}
        self.encoder = build_encoder(enc_shape, 2 * latent_dim, **kw)
        self.decoder = build_decoder(latent_dim + k, shape if conv else (math.prod(shape),), **kw)
        for role, spec in user.items():
            if spec is not None:  # the user's network, saved as its import spec (load rebuilds it)
                self.config[role] = normalize_spec(spec, role)
                setattr(self, role, build_network(spec, role, shape=shape, latent_dim=latent_dim,
                                                  num_classes=num_classes))
        self.reparam = GaussianReparameterize(logvar_range=tuple(logvar_range) if logvar_range is not None else None)

        if likelihood == "gaussian" and gamma == "learned":
            self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma_init)))
        if likelihood == "gaussian" and gamma == "running":
            self.register_buffer("running_mse", torch.tensor(float(gamma_init) ** 2))
        # variance renormalisation factor of generated images (calibrate_variance sets it)
        self.register_buffer("var_scale", torch.tensor(1.0))
        self.prior_flow: Flow | None = None
        if second_stage is not None:
            self._build_second_stage(dict(second_stage))

    @classmethod
    def for_data(cls, data: Any, *, conditional: bool = False, **options: Any) -> VAE:
        """The default VAE for a :class:`pygen.data.Data` (:attr:`data_defaults`, and
        :attr:`large_model` for large examples (:meth:`is_large`),
        ``options`` overriding them); ``conditional``: on the data's labels."""
        opts = {**cls.data_defaults, **(cls.large_model if cls.is_large(data) else {}), **options}
        if conditional:
            opts["num_classes"] = num_classes_of(data)
        return cls(data.shape, **opts)

    # ---- helpers ----------------------------------------------------------------------
    def _split(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        return split_batch(batch, self.num_classes, "VAE")

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def _onehot(self, labels: Tensor | int | None, n: int) -> Tensor | None:
        """(n, num_classes) one-hot labels, or None for an unconditional model."""
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError(f"this VAE is conditional (num_classes={self.num_classes}): pass labels")
        device, dtype = self._device_dtype()
        labels = sample_labels(labels, n, self.num_classes, seed=0, device=device, owner="VAE")
        return one_hot(labels, self.num_classes, dtype)

    def _check_x(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"expected x of shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")

    # ---- encoder / decoder --------------------------------------------------------------
    def _encoder_params(self, x: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """(B, 2D) encoder output (mu first, then logvar)."""
        self._check_x(x)
        onehot = self._onehot(labels, x.shape[0])
        if self._conv:
            h = x
            if onehot is not None:
                h = torch.cat([h, onehot[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        else:
            h = x.flatten(1)
            if onehot is not None:
                h = torch.cat([h, onehot], 1)
        return self.encoder(h)

    def encode(self, x: Tensor, labels: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """x (B, *data_shape) -> (mu, logvar), each (B, latent_dim): Q(z|x)'s parameters."""
        mu, logvar = self._encoder_params(x, labels).chunk(2, dim=1)
        if self.reparam.logvar_range is not None:
            logvar = logvar.clamp(*self.reparam.logvar_range)
        return mu, logvar

    def decoder_output(self, z: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """z (B, D) -> the decoder's raw output (B, *data_shape): logits (Bernoulli) or the
        mean before its link (Gaussian)."""
        onehot = self._onehot(labels, z.shape[0])
        h = z if onehot is None else torch.cat([z, onehot.to(z.dtype)], 1)
        return self.decoder(h).reshape(z.shape[0], *self.data_shape)

    def _mean(self, out: Tensor) -> Tensor:
        if self.likelihood == "bernoulli" or self.sigmoid_mean:
            return torch.sigmoid(out)
        return out

    def decode(self, z: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """z (B, D) -> the mean of P(x|z) in data space, (B, *data_shape)."""
        return self._mean(self.decoder_output(z, labels))

    # ---- likelihood ---------------------------------------------------------------------
    def gamma(self) -> Tensor:
        """The Gaussian decoder's standard deviation gamma (a 0-dim tensor; learned: with grad)."""
        if self.likelihood != "gaussian":
            raise ValueError("gamma belongs to the Gaussian likelihood")
        if self.gamma_mode == "learned":
            return self.log_gamma.exp()
        if self.gamma_mode == "running":
            return self.running_mse.sqrt()
        return torch.tensor(self.config["gamma_init"], device=self.var_scale.device)

    def _log_gamma(self) -> Tensor:
        if self.gamma_mode == "learned":
            return self.log_gamma
        return self.gamma().log()

    def reconstruction_nll(self, x: Tensor, out: Tensor) -> Tensor:
        """-log P(x|z) per example (B,) in nats, from the decoder's raw output ``out``."""
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        d = x[0].numel()
        sq = (x - self._mean(out)).pow(2).flatten(1).sum(1)
        log_g = self._log_gamma()
        return 0.5 * sq * torch.exp(-2 * log_g) + d * log_g + 0.5 * d * _LOG_2PI

    def kl_weight(self, step: int | None = None) -> float:
        """The KL weight in use at ``step`` (None: the model's ``step``; unset: after warm-up, ``beta``)."""
        step = self.step if step is None else step
        if self.kl_warmup_steps <= 0 or step is None:
            return self.beta
        return self.beta * min(1.0, max(int(step), 0) / self.kl_warmup_steps)

    # ---- the interface ----------------------------------------------------------------
    def training_step(self, batch: Batch, step: int, optimizers, **kwargs: Any) -> dict[str, Tensor]:
        """The default update, after telling the model its (0-based) step for the KL warm-up."""
        self.step = int(step)
        return super().training_step(batch, step, optimizers, **kwargs)

    def loss(self, batch: Batch, step: int | None = None) -> dict[str, Tensor]:
        """batch: x or (x, labels) -> {"loss", "recon", "kl", "kl_term", "elbo", "mse", "beta",
        "kl_weight"[, "gamma"]}, per-example sums averaged over the batch (nats).

        loss = recon + kl_weight * kl_term, where recon = -log P(x|z) (z ~ Q(z|x), one draw),
        kl = KL(Q(z|x) || N(0, I)) and kl_term = kl, or with free bits sum_u max(lambda,
        mean_batch KL_u). In training mode a running gamma is updated after the terms are
        computed (the batch sees the gamma from before its own update).
        """
        x, labels = self._split(batch)
        # a data-dependent check: eager only (torch.compile(fullgraph=True) cannot branch on it)
        if self.likelihood == "bernoulli" and not torch.compiler.is_compiling() and bool((x.min() < 0) | (x.max() > 1)):
            raise ValueError("the Bernoulli likelihood needs x in [0, 1]")
        mu, logvar = self._encoder_params(x, labels).chunk(2, dim=1)
        b, d = mu.shape
        if self.free_bits > 0:
            # one element per "sample": the fused op returns the per-dimension KL (B * D,)
            # with the same noise counters as the (B, D) layout
            z, kl_u = self.reparam(mu.reshape(-1, 1), logvar.reshape(-1, 1))
            z, kl_u = z.reshape(b, d), kl_u.reshape(b, d)
            kl = kl_u.sum(1)
            kl_term = kl_u.mean(0).clamp_min(self.free_bits).sum()
        else:
            z, kl = self.reparam(mu, logvar)
            kl_term = kl.mean()
        out = self.decoder_output(z, labels)
        nll = self.reconstruction_nll(x, out)
        recon = nll.mean()
        weight = self.kl_weight(step)
        with torch.no_grad():
            mse = (x - self._mean(out)).pow(2).mean()
        terms = {
            "loss": recon + weight * kl_term,
            "recon": recon,
            "kl": kl.mean(),
            "kl_term": kl_term,
            "elbo": -(nll + kl).mean().detach(),
            "mse": mse,
            "beta": torch.tensor(self.beta),
            "kl_weight": torch.tensor(float(weight)),
        }
        if self.likelihood == "gaussian":
            terms["gamma"] = self.gamma().detach()
            if self.gamma_mode == "running" and self.training:
                self.update_running_mse(mse)
        return terms

    @torch.no_grad()
    def update_running_mse(self, mse_batch: Tensor | float) -> None:
        """Asperti & Trentin's rule: mse <- min(mse, 0.99 mse + 0.01 mse_batch) (no gradient)."""
        m = self.running_mse
        m.copy_(torch.minimum(m, 0.99 * m + 0.01 * torch.as_tensor(mse_batch, dtype=m.dtype, device=m.device)))

    @torch.no_grad()
    def evaluate_step(self, batch: Batch) -> dict[str, Tensor]:
        return self.loss(batch)

    def elbo(
        self, x: Tensor, labels: Tensor | int | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B,) the evidence lower bound log P(x|z) - KL(Q(z|x) || P(z)) in nats, one z ~ Q(z|x)
        (the KL in closed form). No gradient is taken away: wrap in no_grad to evaluate."""
        mu, logvar = self.encode(x, labels)
        eps = randn(*mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        return -(self.reconstruction_nll(x, self.decoder_output(z, labels)) + gaussian_kl(mu, logvar))

    @torch.no_grad()
    def log_likelihood(
        self, x: Tensor, k: int = 100, labels: Tensor | int | None = None, *, seed: int | None = None,
        generator: torch.Generator | None = None, offset: int = 0,
    ) -> Tensor:  # fmt: skip
        """(B,) the importance-weighted bound log (1/k) sum_j P(x, z_j) / Q(z_j|x), z_j ~ Q(z|x)
        (Burda et al.'s IWAE bound) in nats.

        A lower bound on log P(x) that equals the ELBO at k = 1 in expectation and rises with
        k. Draw j of example i reads pygen's Philox stream of ``seed`` (else one drawn from
        ``generator`` / torch's generator) at positions [((offset + i) k + j) D, ... + D): the
        result for an example depends on (seed, offset + i, k) only, not on the batch size or
        on how the draws are chunked (about 4M data elements at a time, so memory stays
        bounded for any k). A conditional model needs ``labels`` (an int or (B,)).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = resolve_seed(seed, generator)
        mu, logvar = self.encode(x, labels)
        b, d = mu.shape
        lab = sample_labels(labels, b, self.num_classes, seed=0, device=mu.device, owner="VAE")
        per = max(1, k * x[0].numel())  # data elements of one example's k draws
        rows = max(1, _IWAE_CHUNK_ELEMENTS // per)  # examples per chunk, all k draws at once
        draws = k if rows > 1 else max(1, _IWAE_CHUNK_ELEMENTS // max(1, x[0].numel()))  # else chunk the draws
        out = []
        for i0 in range(0, b, rows):
            i1 = min(b, i0 + rows)
            eps_all = randn(i1 - i0, k, d, seed=s, offset=(offset + i0) * k * d, device=mu.device, dtype=mu.dtype)
            parts = []
            for j in range(0, k, draws):
                eps = eps_all[:, j : j + draws]  # (m, kc, D)
                m, kc = eps.shape[:2]
                z = mu[i0:i1, None] + torch.exp(0.5 * logvar[i0:i1, None]) * eps
                xr = x[i0:i1, None].expand(m, kc, *x.shape[1:]).reshape(m * kc, *x.shape[1:])
                lab_k = None if lab is None else lab[i0:i1, None].expand(m, kc).reshape(-1)
                log_px = -self.reconstruction_nll(xr, self.decoder_output(z.reshape(m * kc, d), lab_k)).reshape(m, kc)
                log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)
                log_qz = -0.5 * (eps.pow(2) + _LOG_2PI + logvar[i0:i1, None]).sum(-1)
                parts.append(log_px + log_pz - log_qz)
            logw = torch.cat(parts, 1).double()  # (m, k)
            # logmeanexp (pygen.metrics.logmeanexp; not imported: models sit below metrics)
            out.append(torch.logsumexp(logw, 1) - math.log(k))
        return torch.cat(out).to(mu.dtype) if out else mu.new_zeros(0)

    # ---- sampling ---------------------------------------------------------------------
    def latents(
        self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, offset: int = 0,
        second_stage: bool | None = None,
    ) -> Tensor:  # fmt: skip
        """(n, D) latents of samples offset .. offset + n - 1: from the second stage when it is
        fitted (and ``second_stage`` is not False), else from the prior N(0, I)."""
        s = resolve_seed(seed, generator)
        device, dtype = self._device_dtype()
        kind = (self.config["second_stage"] or {}).get("kind")
        if second_stage is None:
            second_stage = kind is not None
        if second_stage and kind is None:
            raise ValueError("no second stage fitted: call fit_second_stage first")
        d = self.latent_dim
        if not second_stage:
            return randn(n, d, seed=s, offset=offset * d, device=device, dtype=dtype)
        return self.second_stage_latents(n, seed=s, offset=offset)

    @sampling
    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        offset: int = 0,
        labels: Tensor | int | None = None,
        second_stage: bool | None = None,
        renormalize: bool | None = None,
    ) -> Tensor:
        """(n, *data_shape) decoded means of latents drawn from the second stage when fitted
        (``second_stage=False``: the prior N(0, I)); sample i depends on (seed, offset + i)
        only (up to the network's float rounding at different batch sizes).

        A conditional model samples class ``labels`` (an int or (n,)), or, when None, labels
        drawn uniformly from a derived stream with the same offset rule. ``renormalize``
        rescales each image's deviation from its own mean by the calibrated factor
        (:meth:`calibrate_variance`) and clamps to [0, 1]; None: when a factor was
        calibrated (it is not 1).
        """
        s = resolve_seed(seed, generator)
        z = self.latents(n, seed=s, offset=offset, second_stage=second_stage)
        labels = sample_labels(labels, n, self.num_classes, seed=s, offset=offset, device=z.device, owner="VAE")
        x = self.decode(z, labels)
        if renormalize is None:
            renormalize = bool(self.var_scale != 1)
        return self.renormalize_variance(x) if renormalize else x

    @sampling
    def reconstruct(self, x: Tensor, labels: Tensor | int | None = None) -> Tensor:
        """The decoded posterior mean: decode(mu(x)), (B, *data_shape)."""
        mu, _ = self.encode(x, labels)
        return self.decode(mu, labels)

    @sampling
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8, labels: Tensor | int | None = None) -> Tensor:
        """Decodes of the straight line between the posterior means of x1 and x2.

        x1, x2: one example (*data_shape) -> (steps, *data_shape); or (B, *data_shape) ->
        (B, steps, *data_shape). The end points are the reconstructions of x1 and x2.
        """
        single = x1.dim() == len(self.data_shape)
        if single:
            x1, x2 = x1.unsqueeze(0), x2.unsqueeze(0)
        b = x1.shape[0]
        lab = None
        if labels is not None:
            lab = torch.as_tensor(labels, device=x1.device).long().reshape(-1).expand(b)
        mu, _ = self.encode(torch.cat([x1, x2]), None if lab is None else lab.repeat(2))
        t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype).reshape(1, steps, 1)
        z = (mu[:b, None] * (1 - t) + mu[b:, None] * t).reshape(b * steps, -1)
        out = self.decode(z, None if lab is None else lab.repeat_interleave(steps)).reshape(b, steps, *self.data_shape)
        return out[0] if single else out


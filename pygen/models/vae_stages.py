"""A trained VAE's post-hoc stages (:class:`PostHocStages`, a base of :class:`pygen.models.VAE`):

- the second stage (Dai & Wipf 2019; Ghosh et al. 2020): a density fitted to the aggregate
  posterior Q(z) = E_x Q(z|x) after training, a Gaussian mixture (scikit-learn) or a small
  NSF flow, from which :meth:`~pygen.models.VAE.sample` then draws latents instead of the
  prior N(0, I): the remedy for the mismatch between Q(z) and the prior;
- variance renormalisation: one stored factor that rescales each generated image's
  deviation from its own mean so that the samples' average per-image variance matches the
  data's: the remedy for blurry samples.

Both are buffers or submodules of the model (saved in its state dict; the second stage's
kind in its config, so that :func:`pygen.models.load` rebuilds it). A VAE built with
``post_hoc=True`` (what :meth:`~pygen.models.VAE.for_data`, hence ``pygen train vae``,
builds) fits both when training ends (:meth:`PostHocStages.fit_post_hoc`, called by
:func:`pygen.train.fit`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from pygen.data.loader import as_tensors
from pygen.data.storage import materialize
from pygen.models.flow import Flow
from pygen.models.inference import eval_mode
from pygen.models.seeding import Stream, counter_uniform, derive_seed
from pygen.ops.gaussian import randn

__all__ = ["PostHocStages"]


class PostHocStages:
    """The second stage on Q(z) and the variance calibration of a VAE (methods of :class:`pygen.models.VAE`)."""

    def second_stage_latents(self, n: int, *, seed: int, offset: int = 0) -> Tensor:
        """(n, D) latents of samples offset .. offset + n - 1 from the fitted second stage; latent
        i depends on (seed, offset + i) only (a mixture's component from a derived stream)."""
        device, dtype = self._device_dtype()
        d = self.latent_dim
        if self.config["second_stage"]["kind"] == "flow":
            return self.prior_flow.sample(n, seed=seed, offset=offset)
        # a Gaussian mixture: component from a uniform of a derived stream, then mean + L eps
        u = counter_uniform(n, seed=derive_seed(seed, Stream.MIXTURE), offset=offset, device=device)
        cdf = self.gmm_weights.double().cumsum(0)
        comp = torch.searchsorted(cdf / cdf[-1], u).clamp_(max=len(cdf) - 1)
        eps = randn(n, d, seed=seed, offset=offset * d, device=device, dtype=dtype)
        return self.gmm_means[comp] + torch.einsum("nij,nj->ni", self.gmm_chol[comp], eps)

    def renormalize_variance(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """x' = m + scale (x - m), m each image's own mean (scale: the calibrated factor by
        default); clamped to [0, 1] for images."""
        scale = self.var_scale if scale is None else scale
        m = x.flatten(1).mean(1).reshape(-1, *([1] * (x.dim() - 1)))
        y = m + scale * (x - m)
        return y.clamp(0, 1) if self.image else y

    @torch.no_grad()
    def calibrate_variance(
        self, data: Any, *, n: int | None = None, seed: int = 0, second_stage: bool | None = None,
        batch_size: int = 500,
    ) -> float:  # fmt: skip
        """Set the renormalisation factor so that the mean per-image variance of ``n`` samples
        (default len(data); ``seed``; the sampler ``second_stage`` selects) after
        :meth:`renormalize_variance` equals that of ``data``: sqrt of the variance ratio for
        vectors; for images found by bisection, so that the clamp to [0, 1] is accounted for.
        Returns the factor. Calibrate again after :meth:`fit_second_stage`."""
        x, _ = as_tensors(data)
        n = len(x) if n is None else n
        target = float(x.flatten(1).double().var(1, unbiased=False).mean())
        gen = torch.cat([
            self.sample(min(batch_size, n - i), seed=seed, offset=i, second_stage=second_stage, renormalize=False)
            for i in range(0, n, batch_size)
        ]).double()  # fmt: skip

        def var(scale: float) -> float:
            return float(self.renormalize_variance(gen, scale).flatten(1).var(1, unbiased=False).mean())

        scale = math.sqrt(target / max(var(1.0), 1e-300))
        if self.image:  # the clamp lowers the variance: bisect var(s) = target on [0, hi]
            lo, hi = 0.0, max(1.0, scale)
            while var(hi) < target and hi < 1e6:
                lo, hi = hi, 2 * hi
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if var(mid) < target else (lo, mid)
            scale = 0.5 * (lo + hi)
        self.var_scale.fill_(scale)
        return scale

    def fit_post_hoc(self, data: Any, *, max_examples: int = 20000, components: int | None = None,
                     seed: int = 0) -> str | None:
        """With ``post_hoc=True``: :meth:`fit_second_stage` (a ``components``-Gaussian
        mixture on about 20,000 draws z ~ Q(z|x), up to 4 per example: EM's time grows with
        them) and :meth:`calibrate_variance` (10,000 samples at most), on at most
        ``max_examples`` examples of ``data`` (a seeded subset of larger data), all from the
        seed's :attr:`Stream.POST_HOC` stream. ``components`` None: one per 400 examples, 10
        to 50 (measured on Fashion-MNIST's 20,000: FD 6.2 with 10, 5.4 with 20 or 30, 5.0
        with 50, 6.0 with 100). Returns what it fitted in one line; None (nothing fitted)
        with ``post_hoc=False``."""
        if not self.config.get("post_hoc"):
            return None
        t0 = time.perf_counter()
        s = derive_seed(seed, Stream.POST_HOC)
        x, labels = as_tensors(data, lazy=True)
        if len(x) > max_examples:  # a seeded subset, read in index order (a lazy folder decodes only it)
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:max_examples].sort().values
            x, labels = x[keep], labels[keep] if labels is not None else None
        x = materialize(x)
        subset = (x, labels) if labels is not None else x
        draws = max(1, min(4, 20_000 // len(x)))
        if components is None:  # more examples carry more components' full covariances
            components = min(50, max(10, len(x) // 400))
        self.fit_second_stage(subset, "gmm", components=min(components, len(x) * draws), draws=draws, seed=s)
        scale = self.calibrate_variance(subset, n=min(len(x), 10_000), seed=s)
        return (f"a {self.config['second_stage']['components']}-component Gaussian mixture on Q(z) of {len(x)} "
                f"examples x {draws} draws, variance factor {scale:.4g} ({time.perf_counter() - t0:.1f} s)")

    # ---- the second stage -------------------------------------------------------------
    def _build_second_stage(self, spec: dict[str, Any]) -> None:
        """Create the (empty) second-stage buffers / flow that ``spec`` describes."""
        kind = spec.get("kind")
        d = self.latent_dim
        if kind == "gmm":
            k = int(spec["components"])
            like = {"device": self.var_scale.device, "dtype": self.var_scale.dtype}
            self.register_buffer("gmm_weights", torch.full((k,), 1.0 / k, **like))
            self.register_buffer("gmm_means", torch.zeros(k, d, **like))
            self.register_buffer("gmm_chol", torch.eye(d, **like).repeat(k, 1, 1))
        elif kind == "flow":
            flow_kwargs = {key: v for key, v in spec.items() if key != "kind"}
            self.prior_flow = Flow("nsf", (d,), **flow_kwargs).to(self.var_scale.device)
        else:
            raise ValueError(f"second_stage kind must be 'gmm' or 'flow', got {kind!r}")
        self.config["second_stage"] = dict(spec)

    def _clear_second_stage(self) -> None:
        for name in ("gmm_weights", "gmm_means", "gmm_chol"):
            if name in self._buffers:
                del self._buffers[name]
        self.prior_flow = None
        self.config["second_stage"] = None

    @torch.no_grad()
    def encode_data(self, data: Any, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of every example of ``data`` (x, (x, labels) or .data/.labels), in eval mode."""
        x, labels = as_tensors(data)
        device, _ = self._device_dtype()
        mus, lvs = [], []
        with eval_mode(self):
            for i in range(0, len(x), batch_size):
                lab = labels[i : i + batch_size].to(device) if labels is not None and self.num_classes else None
                mu, lv = self.encode(x[i : i + batch_size].to(device), lab)
                mus.append(mu)
                lvs.append(lv)
        return torch.cat(mus), torch.cat(lvs)

    def fit_second_stage(
        self,
        data: Any,
        kind: str = "gmm",
        *,
        components: int = 10,
        latents: str = "sample",
        draws: int = 4,
        steps: int = 1500,
        batch_size: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        **flow_kwargs: Any,
    ) -> PostHocStages:
        """Fit a density to the aggregate posterior Q(z) of ``data``; :meth:`sample` then uses it.

        kind="gmm": scikit-learn's GaussianMixture (``components``, full covariances) on
        ``draws`` draws z ~ Q(z|x) per example (``latents="sample"``) or on the posterior means
        (``"mean"``); stored as buffers (weights, means, Cholesky factors of the covariances).
        kind="flow": a pygen NSF (:class:`pygen.models.Flow`, ``flow_kwargs`` e.g. hidden,
        n_layers, n_bins) trained by maximum likelihood with Adam for ``steps`` steps on fresh
        draws z ~ Q(z|x) (or the means). Deterministic given ``seed``. Returns self.
        """
        if kind not in ("gmm", "flow"):
            raise ValueError(f"kind must be 'gmm' or 'flow', got {kind!r}")
        if latents not in ("sample", "mean"):
            raise ValueError(f"latents must be 'sample' or 'mean', got {latents!r}")
        mu, logvar = self.encode_data(data)
        std = torch.exp(0.5 * logvar)
        device, dtype = self._device_dtype()
        self._clear_second_stage()
        if kind == "gmm":
            from sklearn.mixture import GaussianMixture  # the 'models' extra

            if latents == "sample":
                eps = randn(draws, *mu.shape, seed=seed, device=device, dtype=dtype)
                z = (mu + std * eps).reshape(-1, mu.shape[1])
            else:
                z = mu
            gm = GaussianMixture(components, covariance_type="full", reg_covar=1e-5, random_state=seed % 2**32, max_iter=500)
            gm.fit(z.double().cpu().numpy())
            self._build_second_stage({"kind": "gmm", "components": int(components)})
            cov = torch.as_tensor(gm.covariances_, dtype=torch.float64)
            self.gmm_weights.copy_(torch.as_tensor(gm.weights_))
            self.gmm_means.copy_(torch.as_tensor(gm.means_))
            self.gmm_chol.copy_(torch.linalg.cholesky(cov))
            return self
        flow_kwargs = {"hidden": 64, "n_layers": 4, **flow_kwargs}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self._build_second_stage({"kind": "flow", **flow_kwargs})
        flow = self.prior_flow.to(device)
        g = torch.Generator(device=device).manual_seed(seed)
        n = mu.shape[0]

        def batch() -> Tensor:
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g, device=device)
            if latents == "mean":
                return mu[idx]
            eps = randn(len(idx), mu.shape[1], generator=g, device=device, dtype=dtype)
            return mu[idx] + std[idx] * eps

        flow.train()
        flow.setup(batch())
        opt = torch.optim.Adam(flow.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        for _ in range(steps):
            loss = flow.loss(batch())["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
            opt.step()
            sched.step()
        flow.eval()
        return self

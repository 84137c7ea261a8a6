"""pygen.flows' RealNVP / NSF / Glow behind the :class:`GenerativeModel` interface.

Data conventions:

- ``bins=None``: continuous data of any shape; the loss is the exact mean negative
  log-likelihood -log p(x) in nats.
- ``bins=K``: quantised data in [0, 1] holding levels k / (K - 1) (K = 256 for 8-bit
  images, 17 for scikit-learn's digits). Training dequantises, y = (k + u) / K with
  u ~ U[0, 1) (:func:`pygen.flows.dequantize`), and the flow is a density on y. The loss is
  the discrete NLL bound in nats per example, -log p(y) + D log K (>= -log P(k), Jensen),
  and ``"bpd"`` = loss / (D log 2). Samples are quantised back, x = floor(K y) / (K - 1)
  clamped to the levels, so they look like the data.

Vector flows (``kind="realnvp"`` or ``"nsf"``) see a (B, *data_shape) batch flattened to
(B, D); ``"glow"`` needs (C, H, W) data. Glow squeezes 2x2 at each of its ``levels``: an
image whose sides are not multiples of 2^levels is padded (centred) to the next multiples
with *augmentation* pixels u ~ U[0, 1)^P drawn afresh each time (Huang et al. 2020's
augmented flows; log q(u) = 0), the flow is a density on (x, u), and samples are cropped.
The loss then bounds -log p(x) from above (-log p(x) <= E_u[-log p(x, u)], Jensen), bits/dim
count x's D dimensions only, and :meth:`Flow.log_prob` is a one-draw estimate of that bound. With ``num_classes``, batches are (x, labels) and
the flow is conditioned on one-hot labels (``sample(n, labels=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from pygen.flows import NSF, Glow, RealNVP, dequantize
from pygen.models.base import GenerativeModel
from pygen.models.inference import sampling
from pygen.models.labels import Batch, num_classes_of, one_hot, sample_labels, split_batch
from pygen.models.networks import crop_from, pad_to, padding_for
from pygen.models.seeding import counter_uniform, resolve_seed
from pygen.ops import randn

__all__ = ["Flow"]

_KINDS = {"realnvp": RealNVP, "nsf": NSF, "glow": Glow}


class Flow(GenerativeModel, family="flow"):
    """A normalizing flow as a generative model (see the module docstring for data conventions).

    Args:
        kind: "realnvp", "nsf" (vectors; data flattened) or "glow" (images (C, H, W)).
        data_shape: the shape of one example, e.g. (2,) or (1, 8, 8).
        bins: quantisation levels of the data in [0, 1], or None for continuous data.
        num_classes: condition on one-hot labels of this many classes.
        ema_decay: the trainer keeps an EMA of the weights with this decay when set.
        **flow_kwargs: passed to the flow's constructor (hidden, n_layers, levels, depth, ...).
    """

    #: ``pygen train flow``: benchmarks/quality/flow_digits.py's Glow (2 levels x depth 4, hidden 64,
    #: 17 bins), 1500 steps of 128 at lr 1e-3: FD 6.7, 2.35 bits/dim on the digits, ~40 s
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 1500, "batch_size": 128, "lr": 1e-3}
    #: on Fashion-MNIST (benchmarks/quality/fashion_mnist.py): 4.43 test bits/dim after 1500 steps
    #: (a 2-core AMD EPYC), 3.77 after 8084 (``--minutes 20``, a 2-core Intel Xeon; the Gaussian
    #: bar: 6.46), so at most 10000 and the 20-minute cap binds on a 2-core CPU. Its samples stay
    #: unrecognisable at this size (FD 96.6 and 139: likelihood, not samples, is what improves)
    large_train: ClassVar[dict[str, Any]] = {"steps": 10000}
    #: on a GPU: conditioners 4x as wide, 20k steps (capped at 20 minutes); not yet measured
    #: on a GPU
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "gpu": {"train": {"steps": 20000, "batch_size": 128}, "model": {"hidden": 256}}}

    @staticmethod
    def data_defaults(data: Any) -> dict[str, Any]:
        """The constructor options :meth:`for_data` starts from: Glow for images (sides that
        are not multiples of 4 padded with augmentation pixels), a RealNVP for points; the
        data's quantisation (:attr:`pygen.data.Data.bins`)."""
        if data.kind == "image":
            return {"kind": "glow", "bins": data.bins, "levels": 2, "depth": 4, "hidden": 64}
        return {"kind": "realnvp", "bins": None, "hidden": 64, "n_layers": 8}

    @classmethod
    def for_data(cls, data: Any, *, conditional: bool = False, **options: Any) -> Flow:
        """The default flow for a :class:`pygen.data.Data` (:meth:`data_defaults`, ``options``
        overriding them; another ``kind`` drops the default kind's layer options);
        ``conditional``: on the data's labels."""
        defaults = cls.data_defaults(data)
        opts = {**defaults, **options}
        if opts["kind"] != defaults["kind"]:
            for k in ("levels", "depth", "n_layers", "hidden"):
                if k not in options:
                    opts.pop(k, None)
        if conditional:
            opts["num_classes"] = num_classes_of(data)
        return cls(opts.pop("kind"), data.shape, **opts)

    def __init__(
        self,
        kind: str = "realnvp",
        data_shape: Sequence[int] = (2,),
        *,
        bins: int | None = None,
        num_classes: int | None = None,
        ema_decay: float | None = None,
        **flow_kwargs: Any,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
        shape = tuple(int(s) for s in data_shape)
        if bins is not None and (not isinstance(bins, int) or bins < 2):
            raise ValueError(f"bins must be an int >= 2 or None, got {bins!r}")
        self.config = {
            "kind": kind,
            "data_shape": list(shape),
            "bins": bins,
            "num_classes": num_classes,
            "ema_decay": ema_decay,
            **flow_kwargs,
        }
        self.data_shape, self.bins, self.num_classes, self.ema_decay = shape, bins, num_classes, ema_decay
        self.dim = math.prod(shape)
        context = {"context_features": num_classes} if num_classes else {}
        self.pad = (0, 0, 0, 0)  # Glow's augmentation padding (left, right, top, bottom)
        if kind == "glow":
            if len(shape) != 3:
                raise ValueError(f"kind='glow' needs data_shape (C, H, W), got {shape}")
            levels = flow_kwargs.get("levels", 2)
            if isinstance(levels, int) and levels >= 1:
                self.pad = padding_for(shape[1], shape[2], 2**levels)
            h, w = shape[1] + self.pad[2] + self.pad[3], shape[2] + self.pad[0] + self.pad[1]
            self.flow = Glow(shape[0], (h, w), **flow_kwargs, **context)
        else:
            self.flow = _KINDS[kind](self.dim, **flow_kwargs, **context)

    # ---- helpers ----------------------------------------------------------------------
    def _split(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        x, labels = split_batch(batch, self.num_classes, "Flow")
        return x, self._context(labels, x.shape[0])

    def _context(self, labels: Tensor | int | None, n: int) -> Tensor | None:
        """(n, num_classes) one-hot context, or None for an unconditional flow."""
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError(f"this Flow is conditional (num_classes={self.num_classes}): pass labels")
        p = next(self.parameters())
        labels = sample_labels(labels, n, self.num_classes, seed=0, device=p.device, owner="Flow")
        return one_hot(labels, self.num_classes, p.dtype)

    def _to_flow(self, x: Tensor, seed: int | None = None, offset: int = 0) -> Tensor:
        # vector flows see (B, D); Glow sees (B, C, H, W), padded with fresh U[0, 1) pixels where
        # its levels need it: from torch's generator (the trainer seeds and checkpoints it), or
        # example i's from pygen's stream of `seed` at positions (offset + i) * D_flow.. when given
        if not any(self.pad):
            return x.reshape(x.shape[0], *self.flow.shape)
        b, shape = x.shape[0], self.flow.shape
        if seed is None:
            u = torch.rand(b, *shape, device=x.device, dtype=x.dtype)
        else:
            d = math.prod(shape)
            u = counter_uniform(b * d, seed=seed, offset=offset * d, device=x.device).to(x.dtype).view(b, *shape)
        inside = pad_to(torch.ones_like(x[:1, :1]), self.pad)
        return pad_to(x, self.pad) + (1 - inside) * u

    # ---- the interface ----------------------------------------------------------------
    def setup(self, batch: Batch) -> None:
        """ActNorm's data-dependent initialisation, from the trainer's first global batch."""
        with torch.no_grad():
            self.loss(batch)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """batch: x (B, *data_shape) or (x, labels (B,)) -> {"loss": mean NLL in nats[, "bpd"]}."""
        x, context = self._split(batch)
        if self.bins is None:
            return {"loss": -self.flow.log_prob(self._to_flow(x), context).mean()}
        y = dequantize(x, self.bins)  # noise from torch's generator: the trainer seeds and checkpoints it
        nll = -self.flow.log_prob(self._to_flow(y), context).mean() + self.dim * math.log(self.bins)
        return {"loss": nll, "bpd": nll.detach() / (self.dim * math.log(2))}

    def log_prob(self, x: Tensor, labels: Tensor | None = None, *, seed: int | None = None,
                 offset: int = 0) -> Tensor:
        """x (B, *data_shape) -> (B,) exact log-density of x as given (no dequantisation).

        A padded Glow gives log p(x, u) at one draw of its augmentation pixels u, a lower
        bound of log p(x) in expectation: example i's u from (``seed``, ``offset`` + i) when
        a seed is given (any batching, the same values), else from torch's generator."""
        return self.flow.log_prob(self._to_flow(x, seed, offset), self._context(labels, x.shape[0]))

    @sampling
    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        offset: int = 0,
        labels: Tensor | int | None = None,
    ) -> Tensor:
        """(n, *data_shape) samples; sample i is a function of (seed, offset + i) only.

        The latent of sample i is pygen's Philox stream at positions [(offset + i) D,
        (offset + i + 1) D) (D: the flow's dimension, padding included), so any chunking of an index range gives the same samples (up
        to float rounding of the network at different batch sizes). A conditional flow
        samples class ``labels`` (an int or (n,)), or labels drawn uniformly from a derived
        stream of the seed by the same rule when None.
        """
        p = next(self.parameters())
        s = resolve_seed(seed, generator)
        shape = self.flow.shape
        start = offset * math.prod(shape)  # stream position of sample `offset`
        z = randn(n, *shape, seed=s, offset=start, device=p.device, dtype=p.dtype)
        labels = sample_labels(labels, n, self.num_classes, seed=s, offset=offset, device=p.device, owner="Flow")
        y, _ = self.flow.transform.inverse(z, self._context(labels, n))
        y = crop_from(y, self.pad).reshape(n, *self.data_shape)
        if self.bins is None:
            return y
        # the inverse of dequantize: bin k of [0, 1) is level k / (bins - 1)
        return torch.floor(y * self.bins).clamp_(0, self.bins - 1) / (self.bins - 1)

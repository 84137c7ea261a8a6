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
(B, D); ``"glow"`` needs (C, H, W) data. With ``num_classes``, batches are (x, labels) and
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
from pygen.models.seeding import resolve_seed
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

    @staticmethod
    def data_defaults(data: Any) -> dict[str, Any]:
        """The constructor options :meth:`for_data` starts from: Glow for images whose sides are
        multiples of 4, a RealNVP over the pixels for other images, a RealNVP for points; the
        data's quantisation (:attr:`pygen.data.Data.bins`)."""
        if data.kind == "image" and data.shape[1] % 4 == 0 and data.shape[2] % 4 == 0:
            return {"kind": "glow", "bins": data.bins, "levels": 2, "depth": 4, "hidden": 64}
        if data.kind == "image":
            return {"kind": "realnvp", "bins": data.bins, "hidden": 256, "n_layers": 8}
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
        if kind == "glow":
            if len(shape) != 3:
                raise ValueError(f"kind='glow' needs data_shape (C, H, W), got {shape}")
            self.flow = Glow(shape[0], (shape[1], shape[2]), **flow_kwargs, **context)
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

    def _to_flow(self, x: Tensor) -> Tensor:
        # vector flows see (B, D); Glow sees (B, C, H, W)
        return x.reshape(x.shape[0], *self.flow.shape)

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

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, *data_shape) -> (B,) exact log-density of x as given (no dequantisation)."""
        return self.flow.log_prob(self._to_flow(x), self._context(labels, x.shape[0]))

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
        (offset + i + 1) D), so any chunking of an index range gives the same samples (up
        to float rounding of the network at different batch sizes). A conditional flow
        samples class ``labels`` (an int or (n,)), or labels drawn uniformly from a derived
        stream of the seed by the same rule when None.
        """
        p = next(self.parameters())
        s = resolve_seed(seed, generator)
        shape, start = self.flow.shape, offset * self.dim  # stream position of sample `offset`
        z = randn(n, *shape, seed=s, offset=start, device=p.device, dtype=p.dtype)
        labels = sample_labels(labels, n, self.num_classes, seed=s, offset=offset, device=p.device, owner="Flow")
        y, _ = self.flow.transform.inverse(z, self._context(labels, n))
        y = y.reshape(n, *self.data_shape)
        if self.bins is None:
            return y
        # the inverse of dequantize: bin k of [0, 1) is level k / (bins - 1)
        return torch.floor(y * self.bins).clamp_(0, self.bins - 1) / (self.bins - 1)

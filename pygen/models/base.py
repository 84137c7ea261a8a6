"""The interface every generative model of pygen implements, and :func:`load`.

A model is an ``nn.Module`` with a JSON-serialisable ``config`` (``type(model)(**config)``
rebuilds it) and a family name registered by subclassing::

    class Flow(GenerativeModel, family="flow"): ...

Required: ``loss(batch) -> {"loss": scalar, ...named terms}`` and ``sample(n, *, seed=,
generator=, offset=, **cond) -> (n, *data_shape)``. The trainer (:func:`pygen.train.fit`)
calls only the methods below, so a new family needs no trainer change:

- ``setup(batch)``: once, on a fresh run, with the first global batch, before DDP wraps the
  model (data-dependent initialisation such as ActNorm: every rank sees the same batch).
- ``configure_optimizers(lr) -> list[Optimizer]`` (or ``(optimizers, schedulers)``).
- ``training_step(batch, step, optimizers, *, update) -> dict``: one update; a GAN overrides
  it to alternate D and G. ``update`` (:class:`pygen.models.update.Update`) runs the forward
  through the trainer's wrapper of ``self`` (DistributedDataParallel, torch.compile: so that
  gradients are all-reduced), micro-batches, autocast, clipping and the optimizer step.
  ``model.forward(*a, **k)`` is ``model.loss(*a, **k)``.
- ``ema_decay``: a float makes the trainer keep an EMA of the weights; ``ema_warmup = True``
  warms its decay up as min(decay, (1 + k) / (10 + k)) over the first updates.
- ``evaluate_step(batch) -> dict``: the loss terms without gradient by default.
- ``fit_post_hoc(data, *, seed) -> str | None``: after the last step, stages fitted on the trained
  weights (the VAE's second stage and variance calibration); the trainer writes the result
  into the checkpoint :func:`load` reads (its ``"post_hoc"`` entry), beside the training
  state, which stays as it was: a resume continues training from it unchanged.

Sampling runs in eval mode with the caller's mode restored (decorate ``sample`` with
:func:`pygen.models.inference.sampling`); samples depend on (seed, offset + i) only
(:mod:`pygen.models.seeding`). The command line and the sampling job use three more hooks:
``for_data(data, **options)`` and ``train_defaults_for(data)`` (the family's defaults, one place),
``sample_settings(**given)`` (the settings a sample call actually uses) and ``use_ema(flag)``.

Files: :meth:`GenerativeModel.save` writes ``{"family", "config", "model", "versions"}``;
the trainer's checkpoints (``ckpt-<step>.pt``) hold the same keys and more (``"ema"``,
optimizer and RNG states). :func:`load` reads either, or a training directory (the
checkpoint its ``latest`` file names).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pygen._io import LATEST, CorruptCheckpoint, gigabytes, load_checkpoint, save_atomic, select_checkpoint
from pygen.models.labels import Batch
from pygen.models.update import Update

__all__ = ["GenerativeModel", "TrainingDiverged", "Batch", "load", "families", "versions"]

_REGISTRY: dict[str, type[GenerativeModel]] = {}


class TrainingDiverged(FloatingPointError):
    """A loss term became NaN or inf, or a model judged its losses to have exploded. ``step``
    (1-based) is the step that produced it and ``checkpoint`` the last good checkpoint written
    (None if none was; :func:`pygen.train.fit` fills it in). Defined here, below both the
    models that raise it and the trainer that reports it."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class GenerativeModel(nn.Module):
    """Base class of pygen's generative models (see the module docstring for the contract).

    Subclasses set ``self.config`` in ``__init__`` (JSON-serialisable keyword arguments of
    their constructor) and register with ``class X(GenerativeModel, family="name")``. A
    subclass without ``family=`` is saved under its parent's family and loads as the parent.
    """

    family: ClassVar[str]
    default_lr: ClassVar[float] = 1e-3
    #: what ``pygen train FAMILY`` uses unless told otherwise: {"steps", "batch_size", "lr"}
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 128, "lr": None}
    #: examples of at least this many values (28x28 images and up) are "large": they train with
    #: :attr:`large_train` over :attr:`train_defaults`
    large_dims: ClassVar[int] = 256
    #: the family's train settings for large examples (measured on Fashion-MNIST), if they differ
    large_train: ClassVar[dict[str, Any]] = {}
    #: ``pygen train`` without --steps / --minutes trains the default step count, or as many
    #: steps as fit in this many minutes on the machine at hand (measured) when fewer
    train_minutes: ClassVar[float | None] = 20.0
    #: settings for hardware that affords more, by name (``pygen train --preset NAME``; "gpu"
    #: is chosen when training on CUDA): {"train": {steps, batch_size, lr}, "model": {for_data
    #: options}} over :attr:`train_defaults` and ``for_data``'s defaults (which are "cpu")
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    config: dict[str, Any]
    ema_decay: float | None = None
    ema_warmup: bool = False

    def __init_subclass__(cls, family: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if family is None:
            return
        old = _REGISTRY.get(family)
        # the same class re-imported (e.g. module reload) may re-register; another may not
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"model family {family!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.family = family
        _REGISTRY[family] = cls

    # ---- required -------------------------------------------------------------------
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms of a batch; ``"loss"`` is the scalar to minimise."""
        raise NotImplementedError

    def sample(
        self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, offset: int = 0, **cond: Any
    ) -> Tensor:
        """(n, *data_shape) samples in the data's range; sample i depends on (seed, offset + i) only."""
        raise NotImplementedError

    @classmethod
    def is_large(cls, data: Any) -> bool:
        """Whether ``data``'s examples have at least :attr:`large_dims` values."""
        return math.prod(data.shape) >= cls.large_dims

    @classmethod
    def train_defaults_for(cls, data: Any) -> dict[str, Any]:
        """{"steps", "batch_size", "lr"} for training on ``data`` (what ``pygen train`` and
        the demo start from): :attr:`train_defaults`, :attr:`large_train` over them for large
        examples (:meth:`is_large`)."""
        return {**cls.train_defaults, **(cls.large_train if cls.is_large(data) else {})}

    @classmethod
    def for_data(cls, data: Any, **options: Any) -> GenerativeModel:
        """The family's default model for a :class:`pygen.data.Data` (its shape, its labels
        when the family conditions on them), ``options`` overriding constructor arguments."""
        raise NotImplementedError(f"{cls.__name__} has no defaults for data: construct it directly")

    def sample_settings(self, **given: Any) -> dict[str, Any]:
        """The sampler settings a ``sample(**given)`` call actually uses, defaults filled in
        (what the sampling job records and compares: a default given explicitly is the same
        job). Only the keys the family's ``sample`` takes; the given ones are validated."""
        return {k: v for k, v in given.items() if v is not None}

    #: whether ``sample`` uses the EMA copy a model keeps inside itself (:meth:`use_ema`)
    sample_ema: bool = True
    #: the submodules that are EMA copies of others (not counted by :meth:`num_parameters`)
    ema_copies: ClassVar[tuple[str, ...]] = ()

    def num_parameters(self) -> int:
        """The model's parameter count, without the EMA copies it keeps inside itself."""
        skip = tuple(name + "." for name in self.ema_copies)
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(skip))

    def use_ema(self, flag: bool) -> None:
        """Whether ``sample`` uses EMA weights the model keeps inside itself (a GAN's EMA
        generator, latent diffusion's EMA denoiser; see :meth:`pick_ema`) by default.
        :func:`load` calls it with its ``ema=`` argument (``pygen sample --no-ema``: False);
        models whose EMA the trainer keeps get it through the weights ``load`` picks."""
        self.sample_ema = bool(flag)

    def pick_ema(self, ema: bool | None, averaged: Any, raw: Any, missing: str) -> Any:
        """``averaged`` (an EMA copy kept inside the model, None when it keeps none) or
        ``raw``: by ``ema``, or :meth:`use_ema`'s choice when None. Asking for an EMA the
        model does not keep is a ValueError: "this {missing} (ema_decay=None)"."""
        if ema and averaged is None:
            raise ValueError(f"this {missing} (ema_decay=None)")
        use = self.sample_ema if ema is None else ema
        return averaged if use and averaged is not None else raw

    def probe_copy(self) -> GenerativeModel:
        """A throwaway copy whose training steps cost what this model's steps cost: what
        ``pygen train --minutes`` times (:mod:`pygen.train.budget`). Default: a deep copy."""
        return copy.deepcopy(self)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        # DDP and torch.compile wrap forward: routing loss through it is what makes them apply
        return self.loss(*args, **kwargs)

    # ---- optional hooks used by the trainer -------------------------------------------
    def setup(self, batch: Batch) -> None:
        """Data-dependent initialisation from the first global batch (fresh runs only). Default: none."""

    def configure_optimizers(self, lr: float | None = None) -> list[torch.optim.Optimizer]:
        """One Adam over all parameters (``lr`` or the class's ``default_lr``)."""
        return [torch.optim.Adam(self.parameters(), lr=self.default_lr if lr is None else lr)]

    def training_step(
        self, batch: Batch, step: int, optimizers: Sequence[torch.optim.Optimizer], *, update: Update | None = None
    ) -> dict[str, Tensor]:
        """One update (step is 0-based): zero_grad, forward and backward through ``update``
        (the trainer's wrapper, micro-batches, precision), clip, step every optimizer.

        Returns the detached loss terms, plus ``"grad_norm"`` (before clipping) when clipping.
        """
        update = Update() if update is None else update
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = update.backward(self, batch)
        for i, opt in enumerate(optimizers):
            params = [p for group in opt.param_groups for p in group["params"]]
            norm = update.step(opt, params)
            if update.grad_clip is not None and i == 0:
                out["grad_norm"] = norm
        return out

    @torch.no_grad()
    def evaluate_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss terms of a held-out batch, without gradient (the trainer averages them)."""
        return self.loss(batch)

    def fit_post_hoc(self, data: Any, *, seed: int = 0) -> str | None:
        """Fit what the model fits after training, on its final sampling weights and the
        training ``data`` (as given to :func:`pygen.train.fit`, with its ``seed``); may
        change ``config`` and add buffers. Returns one line saying what it fitted, or None
        when it fits nothing (the default)."""
        return None

    # ---- files ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"family", "config", "model", "versions"}`` to ``path`` atomically (temp file + rename)."""
        save_atomic(
            {"family": self.family, "config": _json_config(self), "model": self.state_dict(), "versions": versions()},
            path,
        )


def _json_config(model: GenerativeModel) -> dict[str, Any]:
    """model.config through a JSON round trip: fails early if it is not serialisable, and
    normalises tuples to lists so that configs compare equal after a save/load."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(model).__name__}.config must be a dict of constructor arguments")
    try:
        return json.loads(json.dumps(config))
    except TypeError as e:
        raise TypeError(f"{type(model).__name__}.config is not JSON-serialisable: {e}") from None


def families() -> dict[str, type[GenerativeModel]]:
    """The registered families: name -> class."""
    return dict(_REGISTRY)


def versions() -> dict[str, str]:
    import pygen  # the package root, to read its version (nothing above models is imported)

    return {"pygen": str(pygen.__version__), "torch": str(torch.__version__)}  # plain str: weights_only loads


def meta_bytes(build: Callable[[], nn.Module]) -> int:
    """The bytes of the parameters and buffers of the module ``build()`` returns, built on the
    meta device (nothing allocated); 0 when the constructor needs real tensors."""
    try:
        with torch.device("meta"):
            probe = build()
        return sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    except Exception:  # e.g. data-dependent initialisation: nothing to learn here
        return 0


def _build(cls: type[GenerativeModel], config: dict[str, Any], state: dict[str, Any], file: Path) -> GenerativeModel:
    """``cls(**config)``, first on the meta device: a config that asks for far more than the
    weights it came with (a damaged or hostile file, e.g. a width of 10**9) is refused before
    it allocates."""
    weights = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
    size = meta_bytes(lambda: cls(**config))
    if size > 4 * weights + (64 << 20):
        raise CorruptCheckpoint(f"{file}: its config builds a model of {gigabytes(size)} for {gigabytes(weights)} "
                                "of weights: a damaged or foreign checkpoint")  # fmt: skip
    return cls(**config)


def load(
    path: str | os.PathLike,
    *,
    ema: bool = True,
    map_location: str | torch.device = "cpu",
    checkpoint: str | int | None = None,
) -> GenerativeModel:
    """Rebuild a model from a file written by :meth:`GenerativeModel.save` or the trainer, or
    from a training directory: its ``best.pt`` when the run kept one (``--keep-best``), else
    its latest checkpoint; ``checkpoint`` = "best", "latest" or a step picks one.

    ema=True takes the EMA weights when the checkpoint has them (the raw weights otherwise),
    and makes a model that keeps its EMA inside itself (the GAN) sample with it; ema=False
    the raw weights everywhere. A checkpoint whose run fitted post-hoc stages
    (:meth:`GenerativeModel.fit_post_hoc`, e.g. the VAE's second stage) gives the model with
    them, unless ema=False asks for raw weights other than those they were fitted on. The
    model is returned in eval mode on ``map_location``.

    The file is verified first (:func:`pygen._io.verify_checkpoint`): a damaged one raises
    :class:`pygen._io.CorruptCheckpoint`, except that a training directory's default or
    latest checkpoint falls back to its newest intact one, with a warning.
    """
    file = select_checkpoint(path, checkpoint)
    if file is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no {LATEST} file, no ckpt-*.pt)")
    ckpt = load_checkpoint(file, map_location, verify=False)
    family = ckpt.get("family")
    if family not in _REGISTRY:
        import pygen.models  # noqa: F401  registers the built-in families

    if family not in _REGISTRY:
        raise ValueError(f"{file}: unknown model family {family!r}; registered: {sorted(_REGISTRY)}")
    post = ckpt.get("post_hoc")
    if post is not None and (ema or not post["on_ema"]):  # the trained model with its post-hoc stages
        config, state = post["config"], post["model"]
    else:
        config = ckpt["config"]
        state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model = _build(_REGISTRY[family], config, state, file)
    model.load_state_dict(state)
    model.use_ema(ema)
    return model.to(map_location).eval()

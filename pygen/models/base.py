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
- ``training_step(batch, step, optimizers, *, forward, grad_clip) -> dict``: one update; a GAN
  overrides it to alternate D and G. ``forward`` is the trainer's wrapper of ``self``
  (DistributedDataParallel, torch.compile): call it instead of ``self.loss`` so that
  gradients are all-reduced. ``model.forward(*a, **k)`` is ``model.loss(*a, **k)``.
- ``ema_decay``: a float makes the trainer keep an EMA of the weights; ``ema_warmup = True``
  warms its decay up as min(decay, (1 + k) / (10 + k)) over the first updates.
- ``evaluate_step(batch) -> dict``: the loss terms without gradient by default.

Files: :meth:`GenerativeModel.save` writes ``{"family", "config", "model", "versions"}``;
the trainer's checkpoints (``ckpt-<step>.pt``) hold the same keys and more (``"ema"``,
optimizer and RNG states). :func:`load` reads either, or a training directory (the
checkpoint its ``latest`` file names).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pygen._io import write_atomic
from pygen.ops.gaussian import randn

__all__ = [
    "GenerativeModel",
    "TrainingDiverged",
    "derive_seed",
    "resolve_seed",
    "split_batch",
    "counter_uniform",
    "uniform_labels",
    "load",
    "families",
    "save_atomic",
    "write_text_atomic",
    "checkpoints",
    "resolve_checkpoint",
    "versions",
]

_REGISTRY: dict[str, type[GenerativeModel]] = {}


class TrainingDiverged(FloatingPointError):
    """A loss term became NaN or inf, or a model judged its losses to have exploded. ``step``
    (1-based) is the step that produced it and ``checkpoint`` the last good checkpoint written
    (None if none was; :func:`pygen.train.fit` fills it in). Defined here, below both the
    models that raise it and the trainer that reports it."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
LATEST = "latest"  # the file in a training directory naming its newest checkpoint
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")

Batch = Any  # a Tensor, or a tuple (x, labels): what the trainer hands to loss()


# ---- samples fixed by (seed, index) ------------------------------------------------------
# Every family draws its noise from pygen's counter-based stream: sample i reads stream
# positions that depend on (seed, offset + i) only. Extra streams (mixture components,
# labels) use seeds derived from the sample seed.


def derive_seed(seed: int, stream: int) -> int:
    """A seed for a separate noise stream of ``seed`` (a splitmix64 step), in [0, 2^63)."""
    z = (int(seed) + 0x9E3779B97F4A7C15 * (int(stream) + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % 2**63


SEED_MOD = 2**63  # sample seeds live in [0, 2^63): int64-safe


def resolve_seed(seed: int | Tensor | None, generator: torch.Generator | None = None) -> int:
    """The int seed of a ``sample(seed=, generator=)`` call: ``seed`` checked, else one drawn
    from ``generator`` (or torch's default generator, so ``torch.manual_seed`` fixes it)."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed= or generator=, not both")
        seed = int(seed.item()) if isinstance(seed, Tensor) else int(seed)
        if not 0 <= seed < SEED_MOD:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return seed
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_MOD - 1, (1,), generator=generator, device=device).item())


def split_batch(batch: Batch, num_classes: int | None, owner: str) -> tuple[Tensor, Tensor | None]:
    """(x, labels) of a trainer batch (a tensor or (x, labels)): labels None for an
    unconditional model, int64 for a conditional one, which refuses unlabelled batches."""
    x, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
    if not num_classes:
        return x, None
    if labels is None:
        raise ValueError(f"this {owner} is class-conditional (num_classes={num_classes}): batches are (x, labels)")
    return x, labels.long()


def counter_uniform(n: int, *, seed: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(n,) float64 uniforms in (0, 1); element i is a function of (seed, offset + i) only.

    Phi(eps) of pygen's Philox normal at stream position offset + i (the normal CDF of a
    standard normal is uniform).
    """
    eps = randn(n, seed=seed, offset=offset, device=device).double()
    return (0.5 * torch.erfc(-eps / math.sqrt(2))).clamp(1e-12, 1 - 1e-12)


def uniform_labels(n: int, num_classes: int, *, seed: int, offset: int = 0,
                   device: torch.device | str | None = None) -> Tensor:
    """(n,) int64 labels uniform over ``num_classes``; label i is a function of (seed, offset + i)
    (a conditional model's random labels, batch-size invariant like its latents)."""
    u = counter_uniform(n, seed=seed, offset=offset, device=device)
    return (u * num_classes).long().clamp_(max=num_classes - 1)


class GenerativeModel(nn.Module):
    """Base class of pygen's generative models (see the module docstring for the contract).

    Subclasses set ``self.config`` in ``__init__`` (JSON-serialisable keyword arguments of
    their constructor) and register with ``class X(GenerativeModel, family="name")``. A
    subclass without ``family=`` is saved under its parent's family and loads as the parent.
    """

    family: ClassVar[str]
    default_lr: ClassVar[float] = 1e-3
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
        self,
        batch: Batch,
        step: int,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        forward: Callable[..., dict[str, Tensor]] | None = None,
        grad_clip: float | None = None,
    ) -> dict[str, Tensor]:
        """One update (step is 0-based): zero_grad, loss backward, clip the grad norm, step.

        Returns the detached loss terms, plus ``"grad_norm"`` (before clipping) when clipping.
        """
        terms = (self if forward is None else forward)(batch)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        out = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}
        if grad_clip is not None:
            out["grad_norm"] = nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        for opt in optimizers:
            opt.step()
        return out

    @torch.no_grad()
    def evaluate_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss terms of a held-out batch, without gradient (the trainer averages them)."""
        return self.loss(batch)

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


# ---- atomic files ---------------------------------------------------------------------


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), "w")


def checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``ckpt-<step>.pt`` files of a directory as (step, path), oldest first."""
    d = Path(directory)
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))] if d.is_dir() else []
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint file: ``path`` itself, or for a directory the one its ``latest`` names
    (the newest ``ckpt-*.pt`` when there is no ``latest``); None for a directory without one."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint or directory at {path}")
        return path
    latest = path / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        if not (path / name).exists():
            raise FileNotFoundError(f"{latest} names {name!r}, which does not exist")
        return path / name
    found = checkpoints(path)
    return found[-1][1] if found else None


def load(path: str | os.PathLike, *, ema: bool = True, map_location: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a model from a file written by :meth:`GenerativeModel.save` or the trainer, or
    from a training directory (its latest checkpoint).

    ema=True takes the EMA weights when the checkpoint has them (the raw weights otherwise).
    The model is returned in eval mode on ``map_location``.
    """
    file = resolve_checkpoint(path)
    if file is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no {LATEST} file, no ckpt-*.pt)")
    ckpt = torch.load(file, map_location=map_location, weights_only=True)
    family = ckpt.get("family")
    if family not in _REGISTRY:
        import pygen.models  # noqa: F401  registers the built-in families

    if family not in _REGISTRY:
        raise ValueError(f"{file}: unknown model family {family!r}; registered: {sorted(_REGISTRY)}")
    model = _REGISTRY[family](**ckpt["config"])
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model.to(map_location).eval()

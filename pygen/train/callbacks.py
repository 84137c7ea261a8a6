"""Hooks into :func:`pygen.train.fit`, and the trainer features built on them.

A :class:`Callback` sees a :class:`Run` (the model, its EMA, the step, the run directory) at
the start, after every optimizer step with that step's log record, after every held-out
evaluation, and at the end. The record is mutable: what a callback adds is logged (and seen
by the callbacks after it). A callback with state (``state_dict`` / ``load_state_dict``) is
checkpointed with the run, so a resumed run continues it exactly. Callbacks run on rank 0
only under torchrun, except that a stop request is agreed by all ranks.

Built in: :class:`BestCheckpoint` (``best.pt`` and early stopping), :class:`SampleGrids`
(PNG grids in the run directory), :class:`TensorBoard` (scalars and grids),
:class:`HeldOutFD` (FD on held-out data during training).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pygen._io import BEST
from pygen.models.base import GenerativeModel

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

__all__ = ["Callback", "Run", "BestCheckpoint", "SampleGrids", "TensorBoard", "HeldOutFD", "BEST"]



class Run:
    """What a callback can see and do during :func:`pygen.train.fit`.

    Attributes: ``model`` (being trained), ``ema`` (torch's AveragedModel or None), ``step``
    (optimizer steps completed), ``steps`` (the total), ``out`` (the run directory or None),
    ``seed``, ``stop_reason`` (set by :meth:`stop`).
    """

    def __init__(self, model: GenerativeModel, ema: AveragedModel | None, *, steps: int, out: Path | None,
                 seed: int, save: Any) -> None:  # fmt: skip
        self.model, self.ema, self.steps, self.out, self.seed = model, ema, steps, out, seed
        self.step = 0
        self.stop_reason: str | None = None
        self._save = save

    @property
    def sampling_model(self) -> GenerativeModel:
        """The weights that sampling uses after training: the EMA when the trainer keeps one."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def stop(self, reason: str) -> None:
        """Ask the trainer to stop after this step (it writes a checkpoint first)."""
        self.stop_reason = reason

    def save_checkpoint(self, name: str, **extra: Any) -> Path:
        """Write the full training state of this step (as ``ckpt-<step>.pt`` holds it, plus
        ``extra``) to ``out/name`` atomically. Needs ``out``."""
        if self.out is None:
            raise ValueError("save_checkpoint needs fit(out=...)")
        return self._save(self.out / name, extra)


class Callback:
    """Base class: override the hooks you need (all default to nothing)."""

    def on_start(self, run: Run) -> None:
        """Before the first step of this call (``run.step`` is where a resumed run starts)."""

    def on_eval(self, run: Run, metrics: dict[str, float]) -> None:
        """After a held-out evaluation at ``run.step``: ``metrics`` ("eval/<term>", ...) may be extended."""

    def on_step(self, run: Run, record: dict[str, float]) -> None:
        """After optimizer step ``run.step`` (1-based count): ``record`` holds what is logged at
        this step (empty on steps that log nothing) and may be extended."""

    def on_end(self, run: Run) -> None:
        """After the last step (also after an early stop); not after an exception."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BestCheckpoint(Callback):
    """Keep ``best.pt``, the checkpoint of the best value of ``metric`` so far, and optionally
    stop after ``patience`` records of the metric without improvement.

    ``metric`` is a record key ("eval_ema/loss", "eval/loss", "eval/fd", ...), lower is
    better; "max:KEY" for higher is better. ``min_delta``: the improvement that counts.
    """

    def __init__(self, metric: str, *, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.maximize = metric.startswith("max:")
        self.metric = metric.removeprefix("max:")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.best: float | None = None
        self.best_step = 0
        self.bad = 0  # records of the metric since the best

    def on_step(self, run: Run, record: dict[str, float]) -> None:
        if self.metric not in record:
            return
        value = float(record[self.metric])
        score = -value if self.maximize else value
        if math.isfinite(score) and (self.best is None or score < self.best - self.min_delta):
            self.best, self.best_step, self.bad = score, run.step, 0
            if run.out is not None:
                run.save_checkpoint(BEST, best={"metric": self.metric, "value": value, "step": run.step})
            return
        self.bad += 1
        if self.patience is not None and self.bad >= self.patience:
            shown = -self.best if self.maximize and self.best is not None else self.best
            run.stop(f"{self.metric} has not improved for {self.bad} evaluations "
                     f"(best {shown:.6g} at step {self.best_step})")  # fmt: skip

    def on_end(self, run: Run) -> None:
        """The model ends with the best weights (what ``load(run)`` gives: it prefers ``best.pt``)."""
        path = run.out / BEST if run.out is not None else None
        if path is None or not path.exists():
            return
        ckpt = torch.load(path, map_location=next(run.model.parameters()).device, weights_only=True)
        run.model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], int(state["best_step"]), int(state["bad"])


def _grid_images(model: GenerativeModel, n: int, seed: int) -> Tensor | None:
    """n samples of an image model as (n, C, H, W) in [0, 1]; None when the samples are not
    1- or 3-channel images."""
    x = model.sample(n, seed=seed)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        return None
    lo, hi = getattr(model, "data_range", None) or (0.0, 1.0)
    return ((x.float() - lo) / (hi - lo)).clamp(0, 1)


class SampleGrids(Callback):
    """Every ``every`` steps (and at the end), a grid of ``n`` samples of the sampling
    weights (fixed seed: the grids show progress, not noise) as ``out/samples/step-<k>.png``,
    and to TensorBoard when a :class:`TensorBoard` callback is given. Image data only."""

    def __init__(self, every: int, *, n: int = 64, tensorboard: TensorBoard | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"sample_every must be an int >= 1, got {every!r}")
        self.every, self.n, self.tensorboard = every, n, tensorboard
        self.written: list[Path] = []

    def on_step(self, run: Run, record: dict[str, float]) -> None:
        if run.step % self.every and run.step != run.steps:
            return
        images = _grid_images(run.sampling_model, self.n, run.seed)
        if images is None:
            return
        if run.out is not None:
            from pygen.images import save_grid

            scale = max(1, 128 // max(images.shape[-2:]))
            self.written.append(save_grid(images, run.out / "samples" / f"step-{run.step:07d}.png", scale=scale))
        if self.tensorboard is not None and self.tensorboard.writer is not None:
            from pygen.images import make_grid

            self.tensorboard.writer.add_image("samples", make_grid(images), run.step)


class TensorBoard(Callback):
    """Every logged record as TensorBoard scalars in ``out/tensorboard`` (or ``log_dir``).
    Needs the ``tensorboard`` package (``pip install tensorboard``)."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        self.log_dir = log_dir
        self.writer: Any = None

    def on_start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.log_dir or (run.out / "tensorboard" if run.out is not None else None)
        # purge_step: a resumed run drops the events a killed run logged past its checkpoint
        self.writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir), purge_step=run.step or None)

    def on_step(self, run: Run, record: dict[str, float]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, run.step)

    def on_end(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()


class HeldOutFD(Callback):
    """Every ``every`` steps (and at the end), the Fréchet distance between ``n`` samples of
    the sampling weights and ``n`` held-out examples, in :func:`pygen.metrics.feature_space`
    of the data (a :class:`pygen.data.Data`), logged as "eval/fd"."""

    def __init__(self, data: Any, every: int, *, n: int = 1000, seed: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"eval_fd_every must be an int >= 1, got {every!r}")
        from pygen.metrics.evaluate import feature_space

        x = data.source  # the compact rows: a lazy folder decodes only the n held out below
        self.n = min(n, len(x))
        if self.n < 2:
            raise ValueError("the held-out FD needs at least 2 held-out examples")
        self.name, self.features = feature_space(data)
        self.every, self.seed = every, seed
        g = torch.Generator().manual_seed(seed)
        self.real = x[torch.randperm(len(x), generator=g)[: self.n]]
        self._real_features: Tensor | None = None

    def on_step(self, run: Run, record: dict[str, float]) -> None:
        if run.step % self.every and run.step != run.steps:
            return
        from pygen.metrics.evaluate import _sample
        from pygen.metrics.sample_quality import frechet_distance

        model = run.sampling_model
        device = next(model.parameters()).device
        with torch.no_grad():
            if self._real_features is None:
                self._real_features = self.features(self.real.to(device).float()).cpu()
            fake = self.features(_sample(model, self.n, self.seed, 256).float()).cpu()
        record["eval/fd"] = frechet_distance(self._real_features, fake)

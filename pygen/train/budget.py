"""Training to a wall-clock budget: ``pygen train --minutes M``.

The step count is fixed once, before training, from the throughput this machine shows on a
throwaway copy of the model (the real model, its data order and its RNG streams are not
touched), and then written to train.json like any other setting: a resumed run continues to
the same step count, so resume stays exact even though the budget came from a measurement.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pygen.models.base import GenerativeModel
from pygen.train.callbacks import Callback

__all__ = ["measure_step_seconds", "steps_for_minutes", "plan_for_minutes", "stage_options", "OVERHEAD"]

#: share of a budget kept for what the probe does not time: held-out evaluations,
#: checkpoints, sample grids, and steps that run slower than the probe's first few (a GAN's on
#: Fashion-MNIST slowed from 0.16 to 0.185 s over its run: 20 minutes took 20.5 with 10% kept,
#: 20.7 with 15%)
OVERHEAD = 0.2


class _StepTimer(Callback):
    """Times optimizer steps after the first (warm-up: allocation, ActNorm init, compile);
    stops the probe after ``min_steps`` timed steps once ``min_seconds`` passed, or at
    ``max_seconds`` with at least one timed step."""

    def __init__(self, min_steps: int, min_seconds: float, max_seconds: float) -> None:
        self.min_steps, self.min_seconds, self.max_seconds = min_steps, min_seconds, max_seconds
        self.times: list[float] = []

    def on_step(self, run: Any, record: dict[str, float]) -> None:
        self.times.append(time.perf_counter())
        timed = len(self.times) - 1
        spent = self.times[-1] - self.times[0]
        if (timed >= self.min_steps and spent >= self.min_seconds) or (timed >= 1 and spent >= self.max_seconds):
            run.stop("step-time probe done")

    @property
    def seconds_per_step(self) -> float:
        if len(self.times) < 2:
            raise RuntimeError("the step-time probe timed no step")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def measure_step_seconds(model: GenerativeModel, data: Any, *, batch_size: int, min_steps: int = 3,
                         min_seconds: float = 3.0, max_seconds: float = 30.0, probe: GenerativeModel | None = None,
                         **fit_kwargs: Any) -> float:
    """Seconds per optimizer step of :func:`pygen.train.fit` (``fit_kwargs``: its options,
    e.g. lr, grad_accum, precision, device) on a deep copy of ``model``; the RNG states are
    restored afterwards, so the run that follows is the run it would have been. The copy is
    ``probe``, else ``model.probe_copy()`` (a model whose stages differ in cost times its
    dearer one)."""
    from pygen.train import fit

    probe = model.probe_copy() if probe is None else probe
    timer = _StepTimer(min_steps, min_seconds, max_seconds)
    with torch.random.fork_rng(devices=[]):
        fit(probe, data, steps=10**9, batch_size=batch_size, out=None, progress=False, log_every=10**9,
            eval_every=10**9, callbacks=[timer], **fit_kwargs)
    return timer.seconds_per_step


def steps_for_minutes(minutes: float, seconds_per_step: float, *, spent: float = 0.0,
                      first_stage: tuple[int, float] | None = None) -> int:
    """Steps that fit in ``minutes`` (less ``spent`` seconds already used, less :data:`OVERHEAD`).

    ``first_stage``: (steps, seconds per step) of a cheaper first stage (latent diffusion's
    autoencoder, ``stage_steps_for``): it keeps its steps but at most half of the run's (so
    ``stage_steps_for`` of the result gives it exactly that many), the rest of the time goes
    to steps of ``seconds_per_step``."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    budget = (minutes * 60.0 - spent) * (1.0 - OVERHEAD)
    if first_stage is None:
        return max(1, int(budget / seconds_per_step))
    n, first_seconds = first_stage
    n = max(0, min(n, int(budget / (first_seconds + seconds_per_step))))  # then the rest is >= n steps
    return max(1, n + int((budget - n * first_seconds) / seconds_per_step))


def plan_for_minutes(model: GenerativeModel, data: Any, minutes: float, *, batch_size: int, spent: float = 0.0,
                     **fit_kwargs: Any) -> tuple[int, float, float | None]:
    """(steps, seconds per step, seconds per first-stage step or None): the steps of
    ``model`` (``fit_kwargs``: fit's options) that fit in ``minutes`` here, measured (the
    probes' own time and ``spent``, seconds the caller already used of the budget, are
    spent from it). A model with a cheaper first stage
    (``first_stage_probe()``: its steps and a copy that trains only that stage) has both
    stages timed, so the budget counts each stage at its own cost."""
    t0 = time.perf_counter()
    sec = measure_step_seconds(model, data, batch_size=batch_size, **fit_kwargs)
    first, first_sec = None, None
    if hasattr(model, "first_stage_probe"):
        n, probe = model.first_stage_probe()
        first_sec = measure_step_seconds(model, data, batch_size=batch_size, probe=probe, **fit_kwargs)
        first = (n, first_sec)
    return steps_for_minutes(minutes, sec, spent=spent + time.perf_counter() - t0, first_stage=first), sec, first_sec


def stage_options(model: GenerativeModel, steps: int) -> dict[str, int]:
    """Constructor options that size a staged model (:class:`pygen.models.LatentDiffusion`:
    its autoencoder steps, ``stage_steps_for``) for a run of ``steps``: empty when the model
    has no stages or they already fit. The caller rebuilds the model with them (and records
    them, so that a resume rebuilds the same model)."""
    split = getattr(model, "stage_steps_for", None)
    if split is None or split(steps) == model.ae_steps:
        return {}
    return {"ae_steps": split(steps)}

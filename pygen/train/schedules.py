"""Learning-rate schedules and weight decay applied on top of a model's optimizers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["LR_SCHEDULES", "lr_factor", "apply_weight_decay", "lr_schedulers", "set_current_lr", "base_lrs",
           "apply_base_lr"]

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, warmup: int, steps: int) -> Callable[[int], float]:
    """The multiplier of the base lr at 0-based optimizer step k: a linear warm-up
    (k + 1) / warmup over the first ``warmup`` steps, then constant, or a cosine / linear decay
    that reaches 0 after step ``steps`` (the last step runs at a small positive lr)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = (k - warmup + 1) / max(1, steps - warmup + 1)  # in (0, 1): never exactly 0 inside the run
        return 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p

    return factor


def apply_weight_decay(optimizers: list[torch.optim.Optimizer], weight_decay: float) -> None:
    """Set decoupled weight decay (AdamW's, Loshchilov & Hutter) on every parameter group:
    Adam becomes AdamW; optimizers without the decoupled form (SGD) get their own
    ``weight_decay``. Every group, biases and norm scales included (AdamW's default too)."""
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    for opt in optimizers:
        for group in opt.param_groups:
            if "weight_decay" not in group:
                raise ValueError(f"{type(opt).__name__} has no weight_decay setting")
            group["weight_decay"] = float(weight_decay)
            if "decoupled_weight_decay" in group:
                group["decoupled_weight_decay"] = True


def lr_schedulers(
    optimizers: list[torch.optim.Optimizer], schedule: str, warmup: int, steps: int
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer with :func:`lr_factor` (nothing for a constant lr without
    warm-up, so that such runs and their checkpoints are what they were)."""
    factor = lr_factor(schedule, warmup, steps)
    if schedule == "constant" and warmup == 0:
        return []
    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def set_current_lr(schedulers: list[torch.optim.lr_scheduler.LambdaLR]) -> None:
    """Set each optimizer's lr to its scheduler's value at the scheduler's step, as LambdaLR
    computes it (base_lr * factor). After a resume, the restored lr is the one the old
    schedule gave; a resume with more steps stretches the schedule, and this applies it."""
    for sch in schedulers:
        for group, base, fn in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            group["lr"] = base * fn(sch.last_epoch)
        sch._last_lr = [group["lr"] for group in sch.optimizer.param_groups]


def base_lrs(optimizers: list[torch.optim.Optimizer]) -> list[list[float]]:
    """Each optimizer's base lr per parameter group (before any schedule's factor)."""
    return [[g.get("initial_lr", g["lr"]) for g in opt.param_groups] for opt in optimizers]


def apply_base_lr(optimizers: list[torch.optim.Optimizer], schedulers: list[object], lrs: list[list[float]]) -> None:
    """Make ``lrs`` (as :func:`base_lrs` gives them) the base of every group and of the
    schedulers that scale it: a resume with another lr continues the same schedule from
    the new base (call :func:`set_current_lr` on LambdaLR schedulers afterwards)."""
    for opt, bases in zip(optimizers, lrs):
        for group, base in zip(opt.param_groups, bases):
            if "initial_lr" in group:
                group["initial_lr"] = base
            group["lr"] = base
    for sch in schedulers:
        if hasattr(sch, "base_lrs") and hasattr(sch, "optimizer"):
            sch.base_lrs = [g.get("initial_lr", g["lr"]) for g in sch.optimizer.param_groups]

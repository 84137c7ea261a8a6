"""The training loop: :func:`fit`."""

from __future__ import annotations

import functools
import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pygen.data.loader import as_tensors, default_workers, epoch_permutation, prefetched
from pygen.data.storage import ImageFiles
from pygen._io import load_checkpoint, save_atomic, select_checkpoint, write_text_atomic
from pygen.models.base import GenerativeModel, TrainingDiverged, _json_config, versions
from pygen.models.update import PRECISIONS, Update, ema_warmup_fn
from pygen.train import ddp
from pygen.train.callbacks import Callback, Run
from pygen.train.schedules import apply_base_lr, apply_weight_decay, base_lrs, lr_schedulers, set_current_lr
from pygen.train.checkpoint import (
    describe,
    is_run_directory,
    read_checkpoint,
    remove_temp_files,
    rng_state,
    set_rng_state,
    write_checkpoint,
)

__all__ = ["fit", "TrainingDiverged", "BatchOrder", "as_tensors"]

METRICS = "metrics.jsonl"


# ---- data -----------------------------------------------------------------------------


class BatchOrder:
    """The global batch of step k (0-based) as a pure function of (seed, k).

    Examples are an endless stream of epochs, epoch e being the permutation drawn from
    (seed, e) (not from a running generator, so a resumed run needs no data state); batch k
    holds stream positions [k B, (k + 1) B). Rank r of W takes the slice [r B/W, (r+1) B/W).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most a few epochs: keep the cache small
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        """(batch_size,) int64 example indices of the global batch at ``step``."""
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epoch = pos // self.n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            m = epoch == e
            out[m] = self._perm(e)[pos[m] % self.n]
        return out


def _batch(x: Tensor, labels: Tensor | None, idx: Tensor | slice, device: torch.device) -> Any:
    xb = x[idx].to(device, non_blocking=True)
    return xb if labels is None else (xb, labels[idx].to(device, non_blocking=True))


# ---- helpers --------------------------------------------------------------------------


def _seed_everything(seed: int, rank: int) -> None:
    # one stream per rank (dequantisation noise, dropout differ across shards); weights are
    # rank 0's anyway (DDP broadcasts them)
    s = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _non_finite(*modules: nn.Module | None) -> list[str]:
    """The floating-point parameters and buffers holding NaN or inf."""
    return [name for m in modules if m is not None for name, t in m.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip


def _optimizers(model: GenerativeModel, lr: float | None) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    got = model.configure_optimizers(lr)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], (list, tuple)):
        return list(got[0]), list(got[1])
    return (list(got) if isinstance(got, (list, tuple)) else [got]), []


#: training settings recorded in checkpoints, with the value a checkpoint that lacks one had
TRAIN_DEFAULTS: dict[str, Any] = {"grad_accum": 1, "precision": "fp32", "lr_schedule": "constant", "warmup": 0,
                                  "weight_decay": None}
#: settings a resume must keep (the schedulers' state means nothing under another schedule)
FIXED_ON_RESUME = ("lr_schedule", "warmup")


def _check_resumable(model: GenerativeModel, ckpt: dict[str, Any], path: Path, train: dict[str, Any]) -> None:
    config = _json_config(model)
    if ckpt.get("family") != model.family or ckpt.get("config") != config:
        old = ckpt.get("config") or {}
        keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(
            f"cannot resume from {path}: it holds a {ckpt.get('family')!r} model with config {old}, "
            f"this is a {model.family!r} model with config {config} (differs in {keys}). "
            f"Use the same model, or another out directory."
        )
    saved = {**TRAIN_DEFAULTS, **ckpt.get("train", {})}
    for key in FIXED_ON_RESUME:
        if saved.get(key) != train[key]:
            raise ValueError(f"cannot resume from {path} with {key}={train[key]!r}: the run used {saved.get(key)!r}")
    if train["lr_schedule"] != "constant" and saved.get("steps") is not None and saved["steps"] != train["steps"]:
        warnings.warn(f"resuming {path} with steps={train['steps']}: the {train['lr_schedule']} lr schedule now "
                      f"decays to 0 at step {train['steps']} (was {saved['steps']}); its lr jumps at the resume",
                      stacklevel=4)  # fmt: skip
    for key, value in train.items():
        if key in ("seed", "batch_size", "world_size") and saved.get(key) != value:
            warnings.warn(
                f"resuming {path} with {key}={value} (the run used {saved.get(key)}): "
                f"the continuation will not equal an uninterrupted run",
                stacklevel=4,  # _check_resumable < _fit < fit < the caller
            )


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision='fp16' needs a CUDA device (on a CPU use bf16 where the CPU has it, or fp32)")
    if device.type == "cpu" and precision == "bf16":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        if not any(caps.get(k) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")):
            raise ValueError(
                "precision='bf16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX); this one has none: "
                "emulated bf16 is slower than fp32. Use precision='fp32'."
            )


def _scalars(terms: dict[str, Any], device: torch.device) -> Tensor:
    return torch.stack(
        [torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, device=device).float().mean() for v in terms.values()]
    )


@torch.no_grad()
def _evaluate(
    model: GenerativeModel, x: Tensor, labels: Tensor | None, batch_size: int, device: torch.device, seed: int
) -> dict[str, float]:
    """Example-weighted means of ``evaluate_step`` over the whole eval set.

    Runs on a forked, fixed-seed RNG: the same noise (dequantisation) at every evaluation,
    and the training stream is left untouched (exact resume does not depend on eval_every).
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            sl = slice(i, min(i + batch_size, len(x)))
            terms = model.evaluate_step(_batch(x, labels, sl, device))
            for k, v in zip(terms, _scalars(terms, device).tolist()):
                sums[k] = sums.get(k, 0.0) + v * (sl.stop - sl.start)
    model.train(was_training)
    return {k: v / len(x) for k, v in sums.items()}


def _training_state(
    model: GenerativeModel, ema: AveragedModel | None, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
    scaler: torch.amp.GradScaler | None, callbacks: list[Callback],
) -> dict[str, Any]:  # fmt: skip
    """The model, EMA, optimizer, scheduler, loss-scaler and callback parts of a checkpoint."""
    return {
        "family": model.family,
        "config": _json_config(model),
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "callbacks": [[type(c).__name__, c.state_dict()] for c in callbacks],
    }


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep the records of steps <= upto: a killed run may have logged past its last checkpoint."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# ---- the loop -------------------------------------------------------------------------


def fit(
    model: GenerativeModel,
    data: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 100,
    eval_every: int = 1000,
    eval_data: Any = None,
    checkpoint_every: int = 1000,
    keep: int = 2,
    grad_clip: float | None = None,
    lr_schedule: str = "constant",
    warmup: int = 0,
    weight_decay: float | None = None,
    grad_accum: int = 1,
    precision: str = "fp32",
    callbacks: list[Callback] | tuple[Callback, ...] = (),
    compile: bool | str = False,
    device: str | torch.device | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` optimizer steps (in total, counting resumed ones).

    Args:
        data: x (N, ...), (x, labels), an object with ``.data``/``.labels`` (a
            :class:`pygen.data.Data`: its compact ``source`` is read batch by batch), or a
            Dataset; batched in a seeded order that is a pure function of (seed, step).
        batch_size: the global batch of one optimizer step; under torchrun each of W ranks
            takes a disjoint batch_size / W slice of it.
        lr: passed to ``model.configure_optimizers`` (None: the model's default).
        seed: seeds python, numpy and torch (per rank) and fixes the data order. It does not
            touch the model's initialisation, which happened before: seed that yourself.
        out: the run directory: ``ckpt-<step>.pt`` (every ``checkpoint_every`` steps and at
            the end; the newest ``keep`` kept, all if keep <= 0), ``latest``, ``metrics.jsonl``.
            A directory that already holds a run needs ``resume=True``.
        resume: continue from ``out/latest`` (weights, EMA, optimizers, schedulers, loss
            scaler, callback states, step, RNG states): the result equals an uninterrupted run
            bitwise on CPU with the same threads. Starts fresh if ``out`` holds no checkpoint
            yet. Refuses a checkpoint of another model config or lr schedule; a run that
            stopped early stays stopped.
        log_every, eval_every: steps between records (mean loss terms over the window,
            the lr of the step, steps/s, samples/s) and between evaluations of ``eval_data``
            ("eval/<term>", "eval_ema/<term>" with an EMA). Both also happen at the last step.
        grad_clip: max total grad norm per optimizer (None: no clipping).
        lr_schedule, warmup: "constant", "cosine" or "linear" decay of every optimizer's lr
            to 0 at ``steps``, after a linear warm-up over ``warmup`` steps
            (:func:`pygen.train.schedules.lr_factor`).
        weight_decay: decoupled weight decay on every parameter group (Adam becomes AdamW);
            None: the model's optimizers as configured.
        grad_accum: each rank's share of the batch runs as ``grad_accum`` micro-batches whose
            gradients add up before the step (DDP all-reduces once, on the last): the same
            update at 1/grad_accum of the activation memory.
        precision: "fp32"; "bf16" (autocast; on a CPU only one with native bfloat16);
            "fp16" (CUDA: autocast and a GradScaler, checkpointed).
        callbacks: :class:`pygen.train.callbacks.Callback` hooks (best checkpoint and early
            stopping, sample grids, TensorBoard, held-out FD are callbacks too).
        compile: torch.compile the model's forward (= loss); a string picks the backend.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on
    CUDA, gloo on CPU); rank 0 writes checkpoints and metrics, evaluates and runs callbacks.

    Returns the records (also written to ``out/metrics.jsonl``): dicts with "step" (steps
    completed) and float values. Raises :class:`TrainingDiverged` on a NaN/inf loss term.

    After ``fit`` returns, ``model`` is what :func:`pygen.models.load` of the run gives: in
    eval mode, holding the EMA weights when the model keeps an EMA (``ema_decay``; the raw
    final weights are in the checkpoints, ``load(out, ema=False)``) — the best checkpoint's
    when a :class:`~pygen.train.callbacks.BestCheckpoint` kept one — with what
    ``model.fit_post_hoc(data, seed=seed)`` then fits on them (a VAE's second stage; also written into
    that checkpoint), so ``model.sample()`` right after training equals sampling the saved run.
    """
    if not isinstance(model, GenerativeModel):
        raise TypeError(f"model must be a pygen.models.GenerativeModel, got {type(model).__name__}")
    counts = {"steps": steps, "batch_size": batch_size, "log_every": log_every, "eval_every": eval_every}
    for name, v in {**counts, "checkpoint_every": checkpoint_every, "seed": seed, "grad_accum": grad_accum,
                    "warmup": warmup}.items():  # fmt: skip
        lowest = 0 if name in ("steps", "seed", "warmup") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
            raise ValueError(f"{name} must be an int >= {lowest}, got {v!r}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be pygen.train.callbacks.Callback instances, got {type(cb).__name__}")
    info = ddp.setup(device)
    failed = True
    try:
        _check_precision(precision, info.device)
        with ddp.job_lock(out, info, "run directory") if out is not None else nullcontext():
            history = _fit(
                model, data, info, steps=steps, batch_size=batch_size, lr=lr, seed=seed, out=out, resume=resume,
                progress=progress, log_every=log_every, eval_every=eval_every, eval_data=eval_data,
                checkpoint_every=checkpoint_every, keep=keep, grad_clip=grad_clip, lr_schedule=lr_schedule,
                warmup=warmup, weight_decay=weight_decay, grad_accum=grad_accum, precision=precision,
                callbacks=list(callbacks), compile=compile,
            )  # fmt: skip
        failed = False
        return history
    finally:
        ddp.teardown(info, failed=failed)


def _fit(
    model: GenerativeModel, data: Any, info: ddp.DistInfo, *, steps: int, batch_size: int, lr: float | None,
    seed: int, out: str | Path | None, resume: bool, progress: bool, log_every: int, eval_every: int,
    eval_data: Any, checkpoint_every: int, keep: int, grad_clip: float | None, lr_schedule: str, warmup: int,
    weight_decay: float | None, grad_accum: int, precision: str, callbacks: list[Callback], compile: bool | str,
) -> list[dict[str, float]]:  # fmt: skip
    device, rank, world = info.device, info.rank, info.world_size
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of ranks ({world})")
    local = batch_size // world
    if local < grad_accum:
        raise ValueError(f"grad_accum={grad_accum} needs at least that many examples per rank; "
                         f"batch_size {batch_size} over {world} rank(s) gives {local}")  # fmt: skip
    x, labels = as_tensors(data, lazy=True)  # compact images stay compact: batches read as float32
    ev = as_tensors(eval_data, lazy=True) if eval_data is not None else None
    order = BatchOrder(len(x), batch_size, seed)
    train_settings = {"seed": seed, "batch_size": batch_size, "world_size": world, "steps": steps, "grad_accum": grad_accum,
                      "precision": precision, "lr_schedule": lr_schedule, "warmup": warmup,
                      "weight_decay": weight_decay}  # fmt: skip
    _seed_everything(seed, rank)
    model.to(device).train()

    out_dir = Path(out) if out is not None else None
    found = None
    if out_dir is not None:
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_temp_files(out_dir)
        if resume:
            found = read_checkpoint(out_dir, map_location=device)
        elif out_dir.is_dir() and is_run_directory(out_dir):
            raise FileExistsError(f"{out_dir} already holds a training run: pass resume=True to continue it, or another out")

    start, last_ckpt = 0, None
    if found is not None:
        ckpt, last_ckpt = found
        _check_resumable(model, ckpt, last_ckpt, train_settings)
        model.load_state_dict(ckpt["model"])
        start = int(ckpt["step"])
    else:
        # the same (global) batch on every rank: data-dependent init agrees across ranks
        model.setup(_batch(x, labels, order.indices(0), device))
    optimizers, schedulers = _optimizers(model, lr)
    given_lrs = base_lrs(optimizers)  # what ``lr`` configures; a resume with another lr applies it
    if weight_decay is not None:
        apply_weight_decay(optimizers, weight_decay)
    added = lr_schedulers(optimizers, lr_schedule, warmup, steps)
    if added and schedulers:
        raise ValueError(f"lr_schedule={lr_schedule!r} / warmup={warmup}: {type(model).__name__}.configure_optimizers "
                         f"returns its own lr schedulers; use those or the trainer's, not both")  # fmt: skip
    schedulers += added
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ema = None
    if model.ema_decay is not None:
        avg = ema_warmup_fn(model.ema_decay) if model.ema_warmup else get_ema_multi_avg_fn(model.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=avg, use_buffers=True)
    stopped = None
    if found is not None:
        if len(ckpt["optimizers"]) != len(optimizers) or len(ckpt.get("schedulers", [])) != len(schedulers):
            raise ValueError(f"cannot resume from {last_ckpt}: the model configures other optimizers/schedulers")
        for o, s in zip(optimizers, ckpt["optimizers"]):
            o.load_state_dict(s)
        if weight_decay is not None:  # a resume may change it: the given value applies
            apply_weight_decay(optimizers, weight_decay)
        for sch, s in zip(schedulers, ckpt.get("schedulers", [])):
            sch.load_state_dict(s)
        if lr is not None and base_lrs(optimizers) != given_lrs:
            old = sorted({v for o in base_lrs(optimizers) for v in o})
            warnings.warn(f"resuming from {last_ckpt} with lr {lr:g} (base lrs {', '.join(f'{v:g}' for v in old)} "
                          "before): the schedule continues from the new base", stacklevel=3)  # fmt: skip
            apply_base_lr(optimizers, schedulers, given_lrs)
        set_current_lr(added)
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(int(ckpt["ema_n_averaged"]))
        saved_cbs = {name: state for name, state in ckpt.get("callbacks", [])}
        for cb in callbacks:
            if type(cb).__name__ in saved_cbs:
                cb.load_state_dict(saved_cbs[type(cb).__name__])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        stopped = ckpt.get("stopped")
        if stopped:
            warnings.warn(f"{last_ckpt}: the run stopped early at step {start} ({stopped}); nothing to resume",
                          stacklevel=3)  # fmt: skip

    engine: nn.Module = ddp.wrap(model, info)
    no_sync = engine.no_sync if isinstance(engine, nn.parallel.DistributedDataParallel) else None
    if compile:
        engine = torch.compile(engine, backend="inductor" if compile is True else compile)
    update = Update(engine, grad_clip=grad_clip, grad_accum=grad_accum, precision=precision,
                    device_type=device.type, scaler=scaler, no_sync=no_sync)  # fmt: skip

    def payload(step: int, rngs: list[Any], **extra: Any) -> dict[str, Any]:
        state = _training_state(model, ema, optimizers, schedulers, scaler, callbacks)
        return {**state, "step": step, "rng": rngs, "train": train_settings, "versions": versions(), **extra}

    run = Run(model, ema, steps=steps, out=out_dir, seed=seed,
              save=lambda path, extra: save_atomic(payload(run.step, [rng_state()], **extra), path) or path)
    run.step = start
    cbs = callbacks if info.is_main else []
    for cb in cbs:
        cb.on_start(run)

    metrics = out_dir / METRICS if out_dir is not None and info.is_main else None
    if metrics is not None:
        _rewrite_metrics(metrics, start)
    end = start if stopped else steps
    pbar = None
    if progress and info.is_main and start < end:
        from tqdm.auto import tqdm  # the 'models' extra

        pbar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)

    history: list[dict[str, float]] = []
    window: dict[str, float] = {}
    window_n, t_last = 0, time.perf_counter()

    def read(step: int, on: torch.device = device) -> Any:
        return _batch(x, labels, order.indices(step)[rank * local : (rank + 1) * local], on)

    if isinstance(x, ImageFiles):  # a lazy folder: worker processes decode the next batches while this step trains
        ahead = prefetched(functools.partial(read, on=torch.device("cpu")), range(start, end), depth=2,
                           workers=default_workers())
        batches = (tuple(t.to(device) for t in b) if isinstance(b, tuple) else b.to(device) for b in ahead)
    else:
        batches = map(read, range(start, end))
    # the logged lr: that of the last optimizer that stepped (a GAN's G after its D; latent
    # diffusion's autoencoder, then its diffusion model), read by the optimizers' own hooks
    stepped: list[float] = []
    hooks = [o.register_step_post_hook(lambda o, *_: stepped.append(o.param_groups[0]["lr"])) for o in optimizers]
    lr_used = optimizers[0].param_groups[0]["lr"]
    try:
        for step, batch in zip(range(start, end), batches):
            k = step + 1  # steps completed after this one
            stepped.clear()
            try:
                terms = model.training_step(batch, step, optimizers, update=update)
            except TrainingDiverged as e:  # raised by the model (an exploding GAN loss): name the checkpoint
                if e.checkpoint is not None:
                    raise
                raise TrainingDiverged(f"{e}; last good checkpoint: {describe(last_ckpt)}", step=e.step,
                                       checkpoint=last_ckpt) from e
            lr_used = stepped[-1] if stepped else lr_used  # none: an AMP step skipped for inf grads
            for sch in schedulers:
                sch.step()
            if ema is not None:
                ema.update_parameters(model)
            run.step = k
            # one all-reduce: the global mean, so that all ranks log the same and stop together
            values = dict(zip(terms, ddp.mean_over_ranks(_scalars(terms, device), info).tolist()))
            bad = [name for name, v in values.items() if not math.isfinite(v)]
            if bad:
                found_bad = ", ".join(f"{n}={values[n]}" for n in bad)
                raise TrainingDiverged(
                    f"non-finite loss terms ({found_bad}) at training step {k}; "
                    f"last good checkpoint: {describe(last_ckpt)}",
                    step=k,
                    checkpoint=last_ckpt,
                )
            for name, v in values.items():
                window[name] = window.get(name, 0.0) + v
            window_n += 1
            if pbar is not None:
                pbar.update(1)

            record: dict[str, float] = {}
            if k % log_every == 0 or k == steps:
                rate = window_n / max(time.perf_counter() - t_last, 1e-9)
                record.update({name: v / window_n for name, v in window.items()})
                record.update(lr=lr_used, steps_per_s=rate, samples_per_s=rate * batch_size)
                window, window_n = {}, 0
                if pbar is not None:
                    shown = {n: f"{v:.4g}" for n, v in record.items() if n in terms}
                    pbar.set_postfix(shown | {"samples/s": f"{rate * batch_size:.4g}"})
            if ev is not None and info.is_main and (k % eval_every == 0 or k == steps):
                held_out: dict[str, float] = {}
                for prefix, module in (("eval", model), ("eval_ema", ema.module if ema is not None else None)):
                    if module is not None:
                        terms_ev = _evaluate(module, *ev, batch_size, device, seed)
                        held_out.update({f"{prefix}/{n}": v for n, v in terms_ev.items()})
                for cb in cbs:
                    cb.on_eval(run, held_out)
                record.update(held_out)
            for cb in cbs:
                cb.on_step(run, record)
            stop = ddp.broadcast_flag(run.stop_reason is not None, info)
            if out_dir is not None and (k % checkpoint_every == 0 or k == steps or stop):
                bad = _non_finite(model, ema.module if ema is not None else None)
                if bad:  # never checkpoint them: the last good checkpoint stays the latest
                    raise TrainingDiverged(
                        f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) after training "
                        f"step {k}; last good checkpoint: {describe(last_ckpt)}",
                        step=k,
                        checkpoint=last_ckpt,
                    )
                rngs = ddp.gather_objects(rng_state(), info)  # every rank's, for an exact resume
                last_ckpt = out_dir / f"ckpt-{k}.pt"
                if info.is_main:
                    extra = {"stopped": run.stop_reason} if stop else {}
                    last_ckpt = write_checkpoint(out_dir, payload(k, rngs, **extra), keep)
            if stop:
                record["stopped_early"] = 1.0
            if record:
                record = {"step": k, **record}
                history.append(record)
                if metrics is not None:
                    with open(metrics, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if "steps_per_s" in record:
                t_last = time.perf_counter()  # eval and checkpoint time stays out of the rate
            if stop:
                if pbar is not None:
                    pbar.write(f"stopped early at step {k}: {run.stop_reason}")
                break
    finally:
        for h in hooks:
            h.remove()
        if hasattr(batches, "close"):  # a prefetching reader: its thread stops here
            batches.close()
        if pbar is not None:
            pbar.close()
    if ema is not None:  # the model samples as load(out) does: with the averaged weights
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    for cb in cbs:
        cb.on_end(run)
    fitted = model.fit_post_hoc(data, seed=seed)  # on the weights sampling uses, every rank alike
    if fitted is not None and info.is_main:
        if progress:
            print(f"post-hoc: {fitted}", flush=True)
        if out_dir is not None:
            _add_post_hoc(out_dir, model, on_ema=ema is not None)
    return history


def _add_post_hoc(out_dir: Path, model: GenerativeModel, *, on_ema: bool) -> None:
    """Add the model with its post-hoc stages to the checkpoint :func:`pygen.models.load`
    reads from ``out_dir`` (best.pt or the latest), as its ``"post_hoc"`` entry; the training
    state beside it stays as it was (a resume continues from it)."""
    file = select_checkpoint(out_dir, verify=False)  # written by this run a moment ago
    ckpt = load_checkpoint(file, verify=False)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    ckpt["post_hoc"] = {"config": _json_config(model), "model": state, "on_ema": on_ema}
    save_atomic(ckpt, file)

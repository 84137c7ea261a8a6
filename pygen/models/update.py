"""One optimizer update as the trainer configures it: :class:`Update`.

A model's ``training_step`` decides *what* is updated (one optimizer over all parameters; a
GAN alternates D and G); :class:`Update` does *how*, the same for every family: the forward
through the trainer's wrapper (DistributedDataParallel, torch.compile), gradient accumulation
over micro-batches, autocast and fp16 loss scaling, gradient clipping. Defined below both the
models and the trainer, like :class:`pygen.models.base.TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from pygen.models.labels import Batch

__all__ = ["Update", "PRECISIONS", "split_micro_batches", "ema_warmup_fn"]

#: --precision names -> autocast dtype (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def split_micro_batches(batch: Batch, k: int) -> list[tuple[Batch, float]]:
    """``batch`` (x or (x, labels)) as k micro-batches along dim 0, each with its share of the
    examples n_i / N (the weight that makes the micro-batch losses sum to the batch mean)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    n = x.shape[0]
    if k == 1:
        return [(batch, 1.0)]
    if n < k:
        raise ValueError(f"grad_accum={k} needs at least {k} examples per rank and step, got a batch of {n}")
    parts = (
        list(zip(*(t.tensor_split(k) for t in batch))) if isinstance(batch, (tuple, list)) else batch.tensor_split(k)
    )
    out = []
    for p in parts:
        size = (p[0] if isinstance(p, tuple) else p).shape[0]
        out.append((tuple(p) if isinstance(p, tuple) else p, size / n))
    return out


class Update:
    """How ``training_step`` turns a batch into gradients and an optimizer step.

    Args:
        forward: the trainer's wrapper of the model (call it instead of ``model.loss`` so that
            DDP all-reduces the gradients); None: the model itself.
        grad_clip: max total grad norm of the stepped parameters (None: no clipping).
        grad_accum: the batch is processed as ``grad_accum`` micro-batches whose gradients add
            up (losses weighted by their share of the examples): the same update as the whole
            batch at a fraction of the activation memory, for losses that are means over
            independent examples (batch statistics such as batch norm see micro-batches).
        precision: "fp32", "bf16" or "fp16": the forward under ``torch.autocast`` of that
            dtype; fp16 scales the loss with ``scaler`` (a ``torch.amp.GradScaler``).
        device_type: autocast's device type ("cpu", "cuda").
        no_sync: DDP's ``no_sync`` of the wrapped model: no all-reduce on the inner
            micro-batches, one on the last.
    """

    def __init__(
        self,
        forward: Callable[..., dict[str, Tensor]] | None = None,
        *,
        grad_clip: float | None = None,
        grad_accum: int = 1,
        precision: str = "fp32",
        device_type: str = "cpu",
        scaler: torch.amp.GradScaler | None = None,
        no_sync: Callable[[], ContextManager[Any]] | None = None,
    ) -> None:
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.forward, self.grad_clip, self.grad_accum = forward, grad_clip, grad_accum
        self.precision, self.device_type, self.scaler, self.no_sync = precision, device_type, scaler, no_sync

    def _autocast(self) -> ContextManager[Any]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, model: nn.Module, batch: Batch, **loss_kwargs: Any) -> dict[str, Tensor]:
        """Forward and backward of ``batch`` (gradients accumulate into ``.grad``: zero them
        before). Returns the detached terms, example-weighted means over the micro-batches.
        A non-finite loss is backpropagated too (every DDP rank must join each all-reduce):
        the caller decides not to step on it."""
        fwd = model if self.forward is None else self.forward
        parts = split_micro_batches(batch, self.grad_accum)
        out: dict[str, Any] = {}
        for i, (micro, weight) in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                with self._autocast():
                    terms = fwd(micro, **loss_kwargs)
                loss = terms["loss"] if len(parts) == 1 else terms["loss"] * weight
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in terms.items():
                v = v.detach() if isinstance(v, Tensor) else v
                out[k] = v if len(parts) == 1 else out.get(k, 0.0) + v * weight
        return out

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> Tensor:
        """Unscale (fp16), clip to ``grad_clip``, step ``optimizer``. Returns the total grad
        norm before clipping (0 when no parameter has a gradient)."""
        params = [p for p in params if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params])  # 0 for no gradients
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()
        return norm


def ema_warmup_fn(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An EMA update for :class:`torch.optim.swa_utils.AveragedModel`'s ``multi_avg_fn`` with
    the decay warmed up: min(decay, (1 + k) / (10 + k)) at the k-th update (k = n_averaged),
    so that a short run's average is not dominated by its first weights."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        k = int(n_averaged)
        d = min(decay, (1 + k) / (10 + k))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers (as torch's EMA does)
            for a, c in zip(averaged, current):
                a.copy_(a * d + c * (1 - d))

    return update

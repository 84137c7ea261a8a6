"""Batches from tensors kept in memory, in an order that is a pure function of (seed, epoch).

A trainer resumed at step k must see exactly the batches an uninterrupted run sees at step
k. A running generator cannot give that without saving its state; here each epoch's
permutation is drawn from a fresh generator seeded by (seed, epoch), so the position
(epoch, batch) is all there is to restore: ``loader.batches_from(step)``.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from pygen.data.storage import ImageFiles, Images, materialize

__all__ = ["TensorData", "InMemoryLoader", "epoch_permutation", "as_tensors", "prefetched", "default_workers"]

T = TypeVar("T")


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """A permutation of range(n) (int64, CPU) fixed by (seed, epoch) alone (numpy's PCG64
    seeded with the pair: the same on every platform). The one epoch order of pygen: this
    loader and :class:`pygen.train.BatchOrder` both use it."""
    return torch.from_numpy(np.random.default_rng([int(seed), int(epoch)]).permutation(n))


def prefetched(read: Callable[[int], T], keys: Iterable[int], depth: int = 1, workers: int = 0) -> Iterator[T]:
    """``read(k)`` for each k of ``keys``, in order, the next ``depth`` reads running ahead
    while the caller works on the current one. ``workers`` = 0: in one background thread
    (enough when ``read`` releases the GIL); > 0: in that many forked worker processes (a
    torch DataLoader), which is how a lazy folder's decoding overlaps the training step:
    Pillow holds the GIL for most of a small image's decode (28x28 PNGs on 2 threads decode
    2.4x slower than on one), so threads fight the step for it. The reads are pure
    functions of k, so the results are the plain loop's; an error raised by read(k) reaches
    the caller at k, as itself."""
    if workers > 0:
        yield from _in_workers(read, list(keys), depth, workers)
        return
    keys = iter(keys)
    with ThreadPoolExecutor(1, thread_name_prefix="pygen-prefetch") as pool:
        pending = deque(pool.submit(read, k) for k in itertools.islice(keys, depth + 1))
        try:
            while pending:
                yield pending.popleft().result()  # the caller works while reads k+1 .. k+depth run
                pending.extend(pool.submit(read, k) for k in itertools.islice(keys, 1))
        finally:  # the caller stopped early: drop the reads not started
            for f in pending:
                f.cancel()


class _Reads(Dataset):
    """Item i = (True, read(keys[i])), or (False, the exception read raised): the worker hands
    the error back whole (DataLoader would re-raise it as text with a worker traceback)."""

    def __init__(self, read: Callable[[int], Any], keys: Sequence[int]) -> None:
        self.read, self.keys = read, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[bool, Any]:
        try:
            return True, self.read(self.keys[i])
        except Exception as e:  # noqa: BLE001 - re-raised in the caller at this key
            return False, e


def _as_is(item: Any) -> Any:
    return item


def _in_workers(read: Callable[[int], T], keys: Sequence[int], depth: int, workers: int) -> Iterator[T]:
    if not keys:
        return
    # fork: ``read`` may be a closure (not picklable) and the workers start at once; they
    # only decode files (no CUDA, one torch thread each: DataLoader's worker setting)
    loader = torch.utils.data.DataLoader(_Reads(read, keys), batch_size=None, num_workers=min(workers, len(keys)),
                                         prefetch_factor=max(1, depth), multiprocessing_context="fork",
                                         collate_fn=_as_is,  # (x, labels) stays a tuple of tensors
                                         generator=torch.Generator())  # its worker seeds: not from the global RNG
    for ok, value in loader:  # in key order
        if not ok:
            raise value
        yield value


def default_workers() -> int:
    """Worker processes that decode a lazy folder's batches ahead of training: one per CPU
    this process may use beyond the first (which trains), at least 1, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus - 1))


def as_tensors(data: Any, *, lazy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(x (N, ...), labels (N,) or None) from a tensor, an (x, labels) pair, an object with
    ``.data`` [and ``.labels``] tensor fields (:func:`pygen.data.load`'s data sets), or a
    map-style Dataset (its items are collated into memory).

    ``lazy``: images held compactly (:mod:`pygen.data.storage`: a :class:`~pygen.data.Data`'s
    ``source``, or such a source given as x) are returned as they are, x[idx] reading float32
    batches (what the trainer does); otherwise they are read into one float32 tensor."""
    if isinstance(data, (Images, ImageFiles)):
        x, labels = data, None
    elif isinstance(data, Tensor):
        x, labels = data, None
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)
          and isinstance(data[0], (Tensor, Images, ImageFiles))):
        x, labels = data
    elif hasattr(data, "source") and hasattr(data, "labels"):  # pygen.data.Data
        x, labels = data.source, data.labels
    elif isinstance(getattr(data, "data", None), Tensor):
        x, labels = data.data, getattr(data, "labels", None)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = default_collate([data[i] for i in range(len(data))])
        x, labels = (items, None) if isinstance(items, Tensor) else (items[0], items[1] if len(items) > 1 else None)
    else:
        raise TypeError(
            f"data must be a tensor, (tensor, labels), an object with .data, or a Dataset; got {type(data).__name__}"
        )
    if not lazy:
        x = materialize(x)
    if x.dim() == 0 or len(x) == 0:
        raise ValueError(f"data must be a non-empty (N, ...) tensor, got shape {tuple(x.shape)}")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} examples")
    return x, labels


class TensorData(Dataset):
    """A map-style Dataset over tensors sharing their first dim: item i is (t[i] for t in tensors)."""

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError(f"TensorData needs tensors with one first dim, got {[tuple(t.shape) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


class InMemoryLoader:
    """Shuffled batches from tensors in memory, resumable at any step, sharded over ranks.

    ``tensors``: one tensor or a sequence sharing dim 0 (e.g. (images, labels)); a batch is
    a tuple of slices (a single tensor when one was given), on the tensors' device.

    Order: epoch e uses the permutation :func:`epoch_permutation` (N, seed, e) (identity when
    ``shuffle=False``), the same on every rank. With ``world_size`` W > 1 (DDP) rank r takes
    positions r, r + W, r + 2W, ... of the first W * (N // W) entries, so ranks get disjoint
    index sets of equal size (they cover the data when W divides N; otherwise each epoch drops
    N mod W of it, a different part every epoch), and every rank runs the same number of
    steps. ``batch_size`` is per rank. ``drop_last`` drops an incomplete last batch.

    Iterating yields one epoch (from the position :meth:`set_epoch` gave, else the start of
    the current epoch) and then moves on to the next epoch. :meth:`batches_from` (step) is
    the endless stream a trainer resumed at global step ``step`` uses: step k is batch
    k mod len(self) of epoch k // len(self), whatever happened before.
    """

    def __init__(
        self,
        tensors: Tensor | Sequence[Tensor],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self._single = isinstance(tensors, Tensor)
        self.tensors: tuple[Tensor, ...] = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        if not self.tensors or any(t.shape[0] != self.tensors[0].shape[0] for t in self.tensors):
            raise ValueError(f"tensors must share their first dim, got {[tuple(t.shape) for t in self.tensors]}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.n = self.tensors[0].shape[0]
        self.per_rank = self.n // world_size
        if self.per_rank < (batch_size if drop_last else 1):
            raise ValueError(f"{self.n} examples over {world_size} rank(s) leave fewer than one batch of {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's example indices for ``epoch``, in order (int64, CPU)."""
        order = epoch_permutation(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Make the next iteration yield ``epoch`` from batch ``position`` on."""
        if not 0 <= position <= len(self):
            raise ValueError(f"position must be in [0, {len(self)}], got {position}")
        self.epoch, self.position = int(epoch), int(position)

    def _batch(self, idx: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = tuple(t[idx.to(t.device)] for t in self.tensors)
        return out[0] if self._single else out

    def _epoch(self, epoch: int, start: int) -> Iterator[Tensor | tuple[Tensor, ...]]:
        idx = self.indices(epoch)
        for b in range(start, len(self)):
            yield self._batch(idx[b * self.batch_size : (b + 1) * self.batch_size])

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, ...]]:
        epoch, start = self.epoch, self.position
        self.epoch, self.position = epoch + 1, 0  # the next iteration is the next epoch
        yield from self._epoch(epoch, start)

    def batches_from(self, step: int = 0) -> Iterator[Tensor | tuple[Tensor, ...]]:
        """Endless batches starting at global step ``step`` (epoch step // len, batch step % len)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, start = divmod(int(step), len(self))
        while True:
            yield from self._epoch(epoch, start)
            epoch, start = epoch + 1, 0

"""How image data is held: compactly, read as float32 one batch at a time.

60,000 28x28 images are 47 MB as uint8 and 188 MB as float32; a folder of photographs or a
large .npy may not fit in memory at all. :class:`Images` keeps the stored values (uint8
codes in memory, or any numeric array memory-mapped from an .npy file) plus an optional
index map (a split's rows, no copy) and gives ``images[idx]`` -> (B, C, H, W) float32 in
[0, 1] for the rows asked for; the trainer reads it that way
(:func:`pygen.data.as_tensors` with ``lazy=True``). :class:`ImageFiles` does the same for
a folder whose decoded images would not fit: each batch's files are decoded when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Images", "ImageFiles", "Source", "take", "materialize"]


def _index(idx: Any, n: int) -> np.ndarray:
    """An int64 array of row numbers from an int, a slice, a tensor or a sequence."""
    if isinstance(idx, slice):
        return np.arange(n, dtype=np.int64)[idx]
    if isinstance(idx, Tensor):
        idx = idx.cpu().numpy()
    out = np.asarray(idx, dtype=np.int64).reshape(-1)
    return np.where(out < 0, out + n, out)


class Images:
    """Images (N, C, H, W) kept as their stored values, read as float32 ``value / scale``.

    Args:
        array: (N, C, H, W), or (N, H, W, C) with ``channels_last``: a uint8 tensor, or a
            numpy array of any numeric dtype (e.g. ``np.load(path, mmap_mode="r")``).
        scale: what a value is divided by: 255 for 8-bit codes, 1 for floats in [0, 1].
        rows: the rows of ``array`` this object is (a split), in order; None: all.
    """

    def __init__(self, array: Tensor | np.ndarray, *, scale: float = 255.0, channels_last: bool = False,
                 rows: np.ndarray | None = None) -> None:
        if array.ndim != 4:
            raise ValueError(f"Images needs a 4-d array, got shape {tuple(array.shape)}")
        self.array, self.scale, self.channels_last, self.rows = array, float(scale), channels_last, rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        n, *rest = self.array.shape
        c_h_w = (rest[2], rest[0], rest[1]) if self.channels_last else tuple(rest)
        return (len(self), *map(int, c_h_w))

    def dim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values of these rows (what holding them in memory costs)."""
        return len(self) * math.prod(self.shape[1:]) * self.array.dtype.itemsize

    def __getitem__(self, idx: Any) -> Tensor:
        """Rows ``idx`` (a slice, an int tensor or sequence) -> (B, C, H, W) float32 in [0, 1]."""
        i = _index(idx, len(self))
        if self.rows is not None:
            i = self.rows[i]
        if isinstance(self.array, Tensor):
            raw = self.array[torch.from_numpy(i)]
        else:
            # a memory-mapped array reads fastest in file order: gather sorted, then reorder
            order = np.argsort(i, kind="stable")
            got = np.empty((len(i), *self.array.shape[1:]), dtype=self.array.dtype)
            got[order] = self.array[i[order]]
            raw = torch.from_numpy(got)
        if self.channels_last:
            raw = raw.permute(0, 3, 1, 2)
        x = raw.to(torch.float32).contiguous()
        return x.div_(self.scale) if self.scale != 1 else x

    def subset(self, idx: Any) -> Images:
        """These images' rows ``idx`` without copying the stored values."""
        i = _index(idx, len(self))
        return Images(self.array, scale=self.scale, channels_last=self.channels_last,
                      rows=self.rows[i] if self.rows is not None else i)

    def float(self) -> Tensor:
        """All rows as one (N, C, H, W) float32 tensor (a copy: 4 bytes per value)."""
        return self[slice(None)]


class ImageFiles:
    """A folder's images decoded when a batch asks for them (the folder's decoded images
    would not fit in memory). ``decode(path) -> (C, H, W) uint8 array``; ``threads`` decode
    a batch's files in parallel (Pillow releases the GIL while decoding)."""

    def __init__(self, files: Sequence[Path], shape: tuple[int, int, int], decode: Callable[[Path], np.ndarray],
                 *, threads: int | None = None) -> None:
        self.files, self._shape, self.decode = list(files), tuple(shape), decode
        # one by default: Pillow holds the GIL for most of a small image's decode (a batch of 128
        # 28x28 PNGs: 20 ms on one thread, 50 ms on two); the trainer decodes in worker processes
        self.threads = threads if threads is not None else 1

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._shape)

    def dim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self._shape)

    def __getitem__(self, idx: Any) -> Tensor:
        paths = [self.files[j] for j in _index(idx, len(self))]
        if self.threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                arrays = list(pool.map(self.decode, paths))
        else:
            arrays = [self.decode(p) for p in paths]
        if not arrays:
            return torch.empty(0, *self._shape)
        return torch.from_numpy(np.stack(arrays)).to(torch.float32).div_(255.0)

    def subset(self, idx: Any) -> ImageFiles:
        return ImageFiles([self.files[j] for j in _index(idx, len(self))], self._shape, self.decode,
                          threads=self.threads)

    def float(self) -> Tensor:
        return self[slice(None)]


Source = Tensor | Images | ImageFiles


def take(source: Source, idx: Any) -> Source:
    """Rows ``idx`` of a source: a tensor indexed, an :class:`Images` / :class:`ImageFiles` subset."""
    if isinstance(source, Tensor):
        return source[torch.as_tensor(_index(idx, len(source)))]
    return source.subset(idx)


def materialize(source: Source) -> Tensor:
    """A source as one float32 tensor (itself when it is one)."""
    return source if isinstance(source, Tensor) else source.float()

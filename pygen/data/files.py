"""``load(spec)``: one entry point from a name or a path to a :class:`Data`.

Built-in names: "digits", "digits16", "digits32", the :data:`~pygen.data.datasets.TOY2D`
names, "patches" and "fashion-mnist" / "fashion-mnist:test" (read from the Debian package
``dataset-fashion-mnist``'s IDX files, or from ``$PYGEN_DATA``). Paths: a folder of images, an .npz / .npy array, or MNIST-style IDX
files. Every failure to read data is one :class:`DataError` (a ValueError) whose message
names the file and what was expected, so a command-line tool can print it as one line.

8-bit images are held as uint8 (:class:`pygen.data.storage.Images`): a quarter of float32's
memory; ``.npy`` images stay memory-mapped (data larger than memory), and a folder whose
decoded images would take more than a quarter of the memory is read lazily
(:class:`~pygen.data.storage.ImageFiles`). :attr:`Data.data` is the float32 view.
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pygen._io import gigabytes, memory_bytes
from pygen.data.datasets import SPLITS, TOY2D, digits, patches, toy2d
from pygen.data.storage import ImageFiles, Images, Source, materialize, take

__all__ = ["DataError", "Data", "NAMES", "load", "train_test", "fashion_mnist", "FASHION_MNIST_CLASSES"]

NAMES = ("digits", "digits16", "digits32", *TOY2D, "patches", "fashion-mnist", "fashion-mnist:test")
#: points drawn for a toy2d name: train, and test (a different seed: seed + _TOY_TEST_SEED)
_TOY_N = {"train": 10_000, "test": 2_000}
_TOY_TEST_SEED = 1_000_003
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """Data that could not be read: a missing, empty or malformed file, or an unknown name."""


@dataclass(frozen=True)
class Data:
    """A data set.

    source: how the examples are held: a float32 tensor ((N, D) points, or (N, C, H, W)
    images in [0, 1]), or images kept compactly (:class:`~pygen.data.storage.Images`: uint8
    or memory-mapped; :class:`~pygen.data.storage.ImageFiles`: decoded per batch), which
    ``source[idx]`` reads as float32 batches. ``data``: all of it as one float32 tensor (a
    copy for compact sources: the trainer reads batches from ``source`` instead).
    labels: (N,) int64 or None.  name: the spec it came from.  split: "train", "test" or "all".
    ``low_res`` is set for super-resolution data ("patches") only: the low-resolution inputs
    (N, 3, h, w) of the images in ``data`` (the high-resolution targets). ``classes``: the
    class names of labels 0..K-1 where the data names them (a folder's sub-folders,
    Fashion-MNIST's classes).
    """

    source: Source
    labels: Tensor | None
    name: str
    split: str = "all"
    low_res: Tensor | None = None
    classes: tuple[str, ...] | None = None

    @property
    def data(self) -> Tensor:
        """All examples as float32 (N, ...) (images in [0, 1]). A lazy image folder decodes
        every file here: for a subset, index ``source`` (:func:`pygen.data.storage.take`)."""
        return materialize(self.source)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example (no batch dim)."""
        return tuple(self.source.shape[1:])

    @property
    def kind(self) -> str:
        """"image" for (N, C, H, W) data, "points" for (N, D)."""
        return "image" if len(self.source.shape) == 4 else "points"

    @property
    def bins(self) -> int | None:
        """Quantisation levels of image data in [0, 1], the rule every likelihood in pygen
        uses unless a model's config says otherwise: 17 for the digits at any size (values
        k / 16), 256 for other images (8 bits); None for points (continuous)."""
        if self.kind != "image":
            return None
        return 17 if self.name.startswith("digits") else 256

    def __len__(self) -> int:
        return len(self.source)


def _fail(path: os.PathLike | str, what: str) -> DataError:
    return DataError(f"{os.fspath(path)}: {what}")


# ---------------------------------------------------------------------------------------
# arrays -> images / points


def _as_float(arr: np.ndarray, path: Path) -> Tensor:
    """An array of images or points -> float32 tensor, images scaled to [0, 1]."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise _fail(path, f"integer data must be 0..255 pixel values, got range [{arr.min()}, {arr.max()}]")
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise _fail(path, f"expected a numeric array, got dtype {arr.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise _fail(path, "array holds NaN or infinite values")
    return t


MAX_CLASSES = 65536  # a larger label is a mistake, not a class: each class gets an embedding row


def _range(arr: np.ndarray, rows: int = 4096) -> tuple[Any, Any, bool]:
    """(min, max, all finite) of an array, read ``rows`` rows at a time (a memory map stays
    unread in memory)."""
    lo, hi, finite = None, None, True
    for i in range(0, arr.shape[0], rows):
        part = np.asarray(arr[i : i + rows])
        if part.size == 0:
            continue
        if np.issubdtype(part.dtype, np.floating) and not np.isfinite(part).all():
            finite = False
            part = part[np.isfinite(part)]
            if part.size == 0:
                continue
        lo = part.min() if lo is None else min(lo, part.min())
        hi = part.max() if hi is None else max(hi, part.max())
    return lo, hi, finite


def _image_source(arr: np.ndarray, path: Path, *, mapped: bool) -> Source:
    """(N, H, W) / (N, C, H, W) / (N, H, W, C) image values -> a source: integers 0..255 kept
    as 8-bit codes (uint8, or the memory map itself when ``mapped``), floats checked to lie
    in [0, 1] (kept mapped, else a float32 tensor)."""
    channels_last = arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if not (is_float or np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise _fail(path, f"expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        lo, hi, finite = _range(arr)
        if not finite:
            raise _fail(path, "array holds NaN or infinite values")
        if is_float and lo is not None and (lo < 0 or hi > 1):
            raise _fail(path, f"float images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        if not is_float and lo is not None and (lo < 0 or hi > 255):
            raise _fail(path, f"integer data must be 0..255 pixel values, got range [{lo}, {hi}]")
    if arr.ndim == 3:
        arr = arr[:, None]
    if mapped:
        return Images(arr, scale=1.0 if is_float else 255.0, channels_last=channels_last)
    if is_float:
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return (x.permute(0, 3, 1, 2) if channels_last else x).contiguous()
    codes = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))
    return Images((codes.permute(0, 3, 1, 2) if channels_last else codes).contiguous(), scale=255.0)


def _to_data(arr: np.ndarray, labels: np.ndarray | None, path: Path, split: str, *, mapped: bool = False) -> Data:
    """Shape rules: (N, D) points; (N, H, W) grayscale; (N, C, H, W) or (N, H, W, C) images
    (channels-last when the last dim is 1, 3 or 4 and dim 1 is not); float images must lie in
    [0, 1]; integer images are 0..255 pixel values (held as uint8, read as value / 255).
    ``mapped``: ``arr`` is a memory map to keep (images only)."""
    if arr.ndim not in (2, 3, 4) or arr.shape[0] == 0:
        raise _fail(
            path,
            f"expected (N, D) points or (N, H, W) / (N, C, H, W) / (N, H, W, C) images, N > 0; got shape {arr.shape}",
        )
    if arr.ndim == 2:
        _check_claim(path, arr.shape[0] * arr.shape[1] * 4, f"its {arr.shape} points")
        arr = np.array(arr)  # a copy: points live in memory, not in a map of the file
        x: Source = _as_float(arr, path)
        if not np.issubdtype(arr.dtype, np.floating):  # integer (N, D) data: ambiguous, points with raw values
            x = torch.from_numpy(arr.astype(np.float32))
    else:
        x = _image_source(arr, path, mapped=mapped)
    y = None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != x.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise _fail(path, f"labels must be {x.shape[0]} integers, got shape {labels.shape} dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise _fail(path, f"label {bad} is out of range: labels are class indices 0..K-1 (K <= {MAX_CLASSES})")
        y = torch.from_numpy(labels.astype(np.int64))
    return Data(x, y, str(path), split)


def _npy_claim(path: Path) -> None:
    """Check what an .npy header claims against the file before numpy maps it."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            start = f.tell()
    except (OSError, ValueError, EOFError):
        return  # np.load reports it
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = path.stat().st_size - start
    if want > have:
        raise _fail(path, f"its .npy header {shape} {dtype} claims {gigabytes(want)}, the file holds "
                          f"{gigabytes(have)}: a damaged or truncated file")


def _load_npy(path: Path, split: str) -> Data:
    """An .npy file, memory-mapped: images stay on disk (read per batch, data larger than
    memory works), points are read into memory."""
    _npy_claim(path)
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise _fail(path, f"not a readable .npy array ({e})") from None
    return _to_data(arr, None, path, split, mapped=True)


def _load_npz(path: Path, split: str) -> Data:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(path, f"not a readable .npz archive ({e})") from None
    key = next((k for k in ("images", "x") if k in arrays), None)
    if key is None:
        if len(arrays) != 1:
            want = "expected one array or keys 'images'/'x' (+ optional 'labels'/'y')"
            raise _fail(path, f"{want}, found keys {sorted(arrays)}")
        key = next(iter(arrays))
    labels = next((arrays[k] for k in ("labels", "y") if k in arrays), None)
    return _to_data(arrays[key], labels, path, split)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_idx(path: Path) -> bool:
    try:
        with _open(path) as f:
            head = f.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and head[3] >= 1


def _check_claim(path: Path, nbytes: int, what: str) -> None:
    if nbytes > memory_bytes():
        raise _fail(path, f"{what} claims {gigabytes(nbytes)}, more than this machine's memory "
                          f"({gigabytes(memory_bytes())}): a damaged header, or data to split into smaller files")


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format of MNIST: magic (0, 0, dtype code, ndim), ndim big-endian int32 dims, data.
    The header is read first and bounds what is read (a .gz cannot inflate beyond it)."""
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES or head[3] < 1:
                raise _fail(path, "expected an IDX file (magic bytes 00 00 <dtype> <ndim>)")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise _fail(path, "IDX header is truncated")
            dims = struct.unpack(f">{ndim}i", raw_dims)
            dt = np.dtype(_IDX_DTYPES[head[2]])
            if any(d < 0 for d in dims):
                raise _fail(path, f"IDX header has negative dimensions {dims}")
            count = int(np.prod(dims, dtype=np.int64)) if dims else 0
            want = count * dt.itemsize
            _check_claim(path, want, f"its IDX header {dims}")
            body = f.read(want + 1)  # one byte more: a longer file is as wrong as a shorter one
    except (OSError, EOFError, zlib.error) as e:
        raise _fail(path, f"not a readable IDX file ({e})") from None
    if len(body) != want:
        more = "more" if len(body) > want else f"{len(body)}"
        raise _fail(path, f"IDX header says {dims} ({want} bytes of data), file has {more}")
    return np.frombuffer(body, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def _idx_labels_path(path: Path) -> Path | None:
    """train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz] (either compression)."""
    name = path.name
    if "images" not in name:
        return None
    stem = name.replace("images", "labels").replace("idx3", "idx1")
    base = stem[:-3] if stem.endswith(".gz") else stem
    for cand in (base, base + ".gz"):
        if (path.parent / cand).is_file():
            return path.parent / cand
    return None


def _load_idx(path: Path, split: str) -> Data:
    arr = _read_idx(path)
    if arr.ndim not in (3, 4):
        raise _fail(path, f"expected IDX images (N, H, W), got shape {arr.shape}")
    lp = _idx_labels_path(path)
    labels = _read_idx(lp) if lp is not None else None
    if labels is not None and labels.shape[0] != arr.shape[0]:
        raise _fail(lp, f"has {labels.shape[0]} labels for {arr.shape[0]} images in {path.name}")
    return _to_data(arr, labels, path, split)


def _folder_files(path: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """(image files, labels, class names): the folder's images sorted by name, or its
    sub-folders' (one class each, labels = index of the sorted sub-folder names)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXT)
    if files:
        return files, None, None
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    labels: list[int] = []
    for i, c in enumerate(classes):
        found = sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXT)
        files += found
        labels += [i] * len(found)
    if not files:
        raise _fail(path, f"folder holds no images (expected files ending in {sorted(_IMAGE_EXT)})")
    return files, labels, tuple(c.name for c in classes)


def _open_image(f: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as e:  # Pillow's limit stays: say it in one line
        raise _fail(f, f"refused by Pillow's decompression-bomb limit ({str(e).split('.')[0]})") from None
    except (OSError, UnidentifiedImageError) as e:
        raise _fail(f, f"not a readable image ({e})") from None


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class _Decoder:
    """path -> (C, H, W) uint8: grayscale (C = 1) or RGB (C = 3, alpha dropped), resized to
    ``size`` x ``size`` when given (antialiased, the shorter side to size, then the centre
    crop: Pillow's ImageOps.fit), else checked to be ``hw``. A class (not a closure) so that
    lazy data pickles into DataLoader workers."""

    def __init__(self, gray: bool, size: int | None, hw: tuple[int, int], first: str) -> None:
        self.gray, self.size, self.hw, self.first = gray, size, hw, first

    def __call__(self, f: Path) -> np.ndarray:
        from PIL import Image, ImageOps

        im = _open_image(f)
        if self.gray:
            if im.mode in ("I", "I;16", "F"):  # 16-bit / float grayscale: to 8 bits
                scale = 255.0 / 65535.0 if im.mode in ("I", "I;16") else 1.0
                im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) * scale + 0.5, 0, 255).astype(np.uint8))
            im = im.convert("L")
        else:
            im = im.convert("RGB")
        if self.size is not None:
            im = ImageOps.fit(im, (self.size, self.size), method=Image.Resampling.LANCZOS)
        elif (im.height, im.width) != self.hw:
            raise _fail(f, f"image size {im.height}x{im.width} differs from {self.hw[0]}x{self.hw[1]} of "
                           f"{self.first}: all images must have one size, or pass image_size (--image-size N) "
                           "to resize and centre-crop them")
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _load_folder(path: Path, split: str, image_size: int | None = None, lazy: bool | None = None) -> Data:
    """Images in the folder (sorted by name), or in its sub-folders, one class each (labels:
    the sorted sub-folder names' indices, the names kept in ``classes``). All grayscale -> 1
    channel, else RGB (alpha dropped); held as uint8. ``image_size``: each image resized
    (antialiased) so its shorter side is image_size, then centre-cropped square; else all
    must have one size. ``lazy``: decode per batch (None: when the decoded images would take
    more than a quarter of the memory)."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
    files, labels, classes = _folder_files(path)
    first = _open_image(files[0])
    # one mode for the folder: grayscale only when every image is (decided from the headers)
    gray = first.mode in _GRAY_MODES and all(_mode(f) in _GRAY_MODES for f in files[1:])
    hw = (image_size, image_size) if image_size is not None else (first.height, first.width)
    decode = _Decoder(gray, image_size, hw, files[0].name)
    shape = (1 if gray else 3, *hw)
    y = torch.tensor(labels, dtype=torch.int64) if labels is not None else None
    if lazy is None:
        lazy = len(files) * int(np.prod(shape)) > memory_bytes() // 4
    if lazy:
        source: Source = ImageFiles(files, shape, decode)
    else:
        codes = np.empty((len(files), *shape), dtype=np.uint8)
        for i, f in enumerate(files):
            codes[i] = decode(f)
        source = Images(torch.from_numpy(codes), scale=255.0)
    return Data(source, y, str(path), split, classes=classes)


def _mode(f: Path) -> str:
    """An image file's mode from its header (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            return im.mode
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return _open_image(f).mode  # raises its one-line DataError


# ---------------------------------------------------------------------------------------


def _seeded_split(d: Data, split: str, seed: int, test_fraction: float) -> Data:
    """A fixed random held-out split of a file's data: a permutation from (seed)."""
    if split == "all":
        return d
    n = len(d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_test = max(1, round(n * test_fraction)) if n > 1 else 0
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    idx = idx.sort().values  # keep the file's order within a split
    labels = d.labels[idx] if d.labels is not None else None
    low_res = d.low_res[idx] if d.low_res is not None else None
    return Data(take(d.source, idx), labels, d.name, split, low_res, d.classes)


# ---- Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) ---------------------------------------------
# 70,000 28x28 grayscale images of 10 clothing classes, the official 60k / 10k split. Not
# downloaded: Debian packages the four IDX files (apt install dataset-fashion-mnist).

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_INSTALL = "sudo apt install dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts it
_FASHION_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def _fashion_mnist_file(split: str) -> Path:
    """The images file of a split: in $PYGEN_DATA (or its fashion-mnist/ folder), else in the
    Debian package's folder; gzipped or not."""
    dirs = []
    if os.environ.get("PYGEN_DATA"):
        root = Path(os.environ["PYGEN_DATA"])
        dirs += [root / "fashion-mnist", root]
    dirs.append(FASHION_MNIST_DIR)
    for d in dirs:
        for name in (_FASHION_FILES[split] + ".gz", _FASHION_FILES[split]):
            if (d / name).is_file():
                return d / name
    raise DataError(f"fashion-mnist is not installed (looked in {', '.join(map(str, dirs))}): "
                    f"{FASHION_MNIST_INSTALL}, or `make data`, or put its IDX files in $PYGEN_DATA")


def fashion_mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's official ``split`` ("train": 60000, "test": 10000) as (x (N, 1, 28, 28)
    float32 in [0, 1] (levels k / 255), labels (N,) int64 in 0..9, :data:`FASHION_MNIST_CLASSES`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = _fashion_mnist_data(split)
    return d.data, d.labels


def _fashion_mnist_data(split: str) -> Data:
    d = _load_idx(_fashion_mnist_file(split), split)  # uint8 codes
    if d.labels is None:
        raise DataError(f"{_fashion_mnist_file(split)}: its labels file is missing beside it")
    return d


def load(spec: str | os.PathLike, split: str = "all", *, seed: int = 0, test_fraction: float = 0.2,
         image_size: int | None = None, lazy: bool | None = None) -> Data:
    """Load a data set by name or path -> :class:`Data` (tensors in memory, CPU).

    Names (fixed splits, see each function): "digits" / "digits16" / "digits32"
    (:func:`digits` at size 8 / 16 / 32, with labels); the :data:`TOY2D` names (``seed``
    draws 10000 "train" points, 2000 "test" ones from seed + 1000003, "all" is train);
    "patches" (:func:`patches` 32 px, scale 4: data = the 32 px targets, low_res = 8 px inputs);
    "fashion-mnist" (:func:`fashion_mnist`: "train" and "all" the 60000 training images,
    "test" the 10000 test images; "fashion-mnist:test" is the test set as "all").

    Paths:

    - a folder of images (PNG, JPEG, ... via Pillow), directly inside it or one sub-folder
      per class (labels = sorted sub-folder index, the names in ``classes``). All grayscale
      -> 1 channel, else RGB (alpha dropped). ``image_size``: each image resized so that its
      shorter side is image_size (antialiased), then centre-cropped square; without it all
      images must have one size. Decoded per batch when ``lazy`` (None: when the decoded
      images would take more than a quarter of the memory);
    - ``.npy``: one array; ``.npz``: one array, or keys "images"/"x" and optional "labels"/"y";
    - IDX files (MNIST's format, optionally .gz): the images file, e.g.
      ``train-images-idx3-ubyte``; a labels file beside it (``train-labels-idx1-ubyte``)
      is read when present.

    Arrays: uint8 (or other integers 0..255) are pixel values (held as uint8, read as
    value / 255); (N, D) is points, (N, H, W) grayscale images, (N, C, H, W) or channels-last
    (N, H, W, C) images; float images must be in [0, 1]. An ``.npy`` file's images stay
    memory-mapped (larger than memory is fine). File data is split ("train" / "test") by a permutation from ``seed``,
    ``test_fraction`` held out. Anything unreadable raises :class:`DataError`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    s = os.fspath(spec)
    if s in ("digits", "digits16", "digits32"):
        x, y = digits(split, size={"digits": 8, "digits16": 16, "digits32": 32}[s])
        return Data(x, y, s, split)
    if s in TOY2D:
        tsplit = "test" if split == "test" else "train"
        tseed = seed + _TOY_TEST_SEED if tsplit == "test" else seed
        return Data(toy2d(s, _TOY_N[tsplit], seed=tseed), None, s, split)
    if s == "patches":
        hr, low_res = patches(32, 4, split)
        return Data(hr, None, s, split, low_res=low_res)
    if s in ("fashion-mnist", "fashion-mnist:test"):  # "all" is the train set, as for toy2d
        fsplit = "test" if split == "test" or (s.endswith(":test") and split == "all") else "train"
        d = _fashion_mnist_data(fsplit)
        return Data(d.source, d.labels, s, split, classes=FASHION_MNIST_CLASSES)
    path = Path(s)
    if not path.exists():
        raise _fail(
            path,
            f"no such file or folder; expected a data set name ({', '.join(NAMES)}) "
            "or a path to a folder of images, .npz, .npy or IDX file",
        )
    if image_size is not None and not path.is_dir():
        raise DataError(f"{path}: image_size resizes the images of a folder; this is a file")
    if path.is_dir():
        d = _load_folder(path, split, image_size, lazy)
    elif path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    elif path.suffix.lower() == ".npy":
        d = _load_npy(path, split)
    elif path.suffix.lower() == ".npz":
        d = _load_npz(path, split)
    elif _is_idx(path):
        d = _load_idx(path, split)
    else:
        raise _fail(path, "unrecognised format: expected a folder of images, an .npz or .npy array, or an IDX file")
    return _seeded_split(d, split, seed, test_fraction)


def train_test(data: Data | str, *, seed: int = 0, test_fraction: float = 0.2,
               image_size: int | None = None) -> tuple[Data, Data]:
    """The (train, test) pair of a data set.

    Built-in names use their fixed splits (toy2d: train / test drawn with seeds ``seed`` /
    ``seed + 1000003``), whatever split ``data`` holds. Other data: a ``split="all"`` Data is
    split in memory by the seeded permutation :func:`load` uses; a train or test Data is
    re-loaded from its path (its name) to get the other part (a folder with ``image_size``).
    """
    if isinstance(data, str) or data.name in NAMES:
        name = data if isinstance(data, str) else data.name
        return load(name, "train", seed=seed), load(name, "test", seed=seed)
    if data.split == "all":
        return _seeded_split(data, "train", seed, test_fraction), _seeded_split(data, "test", seed, test_fraction)
    if not Path(data.name).exists():
        raise DataError(
            f"{data.name}: a {data.split!r} split with no file to re-load the other part from; pass split='all' data"
        )
    kw: dict[str, Any] = dict(seed=seed, test_fraction=test_fraction)
    if image_size is not None:
        kw["image_size"] = image_size
    return load(data.name, "train", **kw), load(data.name, "test", **kw)

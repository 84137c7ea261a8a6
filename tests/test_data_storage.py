"""Data a user brings, held compactly (issue 18, item 2): 8-bit images as uint8 (read as
float32 per batch, bitwise the values the float path gave), .npy images memory-mapped, image
folders with class names, --image-size (antialiased resize, centre crop) and lazy decoding;
the trainer reads every kind of source in the same (seed, step)-pure order."""

from __future__ import annotations

import json
import os
import struct
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pygen.data as D
from pygen.data import Data, DataError, as_tensors, load, train_test
from pygen.data.storage import ImageFiles, Images, take
from pygen.models import VAE
from pygen.train import fit

from test_cli import assert_user_error, cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _codes(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _float_path(codes: np.ndarray) -> torch.Tensor:
    """What pygen returned before uint8 storage: the float32 array / 255 (numpy)."""
    return torch.from_numpy(codes.astype(np.float32) / 255.0)


# ---- Images -------------------------------------------------------------------------------


def test_images_read_rows_in_any_order_bitwise_as_the_float_path():
    codes = _codes((9, 2, 5, 3))
    im = Images(torch.from_numpy(codes))
    ref = _float_path(codes)
    assert im.shape == (9, 2, 5, 3) and len(im) == 9 and im.dim() == 4 and im.nbytes == codes.size
    for idx in (torch.tensor([4, 0, 8, 4]), slice(2, 7), [8, -1, 3], torch.tensor([], dtype=torch.long)):
        got = im[idx]
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, ref[idx if not isinstance(idx, list) else torch.tensor([8, 8, 3])])
    sub = im.subset(torch.tensor([7, 1, 5]))  # a split: rows, no copy of the codes
    assert sub.array is im.array and len(sub) == 3
    assert torch.equal(sub[torch.tensor([2, 0])], ref[torch.tensor([5, 7])])
    assert torch.equal(sub.subset([1])[0:1], ref[1:2])  # subset of a subset composes


def test_images_memory_mapped_channels_last(tmp_path):
    codes = _codes((11, 6, 4, 3), seed=1)  # (N, H, W, C)
    np.save(tmp_path / "x.npy", codes)
    arr = np.load(tmp_path / "x.npy", mmap_mode="r")
    im = Images(arr, channels_last=True)
    ref = _float_path(codes).permute(0, 3, 1, 2)
    assert im.shape == (11, 3, 6, 4)
    idx = torch.tensor([10, 2, 2, 7, 0])  # unsorted with a repeat: gathered in file order, returned in order
    assert torch.equal(im[idx], ref[idx])
    assert torch.equal(im.float(), ref)


def test_take_keeps_tensors_and_compact_sources():
    x = torch.randn(6, 2)
    assert torch.equal(take(x, [5, 0]), x[[5, 0]])
    im = Images(torch.from_numpy(_codes((6, 1, 4, 4))))
    assert isinstance(take(im, [5, 0]), Images)


# ---- loading --------------------------------------------------------------------------------


def test_integer_arrays_are_held_as_uint8(tmp_path):
    codes = _codes((20, 5, 5, 3), seed=2)
    np.savez(tmp_path / "a.npz", images=codes, labels=np.arange(20))
    d = load(tmp_path / "a.npz")
    assert isinstance(d.source, Images) and d.source.array.dtype == torch.uint8
    assert torch.equal(d.data, _float_path(codes).permute(0, 3, 1, 2))
    wide = codes.astype(np.int64)  # other integer dtypes 0..255: stored as uint8 too
    np.save(tmp_path / "w.npy", wide)
    assert torch.equal(load(tmp_path / "w.npy").data, d.data)


def test_npy_images_stay_memory_mapped_and_split_without_copies(tmp_path):
    codes = _codes((40, 7, 9), seed=3)  # (N, H, W) grayscale
    np.save(tmp_path / "g.npy", codes)
    d = load(tmp_path / "g.npy")
    assert isinstance(d.source, Images) and isinstance(d.source.array, np.memmap)
    assert d.shape == (1, 7, 9)
    train, test = train_test(d)
    assert isinstance(train.source.array, np.memmap) and len(train) + len(test) == 40
    assert torch.equal(train.data, _float_path(codes)[torch.from_numpy(train.source.rows)][:, None])
    floats = (codes / 255.0).astype(np.float32)  # float images in [0, 1] stay mapped too (scale 1)
    np.save(tmp_path / "f.npy", floats)
    f = load(tmp_path / "f.npy")
    assert isinstance(f.source.array, np.memmap) and torch.equal(f.data[:, 0], torch.from_numpy(floats))


def test_npy_values_are_checked_in_every_chunk(tmp_path, monkeypatch):
    import pygen.data.files as files

    real = files._range
    monkeypatch.setattr(files, "_range", lambda arr: real(arr, rows=3))  # many chunks on a small array
    bad = np.full((10, 4, 4), 0.5, dtype=np.float32)
    bad[9, 3, 3] = 1.5  # in the last chunk only
    np.save(tmp_path / "b.npy", bad)
    with pytest.raises(DataError, match=r"must lie in \[0, 1\], got range \[0.5, 1.5\]"):
        load(tmp_path / "b.npy")
    bad[9, 3, 3] = np.nan
    np.save(tmp_path / "n.npy", bad)
    with pytest.raises(DataError, match="NaN or infinite"):
        load(tmp_path / "n.npy")
    ints = np.zeros((10, 4, 4), dtype=np.int16)
    ints[8, 0, 0] = 300
    np.save(tmp_path / "i.npy", ints)
    with pytest.raises(DataError, match=r"0..255 pixel values, got range \[0, 300\]"):
        load(tmp_path / "i.npy")


def test_npy_header_claiming_more_than_the_file(tmp_path):
    arr = np.zeros((4, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "t.npy", arr)
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-10])  # truncated
    with pytest.raises(DataError, match="claims .* GB, the file holds .*: a damaged or truncated file"):
        load(tmp_path / "t.npy")


def _idx(path, arr):
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.write_bytes(raw)


def test_idx_images_are_uint8(tmp_path):
    codes = _codes((12, 6, 6), seed=4)
    _idx(tmp_path / "train-images-idx3-ubyte", codes)
    d = load(tmp_path / "train-images-idx3-ubyte")
    assert d.source.array.dtype == torch.uint8 and torch.equal(d.data[:, 0], _float_path(codes))


@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_mnist_is_held_as_uint8_with_class_names():
    d = load("fashion-mnist")
    assert isinstance(d.source, Images) and d.source.array.dtype == torch.uint8
    assert d.source.nbytes == 60000 * 784  # 47 MB, not 188 MB of float32
    assert d.classes == D.FASHION_MNIST_CLASSES
    x, y = D.fashion_mnist("test")  # the public function still gives float32 in [0, 1]
    assert x.dtype == torch.float32 and x.shape == (10000, 1, 28, 28) and float(x.max()) == 1.0
    t = load("fashion-mnist:test")
    assert torch.equal(t.source[torch.arange(5)], x[:5])


# ---- folders --------------------------------------------------------------------------------


def _png(path, arr, mode):
    Image.fromarray(arr, mode=mode).save(path)


def test_folder_classes_named_and_uint8(tmp_path):
    for c, k in (("shoe", 2), ("bag", 3)):
        (tmp_path / c).mkdir()
        for i in range(k):
            _png(tmp_path / c / f"{i}.png", _codes((6, 5), seed=10 * k + i), "L")
    d = load(tmp_path)
    assert d.classes == ("bag", "shoe") and d.labels.tolist() == [0, 0, 0, 1, 1]
    assert d.source.array.dtype == torch.uint8 and d.shape == (1, 6, 5)
    assert torch.equal(d.data[3, 0], _float_path(_codes((6, 5), seed=20)))  # shoe/0.png
    train, test = train_test(d)
    assert train.classes == d.classes == test.classes


def test_folder_of_mixed_sizes_needs_image_size_then_resizes_and_centre_crops(tmp_path):
    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, 10:30] = 255  # a white centre band; the crop keeps exactly it
    _png(tmp_path / "a.png", wide, "L")
    _png(tmp_path / "b.png", np.full((30, 30), 128, dtype=np.uint8), "L")
    with pytest.raises(DataError, match=r"b.png: image size 30x30 differs from 20x40 of a.png.*--image-size N"):
        load(tmp_path)
    d = load(tmp_path, image_size=10)
    assert d.shape == (1, 10, 10)
    a = d.data[0, 0]
    assert torch.all(a[:, 1:-1] > 0.95)  # the band fills the crop (Lanczos rings at the cut edges)
    assert torch.allclose(d.data[1], torch.full((1, 10, 10), 128 / 255))
    with pytest.raises(ValueError, match="image_size must be an int >= 4"):
        load(tmp_path, image_size=2)
    np.save(tmp_path.parent / "x.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="image_size resizes the images of a folder"):
        load(tmp_path.parent / "x.npy", image_size=8)


def test_folder_one_rgb_image_makes_all_rgb(tmp_path):
    _png(tmp_path / "g.png", np.full((4, 4), 200, dtype=np.uint8), "L")
    _png(tmp_path / "c.png", _codes((4, 4, 3)), "RGB")
    d = load(tmp_path)
    assert d.shape == (3, 4, 4)
    assert torch.equal(d.data[1], torch.full((3, 4, 4), 200 / 255))  # g.png, grey in all three channels


def test_lazy_folder_decodes_per_batch_and_equals_eager(tmp_path):
    for i in range(12):
        _png(tmp_path / f"{i:02d}.png", _codes((9, 7, 3), seed=i), "RGB")
    eager, lazy = load(tmp_path), load(tmp_path, lazy=True)
    assert isinstance(lazy.source, ImageFiles) and isinstance(eager.source, Images)
    idx = torch.tensor([11, 0, 5])
    assert torch.equal(lazy.source[idx], eager.source[idx])
    assert torch.equal(lazy.data, eager.data)
    tr_e, te_e = train_test(eager)
    tr_l, te_l = train_test(lazy)
    assert isinstance(tr_l.source, ImageFiles) and torch.equal(tr_l.data, tr_e.data)


def test_evaluate_decodes_only_the_reference_subset_of_a_lazy_folder(tmp_path, monkeypatch):
    """``evaluate(n_reference=k)`` on a lazy folder reads k train files (and the test split),
    not the whole folder: data larger than memory stays evaluable."""
    from pygen.metrics import evaluate

    for i in range(40):
        _png(tmp_path / f"{i:02d}.png", _codes((8, 8), seed=i), "L")
    lazy = load(tmp_path, lazy=True)
    n_test = len(train_test(lazy)[1])
    read: list[str] = []
    decode = lazy.source.decode
    lazy.source.decode = lambda path: read.append(path.name) or decode(path)  # the splits share it
    res = evaluate(None, lazy, n=6, n_reference=8, features="pixels")
    assert res["meta"]["n_reference"] == 8
    assert len(read) == 8 + n_test, len(read)


# ---- the trainer reads compact sources in the same order -------------------------------------


def test_fit_on_compact_sources_equals_fit_on_float_tensors(tmp_path):
    for i in range(24):
        _png(tmp_path / f"{i:02d}.png", _codes((8, 8), seed=100 + i), "L")
    results = {}
    for kind in ("float", "uint8", "lazy"):
        d = load(tmp_path, lazy=kind == "lazy")
        data = d.data if kind == "float" else d
        x, _ = as_tensors(data, lazy=True)
        assert isinstance(x, {"float": torch.Tensor, "uint8": Images, "lazy": ImageFiles}[kind])
        torch.manual_seed(0)
        model = VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp")
        fit(model, data, steps=4, batch_size=8, progress=False)
        results[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(results["float"], results["uint8"]) and torch.equal(results["float"], results["lazy"])


def test_as_tensors_materialises_unless_lazy():
    im = Images(torch.from_numpy(_codes((5, 1, 4, 4))))
    d = Data(im, torch.arange(5), "x")
    x, y = as_tensors(d)
    assert isinstance(x, torch.Tensor) and torch.equal(x, im.float()) and torch.equal(y, torch.arange(5))
    x, y = as_tensors(d, lazy=True)
    assert x is im
    x, y = as_tensors((im, torch.arange(5)), lazy=True)
    assert x is im


# ---- the command line ------------------------------------------------------------------------


def test_cli_image_size_recorded_used_by_eval_and_kept_on_resume(tmp_path):
    data = tmp_path / "imgs"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(12):
            size = (12 + i, 10 + i // 2)
            _png(data / c / f"{i}.png", _codes(size, seed=i + (0 if c == "a" else 50)), "L")
    run = tmp_path / "run"
    out = cli("train", "vae", "--data", data, "--image-size", "8", "--out", run, "--steps", "2", "--batch-size", "4",
              "--no-progress", "--hidden", "16", "--latent-dim", "2")
    assert "--image-size 8" in out.stdout  # the printed next eval command carries it
    rec = json.loads((run / "train.json").read_text())
    assert rec["image_size"] == 8 and rec["classes"] == ["a", "b"]
    ev = cli("eval", run, "--data", data)  # the run's image size, from train.json
    assert "fd" in ev.stdout.lower()
    assert_user_error(cli("train", "vae", "--data", data, "--image-size", "16", "--out", run, "--resume",
                          "--steps", "3", "--no-progress", check=False), "--image-size 8, not 16")
    cli("train", "vae", "--out", run, "--resume", "--steps", "3", "--no-progress")  # data and size from train.json
    assert_user_error(cli("train", "vae", "--data", data, "--out", tmp_path / "r2", "--no-progress", check=False),
                      "pass image_size (--image-size N)")


# ---- prefetching a lazy folder's batches -------------------------------------------------------


def test_prefetched_yields_the_plain_loop_and_reads_ahead():
    from pygen.data import prefetched

    calls: list[int] = []
    started = threading.Event()

    def read(k: int) -> int:
        calls.append(k)
        if k == 1:
            started.set()
        return k * k

    it = prefetched(read, range(6))
    assert next(it) == 0
    assert started.wait(10)  # batch 1 is read while the caller still holds batch 0
    assert list(it) == [k * k for k in range(1, 6)] and calls == list(range(6))
    assert list(prefetched(read, [])) == []

    def bad(k: int) -> int:
        if k == 3:
            raise OSError("unreadable file")
        return k

    got = []
    with pytest.raises(OSError, match="unreadable file"):
        for v in prefetched(bad, range(6), depth=2):
            got.append(v)
    assert got == [0, 1, 2]  # the error reaches the caller at its own step

    calls.clear()
    gate, one = threading.Event(), threading.Event()

    def slow(k: int) -> int:
        calls.append(k)
        if k >= 1:
            one.set()
            gate.wait(10)
        return k

    it = prefetched(slow, range(100), depth=2)
    assert next(it) == 0 and one.wait(10)
    threading.Timer(0.2, gate.set).start()  # read 1 ends while close() waits for it
    it.close()  # stopped early while read 1 runs: reads not started (2) are dropped, 1 is waited for
    assert calls == [0, 1]


def test_prefetched_in_worker_processes_keeps_order_errors_and_the_global_rng():
    from pygen.data import prefetched

    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    got = list(prefetched(lambda k: (k * k, os.getpid()), range(7), depth=2, workers=2))
    assert torch.equal(torch.rand(3), expect)  # starting the workers drew nothing from torch's global RNG
    assert all(type(v) is tuple for v in got)  # as read returned it (a batch and its labels)
    assert [v for v, _ in got] == [k * k for k in range(7)] and os.getpid() not in {p for _, p in got}
    assert list(prefetched(lambda k: k, [], workers=2)) == []

    def bad(k: int) -> int:
        if k == 3:
            raise DataError("x.png: not a readable image")
        return k

    got = []
    with pytest.raises(DataError, match="^x.png: not a readable image$"):  # itself, not a worker's traceback text
        for v in prefetched(bad, range(6), workers=1):
            got.append(v)
    assert got == [0, 1, 2]


def test_fit_on_a_lazy_folder_prefetches_and_resumes_exactly(tmp_path, monkeypatch):
    """fit() reads a lazy folder's next batch in the background: the same weights as the
    in-memory run, and a run stopped and resumed equals one straight run."""
    for i in range(24):  # two classes: batches are (images, labels) tuples
        (tmp_path / "img" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        _png(tmp_path / "img" / "ab"[i % 2] / f"{i:02d}.png", _codes((8, 8), seed=200 + i), "L")
    lazy, eager = load(tmp_path / "img", lazy=True), load(tmp_path / "img")
    assert lazy.labels is not None

    def weights(data, steps, out=None, resume=False, model=None):
        if model is None:
            torch.manual_seed(0)
            model = VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp")
        fit(model, data, steps=steps, batch_size=8, progress=False, out=out, resume=resume, checkpoint_every=3)
        return model, torch.cat([p.detach().flatten() for p in model.parameters()])

    readers = tmp_path / "readers"  # the processes that decoded batches (a worker writes here too)
    getitem = ImageFiles.__getitem__

    def logged(self, idx):
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return getitem(self, idx)

    monkeypatch.setattr(ImageFiles, "__getitem__", logged)
    _, straight = weights(eager, 7)
    assert not readers.exists()
    _, w_lazy = weights(lazy, 7)
    assert torch.equal(straight, w_lazy)
    pids = readers.read_text().split()
    # model.setup's first batch here, then each of the 7 steps' batches once, in a worker process
    assert len(pids) == 8 and pids.count(str(os.getpid())) == 1, pids
    weights(lazy, 3, out=tmp_path / "run")
    torch.manual_seed(0)
    _, resumed = weights(lazy, 7, out=tmp_path / "run", resume=True)
    assert torch.equal(straight, resumed)

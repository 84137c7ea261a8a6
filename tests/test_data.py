"""pygen.data: built-in sets, load() from files (and every way it can fail), the seeded loader."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pygen.data as D
from pygen.data import DataError, InMemoryLoader, load

# ---------------------------------------------------------------------------------------
# digits


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_digits_shapes_and_ranges(split, size):
    x, y = D.digits(split, size=size)
    n = {"train": 1442, "test": 355, "all": 1797}[split]
    assert x.shape == (n, 1, size, size) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.unique().tolist()) == set(range(10))


def test_digits_values_are_counts_over_16():
    x, _ = D.digits("all")
    assert torch.equal(x * 16, torch.round(x * 16))  # 17 levels, exactly


def test_digits_split_fixed_disjoint_stratified():
    tr, te, al = (D.digits_split_index(s) for s in ("train", "test", "all"))
    assert torch.equal(al, torch.arange(1797))
    assert torch.equal(torch.cat([tr, te]).sort().values, al)  # disjoint and covering
    # pinned: the same on every machine (no random numbers involved)
    assert te[:8].tolist() == [33, 36, 37, 40, 44, 47, 51, 58]
    _, y = D.digits("all")
    frac = torch.bincount(y[te], minlength=10) / torch.bincount(y, minlength=10)
    assert ((frac > 0.18) & (frac < 0.22)).all()
    # the split's images are those of sklearn at those indices
    x_all, _ = D.digits("all")
    assert torch.equal(D.digits("test")[0], x_all[te])


def test_digits_upsampling_keeps_the_image():
    x8, _ = D.digits("test")
    x32, _ = D.digits("test", size=32)
    back = F.avg_pool2d(x32, 4)
    assert (back - x8).abs().mean() < 0.1  # bilinear blurs a little, nothing more
    assert torch.corrcoef(torch.stack([back.flatten(), x8.flatten()]))[0, 1] > 0.95


@pytest.mark.parametrize("kw, msg", [({"size": 12}, "size must be one of"), ({"split": "val"}, "split must be one of")])
def test_digits_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        D.digits(**kw)


# ---------------------------------------------------------------------------------------
# toy2d


@pytest.mark.parametrize("name", D.TOY2D)
def test_toy2d_seeded_local_rng(name):
    state = torch.get_rng_state()
    a = D.toy2d(name, 500, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, D.toy2d(name, 500, seed=3))
    assert not torch.equal(a, D.toy2d(name, 500, seed=4))
    assert a.abs().max() < 6


@pytest.mark.parametrize("name", D.TOY2D_DENSITIES)
def test_toy2d_density_normalises_and_fits_samples(name):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, 2, generator=g, dtype=torch.float64) * 14 - 7  # box [-7, 7]^2
    mass = D.toy2d_log_prob(name, u).exp().mean() * 14**2
    assert abs(float(mass) - 1) < 0.02
    x = D.toy2d(name, 20_000, seed=1)
    lp = D.toy2d_log_prob(name, x)
    assert torch.isfinite(lp).all()  # every sample lies where the density is positive
    # E_p[log p] of the samples vs the Monte Carlo E_p[log p] = int p log p over the box
    lpu = D.toy2d_log_prob(name, u)
    plogp = torch.where(lpu > -math.inf, lpu.exp() * lpu, 0.0)
    assert abs(float(lp.mean()) - float(plogp.mean() * 14**2)) < 0.05


def test_toy2d_checkerboard_exact_values():
    lp = D.toy2d_log_prob("checkerboard", torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [5.0, 5.0]]))
    assert lp[0] == lp[2] == pytest.approx(-math.log(32)) and lp[1] == -math.inf and lp[3] == -math.inf


def test_toy2d_errors():
    with pytest.raises(ValueError, match="unknown toy2d set"):
        D.toy2d("spiral", 10)
    with pytest.raises(NotImplementedError, match="no closed-form density"):
        D.toy2d_log_prob("two_moons", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        D.toy2d_log_prob("8gaussians", torch.zeros(3))


# ---------------------------------------------------------------------------------------
# patches


def test_patches_shapes_lr_and_disjoint_regions():
    hr, low_res = D.patches(32, 4, "train")
    hr_t, lr_t = D.patches(32, 4, "test")
    assert hr.shape == (416, 3, 32, 32) and low_res.shape == (416, 3, 8, 8) and hr.dtype == torch.float32
    assert hr_t.shape == (104, 3, 32, 32) and lr_t.shape == (104, 3, 8, 8)
    assert 0 <= float(hr.min()) and float(hr.max()) <= 1
    torch.testing.assert_close(lr_t, hr_t.reshape(104, 3, 8, 4, 8, 4).mean((3, 5)))
    # no test patch equals (or, with stride 1, could overlap) a train patch: regions are disjoint
    all_hr, _ = D.patches(32, 4, "all")
    assert all_hr.shape[0] == 520
    dense, _ = D.patches(16, 2, "train", stride=8)
    assert dense.shape[1:] == (3, 16, 16)
    flat_t = hr_t.flatten(1)
    assert torch.cdist(flat_t, hr.flatten(1)).min() > 0


@pytest.mark.parametrize("kw", [{"size": 30, "scale": 4}, {"size": 2, "scale": 4}, {"split": "val"}, {"stride": 0}])
def test_patches_bad_arguments(kw):
    with pytest.raises(ValueError):
        D.patches(**kw)


# ---------------------------------------------------------------------------------------
# load(): names


@pytest.mark.parametrize(
    "name, shape", [("digits", (1, 8, 8)), ("digits32", (1, 32, 32)), ("two_moons", (2,)), ("patches", (3, 32, 32))]
)
def test_load_names(name, shape):
    d = load(name, "test")
    assert d.shape == shape and d.name == name and d.split == "test" and d.data.dtype == torch.float32
    assert d.kind == ("points" if len(shape) == 1 else "image")
    if name == "patches":
        assert d.low_res.shape == (len(d), 3, 8, 8)
    tr, te = D.train_test(d)
    assert tr.split == "train" and te.split == "test" and torch.equal(te.data, d.data)


# ---------------------------------------------------------------------------------------
# load(): files


def _png(path, arr, mode):
    Image.fromarray(arr, mode=mode).save(path)


def test_load_folder_of_grayscale_pngs(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 7, 6), dtype=np.uint8)
    for i, a in enumerate(imgs):
        _png(tmp_path / f"{i:02d}.png", a, "L")
    (tmp_path / "notes.txt").write_text("ignored")
    d = load(tmp_path)
    assert d.data.shape == (5, 1, 7, 6) and d.labels is None and d.kind == "image"
    torch.testing.assert_close(d.data[:, 0], torch.from_numpy(imgs).float() / 255)


def test_load_folder_rgb_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for c, k in (("cat", 2), ("dog", 3)):
        (tmp_path / c).mkdir()
        for i in range(k):
            _png(tmp_path / c / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    d = load(tmp_path)
    assert d.data.shape == (5, 3, 4, 4) and d.labels.tolist() == [0, 0, 1, 1, 1]


def test_load_npz_npy(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)  # channels-last
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(10))
    d = load(tmp_path / "a.npz")
    assert d.data.shape == (10, 3, 5, 5) and d.labels.tolist() == list(range(10))
    torch.testing.assert_close(d.data, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    pts = np.random.default_rng(3).normal(size=(20, 2)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    d = load(tmp_path / "p.npy")
    assert d.kind == "points" and torch.equal(d.data, torch.from_numpy(pts))
    np.savez(tmp_path / "one.npz", np.full((4, 8, 8), 0.5, dtype=np.float32))  # one unnamed array
    assert load(tmp_path / "one.npz").data.shape == (4, 1, 8, 8)


def _idx(path, arr, compress=False):
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_with_labels_beside(tmp_path, compress):
    ext = ".gz" if compress else ""
    x = np.random.default_rng(4).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _idx(tmp_path / f"train-images-idx3-ubyte{ext}", x, compress)
    _idx(tmp_path / f"train-labels-idx1-ubyte{ext}", np.arange(6, dtype=np.uint8), compress)
    d = load(tmp_path / f"train-images-idx3-ubyte{ext}")
    assert d.data.shape == (6, 1, 28, 28) and d.labels.tolist() == list(range(6))
    torch.testing.assert_close(d.data[:, 0], torch.from_numpy(x).float() / 255)


def test_load_file_split_seeded_disjoint(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(100, dtype=np.float32).reshape(50, 2))
    tr, te = load(tmp_path / "p.npy", "train"), load(tmp_path / "p.npy", "test")
    assert len(tr) == 40 and len(te) == 10
    assert torch.equal(torch.cat([tr.data, te.data])[:, 0].sort().values, torch.arange(0, 100, 2).float())
    assert torch.equal(te.data, load(tmp_path / "p.npy", "test").data)
    tr2, te2 = D.train_test(load(tmp_path / "p.npy"))
    assert torch.equal(te2.data, te.data) and torch.equal(tr2.data, tr.data)


def _bad_cases(tmp):
    """(path, message fragment) for every way load() must refuse a file."""
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "junk.npy").write_bytes(b"not numpy at all")
    (tmp / "junk.txt").write_text("hello")
    np.save(tmp / "flat.npy", np.zeros(5, dtype=np.float32))
    np.save(tmp / "range.npy", np.full((3, 4, 4), 2.0, dtype=np.float32))
    np.save(tmp / "nan.npy", np.full((3, 2), np.nan, dtype=np.float32))
    np.savez(tmp / "keys.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    np.savez(tmp / "labels.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.arange(2))
    (tmp / "emptydir").mkdir()
    (tmp / "sizes").mkdir()
    _png(tmp / "sizes" / "a.png", np.zeros((4, 4), np.uint8), "L")
    _png(tmp / "sizes" / "b.png", np.zeros((5, 4), np.uint8), "L")
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_bytes(b"\x89PNG garbage")
    _idx(tmp / "short-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    (tmp / "short-images-idx3-ubyte").write_bytes((tmp / "short-images-idx3-ubyte").read_bytes()[:-5])
    _idx(tmp / "t-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    _idx(tmp / "t-labels-idx1-ubyte", np.zeros(2, np.uint8))
    _idx(tmp / "vec-images-idx1-ubyte", np.zeros(3, np.uint8))
    return [
        (tmp / "missing.npz", "no such file or folder"),
        (tmp / "empty.npy", "file is empty"),
        (tmp / "junk.npy", "not a readable .npy"),
        (tmp / "junk.txt", "unrecognised format"),
        (tmp / "flat.npy", "expected .N, D. points"),
        (tmp / "range.npy", r"must lie in \[0, 1\]"),
        (tmp / "nan.npy", "NaN"),
        (tmp / "keys.npz", "expected one array or keys"),
        (tmp / "labels.npz", "labels must be 3 integers"),
        (tmp / "emptydir", "folder holds no images"),
        (tmp / "sizes", "all images must have one size"),
        (tmp / "broken", "not a readable image"),
        (tmp / "short-images-idx3-ubyte", "IDX header says"),
        (tmp / "t-images-idx3-ubyte", "has 2 labels for 3 images"),
        (tmp / "vec-images-idx1-ubyte", "expected IDX images"),
    ]


def test_load_refuses_bad_files_with_one_clear_error(tmp_path):
    for path, msg in _bad_cases(tmp_path):
        with pytest.raises(DataError, match=msg) as e:
            load(path)
        assert isinstance(e.value, ValueError)
        assert str(e.value).startswith(str(path.parent)), str(e.value)  # names the file
        assert "\n" not in str(e.value)  # one line for the CLI


def test_load_unknown_name_lists_the_names():
    with pytest.raises(DataError, match="digits16"):
        load("mnist")


# ---------------------------------------------------------------------------------------
# the loader


def _ids(batches):
    return [b[0].tolist() for b in batches]


def test_loader_same_seed_same_order_and_epochs_differ():
    x = torch.arange(50)
    a = InMemoryLoader((x, x * 2), 8, seed=1)
    b = InMemoryLoader((x, x * 2), 8, seed=1)
    ea, eb = list(a), list(b)
    assert _ids(ea) == _ids(eb) and len(ea) == len(a) == 6
    assert all(torch.equal(y, 2 * xb) for xb, y in ea)
    seen = torch.cat([xb for xb, _ in ea])
    assert len(set(seen.tolist())) == 48  # a permutation, last 2 dropped
    assert _ids(list(a)) != _ids(ea)  # iteration moved on to epoch 1
    assert _ids(InMemoryLoader((x, x), 8, seed=2)) != _ids(ea)
    state = torch.get_rng_state()
    list(InMemoryLoader(x, 8, seed=1))
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_resume_equals_uninterrupted():
    x = torch.arange(37).float()
    loader = InMemoryLoader(x, 5, seed=7)
    stream = loader.batches_from(0)
    full = [next(stream) for _ in range(25)]  # 7 batches per epoch: crosses 3 epochs
    for k in (0, 3, 7, 13, 20):
        resumed = InMemoryLoader(x, 5, seed=7).batches_from(k)
        assert all(torch.equal(next(resumed), full[i]) for i in range(k, 25))
    # the same through set_epoch + position
    fresh = InMemoryLoader(x, 5, seed=7)
    fresh.set_epoch(1, position=3)
    assert all(torch.equal(b, full[7 + 3 + i]) for i, b in enumerate(fresh))
    assert all(torch.equal(b, full[14 + i]) for i, b in enumerate(fresh))  # then epoch 2 from its start


@pytest.mark.parametrize("n, world", [(48, 4), (50, 3)])
def test_loader_rank_shards_disjoint_and_covering(n, world):
    x = torch.arange(n)
    for epoch in (0, 1):
        parts = []
        for r in range(world):
            ld = InMemoryLoader(x, 4, seed=3, rank=r, world_size=world, drop_last=False)
            ld.set_epoch(epoch)
            parts.append(torch.cat(list(ld)))
            assert len(ld) == len(InMemoryLoader(x, 4, seed=3, rank=0, world_size=world, drop_last=False))
        allidx = torch.cat(parts)
        assert len(set(allidx.tolist())) == len(allidx) == (n // world) * world  # disjoint, equal shares
        if n % world == 0:
            assert set(allidx.tolist()) == set(range(n))


def test_loader_no_shuffle_drop_last_false():
    ld = InMemoryLoader(torch.arange(10), 4, shuffle=False, drop_last=False)
    assert _ids([[b] for b in ld]) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"rank": 2, "world_size": 2}, {"batch_size": 64}])
def test_loader_bad_arguments(kw):
    args = {"batch_size": 4, **kw}
    with pytest.raises(ValueError):
        InMemoryLoader(torch.arange(20), args.pop("batch_size"), **args)


def test_tensor_data():
    ds = D.TensorData(torch.arange(4), torch.arange(4) * 3)
    assert len(ds) == 4 and [int(v) for v in ds[2]] == [2, 6]
    with pytest.raises(ValueError):
        D.TensorData(torch.arange(4), torch.arange(3))


# ---- Fashion-MNIST ---------------------------------------------------------------------------

@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_mnist_official_split():
    train, test = D.train_test(D.load("fashion-mnist"))
    assert train.shape == test.shape == (1, 28, 28) and (len(train), len(test)) == (60000, 10000)
    assert train.data.dtype == torch.float32 and float(train.data.min()) == 0 and float(train.data.max()) == 1
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))  # balanced classes
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    levels = torch.unique(test.data[:50] * 255)
    torch.testing.assert_close(levels, levels.round())  # 8-bit levels k / 255
    assert train.bins == 256 and len(D.FASHION_MNIST_CLASSES) == 10
    assert len(D.load("fashion-mnist:test")) == 10000 and len(D.load("fashion-mnist", "test")) == 10000


def test_fashion_mnist_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D.files, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.delenv("PYGEN_DATA", raising=False)
    with pytest.raises(D.DataError, match="apt install dataset-fashion-mnist"):
        D.load("fashion-mnist")


def test_fashion_mnist_from_pygen_data(tmp_path, monkeypatch):
    """$PYGEN_DATA (or its fashion-mnist/ folder) holds the four IDX files instead."""

    def idx(path, arr, code):
        head = b"\0\0" + bytes([code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(head + arr.tobytes())

    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08)
        idx(folder / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), 0x08)
    monkeypatch.setattr(D.files, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setenv("PYGEN_DATA", str(tmp_path))
    train, test = D.train_test("fashion-mnist")
    assert (len(train), len(test)) == (12, 5) and train.labels.tolist() == [i % 10 for i in range(12)]

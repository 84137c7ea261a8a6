"""Exact answers for the trainer's callbacks (mutation testing found these unpinned): the
sample grids' images, seed, scale and TensorBoard hand-off; the held-out FD's defaults,
argument checks and compact reading; TensorBoard's writer and its missing-package message."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pygen.data
import pygen.images
from pygen.data.storage import ImageFiles
from pygen.train.callbacks import HeldOutFD, SampleGrids, TensorBoard, _grid_images


class Stub:
    """A model whose sample(n, seed) is a known function of (n, seed) and ``shape``."""

    def __init__(self, shape, data_range=None):
        self.shape, self.seeds = shape, []
        if data_range is not None:
            self.data_range = data_range

    def sample(self, n, *, seed):
        self.seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, *self.shape, generator=g) * 6.0 - 2.0  # values in [-2, 4): some out of range

    def parameters(self):
        return iter([torch.zeros(1)])


@pytest.mark.parametrize("data_range", [(-1.0, 3.0), None])
def test_grid_images_map_the_data_range_to_unit_and_clamp(data_range):
    model = Stub((1, 4, 4), data_range)
    x = model.sample(5, seed=7)
    lo, hi = data_range or (0.0, 1.0)
    got = _grid_images(model, 5, 7)
    assert model.seeds == [7, 7]  # the seed it was given
    assert torch.equal(got, ((x - lo) / (hi - lo)).clamp(0, 1))
    assert got.min() == 0 and got.max() == 1  # both clamps hit
    assert 0 < got.unique().numel() - 2  # values inside are kept, not only the clamped ends
    assert _grid_images(Stub((3, 4, 4)), 2, 0).shape == (2, 3, 4, 4)  # RGB
    for shape in ((3,), (2, 4, 4), (4, 4, 4), (1, 4)):  # points (even 3 of them), 2 or 4 channels
        assert _grid_images(Stub(shape), 2, 0) is None, shape


def test_sample_grids_defaults_checks_seed_scale_and_tensorboard(tmp_path):
    assert SampleGrids(5).n == 64 and SampleGrids(1).every == 1
    for every in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"sample_every must be an int >= 1, got {every!r}"):
            SampleGrids(every)
    model = Stub((1, 8, 8))
    run = SimpleNamespace(step=4, steps=10, seed=11, out=tmp_path, sampling_model=model)
    grids = SampleGrids(2, n=3)
    grids.on_step(run, {})  # no TensorBoard: the PNG only
    assert model.seeds == [11]  # the run's seed: every grid shows the same latents
    from PIL import Image

    png = Image.open(grids.written[0])
    # 3 images of 8x8 scaled by 128 // 8 = 16, in one row, 1-pixel padding scaled too
    want = pygen.images.make_grid(_grid_images(Stub((1, 8, 8)), 3, 11), scale=16)
    assert png.size == (want.shape[2], want.shape[1])
    odd = SampleGrids(2, n=1)  # 43 pixels: scale 128 // 43 = 2
    odd.on_step(SimpleNamespace(step=4, steps=10, seed=11, out=tmp_path / "o", sampling_model=Stub((1, 43, 43))), {})
    assert Image.open(odd.written[0]).size[0] == pygen.images.make_grid(torch.zeros(1, 1, 43, 43), scale=2).shape[2]
    big = SimpleNamespace(step=4, steps=10, seed=11, out=tmp_path / "b", sampling_model=Stub((1, 100, 200)))
    grids_big = SampleGrids(2, n=1)
    grids_big.on_step(big, {})  # larger than 128 pixels: scale 1
    assert Image.open(grids_big.written[0]).size[0] == pygen.images.make_grid(torch.zeros(1, 1, 100, 200)).shape[2]
    seen = []
    tb = SimpleNamespace(writer=SimpleNamespace(add_image=lambda tag, img, step: seen.append((tag, img.shape, step))))
    SampleGrids(2, n=3, tensorboard=tb).on_step(SimpleNamespace(step=6, steps=10, seed=0, out=None,
                                                                sampling_model=Stub((1, 8, 8))), {})
    assert seen and seen[0][0] == "samples" and seen[0][2] == 6
    SampleGrids(2, n=3, tensorboard=SimpleNamespace(writer=None)).on_step(run, {})  # a writer not started yet


def test_held_out_fd_defaults_checks_and_compact_reading(tmp_path):
    data = pygen.data.load("two_moons")
    n = len(pygen.data.load("two_moons").data)
    fd = HeldOutFD(data, 1)  # every step is allowed
    assert (fd.n, fd.seed, fd.every) == (min(1000, n), 0, 1)
    real = data.data[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: fd.n]]
    assert torch.equal(fd.real, real)
    assert HeldOutFD(data, 3, n=2).n == 2  # two examples are enough
    for small in (1, 0):
        with pytest.raises(ValueError) as e:
            HeldOutFD(data, 3, n=small)
        assert str(e.value) == "the held-out FD needs at least 2 held-out examples"
    # a lazy folder: only the n held-out files are decoded, not the whole folder
    from PIL import Image

    for i in range(12):
        Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), mode="L").save(tmp_path / f"{i:02d}.png")
    lazy = pygen.data.load(tmp_path, lazy=True)
    assert isinstance(lazy.source, ImageFiles)
    read: list[Path] = []
    decode = lazy.source.decode
    lazy.source.decode = lambda p: read.append(p) or decode(p)
    fd = HeldOutFD(lazy, 3, n=4)
    assert len(read) == 4 and fd.real.shape == (4, 1, 8, 8)
    assert torch.equal(fd.real, pygen.data.load(tmp_path).data[torch.randperm(12, generator=torch.Generator()
                                                                              .manual_seed(0))[:4]])


def test_tensorboard_writer_dir_purge_step_and_missing_package(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import torch.utils.tensorboard as tbmod

    made: list[dict] = []

    class Writer:
        def __init__(self, **kw):
            made.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(tbmod, "SummaryWriter", Writer)
    tb = TensorBoard(tmp_path / "given")
    assert tb.writer is None and tb.log_dir == tmp_path / "given"
    tb.on_start(SimpleNamespace(out=tmp_path / "run", step=5))
    assert made[-1] == {"log_dir": str(tmp_path / "given"), "purge_step": 5}  # a resumed run purges later events
    tb = TensorBoard()
    tb.on_start(SimpleNamespace(out=tmp_path / "run", step=0))
    assert made[-1] == {"log_dir": str(tmp_path / "run" / "tensorboard"), "purge_step": None}
    tb.on_start(SimpleNamespace(out=None, step=0))  # no run directory: TensorBoard's own default (./runs/...)
    assert made[-1] == {"log_dir": None, "purge_step": None}
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the package missing
    with pytest.raises(ImportError) as e:
        TensorBoard()
    assert str(e.value) == "TensorBoard logging needs the tensorboard package: pip install tensorboard"


def test_best_checkpoint_rule_state_messages_and_end(tmp_path):
    from pygen.train.callbacks import BestCheckpoint, Run

    assert BestCheckpoint("m", patience=1).patience == 1
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"patience must be an int >= 1, got {bad!r}"):
            BestCheckpoint("m", patience=bad)
    assert BestCheckpoint("m").state_dict() == {"best": None, "best_step": 0, "bad": 0}
    saved = []
    run = Run(torch.nn.Linear(1, 1), None, steps=10, out=tmp_path, seed=0, save=lambda path, extra: saved.append(
        (path.name, extra)) or path)
    assert run.step == 0 and run.stop_reason is None
    cb = BestCheckpoint("loss", patience=2, min_delta=0.5)
    for step, value in ((1, 1.0), (2, 0.7), (3, 0.4)):  # 0.7 is not 0.5 better than 1.0; 0.4 is
        run.step = step
        cb.on_step(run, {"loss": value})
    assert cb.state_dict() == {"best": 0.4, "best_step": 3, "bad": 0}
    assert [s for s, _ in saved] == ["best.pt", "best.pt"] and saved[-1][1]["best"] == {"metric": "loss",
                                                                                       "value": 0.4, "step": 3}
    for step in (4, 5):
        run.step = step
        cb.on_step(run, {"loss": 0.3})
    assert run.stop_reason == "loss has not improved for 2 evaluations (best 0.4 at step 3)"
    up = BestCheckpoint("max:acc", patience=1)
    run.stop_reason = None
    for step, value in ((1, 0.9), (2, 0.8)):
        run.step = step
        up.on_step(run, {"acc": value})
    assert run.stop_reason == "acc has not improved for 1 evaluations (best 0.9 at step 1)"  # shown as measured
    model = torch.nn.Linear(1, 1)
    before = [p.detach().clone() for p in model.parameters()]
    for out in (None, tmp_path / "empty"):  # no run directory, no best.pt: the model is left as it is
        BestCheckpoint("loss").on_end(SimpleNamespace(out=out, model=model))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError) as e:
        Run(model, None, steps=1, out=None, seed=0, save=None).save_checkpoint("x.pt")
    assert str(e.value) == "save_checkpoint needs fit(out=...)"


def test_tensorboard_logs_numbers_but_not_the_step_and_closes(monkeypatch):
    logged, closed = [], []
    tb = TensorBoard.__new__(TensorBoard)  # no package needed for the logging rule
    tb.writer = SimpleNamespace(add_scalar=lambda k, v, s: logged.append((k, v, s)), close=lambda: closed.append(1))
    tb.on_step(SimpleNamespace(step=7), {"step": 7, "loss": 0.5, "n": 3, "note": "x"})
    assert logged == [("loss", 0.5, 7), ("n", 3, 7)]
    tb.on_end(None)
    assert closed == [1]
    tb.writer = None
    tb.on_end(None)  # never started: nothing to close

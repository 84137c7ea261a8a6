"""Exact contracts of the model layer's glue that mutation testing (``make mutation``) found
untested: checkpoint retention and reading, resume bookkeeping, the seed streams, the atomic
files and checkpoint listing, and the sampling directory. Each test pins a value or a
behaviour that a one-token change of the code would alter."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pygen._io import CorruptCheckpoint, checkpoints, resolve_checkpoint
from pygen.models import Flow, GenerativeModel, load
from pygen.models.labels import split_batch
from pygen.models.seeding import counter_uniform, derive_seed, resolve_seed, uniform_labels
from pygen.ops import randn
from pygen.train import fit
from pygen.train.checkpoint import describe, read_checkpoint, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def points(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


def tiny_flow(**kw) -> Flow:
    torch.manual_seed(0)
    return Flow("realnvp", (2,), hidden=8, n_layers=2, **kw)


# ---- checkpoints ------------------------------------------------------------------------------


def test_write_checkpoint_keeps_the_newest_two_by_default_and_one_with_keep_1(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path / "a", {"step": step})
        write_checkpoint(tmp_path / "b", {"step": step}, keep=1)
        write_checkpoint(tmp_path / "c", {"step": step}, keep=0)  # keep <= 0: all
    assert [s for s, _ in checkpoints(tmp_path / "a")] == [2, 3]
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [3]
    assert [s for s, _ in checkpoints(tmp_path / "c")] == [1, 2, 3]
    assert (tmp_path / "b" / "latest").read_text() == "ckpt-3.pt\n"


def test_read_checkpoint_defaults_and_missing_directory(tmp_path):
    assert read_checkpoint(tmp_path / "nothing") is None
    write_checkpoint(tmp_path, {"step": 4, "w": torch.ones(2)})
    ckpt, path = read_checkpoint(tmp_path)  # map_location defaults to the CPU
    assert path == tmp_path / "ckpt-4.pt" and ckpt["step"] == 4 and ckpt["w"].device.type == "cpu"


class _Payload:
    def __reduce__(self):
        return (print, ("a pickled payload ran",))


def test_checkpoints_are_read_with_weights_only(tmp_path):
    """A file holding an arbitrary pickled object is refused, never executed."""
    path = tmp_path / "ckpt-1.pt"
    torch.save({"step": 1, "family": "flow", "payload": _Payload()}, path)
    (tmp_path / "latest").write_text("ckpt-1.pt\n")
    with pytest.raises(CorruptCheckpoint, match="weights-only load refuses it"):
        read_checkpoint(tmp_path)
    with pytest.raises(CorruptCheckpoint, match="weights-only load refuses it"):
        load(path)


def test_a_directory_with_checkpoints_but_no_latest_is_a_run(tmp_path):
    torch.save({"step": 1}, tmp_path / "ckpt-1.pt")
    with pytest.raises(FileExistsError, match="already holds a training run"):
        fit(tiny_flow(), points(), steps=1, batch_size=32, out=tmp_path, progress=False)


def test_describe_a_missing_checkpoint():
    assert describe(None) == "none (no checkpoint was written)"
    assert describe(Path("x/ckpt-3.pt")) == "x/ckpt-3.pt"


# ---- resume bookkeeping ------------------------------------------------------------------------


def test_resume_warns_only_when_the_data_order_changes(tmp_path):
    fit(tiny_flow(), points(), steps=2, batch_size=32, out=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning at all
        fit(tiny_flow(), points(), steps=3, batch_size=32, out=tmp_path, resume=True, progress=False)
    with pytest.warns(UserWarning, match=r"batch_size=16 \(the run used 32\)"):
        fit(tiny_flow(), points(), steps=4, batch_size=16, out=tmp_path, resume=True, progress=False)


def test_resume_refuses_another_config_and_names_what_differs(tmp_path):
    fit(tiny_flow(), points(), steps=1, batch_size=32, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"'flow' model .*differs in \['bins'\]"):
        fit(tiny_flow(bins=17), points().clamp(0, 1), steps=2, batch_size=32, out=tmp_path, resume=True,
            progress=False)


def test_resume_drops_log_records_past_the_last_checkpoint(tmp_path):
    fit(tiny_flow(), points(), steps=4, batch_size=32, out=tmp_path, log_every=1, checkpoint_every=2,
        progress=False)
    metrics = tmp_path / "metrics.jsonl"
    write_checkpoint(tmp_path, torch.load(tmp_path / "ckpt-2.pt", weights_only=False), keep=0)  # latest: step 2
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 1e9}\n{"step": 4, "lo')  # what a killed run may leave
    fit(tiny_flow(), points(), steps=4, batch_size=32, out=tmp_path, resume=True, log_every=1,
        checkpoint_every=2, progress=False)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert all(json.loads(line)["loss"] < 1e8 for line in metrics.read_text().splitlines())


# ---- seeds ----------------------------------------------------------------------------------------


def test_derive_seed_is_the_pinned_splitmix64_step():
    # splitmix64 of seed + golden gamma * (stream + 1), mod 2^63: a change of any constant,
    # shift or operator moves these values
    assert derive_seed(0, 0) == 7070836379803831727
    assert derive_seed(123, 1) == 8791656398039529340
    assert derive_seed(2**63 - 1, 1000) == 5579409418578628735
    assert all(0 <= derive_seed(s, k) < 2**63 for s in (0, 1, 2**62) for k in (0, 7, 30_000_000))


def test_resolve_seed_forms_and_errors():
    assert resolve_seed(torch.tensor(3)) == resolve_seed(3) == 3
    assert resolve_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            resolve_seed(bad)
    with pytest.raises(ValueError, match="not both"):
        resolve_seed(1, torch.Generator())
    torch.manual_seed(5)
    a = resolve_seed(None)
    torch.manual_seed(5)
    assert resolve_seed(None) == a and resolve_seed(None, torch.Generator().manual_seed(5)) >= 0


def test_counter_uniform_is_the_normal_cdf_of_the_stream():
    eps = randn(1000, seed=9, offset=3).double()
    want = 0.5 * torch.erfc(-eps / math.sqrt(2))
    torch.testing.assert_close(counter_uniform(1000, seed=9, offset=3), want, rtol=0, atol=1e-15)
    lab = uniform_labels(50, 7, seed=4)  # offset defaults to 0
    torch.testing.assert_close(lab[5:], uniform_labels(45, 7, seed=4, offset=5))
    torch.testing.assert_close(lab, (counter_uniform(50, seed=4) * 7).long())


def test_split_batch_forms():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    assert split_batch((x,), None, "m")[1] is None and split_batch((x,), None, "m")[0] is x
    assert split_batch((x, y), None, "m")[1] is None  # unconditional: labels ignored
    assert split_batch((x, y.int()), 3, "m")[1].dtype == torch.int64
    with pytest.raises(ValueError, match="this m is class-conditional"):
        split_batch(x, 3, "m")


# ---- files -------------------------------------------------------------------------------------------


def test_saved_files_record_versions_and_configs(tmp_path):
    import pygen

    m = tiny_flow()
    m.save(tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert saved["versions"] == {"pygen": pygen.__version__, "torch": torch.__version__}
    assert saved["family"] == "flow" and saved["config"] == json.loads(json.dumps(m.config))

    class NoConfig(GenerativeModel, family="test-no-config"):
        pass

    with pytest.raises(TypeError, match="NoConfig.config must be a dict"):
        NoConfig().save(tmp_path / "x.pt")


def test_checkpoint_listing_and_resolution(tmp_path):
    assert checkpoints(tmp_path / "missing") == []
    for k in (1, 10, 2):
        (tmp_path / f"ckpt-{k}.pt").write_bytes(b"")
    (tmp_path / "ckpt-x.pt").write_bytes(b"")
    assert [s for s, _ in checkpoints(tmp_path)] == [1, 2, 10]
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-10.pt"  # no latest: the newest
    (tmp_path / "latest").write_text("ckpt-2.pt\n")
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-2.pt"
    for damaged in ("ckpt-7.pt\n", "\x00\x9c garbage"):  # a missing file, flipped bytes: the newest, said
        (tmp_path / "latest").write_text(damaged)
        with pytest.warns(UserWarning, match=r"which is not a checkpoint of .*using the newest, ckpt-10.pt"):
            assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-10.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("ckpt-7.pt\n")
    with pytest.raises(FileNotFoundError, match="names 'ckpt-7.pt', which is not a checkpoint of"):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="no checkpoint or directory"):
        resolve_checkpoint(tmp_path / "nope.pt")


# ---- the default training step ----------------------------------------------------------------------


class _FloatTerm(GenerativeModel, family="test-float-term"):
    """N(w, I) whose loss also reports a plain float term."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {}
        self.w = nn.Parameter(torch.zeros(2))

    def loss(self, batch):
        x = batch[0] if isinstance(batch, tuple) else batch
        return {"loss": ((x - self.w) ** 2).sum(1).mean(), "const": 1.5}


def test_training_step_returns_detached_terms_and_accepts_floats():
    m = _FloatTerm()
    opt = m.configure_optimizers(0.1)
    terms = m.training_step(torch.ones(4, 2), 0, opt)
    assert not terms["loss"].requires_grad and terms["const"] == 1.5
    assert torch.all(m.w.detach() > 0)  # one step towards the data
    hist = fit(_FloatTerm(), torch.ones(64, 2), steps=3, batch_size=16, lr=0.1, log_every=1, progress=False)
    assert [r["const"] for r in hist] == [1.5, 1.5, 1.5]


# ---- the sampling directory ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_run(trained_run) -> Path:
    return trained_run("flow", tiny_flow(), points(), steps=2, batch_size=32)


def test_sampling_directory_shards_resume_and_reads(flow_run, tmp_path):
    from pygen.sampling import SampleDir, SamplingError, sample_to_dir, shard_file

    out = tmp_path / "s"
    m = sample_to_dir(flow_run, 400, out, batch_size=64, shard_size=150, progress=False, grid=False)
    assert m["sampled"] == 400 and [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 150), (150, 300), (300, 400)]
    with np.load(out / shard_file(150, 300)) as z:
        assert z["samples"].dtype == np.float32 and np.array_equal(z["index"], np.arange(150, 300))
    d = SampleDir(out)
    want = load(flow_run).sample(400, seed=0)
    torch.testing.assert_close(d.read(140, 160), want[140:160], rtol=1e-5, atol=1e-5)  # across two shards
    torch.testing.assert_close(d.sample(100), d.read(0, 100))  # offset 0 by default
    assert d.sample(400).shape == (400, 2)
    with pytest.raises(SamplingError, match="450 are needed"):
        d.sample(100, offset=350)
    # resume: a damaged shard is redone, the others are kept
    (out / shard_file(150, 300)).write_bytes(b"PK\x03\x04 not a zip")
    again = sample_to_dir(flow_run, 400, out, batch_size=64, progress=False, grid=False)
    assert again["sampled"] == 150
    torch.testing.assert_close(SampleDir(out).read(0, 400), want, rtol=1e-5, atol=1e-5)
    assert sample_to_dir(flow_run, 400, out, progress=False, grid=False)["sampled"] == 0


def test_sampling_directory_png_in_process(tmp_path):
    """PNG shards written and read back in this process (the subprocess tests are invisible to
    mutmut's per-function test selection)."""
    from pygen.models import VAE
    from pygen.sampling import SampleDir, png_file, sample_to_dir

    torch.manual_seed(0)
    vae = VAE((1, 8, 8), 2, network="mlp", hidden=8)
    vae.save(tmp_path / "vae.pt")
    m = sample_to_dir(tmp_path / "vae.pt", 10, tmp_path / "p", fmt="png", batch_size=4, shard_size=4,
                      progress=False, grid=False)
    assert m["complete"] and sorted(p.name for p in (tmp_path / "p").glob("0*.png")) == [png_file(i) for i in range(10)]
    x = SampleDir(tmp_path / "p").read(0, 10)
    torch.testing.assert_close(x, vae.sample(10, seed=0), rtol=0, atol=0.5 / 255 + 1e-6)  # 8-bit
    (tmp_path / "p" / png_file(5)).unlink()
    assert sample_to_dir(tmp_path / "vae.pt", 10, tmp_path / "p", fmt="png", progress=False, grid=False)["sampled"] == 4


def test_labels_helpers():
    from pygen.data import Data
    from pygen.models import VAE
    from pygen.models.labels import num_classes_of, one_hot, training_data

    x = torch.zeros(4, 2)
    labelled, plain = Data(x, torch.tensor([0, 4, 1, 4]), "d"), Data(x, None, "p")
    assert num_classes_of(labelled) == 5
    with pytest.raises(ValueError, match="needs labelled data; p has no labels"):
        num_classes_of(plain)
    oh = one_hot(torch.tensor([2, 0]), 3, torch.float64)
    assert oh.dtype == torch.float64 and oh.tolist() == [[0, 0, 1], [1, 0, 0]]
    cond, uncond = VAE((2,), 2, hidden=8, num_classes=5), VAE((2,), 2, hidden=8)
    got = training_data(cond, labelled)
    assert isinstance(got, tuple) and got[0] is x and torch.equal(got[1], labelled.labels)
    assert training_data(uncond, labelled) is x and training_data(cond, plain) is x
    assert VAE.for_data(labelled, conditional=True).num_classes == 5 and VAE.for_data(labelled).num_classes is None


def test_sample_labels_forms():
    from pygen.models.labels import sample_labels

    assert sample_labels(torch.tensor([2]), 3, 5, seed=0).tolist() == [2, 2, 2]  # a 1-element tensor broadcasts
    assert sample_labels(torch.tensor(4), 2, 5, seed=0).tolist() == [4, 4] and sample_labels(1, 2, 5, seed=0).tolist() == [1, 1]
    with pytest.raises(TypeError, match="labels must be integers"):
        sample_labels(torch.tensor([1.0, 2.0]), 2, 5, seed=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\), got values in \[-1, 4\]"):
        sample_labels(torch.tensor([-1, 4]), 2, 5, seed=0)
    with pytest.raises(ValueError, match=r"labels must be an int or \(3,\)"):
        sample_labels(torch.tensor([1, 2]), 3, 5, seed=0)
    with pytest.raises(ValueError, match="unconditional GAN"):
        sample_labels(1, 3, None, seed=0, owner="GAN")
    assert sample_labels(None, 3, None, seed=0) is None

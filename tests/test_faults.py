"""The main job under faults (issue 20): concurrent jobs on one directory, corrupt and truncated
checkpoints, byte flips of train.json / metrics.jsonl / manifest.json, SIGKILL at random points
of training and sampling, divergence, refused resumes, full and read-only disks, budgets; each
driven as a user would (``python -m pygen`` subprocesses) or through the API. Each fix's test
failed before it; the random-kill loops pin what the earlier kill tests showed at one point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pygen._io import CorruptCheckpoint, verify_checkpoint
from pygen._lock import LOCK, DirectoryBusy, lock_directory
from pygen.models import GenerativeModel, load
from pygen.sampling import SamplingError, sample_to_dir
from pygen.train import TrainingDiverged, fit

from test_cli_trainer import TINY_VAE, assert_user_error, cli, env, records

REPO = Path(__file__).resolve().parents[1]


def _flip(path: Path) -> None:
    """Flip a byte in the middle of the largest record (weight bytes, not header padding)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        rec = max(z.infolist(), key=lambda i: i.file_size)
    b = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", b[rec.header_offset + 26 : rec.header_offset + 30])
    b[rec.header_offset + 30 + name_len + extra_len + rec.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 20-step VAE run with checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("faults") / "vae"
    cli("train", "vae", "--data", "digits", "--out", out, "--steps", "20", "--batch-size", "32",
        "--checkpoint-every", "10", "--no-progress", *TINY_VAE)  # fmt: skip
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != LOCK:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ---- one job per directory ---------------------------------------------------------------------


def test_a_held_directory_refuses_a_second_job_in_one_line(run, tmp_path):
    out = tmp_path / "s"
    with lock_directory(out):
        busy = cli("sample", run, "-n", "8", "--out", out, "--no-progress", check=False)
        assert_user_error(busy, "in use by another pygen job", f"pid {os.getpid()}")
        train = cli("train", "vae", "--data", "digits", "--out", out, "--steps", "2", "--no-progress", *TINY_VAE,
                    check=False)  # fmt: skip
        assert_user_error(train, "in use by another pygen job")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written: no train.json, no manifest
    cli("sample", run, "-n", "8", "--out", out, "--no-progress")  # released: the job runs


def test_a_killed_owner_leaves_no_stale_lock(tmp_path):
    code = f"from pygen._lock import lock_directory\nwith lock_directory({str(tmp_path)!r}):\n" \
           "    print('held', flush=True)\n    import time; time.sleep(60)\n"  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"pid {owner.pid} on "):
            with lock_directory(tmp_path):
                pass
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    with lock_directory(tmp_path):  # the kernel released the dead owner's lock
        with lock_directory(tmp_path):  # re-entrant within one process
            pass
    info = json.loads((tmp_path / LOCK).read_text())
    assert info["pid"] == os.getpid()


def test_two_sampling_jobs_started_together_never_mix(run, tmp_path):
    """Two seeds, one --out, started at once: one job wins, the other is refused (busy, or
    another job's identity); the directory holds only the winner's samples."""
    out = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-m", "pygen", "sample", str(run), "-n", "64", "--batch-size", "8",
                               "--shard-size", "8", "--seed", str(seed), "--out", str(out), "--no-progress"],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]  # fmt: skip
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], [p.stderr.read() for p in procs]
    winner = (1, 2)[codes.index(0)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == winner and manifest["complete"]
    alone = tmp_path / "alone"
    cli("sample", run, "-n", "64", "--batch-size", "8", "--shard-size", "8", "--seed", winner, "--out", alone,
        "--no-progress")  # fmt: skip
    for shard in sorted(alone.glob("*.npz")):
        with np.load(shard) as a, np.load(out / shard.name) as b:
            assert np.array_equal(a["samples"], b["samples"])


def test_two_training_runs_started_together_never_interleave(tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "pygen", "train", "vae", "--data", "digits", "--out", str(out),
                               "--steps", "6", "--batch-size", "32", "--log-every", "1", "--seed", str(seed),
                               "--no-progress", *TINY_VAE],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]  # fmt: skip
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], [p.stderr.read() for p in procs]
    winner = (1, 2)[codes.index(0)]
    assert json.loads((out / "train.json").read_text())["seed"] == winner
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "ckpt-6.pt", weights_only=True)["train"]["seed"] == winner


# ---- verified checkpoints ----------------------------------------------------------------------


def test_verify_checkpoint_catches_flipped_and_truncated_bytes(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good)
    verify_checkpoint(good)
    for damage in (_flip, _truncate):
        bad = tmp_path / f"{damage.__name__}.pt"
        bad.write_bytes(good.read_bytes())
        damage(bad)
        with pytest.raises(CorruptCheckpoint, match=str(bad)):
            verify_checkpoint(bad)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CorruptCheckpoint, match="not a checkpoint"):
        verify_checkpoint(text)


def test_a_corrupt_file_is_one_line_and_a_run_falls_back(run, tmp_path):
    r = _copy_run(run, tmp_path / "run")
    _flip(r / "ckpt-20.pt")
    assert_user_error(cli("sample", r / "ckpt-20.pt", "-n", "8", "--out", tmp_path / "a", check=False),
                      "ckpt-20.pt", "corrupt")  # fmt: skip
    assert_user_error(cli("eval", r / "ckpt-20.pt", "--data", "digits", "--n", "50", check=False), "corrupt")
    fell = cli("sample", r, "-n", "8", "--out", tmp_path / "b", "--no-progress")
    assert "ckpt-20.pt" in fell.stderr and "ckpt-10.pt" in fell.stderr  # says so
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["checkpoint"].endswith("ckpt-10.pt")
    with pytest.warns(UserWarning, match="corrupt"):
        model = load(r)
    ref = load(run / "ckpt-10.pt")
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    for named in (r / "ckpt-20.pt", r):  # asked for by name or step: no fallback
        with pytest.raises(CorruptCheckpoint, match="ckpt-20.pt"):
            load(named, **({} if named.is_file() else {"checkpoint": 20}))


def test_resume_from_a_truncated_latest_falls_back_to_the_previous_checkpoint(run, tmp_path):
    r = _copy_run(run, tmp_path / "run")
    _truncate(r / "ckpt-20.pt")
    resumed = cli("train", "vae", "--out", r, "--resume", "--steps", "30", "--no-progress")
    assert "ckpt-20.pt" in resumed.stderr and "falling back to" in resumed.stderr and "ckpt-10.pt" in resumed.stderr
    steps = [rec["step"] for rec in records(r)]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # the log rewound to step 10, nothing doubled
    verify_checkpoint(r / "ckpt-30.pt")


# ---- divergence ---------------------------------------------------------------------------------


class _Blows(GenerativeModel, family="test-faults-blows"):
    """Finite losses, but the update of step ``at`` (0-based) leaves NaN weights."""

    def __init__(self, at: int = 4) -> None:
        super().__init__()
        self.config = {"at": at}
        self.at = at
        self.w = nn.Parameter(torch.zeros(3))

    def loss(self, batch):
        return {"loss": ((batch - self.w) ** 2).mean()}

    def training_step(self, batch, step, optimizers, *, update=None):
        with torch.no_grad():
            self.w.add_(1.0 if step < self.at else float("nan"))
        return {"loss": torch.ones(())}

    def sample(self, n, *, seed=None, offset=0, generator=None):
        return self.w.detach().expand(n, 3).clone()


class _NanFrom(GenerativeModel, family="test-faults-nan-from"):
    """Samples 0 from index ``first`` on, NaN before it: sample 0 (the job's probe) is fine."""

    def __init__(self, first: int = 5) -> None:
        super().__init__()
        self.config = {"first": first}
        self.first = first
        self.w = nn.Parameter(torch.zeros(3))

    def loss(self, batch):
        return {"loss": ((batch - self.w) ** 2).mean()}

    def sample(self, n, *, seed=None, offset=0, generator=None):
        x = torch.zeros(n, 3)
        x[torch.arange(offset, offset + n) >= self.first] = float("nan")
        return x


def test_weights_that_went_non_finite_are_never_checkpointed(tmp_path):
    with pytest.raises(TrainingDiverged, match="ckpt-4.pt") as e:
        fit(_Blows(at=4), torch.zeros(8, 3), steps=10, batch_size=4, out=tmp_path, checkpoint_every=1, progress=False)
    assert "non-finite weights" in str(e.value) and e.value.checkpoint == tmp_path / "ckpt-4.pt"
    assert not (tmp_path / "ckpt-5.pt").exists() and (tmp_path / "latest").read_text().strip() == "ckpt-4.pt"
    good = load(tmp_path)
    assert torch.isfinite(good.w).all() and torch.equal(good.w.detach(), torch.full((3,), 4.0))


def test_the_sampling_job_refuses_non_finite_samples(run, tmp_path):
    ckpt = torch.load(run / "ckpt-20.pt", weights_only=True)
    assert "post_hoc" in ckpt  # the VAE's second stage: what load reads
    for state in (ckpt["model"], ckpt["ema"] or {}, ckpt["post_hoc"]["model"]):
        for v in state.values():
            if v.is_floating_point():
                v.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(SamplingError, match="NaN or inf"):  # the first sample says so: nothing written
        sample_to_dir(tmp_path / "nan.pt", 8, tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()
    bad = cli("sample", tmp_path / "nan.pt", "-n", "8", "--out", tmp_path / "t", check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "NaN or inf" in bad.stderr
    _NanFrom(first=13).save(tmp_path / "late.pt")  # a later shard goes bad: the earlier ones stay
    with pytest.raises(SamplingError, match=r"samples 8\.\.15 hold NaN or inf \(first: sample 13\)"):
        sample_to_dir(tmp_path / "late.pt", 24, tmp_path / "u", batch_size=4, shard_size=8, progress=False)
    manifest = json.loads((tmp_path / "u" / "manifest.json").read_text())
    assert not manifest["complete"] and sorted(p.name for p in (tmp_path / "u").glob("*.npz")) == [
        manifest["shards"][0]["file"]]


# ---- resume bookkeeping -------------------------------------------------------------------------


def test_a_refused_resume_changes_nothing_and_a_given_lr_applies(run, tmp_path):
    r = _copy_run(run, tmp_path / "run")
    before = (r / "train.json").read_bytes()
    refused = cli("train", "vae", "--out", r, "--resume", "--steps", "30", "--lr-schedule", "cosine", check=False)
    assert_user_error(refused, "lr_schedule")
    assert (r / "train.json").read_bytes() == before
    cli("train", "vae", "--out", r, "--resume", "--steps", "30", "--lr", "1e-4", "--log-every", "1", "--no-progress")
    recs = {rec["step"]: rec for rec in records(r)}
    assert all(recs[k]["lr"] == pytest.approx(1e-4, rel=1e-12) for k in range(21, 31))
    assert json.loads((r / "train.json").read_text())["lr"] == 1e-4
    ckpt = torch.load(r / "ckpt-30.pt", weights_only=True)
    assert all(g["lr"] == pytest.approx(1e-4) for g in ckpt["optimizers"][0]["param_groups"])


# ---- every mistake: one line, exit 2, nothing written ------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "one.npy", np.zeros((1, 8, 8), np.float32))
    x = np.random.default_rng(0).random((64, 8, 8)).astype(np.float32)
    np.savez(d / "neg_labels.npz", x=x, labels=np.r_[-1, np.zeros(63, np.int64)])
    np.savez(d / "huge_labels.npz", x=x, labels=np.r_[10**9, np.zeros(63, np.int64)])
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "text.pt").write_text("hello\n")
    import pickle

    (d / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    (d / "typo.json").write_text(json.dumps({"stepz": 3}))
    with open(d / "claims.npy", "wb") as f:  # a header claiming 40 TB, and no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**6)})
    import gzip
    import struct

    with gzip.open(d / "bomb-images-idx3-ubyte.gz", "wb") as f:  # 8 bytes of images, then 64 MB of zeros
        f.write(b"\0\0\x08\x03" + struct.pack(">3i", 2, 2, 2) + bytes(8))
        for _ in range(64):
            f.write(bytes(1 << 20))
    for name, manifest in {"zero_shards": {"n": 8, "shard_size": 0}, "no_n": {"shard_size": 8},
                           "text_n": {"n": "many", "shard_size": 8}}.items():  # fmt: skip
        (d / name).mkdir()
        (d / name / "manifest.json").write_text(json.dumps({"format_version": 1, "complete": True, **manifest}))
    return d


TRAIN = ["train", "vae", "--data", "digits", "--steps", "2", "--no-progress", *TINY_VAE]
CASES = {
    "lr negative": (TRAIN + ["--lr", "-1"], "--lr"),
    "lr nan": (TRAIN + ["--lr", "nan"], "--lr"),
    "threads negative": (TRAIN + ["--threads", "-1"], "--threads"),
    "seed negative": (TRAIN + ["--seed", "-3"], "--seed"),
    "steps zero": (TRAIN + ["--steps", "0"], "--steps"),
    "hidden negative": (TRAIN + ["--option", "hidden=-1"], "cannot build"),
    "config typo": (TRAIN + ["--config", "{in}/typo.json"], "stepz"),
    "one example": (["train", "vae", "--data", "{in}/one.npy", "--steps", "2", "--no-progress"], "one.npy"),
    "labels -1": (["train", "vae", "--data", "{in}/neg_labels.npz", "--steps", "2", "--no-progress"], "labels"),
    "labels 1e9": (["train", "vae", "--data", "{in}/huge_labels.npz", "--steps", "2", "--no-progress"], "labels"),
    "npy header claims 40 TB": (["train", "vae", "--data", "{in}/claims.npy", "--no-progress"], "a damaged or truncated file"),
    "gz inflates past its header": (["train", "vae", "--data", "{in}/bomb-images-idx3-ubyte.gz", "--no-progress"],
                                    "file has more"),
    "garbage npz": (["train", "vae", "--data", "{in}/garbage.npz", "--steps", "2", "--no-progress"], "garbage.npz"),
    "sample seed negative": (["sample", "{run}", "-n", "8", "--seed", "-1"], "--seed"),
    "sample text file": (["sample", "{in}/text.pt", "-n", "8"], "not a checkpoint"),
    "eval text file": (["eval", "{in}/text.pt", "--data", "digits"], "not a checkpoint"),
    "eval pickle": (["eval", "{in}/pickle.pt", "--data", "digits"], "not a checkpoint"),
    "eval other data": (["eval", "{run}", "--data", "digits32", "--n", "50"], "digits32"),
    "eval shard size 0": (["eval", "{in}/zero_shards", "--data", "digits"], "shard_size"),
    "eval no n": (["eval", "{in}/no_n", "--data", "digits"], "manifest"),
    "eval n text": (["eval", "{in}/text_n", "--data", "digits"], "manifest"),
    "eval json unwritable": (["eval", "{run}", "--data", "digits", "--n", "50", "--json", "/proc/pygen/x.json"],
                             "--json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_and_exit_2(case, run, inputs, tmp_path):
    args, needle = CASES[case]
    args = [a.format(run=run, **{"in": inputs}) for a in args]
    out = tmp_path / "out"
    if args[0] in ("train", "sample"):
        args += ["--out", str(out)]
    assert_user_error(cli(*args, check=False), needle)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) in ([], [LOCK])  # nothing written


def test_an_n_the_disk_cannot_hold_is_refused_before_anything_is_written(run, tmp_path):
    huge = cli("sample", run, "-n", str(10**12), "--out", tmp_path / "s", check=False, timeout=120)
    assert_user_error(huge, "-n 1000000000000 needs about", "free there")
    assert not (tmp_path / "s" / "manifest.json").exists()


# ---- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 200 kB tmpfs (a tiny VAE's checkpoint is about 110 kB): needs root, skipped without."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("mounting a small tmpfs needs root")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_after(small_disk):
    out = small_disk / "run"
    full = cli("train", "vae", "--data", "digits", "--out", out, "--steps", "4", "--checkpoint-every", "1",
               "--batch-size", "32", "--no-progress", *TINY_VAE, check=False)  # fmt: skip
    assert_user_error(full, "No space left on device", "ckpt-1.pt", "--resume")
    assert not list(out.glob(".tmp-*"))  # no half-written file left behind
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    cli("train", "vae", "--out", out, "--resume", "--no-progress")
    verify_checkpoint(out / "ckpt-4.pt")
    assert [r["step"] for r in records(out)][-1] == 4


def test_a_disk_that_fills_during_sampling_keeps_the_complete_shards(run, small_disk, tmp_path):
    out, filler = small_disk / "s", small_disk / "filler"

    def fill(start, stop):  # another process takes the rest of the disk after the first shard
        if not filler.exists():
            with open(filler, "wb", buffering=0) as f:  # unbuffered: the close has nothing left to fail on
                try:
                    while True:
                        f.write(bytes(4096))
                except OSError:
                    pass

    with pytest.raises(SamplingError, match="cannot write samples 8..15 .*No space left on device"):
        sample_to_dir(run, 32, out, batch_size=8, shard_size=8, progress=False, on_shard=fill)
    filler.unlink()
    manifest = sample_to_dir(run, 32, out, batch_size=8, shard_size=8, progress=False)
    assert manifest["complete"]
    alone = sample_to_dir(run, 32, tmp_path / "alone", batch_size=8, shard_size=8, progress=False)
    for entry in alone["shards"]:
        with np.load(tmp_path / "alone" / entry["file"]) as a, np.load(out / entry["file"]) as b:
            assert np.array_equal(a["samples"], b["samples"])


def test_pillows_bomb_limit_is_kept_and_said_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    import pygen.data
    from pygen.data import DataError

    Image.new("L", (100, 100)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > twice the limit: an error
    with pytest.raises(DataError, match="decompression-bomb limit") as e:
        pygen.data.load(str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_collapsed_gan_stops_with_one_line_instead_of_sampling_constants(tmp_path):
    """G that outputs one image for every z (as a GAN at --lr 10 did: every sample exactly 0.0):
    its losses stay finite and moderate, the spread of its fakes says it."""
    from pygen.models import GAN

    torch.manual_seed(0)
    gan = GAN((1, 8, 8), z_dim=8, g_width=8, d_width=8)
    x = torch.rand(64, 1, 8, 8)
    healthy = fit(gan, x, steps=2, batch_size=16, log_every=1, progress=False)
    assert all(r["fake_spread"] > 1e-3 for r in healthy)
    first = next(gan.generator.parameters())
    gan.generator.forward = lambda z, labels=None: torch.zeros(z.shape[0], 1, 8, 8) + 0 * first.sum()
    with pytest.raises(TrainingDiverged, match=r"collapsed at training step 1: .*spread 0 < 1e-06") as e:
        fit(gan, x, steps=2, batch_size=16, out=tmp_path, progress=False)
    assert "last good checkpoint: none" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"num_train_timesteps": 10**10}, "num_train_timesteps must be <= 100000"),
        ({"beta_end": 1.5}, "betas must lie in [0, 1]"),
        ({"beta_start": float("nan")}, "betas must lie in [0, 1]"),
        ({"trained_betas": [0.1, float("nan"), 0.2]}, "trained_betas gives"),
        ({"trained_betas": [0.1] * 100_001}, "trained_betas must hold <= 100000"),
    ],
)
def test_scheduler_configs_are_bounded_and_checked(tmp_path, config, needle):
    from pygen.diffusion import DDIMScheduler

    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", **config}))
    with pytest.raises(ValueError, match=re.escape(needle)):
        DDIMScheduler.from_pretrained(tmp_path)


def test_a_config_asking_for_far_more_than_its_weights_is_refused_before_allocating(run, tmp_path):
    ckpt = torch.load(run / "ckpt-20.pt", weights_only=True)
    for config in (ckpt["config"], ckpt["post_hoc"]["config"]):  # post_hoc: what load reads by default
        config["hidden"] = 10**9  # a 64 x 1e9 first layer: 256 GB of float32
    torch.save(ckpt, tmp_path / "wide.pt")
    with pytest.raises(CorruptCheckpoint, match=r"builds a model of \S+ GB for \S+ GB of weights"):
        load(tmp_path / "wide.pt")
    assert_user_error(cli("sample", tmp_path / "wide.pt", "-n", "4", "--out", tmp_path / "s", check=False),
                      "builds a model of")  # fmt: skip


@pytest.mark.parametrize("family", ["vae", "gan", "flow", "diffusion", "latent-diffusion"])
def test_a_model_too_large_for_this_machine_is_refused_before_it_is_built(family, tmp_path, monkeypatch, capsys):
    """(Two 4000x4000 images made the VAE ask for 16 GB.) The model is sized on the meta
    device first (every family: the flow's masks and the diffusion schedule are CPU
    constants, so the meta build works); here the machine is made small instead of the images
    large: 20 kB, less than 4x the weights of even the tiny VAE."""
    import pygen._io
    from pygen.cli import main

    import warnings

    monkeypatch.setattr(pygen._io, "memory_bytes", lambda: 20_000)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets both: restore them
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    args = TINY_VAE if family == "vae" else []
    try:
        assert main(["train", family, "--data", "digits", "--out", str(out), "--no-progress", *args]) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GB of weights; training needs about 4x that" in err[0], err
    assert not out.exists()


class _Mean(GenerativeModel, family="test-faults-mean"):
    def __init__(self) -> None:
        super().__init__()
        self.config = {}
        self.w = nn.Parameter(torch.zeros(3))

    def loss(self, batch):
        return {"loss": ((batch - self.w) ** 2).mean()}


def test_a_resume_with_another_lr_continues_the_schedule_from_the_new_base(tmp_path):
    from pygen.train.schedules import lr_factor

    x = torch.randn(32, 3)
    kw = dict(steps=10, batch_size=8, lr_schedule="cosine", warmup=2, out=tmp_path, log_every=1, checkpoint_every=5,
              progress=False)  # fmt: skip
    fit(_Mean(), x, lr=0.1, **kw)
    (tmp_path / "latest").write_text("ckpt-5.pt\n")  # back to step 5
    with pytest.warns(UserWarning, match=r"with lr 0.01 \(base lrs 0.1 before\)"):
        again = fit(_Mean(), x, lr=0.01, resume=True, **kw)
    factor = lr_factor("cosine", 2, 10)
    assert [r["step"] for r in again] == [6, 7, 8, 9, 10]
    for r in again:
        assert r["lr"] == pytest.approx(0.01 * factor(r["step"] - 1), rel=1e-12)
    with pytest.warns(UserWarning) as caught:  # the same lr again: only the stretched schedule is news
        same = fit(_Mean(), x, lr=0.01, resume=True, **{**kw, "steps": 12})
    assert [str(w.message) for w in caught if "lr 0.01" in str(w.message)] == []
    assert any("decays to 0 at step 12" in str(w.message) for w in caught)
    assert same[0]["lr"] == pytest.approx(0.01 * lr_factor("cosine", 2, 12)(10), rel=1e-12)


def test_a_read_only_output_is_one_line_before_any_work(run, small_disk):
    """(Root ignores directory permissions: a read-only mount is what refuses it.)"""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    train = cli("train", "vae", "--data", "digits", "--out", small_disk / "run", "--steps", "2", "--no-progress",
                *TINY_VAE, check=False)  # fmt: skip
    assert_user_error(train, "cannot write to --out", "Read-only file system")
    sample = cli("sample", run, "-n", "8", "--out", small_disk / "s", check=False)
    assert_user_error(sample, "Read-only file system")
    assert list(small_disk.iterdir()) == []


# ---- byte flips of the run's text files ------------------------------------------------------


def _flip_at(path: Path, needle: bytes, new: bytes) -> None:
    """Replace the first ``needle`` by ``new`` (same length: one damaged byte or two)."""
    b = path.read_bytes()
    assert len(needle) == len(new) and needle in b, (needle, b[:200])
    path.write_bytes(b.replace(needle, new, 1))


def test_byte_flips_of_train_json_and_metrics_jsonl(run, tmp_path):
    # train.json damaged: one line naming it, exit 2, nothing changed
    r = _copy_run(run, tmp_path / "r")
    _flip_at(r / "train.json", b'"steps":', b'"steps";')
    before = {p.name: p.read_bytes() for p in r.iterdir()}
    proc = cli("train", "vae", "--out", r, "--resume", "--steps", "30", "--no-progress", check=False)
    assert_user_error(proc, "train.json (the run's settings) is damaged", "restore it")
    assert {p.name: p.read_bytes() for p in r.iterdir() if p.name != LOCK} == before
    (r / "train.json").write_text("[1, 2]\n")  # valid JSON, not the settings object
    assert_user_error(cli("train", "vae", "--out", r, "--resume", "--no-progress", check=False), "not an object")

    # metrics.jsonl: a damaged line is dropped on resume, every other record kept, then the run continues
    r = tmp_path / "m"
    cli("train", "vae", "--data", "digits", "--out", r, "--steps", "20", "--batch-size", "32", "--checkpoint-every",
        "10", "--log-every", "1", "--no-progress", *TINY_VAE)  # fmt: skip
    lines = (r / "metrics.jsonl").read_text().splitlines()
    bad = next(i for i, line in enumerate(lines) if '"step": 10' in line)
    _flip_at(r / "metrics.jsonl", b'"step": 10,', b'"step": 10;')
    cli("train", "vae", "--out", r, "--resume", "--steps", "30", "--no-progress")
    steps = [rec["step"] for rec in records(r)]
    kept = [json.loads(line)["step"] for i, line in enumerate(lines) if i != bad]
    assert steps[: len(kept)] == kept and steps[-1] == 30 and 10 not in steps[: len(kept)]
    assert (r / "latest").read_text().strip() == "ckpt-30.pt"


def test_byte_flips_of_the_manifest(run, tmp_path):
    clean = tmp_path / "clean"
    sample_to_dir(run, 48, clean, batch_size=8, shard_size=16, progress=False)
    ref = {p.name: p.read_bytes() for p in clean.glob("shard-*.npz")}

    def damaged(name: str, needle: bytes, new: bytes) -> Path:
        d = tmp_path / name
        d.mkdir()
        for p in clean.iterdir():
            if p.name != LOCK:
                (d / p.name).write_bytes(p.read_bytes())
        _flip_at(d / "manifest.json", needle, new)
        return d

    # a flip in an identity field: another job as far as anyone can tell -> one line, nothing touched
    d = damaged("seed", b'"seed": 0', b'"seed": 1')
    proc = cli("sample", run, "-n", "48", "--out", d, "--shard-size", "16", "--no-progress", check=False)
    assert_user_error(proc, "holds samples of another job", "seed 1 there vs 0 now")
    assert {p.name: p.read_bytes() for p in d.glob("shard-*.npz")} == ref
    # a flip that breaks the JSON: one line naming the file, nothing touched
    d = damaged("syntax", b'"complete":', b'"complete";')
    proc = cli("sample", run, "-n", "48", "--out", d, "--shard-size", "16", "--no-progress", check=False)
    assert_user_error(proc, "manifest.json is unreadable")
    assert {p.name: p.read_bytes() for p in d.glob("shard-*.npz")} == ref
    # a flip in the shard list (derived from the shards on disk): the rerun completes, bytes as the clean job's
    d = damaged("shards", b'"stop"', b'"rtop"')
    cli("sample", run, "-n", "48", "--out", d, "--shard-size", "16", "--no-progress")
    assert {p.name: p.read_bytes() for p in d.glob("shard-*.npz")} == ref
    assert json.loads((d / "manifest.json").read_text())["complete"] is True


# ---- SIGKILL at random points ---------------------------------------------------------------------


def _kill_loop(args: list[str], done: "callable", delays: list[float]) -> int:
    """Start ``python -m pygen *args`` again and again, SIGKILLing it after each delay, until
    ``done()``; then once more to the end. Returns how many kills landed."""
    kills = 0
    for delay in delays:
        if done():
            break
        proc = subprocess.Popen([sys.executable, "-m", "pygen", *args], cwd=REPO, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    return kills


def test_training_killed_at_random_points_resumes_to_the_uninterrupted_run(tmp_path):
    common = ["--data", "digits", "--steps", "120", "--batch-size", "32", "--checkpoint-every", "4", "--log-every", "1",
              "--no-progress", *TINY_VAE]
    ref = tmp_path / "ref"
    cli("train", "vae", "--out", ref, *common)
    out = tmp_path / "killed"
    rng = np.random.default_rng(20)  # kill points spread over start-up, training and checkpoint writes
    delays = list(rng.uniform(1.0, 6.0, size=8))
    kills = _kill_loop(["train", "vae", "--out", str(out), "--resume", *common],
                       lambda: (out / "latest").exists() and (out / "latest").read_text().strip() == "ckpt-120.pt",
                       delays)
    assert kills >= 1, "no kill landed: the delays are too long for this machine"
    cli("train", "vae", "--out", out, "--resume", *common)  # to the end (a no-op if the loop finished it)
    a, b = torch.load(ref / "ckpt-120.pt", weights_only=True), torch.load(out / "ckpt-120.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["step"] for r in records(out)] == list(range(1, 121))  # every step logged once
    strip = lambda r: {k: v for k, v in r.items() if k not in ("steps_per_s", "samples_per_s")}  # noqa: E731
    assert [strip(r) for r in records(out)] == [strip(r) for r in records(ref)]
    assert not list(out.glob(".tmp-*"))


def test_sampling_killed_at_random_points_resumes_to_the_clean_job(run, tmp_path):
    clean = tmp_path / "clean"
    sample_to_dir(run, 4000, clean, batch_size=50, shard_size=200, progress=False)
    ref = {p.name: p.read_bytes() for p in clean.glob("shard-*.npz")}
    out = tmp_path / "killed"
    args = ["sample", str(run), "-n", "4000", "--out", str(out), "--batch-size", "50", "--shard-size", "200",
            "--no-progress"]
    t0 = time.perf_counter()  # the whole job's wall time here, start-up included: kill points within it
    cli(*[tmp_path / "timed" if a == str(out) else a for a in args])
    wall = time.perf_counter() - t0
    rng = np.random.default_rng(21)
    kills = _kill_loop(args, lambda: (out / "manifest.json").exists()
                       and json.loads((out / "manifest.json").read_text())["complete"],
                       list(wall * rng.uniform(0.3, 0.95, 8)))
    assert kills >= 1, "no kill landed mid-job"
    cli(*args)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.npz")} == ref
    assert not list(out.glob(".tmp-*"))

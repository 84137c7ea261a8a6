"""The sampling job (``pygen sample`` / :mod:`pygen.sampling`), driven as a user would: killed
with SIGKILL mid-way and resumed, another batch size or shard size, two torchrun ranks, PNG
output, and the refusals that keep two jobs' samples from mixing.

Tiny models (a 30-step VAE), one torch thread per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pygen.sampling import SampleDir, plan_shards

REPO = Path(__file__).resolve().parents[1]
N = 1000


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    e.pop("TRITON_INTERPRET", None)  # CPU kernels, not the Triton interpreter (slow), in the children
    return e


def pygen(*args: str, check: bool = True, extra_env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "pygen", *args], cwd=REPO, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "vae"
    pygen("train", "vae", "--data", "digits", "--out", str(run), "--steps", "30", "--batch-size", "32",
          "--hidden", "32", "--latent-dim", "4", "--no-progress")
    return run


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory) -> torch.Tensor:
    """The uninterrupted single-process run: batch 100, shards of 100."""
    out = tmp_path_factory.mktemp("ref") / "s"
    pygen("sample", str(run_dir), "-n", str(N), "--out", str(out), "--batch-size", "100", "--shard-size", "100",
          "--no-progress")
    return read_all(out)


def read_all(out: Path) -> torch.Tensor:
    """Every sample of a directory, checking that the shards hold each index 0..n-1 exactly once."""
    d = SampleDir(out)
    assert d.complete
    manifest = json.loads((out / "manifest.json").read_text())
    seen = []
    if d.fmt == "npz":
        files = sorted(out.glob("shard-*.npz"))
        assert [f.name for f in files] == sorted(s["file"] for s in manifest["shards"])
        for f in files:
            with np.load(f) as z:
                assert z["samples"].dtype == np.float32 and z["index"].dtype == np.int64
                seen.append(z["index"])
        idx = np.concatenate(seen)
        assert np.array_equal(np.sort(idx), np.arange(d.n)) and len(idx) == d.n  # none missing, none twice
    assert not list(out.glob(".tmp-*"))
    return d.read(0, d.n)


def test_plan_shards():
    assert plan_shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards(4, 4) == [(0, 4)]


def test_reference_run(run_dir, reference, tmp_path):
    assert reference.shape == (N, 1, 8, 8) and torch.isfinite(reference).all()
    assert 0 <= reference.min() and reference.max() <= 1  # the data's range
    # the job equals the model's own sample(n, seed) (EMA-less VAE: the trained weights)
    import pygen.models

    model = pygen.models.load(run_dir)
    torch.testing.assert_close(model.sample(64, seed=0, offset=200), reference[200:264], rtol=0, atol=1e-5)
    assert (run_dir.parent / "vae").exists()


def test_killed_then_resumed_equals_uninterrupted(run_dir, reference, tmp_path):
    out = tmp_path / "s"
    # the job as `pygen sample` runs it, slowed down after each shard so that it can be killed mid-way
    script = (f"import time; from pygen.sampling import sample_to_dir; "
              f"sample_to_dir({str(run_dir)!r}, {N}, {str(out)!r}, batch_size=100, shard_size=100, "
              f"progress=False, on_shard=lambda a, b: time.sleep(0.4))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while len(list(out.glob("shard-*.npz"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "no shard written within 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(out.glob("shard-*.npz"))
    assert 3 <= len(done) < N // 100, "killed mid-way"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["n"] == N
    for f in done:  # whatever exists under a final name is complete
        with np.load(f) as z:
            a, b = (int(s) for s in f.stem.split("-")[1:])
            assert np.array_equal(z["index"], np.arange(a, b))
    # what a writer killed inside np.savez leaves: a temp file, never read, removed on resume
    (out / ".tmp-shard-0000000900-0000001000.npz.abc").write_bytes(b"PK\x03\x04 half a zip")
    mtimes = {f: f.stat().st_mtime_ns for f in done}

    proc = pygen("sample", str(run_dir), "-n", str(N), "--out", str(out), "--batch-size", "100",
                 "--no-progress")  # the shard size comes from the manifest
    assert f"{N - 100 * len(done):,}" in proc.stdout  # only the missing shards were sampled
    assert {f: f.stat().st_mtime_ns for f in done} == mtimes  # complete shards were kept, not rewritten
    torch.testing.assert_close(read_all(out), reference, rtol=0, atol=1e-6)
    assert (out / "grid.png").exists()

    # run again on a complete job: nothing to do, same samples
    pygen("sample", str(run_dir), "-n", str(N), "--out", str(out), "--no-progress")
    torch.testing.assert_close(read_all(out), reference, rtol=0, atol=1e-6)


def test_batch_size_and_shard_size_invariance(run_dir, reference, tmp_path):
    out = tmp_path / "s"
    pygen("sample", str(run_dir), "-n", str(N), "--out", str(out), "--batch-size", "37", "--shard-size", "300",
          "--no-progress")
    assert len(list(out.glob("shard-*.npz"))) == 4
    torch.testing.assert_close(read_all(out), reference, rtol=0, atol=1e-5)


def test_torchrun_two_ranks_equal_one(run_dir, reference, tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "pygen",
           "sample", str(run_dir), "-n", str(N), "--out", str(out), "--batch-size", "100", "--shard-size", "100",
           "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["complete"]
    torch.testing.assert_close(read_all(out), reference, rtol=0, atol=1e-6)


def test_png_format(run_dir, reference, tmp_path):
    out = tmp_path / "png"
    pygen("sample", str(run_dir), "-n", "20", "--out", str(out), "--format", "png", "--batch-size", "8",
          "--no-progress")
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:010d}.png" for i in range(20)]
    x = SampleDir(out).read(0, 20)
    torch.testing.assert_close(x, reference[:20], rtol=0, atol=0.5 / 255 + 1e-6)  # 8-bit quantisation


def test_refuses_another_job_in_the_same_dir(run_dir, tmp_path):
    out = tmp_path / "s"
    pygen("sample", str(run_dir), "-n", "50", "--out", str(out), "--no-progress")
    for args, what in ((["--seed", "1"], "seed"), (["--format", "png"], "format")):
        proc = pygen("sample", str(run_dir), "-n", "50", "--out", str(out), "--no-progress", *args, check=False)
        assert proc.returncode == 2 and what in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = pygen("sample", str(run_dir), "-n", "60", "--out", str(out), "--no-progress", check=False)
    assert proc.returncode == 2 and "n 50 there vs 60 now" in proc.stderr
    # another checkpoint (the run continued: its latest changed)
    other = tmp_path / "ckpt.pt"
    ck = torch.load(run_dir / (run_dir / "latest").read_text().strip(), weights_only=True)
    ck["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, other)
    proc = pygen("sample", str(other), "-n", "50", "--out", str(out), "--no-progress", check=False)
    assert proc.returncode == 2 and "checkpoint_sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert SampleDir(out).complete  # untouched


def test_sample_dir_streams_into_evaluate(run_dir, tmp_path):
    from pygen.sampling import sample_to_dir

    out = tmp_path / "s"
    sample_to_dir(run_dir, 400, out, batch_size=128, progress=False)
    d = SampleDir(out)
    torch.testing.assert_close(d.sample(100, seed=0, offset=150), d.read(150, 250))
    from pygen.sampling import SamplingError

    with pytest.raises(SamplingError, match="holds 400 samples"):
        d.sample(100, offset=350)

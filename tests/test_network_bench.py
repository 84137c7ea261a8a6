"""The network benchmark, sampling-job benchmark and profiler scripts (issue 19) run, and compare like with like:
diffusers' UNet2DModel is built with pygen's widths, blocks and attention levels (parameter
counts within 10%), and the profile's shares cover the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_diffusers_unet_matches_pygen_unet_in_parameters(shape):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_networks
    finally:
        sys.path.remove(str(BENCH))
    net, cfg = bench_networks.pygen_unet(shape)
    ref = bench_networks.diffusers_unet(shape, cfg)
    a, b = (sum(p.numel() for p in m.parameters()) for m in (net, ref))
    assert abs(a - b) <= 0.1 * b, (a, b)


def test_bench_networks_and_profile_run(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "net.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_networks.py"), "--shapes", "1x8x8", "--batch", "2",
                        "--reps", "1", "--threads", "1", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batch"], r["mode"]) for r in rows} == {(2, "train"), (2, "forward")}
    assert all(r["pygen"]["seconds"] > 0 and r["diffusers"]["seconds"] > 0 for r in rows)
    prof = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, str(BENCH / "profile_unet.py"), "--family", "diffusion,vae,gan", "--shapes",
                        "1x8x8", "--batch", "2", "--threads", "1", "--json", str(prof)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(prof.read_text())["rows"]
    assert [(r["family"], r["mode"]) for r in rows] == [(f, m) for f in ("diffusion", "vae", "gan")
                                                         for m in ("train", "forward")]
    for row in rows:
        assert abs(sum(row["shares"].values()) - 1) < 1e-3 and row["shares"]["convolution"] > 0
        assert (row["shares"].get("optimizer", 0) > 0) == (row["mode"] == "train")


def test_bench_sampling_job_runs_and_pygen_matches_the_diffusers_loop(tmp_path):
    """The sampling-job benchmark on untrained 16x16 models: the network calls it replays are
    the sampler's (20 DPM-Solver++ steps per chunk, twice the batch under guidance, plus the
    latent model's decoder), and pygen's sample() equals diffusers' DPMSolverMultistepScheduler
    loop on the same network and noise (the comparison is like with like)."""
    pytest.importorskip("diffusers")
    out = tmp_path / "job.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_sampling_job.py"), "--shape", "1x16x16", "--batch", "3",
                        "--chunks", "2", "--guidance", "1,2", "--reps", "1", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=BENCH)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["family"], r["guidance_scale"]) for r in rows] == [
        ("latent-diffusion", 1.0), ("latent-diffusion", 2.0), ("diffusion", 1.0), ("diffusion", 2.0)]
    for row in rows:
        assert row["n"] == 6
        assert row["network_calls"] == 2 * (20 + (row["family"] == "latent-diffusion"))
        assert row["max_abs_diff_vs_diffusers"] < 1e-5, row
        assert row["job_fixed_s"] > 0 and all(v > 0 for v in row["seconds"].values())
        assert ("unet2d" in row["seconds"]) == (row["family"] == "diffusion")

"""The GPU-session scripts run their CPU modes here, so that they do not rot between the
sessions that have a GPU (where they are the first thing to run: benchmarks/gpu_check.sh)."""

import os
import sys

import pytest

import pygen

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.skipif("cpp" not in pygen.available_backends(), reason="C++ extension not built")
def test_sanitize_smoke_runs_every_op_group_on_cpu(capsys):
    sys.path.insert(0, BENCH)
    try:
        import sanitize_smoke
    finally:
        sys.path.remove(BENCH)
    assert sanitize_smoke.main(["--device", "cpu", "--backends", "cpp", "--dtypes", "float32,float64"]) == 0
    out = capsys.readouterr().out
    assert "ok: 10 runs" in out and "'diffusion'" in out


def test_cuda_graph_sampling_script_exits_cleanly_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: gpu_check.sh runs the script for real")
    sys.path.insert(0, BENCH)
    try:
        import cuda_graph_sampling
    finally:
        sys.path.remove(BENCH)
    assert cuda_graph_sampling.main([]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


def test_diffusion_sampling_script_on_cpu(capsys, tmp_path):
    """The model-loop benchmark (pygen's fused steps vs diffusers' with the UNet) runs on CPU,
    and its deterministic DDIM loops land on diffusers' samples."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, BENCH)
    try:
        import diffusion_sampling
    finally:
        sys.path.remove(BENCH)
    out = diffusion_sampling.main(["--loops", "ddpm:5,ddim:4", "--batch", "2", "--reps", "1", "--threads", "1",
                                   "--json", str(tmp_path / "r.json")])
    assert [r["sampler"] for r in out["rows"]] == ["ddpm", "ddim"]
    assert out["rows"][1]["max_abs_diff"] < 1e-4
    assert (tmp_path / "r.json").exists() and "| ddim 4 | 2 |" in capsys.readouterr().out

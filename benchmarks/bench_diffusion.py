"""CPU benchmarks of pygen's fused diffusion ops against the unfused torch chain and torch.compile of it.

    python -m pytest benchmarks/bench_diffusion.py --benchmark-columns=median,iqr,ops \
        --benchmark-group-by=group
    PYGEN_BENCH_QUICK=1 python -m pytest benchmarks/bench_diffusion.py --benchmark-disable -q

provider {pygen-cpp, eager, compile} x op x mode x shape {16x3x64x64, 64x4x32x32,
256x3x64x64} (the quick smoke test: 16x3x64x64), float32, every sample at its own
timestep (t, prev_t or the sigma index a (B,) int64 tensor; 50-step schedule of 1000
linear-beta timesteps). Ops (_common.DIFFUSION_OPS), one sampler step each (forward only)
and the training loss:

- ddim_step: DDIM, eta = 0 (deterministic); ddim_step_prev: the same returning prev_sample only
  (return_x0=False); ddim_step_eta1: eta = 1 (with noise);
- ddpm_step: DDPM ancestral, fixed_small variance;
- diffusion_loss: q_sample + diffusion_mse (epsilon target), forward and forward_backward
  (w.r.t. model_output: the loss's backward in a training step), as
  ``pygen.ops.diffusion_loss`` runs them around the model (model_output is an input here);
- euler_ancestral_step, dpmpp_2m_step (second order, with prev_x0): skipped while
  ``pygen.ops`` lacks them.

Providers:

- pygen-cpp: the fused op, ``backend="cpp"``; noise drawn in the kernel.
- eager: the unfused chain (_baselines.py): the coefficients gathered from the schedule
  table on the device with the per-sample indices, ``torch.randn_like`` noise, then
  ``pygen.ops.diffusion.*_step_ref``; the loss: ``torch.randn_like`` eps, ``q_sample_ref``,
  per-sample mean((model_output - eps)^2).
- compile: ``torch.compile`` of that same function, static shapes.

extra_info: ``bytes`` the minimum traffic (_common.bytes_moved; ``bytes_counted`` says
what it counts: a step reads model_output and sample and writes prev_sample and
pred_original_sample, 4N; dpmpp_2m also reads prev_x0, 5N; in-kernel noise moves
nothing), GB/s from the median and its fraction of the session's copy bandwidth. The
benchmark itself (warm-up, sanity checks, rounds) is conftest.py's ``run_benchmark``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from _common import DIFFUSION_CPU_SHAPES, DIFFUSION_OPS, DIFFUSION_QUICK_SHAPES, fused_missing  # noqa: E402

BENCH_OPS = DIFFUSION_OPS  # conftest.pytest_generate_tests: op x mode x shape x provider
BENCH_SIZES = tuple(DIFFUSION_CPU_SHAPES)
BENCH_QUICK_SIZES = DIFFUSION_QUICK_SHAPES


def test_diffusion(run_benchmark, op, mode, size, provider):
    if why := fused_missing(op):  # euler_ancestral_step / dpmpp_2m_step before they land
        pytest.skip(f"{op}: {why}")
    run_benchmark(op, mode, size, provider)

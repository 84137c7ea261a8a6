"""Sampling loops captured in a CUDA graph (GPU only; skipped on CPU machines).

The fused steps read timesteps, step indices and seeds from device tensors and never copy
to or from the host, so a whole sampling loop can be captured once and replayed. These
tests capture loops of every scheduler (and of the sigma-space ops with a pinned seed
tensor) and check that a replay lands exactly on the eager loop's samples. Schedulers are
prepared outside the capture (set_timesteps copies tables to the device) and a loop
consumes one, so the warm-up and the capture each get their own.
"""

import pytest
import torch

from pygen import ops
from pygen.diffusion import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not {"cuda", "triton"} & set(__import__("pygen").available_backends()),
    reason="CUDA graphs need a CUDA device and a fused GPU backend (the torch reference path copies constants)",
)

SHAPE = (8, 3, 16, 16)


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in denoiser: smooth, input dependent, no parameters."""
    return torch.tanh(0.5 * x) * 0.8


def _loop(sched, x: torch.Tensor, **step_kw) -> torch.Tensor:
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        mo = _model(sched.scale_model_input(x, t), t)
        x = sched.step(mo, t, x, **step_kw).prev_sample
    return x


def _prepared(cls, config: dict, steps: int):
    """A scheduler ready for a loop on the GPU, made outside any capture: set_timesteps(device=)
    copies its tables to the device (copies that capture does not allow), set_begin_index(0)
    spares the host-side timestep lookup. A loop consumes it (step index, DPM history)."""
    sched = cls(**config)
    sched.set_timesteps(steps, device=torch.device("cuda"))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched


def _graphed(fn, static_in: torch.Tensor):
    """Warm up on a side stream (the pattern torch.cuda.graphs documents), then capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(static_in, warmup=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(static_in, warmup=False)
    return g, static_out


DETERMINISTIC = [
    (DDIMScheduler, dict(clip_sample=False), {}),
    (EulerDiscreteScheduler, {}, {}),
    (DPMSolverMultistepScheduler, {}, {}),
    (DPMSolverMultistepScheduler, dict(solver_type="heun", prediction_type="v_prediction"), {}),
]


@pytest.mark.parametrize("cls,config,step_kw", DETERMINISTIC, ids=lambda v: getattr(v, "__name__", None))
def test_deterministic_loop_replays_exactly(cls, config, step_kw):
    dev = torch.device("cuda")
    x0 = torch.randn(SHAPE, device=dev) * 3
    eager = _loop(_prepared(cls, config, 12), x0.clone(), **step_kw)
    scheds = {True: _prepared(cls, config, 12), False: _prepared(cls, config, 12)}  # warm-up, capture

    def run(x, warmup):
        return _loop(scheds[warmup], x, **step_kw)

    static_in = x0.clone()
    g, static_out = _graphed(run, static_in)
    static_in.copy_(x0)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    # a new input through the same graph
    x1 = torch.randn(SHAPE, device=dev)
    static_in.copy_(x1)
    g.replay()
    torch.testing.assert_close(static_out, _loop(_prepared(cls, config, 12), x1.clone(), **step_kw), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [DDPMScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler])
def test_stochastic_loop_draws_fresh_noise_per_replay(cls):
    """Seeds are drawn on the device from the default generator (graph-safe): each replay
    samples new noise, and the samples stay finite."""
    dev = torch.device("cuda")
    x0 = torch.randn(SHAPE, device=dev)
    kw = {"eta": 1.0} if cls is DDIMScheduler else {}
    scheds = {True: _prepared(cls, {}, 10), False: _prepared(cls, {}, 10)}

    def run(x, warmup):
        return _loop(scheds[warmup], x, **kw)

    static_in = x0.clone()
    g, static_out = _graphed(run, static_in)
    g.replay()
    a = static_out.clone()
    g.replay()
    b = static_out.clone()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.equal(a, b)


def test_sigma_ops_with_pinned_seed_replay_exactly():
    """Euler-ancestral through pygen.ops with a seed tensor: replay equals the eager loop bit for bit."""
    dev = torch.device("cuda")
    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(15, device=dev)
    sigmas = sched.sigmas.to(dev)
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    n = torch.Size(SHAPE).numel()
    x0 = torch.randn(SHAPE, device=dev)

    def run(x, warmup=False):
        x = x * sigmas[0]
        for i in range(len(sigmas) - 1):
            mo = _model(x / (sigmas[i] ** 2 + 1).sqrt(), i)
            x, _ = ops.euler_ancestral_step(mo, x, sigmas, i, seed=seed, offset=i * n, return_x0=False)
        return x

    eager = run(x0.clone())
    static_in = x0.clone()
    g, static_out = _graphed(run, static_in)
    static_in.copy_(x0)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)

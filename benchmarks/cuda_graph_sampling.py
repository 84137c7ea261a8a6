"""Time a whole sampling loop eagerly and replayed from a CUDA graph (GPU only).

    python benchmarks/cuda_graph_sampling.py [--batch 256] [--steps 50] [--json out.json]

For each sampler (DDIM, Euler, Euler-ancestral, DPM-Solver++ 2M through pygen's schedulers)
the loop of ``--steps`` steps over (batch, 3, 64, 64) float32 runs with a stand-in denoiser
(one elementwise tanh, so the figures show the steps and the launch overhead, not a
network) eagerly and as one captured graph; it prints ms per loop and per step and checks
that deterministic samplers replay onto the eager result exactly. Schedulers are prepared
(set_timesteps on the device, set_begin_index(0)) outside the capture and the timed region.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _model(x, t):
    return torch.tanh(0.5 * x) * 0.8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_graph_sampling: needs a CUDA device; nothing to do")
        return 0
    from pygen.diffusion import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    dev = torch.device("cuda")
    shape = (args.batch, 3, 64, 64)
    samplers = {
        "ddim": (DDIMScheduler, True),
        "euler": (EulerDiscreteScheduler, True),
        "euler_ancestral": (EulerAncestralDiscreteScheduler, False),
        "dpmpp_2m": (DPMSolverMultistepScheduler, True),
    }
    rows = []
    for name, (cls, deterministic) in samplers.items():
        def prepared():
            # made outside the capture and the timed region: set_timesteps copies tables to the device
            sched = cls()
            sched.set_timesteps(args.steps, device=dev)
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(0)
            return sched

        def run(sched, x):
            x = x * sched.init_noise_sigma
            for t in sched.timesteps:
                x = sched.step(_model(sched.scale_model_input(x, t), t), t, x).prev_sample
            return x

        x0 = torch.randn(shape, device=dev)
        eager_out = run(prepared(), x0.clone())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(fn, make) -> float:
            """ms per call of fn(state), state = make() prepared before the timed region."""
            fn(make())
            torch.cuda.synchronize()
            states = [make() for _ in range(args.reps)]
            start.record()
            for st in states:
                fn(st)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / args.reps

        eager_ms = timed(lambda sched: run(sched, x0), prepared)
        static_in = x0.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run(prepared(), static_in)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        capture_sched = prepared()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = run(capture_sched, static_in)
        graph_ms = timed(lambda _: g.replay(), lambda: None)
        static_in.copy_(x0)
        g.replay()
        torch.cuda.synchronize()
        exact = bool(torch.equal(static_out, eager_out)) if deterministic else None
        rows.append(dict(sampler=name, steps=args.steps, shape=list(shape), eager_ms=eager_ms, graph_ms=graph_ms,
                         eager_ms_per_step=eager_ms / args.steps, graph_ms_per_step=graph_ms / args.steps,
                         replay_equals_eager=exact))
        print(f"{name:16s} eager {eager_ms:8.2f} ms  graph {graph_ms:8.2f} ms  "
              f"({eager_ms / graph_ms:4.2f}x; {graph_ms / args.steps * 1e3:7.1f} us/step)  replay==eager: {exact}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(metadata=meta, results=rows), f, indent=1)
        import os

        os.replace(args.json + ".tmp", args.json)
    bad = [r["sampler"] for r in rows if r["replay_equals_eager"] is False]
    if bad:
        print("replay differs from eager for:", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

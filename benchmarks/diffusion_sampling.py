#!/usr/bin/env python
"""Whole sampling loops with a real network: pygen's fused steps vs diffusers' schedulers.

    python benchmarks/diffusion_sampling.py                       # CPU: digits UNet, batch 1 and 64
    python benchmarks/diffusion_sampling.py --device cuda --batch 1,16,256 --json out.json

The network is pygen's UNet of :class:`pygen.models.Diffusion` (``--shape``, default the
digits model 1x8x8; untrained weights: timing only). Both loops call the same denoiser
closure; they differ only in the step: pygen's fused op (``Diffusion.sample_loop``) or
diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` ``step()`` configured identically (cosine
betas, x0 prediction, trailing spacing). On CUDA a third column replays pygen's loop from a
CUDA graph (``sample(cuda_graph=True)``). Loops: DDPM 1000 steps and DDIM 50 steps. Times
are medians of ``--reps`` loops after one warm-up, measured side by side (interleaved) in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import pygen
from pygen.models import Diffusion


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fns: list, reps: int, dev: torch.device) -> list[float]:
    """Median seconds of each function, the reps interleaved (a, b, a, b, ...) so that drifts
    of a shared machine hit every function alike."""
    for fn in fns:
        fn()
    _sync(dev)
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            out[i].append(time.perf_counter() - t0)
    return [statistics.median(o) for o in out]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="1,8,8", help="C,H,W of the model (default the digits' 1,8,8)")
    p.add_argument("--batch", default="1,64", help="comma list of batch sizes")
    p.add_argument("--loops", default="ddpm:1000,ddim:50", help="sampler:steps list")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, DDPMScheduler

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = Diffusion(tuple(int(v) for v in args.shape.split(","))).to(dev).eval()
    common = dict(num_train_timesteps=model.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                  prediction_type="sample", clip_sample=False, timestep_spacing="trailing")
    rows = []
    print(f"device {dev}, model {args.shape}, {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters")
    print("| loop | batch | pygen s | diffusers s | pygen / diffusers speed-up |" + (" pygen + CUDA graph s | graph speed-up |"
                                                                             if dev.type == "cuda" else ""))
    for spec in args.loops.split(","):
        sampler, steps = spec.split(":")
        steps = int(steps)
        for b in (int(v) for v in args.batch.split(",")):
            noise = torch.randn(b, *model.shape, device=dev)
            seeds = model.step_seeds(0, steps, dev)

            def net(x, sigma):
                return model.denoise(x, sigma)

            @torch.no_grad()
            def pygen_loop():
                return model.sample_loop(noise, seeds=seeds, offset=0, sampler=sampler, steps=steps, model=net)

            sched = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler)(**common)
            gen = torch.Generator(device=dev).manual_seed(0)

            @torch.no_grad()
            def diffusers_loop():
                sched.set_timesteps(steps, device=dev)
                x = noise
                for t in sched.timesteps:
                    out = net(x, model.train_sigmas[t].float().expand(b))
                    kw = {"generator": gen} if sampler == "ddpm" else {"eta": 0.0}
                    x = sched.step(out, t, x, **kw).prev_sample
                return x

            tp, td = _time([pygen_loop, diffusers_loop], args.reps, dev)
            row = {"sampler": sampler, "steps": steps, "batch": b, "pygen_s": tp, "diffusers_s": td,
                   "speedup": td / tp}
            line = f"| {sampler} {steps} | {b} | {tp:.3f} | {td:.3f} | {td / tp:.2f}x |"
            if dev.type == "cuda":
                (tg,) = _time([lambda: model.sample(b, seed=0, sampler=sampler, steps=steps, cuda_graph=True)], args.reps,
                              dev)
                row.update(graph_s=tg, graph_speedup=td / tg)
                line += f" {tg:.3f} | {td / tg:.2f}x |"
            if sampler == "ddim":  # deterministic: both loops must land on the same samples
                row["max_abs_diff"] = float((pygen_loop() - diffusers_loop()).abs().max())
            rows.append(row)
            print(line, flush=True)
    out = {"benchmark": "diffusion_sampling", "args": vars(args), "rows": rows,
           "versions": {"torch": torch.__version__, "pygen": str(pygen.__version__),
                        "diffusers": __import__("diffusers").__version__, "python": platform.python_version()},
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()

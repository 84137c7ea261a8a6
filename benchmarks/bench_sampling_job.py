#!/usr/bin/env python
"""The sampling job against the network's own cost and against a diffusers loop (issue 19, item 4).

    python benchmarks/bench_sampling_job.py                                  # untrained 28x28 models (timing only)
    python benchmarks/bench_sampling_job.py --run runs/fashion-mnist/latent-diffusion --batch 128 --guidance 1,2
    python benchmarks/bench_sampling_job.py --run runs/fashion-mnist/diffusion --batch 16 --json out.json
    pygen bench --suite sampling-job                                         # the first line, from the CLI

For a diffusion run (pixel or latent; ``--run`` a training directory or checkpoint, default an
untrained 1x28x28 class-conditional model of each kind: the weights do not change the cost),
each batch size B and guidance scale s, n = B x ``--chunks`` samples with DPM-Solver++(2M),
20 steps, made five ways, interleaved (a, b, c, d, e, a, ...) and reported as medians
(with the job's once-per-job costs, loading the checkpoint and its one-sample probe, timed
beside them and reported as ``job_fixed_s``):

- ``network``: the network calls that sampling makes (recorded once with forward pre-hooks:
  the UNet 20 times per chunk at batch B, or 2B under guidance, and a latent model's decoder),
  replayed alone on the recorded inputs. The floor: everything else is overhead.
- ``job``: ``pygen.sampling.sample_to_dir`` into a fresh directory: checkpoint load, noise,
  labels, steps, guidance, decoding, npz shards and the manifest written atomically.
- ``sample``: ``model.sample`` in process (no load, no writing).
- ``diffusers``: the loop a diffusers user writes, ``DPMSolverMultistepScheduler``
  (dpmsolver++, order 2, trailing spacing, the model's betas and prediction type) stepping
  the same trained network (pygen's preconditioned denoiser at the scheduler's level), same
  initial noise and labels; its samples are compared with pygen's (max |difference|).
- ``unet2d``: the same diffusers loop around a ``UNet2DModel`` of equal parameters
  (benchmarks/bench_networks.py; untrained; pixel models only): diffusers' stack end to end.

Goal (issue 19): the job within 10% of ``network``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from _machine import cpu_name
from bench_networks import diffusers_unet
from pygen.models import Diffusion, LatentDiffusion, load
from pygen.models.labels import sample_labels
from pygen.models.seeding import resolve_seed
from pygen.models.unet import UNet
from pygen.ops import randn
from pygen.sampling import sample_to_dir

SAMPLER, STEPS, SEED = "dpmpp_2m", 20, 0


def _networks(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward is 'the network' of sampling: every UNet, and a latent
    model's decoder."""
    nets = [m for m in model.modules() if isinstance(m, UNet)]
    if isinstance(model, LatentDiffusion):
        nets.append(model.autoencoder.decoder)
    return nets


def record_calls(model: nn.Module, make: Callable[[], Any]) -> list[tuple[nn.Module, tuple, dict]]:
    """Every network call ``make()`` makes, with (cloned) inputs, in order."""
    calls: list[tuple[nn.Module, tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        calls.append((mod, tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in _networks(model)]
    try:
        make()
    finally:
        for h in handles:
            h.remove()
    return calls


def replay(model: nn.Module, calls: list[tuple[nn.Module, tuple, dict]]) -> None:
    model.eval()
    with torch.no_grad():
        for mod, args, kwargs in calls:
            mod(*args, **kwargs)


def _scheduler(den: Diffusion):
    from diffusers import DPMSolverMultistepScheduler

    ac = den.alphas_cumprod.double()
    betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    sched = DPMSolverMultistepScheduler(num_train_timesteps=den.num_train_timesteps, trained_betas=betas.numpy(),
                                        prediction_type=den.output_type, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    return sched


def diffusers_loop(den: Diffusion, noise: torch.Tensor, labels: torch.Tensor | None, scale: float,
                   net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """x0 (model space) by diffusers' DPM-Solver++ loop from ``noise``: ``net`` (default:
    pygen's preconditioned denoiser ``den.denoise``) called as net(x_t, t, labels), classifier-free
    guidance batched as pygen does it."""
    sched = _scheduler(den)
    null = None if labels is None else torch.full_like(labels, den.num_classes)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
            call = net or (lambda x_t, t_, lab: den.denoise(x_t, den.train_sigmas[t_].float(), lab))
            if labels is None or scale == 1.0:
                out = call(x, tt, labels)
            else:
                c, u = call(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
                out = u + scale * (c - u)
            x = sched.step(out, t, x).prev_sample
    return x


def bench(ckpt: Path, batch: int, chunks: int, scale: float, reps: int, tmp: Path) -> dict[str, Any]:
    model = load(ckpt)
    model.eval()
    latent = isinstance(model, LatentDiffusion)
    den = model.denoiser() if latent else model
    n = batch * chunks
    kw = {"sampler": SAMPLER, "steps": STEPS, "guidance_scale": scale, "batch_size": batch}

    def sample() -> torch.Tensor:
        return model.sample(n, seed=SEED, **kw)

    calls = record_calls(model, sample)
    mine = sample()

    # the diffusers loop on the same network, noise and labels as pygen's chunks
    s = resolve_seed(SEED, None)
    d = int(np.prod(den.shape))
    labels = sample_labels(None, n, den.num_classes, seed=s, offset=0)
    noises = [randn(min(n, i + batch) - i, *den.shape, seed=s, offset=i * d) for i in range(0, n, batch)]

    def diffusers_pygen_net() -> torch.Tensor:
        out = []
        for i, z in zip(range(0, n, batch), noises):
            x0 = diffusers_loop(den, z, None if labels is None else labels[i:i + batch], scale)
            with torch.no_grad():
                out.append(model.decode(x0) if latent else model.from_model(x0))
        return torch.cat(out)

    theirs = diffusers_pygen_net()
    job_dir = tmp / "job"

    def job() -> None:
        shutil.rmtree(job_dir, ignore_errors=True)
        sample_to_dir(ckpt, n, job_dir, batch_size=batch, seed=SEED, sampler=SAMPLER, steps=STEPS,
                      guidance=scale if den.num_classes else None, progress=False, grid=False)

    fns: dict[str, Callable[[], Any]] = {"network": lambda: replay(model, calls), "job": job, "sample": sample,
                                         "diffusers": diffusers_pygen_net,
                                         # the job's once-per-job costs: loading, and its one-sample probe
                                         "load": lambda: load(ckpt), "probe": lambda: model.sample(1, seed=SEED, **kw)}
    params = {"pygen": sum(p.numel() for p in den.net.parameters())}
    if not latent:  # diffusers' own network in the same loop
        # class-conditional as pygen's: one extra row, the null label
        unet = diffusers_unet(tuple(den.shape), den.config, den.num_classes and den.num_classes + 1).eval()
        params["unet2d"] = sum(p.numel() for p in unet.parameters())
        fwd = lambda x, t, lab: unet(x, t, class_labels=lab).sample  # noqa: E731
        fns["unet2d"] = lambda: [diffusers_loop(den, z, None if labels is None else labels[i:i + batch], scale, fwd)
                                 for i, z in zip(range(0, n, batch), noises)]
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    fixed = med.pop("load") + med.pop("probe")
    row = {"run": str(ckpt), "family": "latent-diffusion" if latent else "diffusion", "shape": list(den.shape),
           "batch": batch, "n": n, "guidance_scale": scale, "network_calls": len(calls), "params": params,
           "seconds": {k: round(v, 4) for k, v in med.items()},
           "samples_per_s": {k: round(n / v, 2) for k, v in med.items()},
           "job_over_network": round(med["job"] / med["network"], 3),
           "job_fixed_s": round(fixed, 4),  # load + probe: once per job, whatever n
           "job_over_network_per_sample": round((med["job"] - fixed) / med["network"], 3),
           "sample_over_network": round(med["sample"] / med["network"], 3),
           "diffusers_over_network": round(med["diffusers"] / med["network"], 3),
           "job_vs_diffusers_loop": round(med["diffusers"] / med["job"], 3),
           "max_abs_diff_vs_diffusers": float((mine - theirs).abs().max())}
    if "unet2d" in med:
        row["job_vs_unet2d_loop"] = round(med["unet2d"] / med["job"], 3)
    print(f"{row['family']:16s} batch {batch:4d} s={scale:g} n={n}: " + "  ".join(
        f"{k} {n / v:7.1f}/s" for k, v in med.items())
        + f"  | job/network {row['job_over_network']:.3f} ({row['job_over_network_per_sample']:.3f} without "
          f"the job's fixed {fixed:.2f} s)  sample/network {row['sample_over_network']:.3f}"
        + f"  diffusers/network {row['diffusers_over_network']:.3f}"
        + f"  | max|pygen - diffusers| {row['max_abs_diff_vs_diffusers']:.2e}", flush=True)
    return row


def _untrained(tmp: Path, shape: tuple[int, ...]) -> list[Path]:
    """Fresh class-conditional models of ``shape``, latent and pixel (timing only), saved."""
    torch.manual_seed(0)
    paths = []
    for name, model in (("latent-diffusion", LatentDiffusion(shape, num_classes=10)),
                        ("diffusion", Diffusion(shape, num_classes=10))):
        path = tmp / f"{name}.pt"
        model.save(path)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, action="append",
                   help="a diffusion or latent-diffusion training directory or checkpoint (repeatable; "
                        "default: untrained 1x28x28 models)")
    p.add_argument("--shape", default="1x28x28", help="the untrained models' image shape (without --run)")
    p.add_argument("--batch", default="16")
    p.add_argument("--chunks", type=int, default=4, help="model.sample chunks per job (n = batch x chunks)")
    p.add_argument("--guidance", default="1,2", help="guidance scales (1: conditional model alone)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import diffusers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = a.run or _untrained(Path(tmp), tuple(int(v) for v in a.shape.split("x")))
        for run in runs:
            for b in (int(v) for v in a.batch.split(",")):
                for s in (float(v) for v in a.guidance.split(",")):
                    rows.append(bench(run, b, a.chunks, s, a.reps, Path(tmp)))
    result = {"device": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
              "sampler": SAMPLER, "steps": STEPS, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where pygen's networks spend their time (issue 19, items 1 and 5): the share of
convolutions, GroupNorm, SiLU, the noise-level scale/shift and residual adds, attention,
copies and layout conversions, upsampling and the optimizer, in a training step and in a
forward (sampling), per image shape, batch size and thread count.

    python benchmarks/profile_unet.py                         # diffusion UNet, 1x28x28 + 3x32x32, batch 16/128, 1/2 thr
    python benchmarks/profile_unet.py --shapes 1x28x28 --batch 128 --threads 2 --top 15
    python benchmarks/profile_unet.py --family vae,gan --shapes 1x28x28 --batch 128 --threads 2
    python benchmarks/profile_unet.py --json benchmarks/results/unet-profile-<cpu>-<date>.json

The networks are the defaults of each family's ``for_data`` for the shape (what
``pygen train FAMILY`` builds; the VAE with ``network="conv"``), profiled with
torch.profiler (self CPU time per aten op, summed into the categories of ``CATEGORIES``)
after one warm-up. A training step is the family's own ``training_step`` (diffusion and VAE:
forward, backward, Adam; GAN: a discriminator and a generator update, profiled over
``r1_every`` steps so that the lazy R1 penalty counts at its rate); a forward is
``model.sample(batch)`` for the VAE and GAN (decoder, generator) and one denoiser call for
diffusion. Run it alone on the machine: the shares are stable, the absolute times are not
under contention.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from _machine import cpu_name
from types import SimpleNamespace

from pygen.models import GAN, VAE, Diffusion

#: category -> substrings of aten op names (first match wins, in this order)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "convolution": ("convolution", "conv2d", "mkldnn_conv", "slow_conv", "thnn_conv", "conv_depthwise",
                    "conv_transpose"),
    "group_norm": ("group_norm",),
    "batch_norm": ("batch_norm",),
    "silu": ("silu",),
    "other activations": ("leaky_relu", "relu", "tanh", "sigmoid", "gelu", "softplus"),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "bmm", "baddbmm", "softmax"),
    "upsample": ("upsample",),
    "copies/layout": ("copy_", "contiguous", "clone", "cat", "_to_copy", "to_dense", "as_strided_scatter", "pad",
                      "constant_pad"),
    "linear (embeddings)": ("addmm", "mm", "linear"),
    "optimizer": ("_foreach", "adam", "Optimizer"),
    "vector norms (grad clipping, spectral norm)": ("aten::mv", "aten::dot", "vector_norm", "linalg", "aten::norm"),
    "elementwise (scale/shift, residual)": ("mul", "add", "sub", "div", "rsub", "neg", "where", "fill_", "zero_"),
}


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES.items():
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def _inside_optimizer(event) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def _model(family: str, shape: tuple[int, ...]) -> torch.nn.Module:
    data = SimpleNamespace(shape=shape, labels=None)  # what for_data reads
    if family == "vae":
        return VAE.for_data(data, network="conv")
    if family == "gan":
        return GAN.for_data(data)
    return Diffusion.for_data(data)


def profile_case(shape: tuple[int, ...], batch: int, threads: int, mode: str, top: int,
                 family: str = "diffusion") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(family, shape)
    x = torch.rand(batch, *shape)
    opts = model.configure_optimizers()
    sigma = torch.full((batch,), 1.0)
    period = getattr(model, "r1_every", 1) if family == "gan" else 1  # the GAN's lazy R1: one in r1_every steps
    step = [0]

    def train_step() -> None:
        for _ in range(period):
            model.training_step(x, step[0], opts)
            step[0] += 1

    @torch.no_grad()
    def forward() -> None:
        if family == "diffusion":
            model.denoise(x, sigma)
        else:
            model.sample(batch, seed=0)

    fn = train_step if mode == "train" else forward
    fn()  # warm-up: allocation, oneDNN primitive caches
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    shares: dict[str, float] = {}
    for e in prof.events():  # an op inside the optimizer's step (CPU Adam: per-tensor ops) is the optimizer's
        if e.name.startswith("aten::") or e.name.startswith("Optimizer.step"):
            cat = "optimizer" if _inside_optimizer(e) else _category(e.name)
            shares[cat] = shares.get(cat, 0.0) + e.self_cpu_time_total
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or "Optimizer" in e.key]
    total = sum(shares.values()) or 1.0
    shares = {k: v / total for k, v in shares.items()}
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    per_step = wall / (period if mode == "train" else 1)
    return {"family": family, "shape": list(shape), "batch": batch, "threads": threads, "mode": mode,
            "seconds": round(per_step, 4),
            "params": sum(p.numel() for p in model.parameters()),
            "shares": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                        for e in ops]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="diffusion", help="comma-separated: diffusion, vae (conv), gan")
    p.add_argument("--shapes", default="1x28x28,3x32x32")
    p.add_argument("--batch", default="16,128")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--modes", default="train,forward")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = []
    for fam in a.family.split(","):
        for s in a.shapes.split(","):
            shape = tuple(int(v) for v in s.split("x"))
            for b in (int(v) for v in a.batch.split(",")):
                for t in (int(v) for v in a.threads.split(",")):
                    for mode in a.modes.split(","):
                        r = profile_case(shape, b, t, mode, a.top, fam)
                        rows.append(r)
                        top3 = ", ".join(f"{k} {v:.0%}" for k, v in list(r["shares"].items())[:5])
                        print(f"{fam:9s} {s} batch {b:4d} {t} thr {mode:7s} {r['seconds']:8.3f} s  {top3}", flush=True)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

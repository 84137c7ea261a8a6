#!/usr/bin/env python
"""Where pygen's diffusion UNet spends its time (issue 19, item 1): the share of convolutions,
GroupNorm, SiLU, the noise-level scale/shift and residual adds, attention, copies and layout
conversions, upsampling and the optimizer, in a training step (forward + backward + Adam)
and in a forward, per image shape, batch size and thread count.

    python benchmarks/profile_unet.py                         # 1x28x28 and 3x32x32, batch 16/128, 1/2 threads
    python benchmarks/profile_unet.py --shapes 1x28x28 --batch 128 --threads 2 --top 15
    python benchmarks/profile_unet.py --json benchmarks/results/unet-profile-<cpu>-<date>.json

The network is the default of ``pygen.models.Diffusion.for_data`` for the shape (what
``pygen train diffusion`` builds), timed with torch.profiler (self CPU time per aten op,
summed into the categories of ``CATEGORIES``) after one warm-up step. Run it alone on the
machine: the shares are stable, the absolute times are not under contention.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from _machine import cpu_name
from pygen.models import Diffusion

#: category -> substrings of aten op names (first match wins, in this order)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "convolution": ("convolution", "conv2d", "mkldnn_conv", "_slow_conv", "thnn_conv", "conv_depthwise"),
    "group_norm": ("group_norm",),
    "silu": ("silu",),
    "attention": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "bmm", "baddbmm", "softmax"),
    "upsample": ("upsample",),
    "copies/layout": ("copy_", "contiguous", "clone", "cat", "_to_copy", "to_dense", "as_strided_scatter", "pad",
                      "constant_pad"),
    "linear (embeddings)": ("addmm", "mm", "linear"),
    "optimizer": ("_foreach", "adam", "Optimizer"),
    "elementwise (scale/shift, residual)": ("mul", "add", "sub", "div", "rsub", "neg", "where", "fill_", "zero_"),
}


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES.items():
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def profile_case(shape: tuple[int, ...], batch: int, threads: int, mode: str, top: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Diffusion(shape)
    x = torch.rand(batch, *shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sigma = torch.full((batch,), 1.0)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(x)["loss"].backward()
        opt.step()

    @torch.no_grad()
    def forward() -> None:
        model.denoise(x, sigma)

    fn = train_step if mode == "train" else forward
    fn()  # warm-up: allocation, oneDNN primitive caches
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or "Optimizer" in e.key]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        cat = _category(e.key)
        shares[cat] = shares.get(cat, 0.0) + e.self_cpu_time_total / total
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"shape": list(shape), "batch": batch, "threads": threads, "mode": mode, "seconds": round(wall, 4),
            "params": sum(p.numel() for p in model.parameters()),
            "shares": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                        for e in ops]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x28x28,3x32x32")
    p.add_argument("--batch", default="16,128")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--modes", default="train,forward")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = []
    for s in a.shapes.split(","):
        shape = tuple(int(v) for v in s.split("x"))
        for b in (int(v) for v in a.batch.split(",")):
            for t in (int(v) for v in a.threads.split(",")):
                for mode in a.modes.split(","):
                    r = profile_case(shape, b, t, mode, a.top)
                    rows.append(r)
                    top3 = ", ".join(f"{k} {v:.0%}" for k, v in list(r["shares"].items())[:5])
                    print(f"{s} batch {b:4d} {t} thr {mode:7s} {r['seconds']:8.3f} s  {top3}", flush=True)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

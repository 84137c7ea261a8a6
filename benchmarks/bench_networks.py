#!/usr/bin/env python
"""pygen's diffusion UNet against diffusers' UNet2DModel built with the same widths, blocks
per level and attention levels (issue 19, item 4): training-step and forward samples/s,
side by side in one run.

    python benchmarks/bench_networks.py                           # 1x28x28 and 3x32x32, batch 1/16/128
    python benchmarks/bench_networks.py --shapes 1x28x28 --batch 16 --reps 5 --json out.json
    pygen bench --suite networks                                  # the same, from the CLI

For each image shape: pygen's ``Diffusion.for_data`` network (what ``pygen train diffusion``
builds) in its default memory format and in channels_last, and a ``UNet2DModel`` with
``block_out_channels`` = width x mults, ``layers_per_block`` = blocks, attention at the lowest
level and in the middle, scale-shift time conditioning (as pygen's blocks), GroupNorm groups
as pygen's; the parameter counts are printed beside (within 10%). A training step is
forward + MSE + backward + Adam on a batch of that size; a forward is one no-grad call.
Times are medians of ``--reps`` calls after a warm-up, the providers interleaved
(a, b, c, a, b, c, ...) so that drifts of the machine hit them alike. Needs diffusers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from _machine import cpu_name
from pygen.models import Diffusion


def pygen_unet(shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    model = Diffusion(shape)
    cfg = {k: model.config[k] for k in ("width", "mults", "blocks", "attention")}
    return model.net, cfg


def diffusers_unet(shape: tuple[int, ...], cfg: dict, num_class_embeds: int | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    widths = tuple(cfg["width"] * m for m in cfg["mults"])
    n = len(widths)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if cfg["attention"] else "DownBlock2D"]
    up = ["AttnUpBlock2D" if cfg["attention"] else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    groups = math.gcd(widths[0], max(1, min(32, widths[0] // 4)))
    return UNet2DModel(sample_size=shape[1:], in_channels=shape[0], out_channels=shape[0], block_out_channels=widths,
                       layers_per_block=cfg["blocks"], down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=groups, attention_head_dim=widths[-1] // 4,
                       resnet_time_scale_shift="scale_shift", add_attention=cfg["attention"],
                       num_class_embeds=num_class_embeds)


def _call(net: nn.Module, kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "diffusers":
        return lambda x, t: net(x, t * 999).sample
    return lambda x, t: net(x, t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_interleaved(fns: list[Callable[[], None]], reps: int, device: torch.device) -> list[float]:
    for fn in fns:
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_shape(shape: tuple[int, ...], batches: list[int], reps: int, modes: list[str],
                device: torch.device, compile: bool = False) -> list[dict]:
    torch.manual_seed(0)
    net, cfg = pygen_unet(shape)
    net = net.to(device)
    providers: dict[str, tuple[nn.Module, str, torch.memory_format]] = {
        "pygen": (net, "pygen", torch.contiguous_format),
        "pygen channels_last": (net, "pygen", torch.channels_last),
        "diffusers": (diffusers_unet(shape, cfg).to(device), "diffusers", torch.contiguous_format),
    }
    if compile:  # its first call compiles: timed separately below, not in the medians
        providers["pygen compiled"] = (torch.compile(net), "pygen", torch.contiguous_format)
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _, _) in providers.items()}
    rows = []
    for b in batches:
        x = torch.randn(b, *shape, device=device)
        t = torch.rand(b, device=device)
        for mode in modes:
            fns = []
            for name, (m, kind, fmt) in providers.items():
                m.to(memory_format=fmt)
                call = _call(m, kind)
                xin = x.contiguous(memory_format=fmt)
                if mode == "train":
                    opt = torch.optim.Adam(m.parameters(), lr=1e-4)

                    def fn(m=m, call=call, xin=xin, opt=opt, fmt=fmt) -> None:
                        m.to(memory_format=fmt)  # the two pygen providers share one network
                        opt.zero_grad(set_to_none=True)
                        (call(xin, t) - xin).square().mean().backward()
                        opt.step()
                else:

                    def fn(m=m, call=call, xin=xin, fmt=fmt) -> None:
                        m.to(memory_format=fmt)
                        with torch.no_grad():
                            call(xin, t)

                fns.append(fn)
            if compile:
                t0 = time.perf_counter()
                fns[-1]()
                _sync(device)
                print(f"  compile + first call ({mode}, batch {b}): {time.perf_counter() - t0:.1f} s", flush=True)
            secs = _median_interleaved(fns, reps, device)
            row = {"shape": list(shape), "batch": b, "mode": mode}
            for (name, _), s in zip(providers.items(), secs):
                row[name] = {"seconds": round(s, 5), "samples_per_s": round(b / s, 2), "params": params[name]}
            row["pygen_vs_diffusers"] = round(secs[2] / secs[0], 3)
            row["pygen_channels_last_vs_diffusers"] = round(secs[2] / secs[1], 3)
            if compile:
                row["pygen_compiled_vs_diffusers"] = round(secs[2] / secs[3], 3)
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):8s} batch {b:4d} {mode:7s} "
                  + "  ".join(f"{name} {b / s:8.1f}/s" for name, s in zip(providers, secs))
                  + (f"  compiled/diffusers {secs[2] / secs[3]:.2f}x" if compile else "")
                  + f"  pygen/diffusers {secs[2] / secs[0]:.2f}x (channels_last {secs[2] / secs[1]:.2f}x)", flush=True)
    print("params: " + ", ".join(f"{k} {v:,}" for k, v in params.items() if k != "pygen channels_last"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x28x28,3x32x32")
    p.add_argument("--batch", default="1,16,128")
    p.add_argument("--modes", default="train,forward")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also pygen's network under torch.compile")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import diffusers

    rows = []
    for s in a.shapes.split(","):
        rows += bench_shape(tuple(int(v) for v in s.split("x")), [int(v) for v in a.batch.split(",")], a.reps,
                            a.modes.split(","), torch.device(a.device), a.compile)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu_name()
    result = {"device": dev, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

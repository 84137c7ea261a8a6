#!/usr/bin/env python
"""Train a small Glow on scikit-learn's 8x8 digits and report test bits/dim.

    python benchmarks/flow_digits.py --steps 2000 --out /tmp/digits.json
    python benchmarks/flow_digits.py --data synthetic --steps 50      # smoke run, no sklearn

The digits (1797 images, pixel values 0..16, so 17 levels) come from
``sklearn.datasets.load_digits``, which ships the data inside the package (no download).
Pixels are scaled to x = v / 16 and dequantised with uniform noise, y = (v + u) / 17; the
reported number is ``Flow.bits_per_dim(x, n_bins=17)`` averaged over the held-out images:
-(log p(y) - 64 log 17) / (64 log 2), an upper bound (in expectation over u) on the
discrete negative log-likelihood in bits per pixel. For scale: a uniform model over the 17
levels gets log2(17) = 4.09 bits/dim.

``--data synthetic`` replaces the digits by random blob images with the same shape and
levels: it checks that the script runs where scikit-learn is not installed; its number
says nothing about the flow's quality.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from pygen.flows import Glow

N_LEVELS = 17  # digits pixels are integers 0..16


def load_digits_levels() -> torch.Tensor:
    """(1797, 1, 8, 8) float tensor of pixel levels 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit(
            "flow_digits.py needs scikit-learn for the 8x8 digits data set "
            "(sklearn.datasets.load_digits): `pip install scikit-learn`, or run with "
            "--data synthetic for a smoke run without it."
        )
    images = load_digits().images  # (1797, 8, 8), values 0..16
    return torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)


def synthetic_levels(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) random Gaussian blobs quantised to 0..16 (a stand-in for the digits)."""
    grid = torch.arange(8, dtype=torch.float32)
    centre = 2 + 4 * torch.rand(n, 2, generator=generator)
    width = 1 + 1.5 * torch.rand(n, 1, 1, generator=generator)
    d2 = (grid.view(1, 8, 1) - centre[:, 0].view(n, 1, 1)) ** 2 + (grid.view(1, 1, 8) - centre[:, 1].view(n, 1, 1)) ** 2
    return torch.round(16 * torch.exp(-d2 / (2 * width**2))).unsqueeze(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps (default 2000)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--levels", type=int, default=2, help="Glow levels (default 2)")
    parser.add_argument("--depth", type=int, default=4, help="steps per level (default 4)")
    parser.add_argument("--hidden", type=int, default=64, help="conditioner channels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=["digits", "synthetic"], default="digits")
    parser.add_argument("--out", help="write the result as JSON to this path")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    levels = load_digits_levels() if args.data == "digits" else synthetic_levels(1797, g)
    perm = torch.randperm(len(levels), generator=g)
    n_test = len(levels) // 5  # 80/20 split
    x = (levels / (N_LEVELS - 1)).to(device)  # in [0, 1], levels k / 16
    test, train = x[perm[:n_test]], x[perm[n_test:]]

    flow = Glow(1, 8, levels=args.levels, depth=args.depth, hidden=args.hidden).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def evaluate(data: torch.Tensor) -> float:
        flow.eval()
        eval_gen = torch.Generator(device=device).manual_seed(1234)  # same noise every evaluation
        with torch.no_grad():
            bpd = torch.cat([flow.bits_per_dim(c, N_LEVELS, generator=eval_gen) for c in data.split(512)])
        flow.train()
        return bpd.mean().item()

    # ActNorm's data-dependent init sees a large batch first
    with torch.no_grad():
        flow.bits_per_dim(train[:512], N_LEVELS, generator=gen)
    t0 = time.perf_counter()
    log = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), device=device, generator=gen)
        loss = flow.bits_per_dim(train[idx], N_LEVELS, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            log.append({"step": step, "train_bpd_batch": loss.item(), "seconds": time.perf_counter() - t0})
            elapsed = time.perf_counter() - t0
            print(f"step {step:5d}  train batch {loss.item():.3f} bits/dim  ({elapsed:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0

    result = {
        "data": args.data,
        "test_bits_per_dim": evaluate(test),
        "train_bits_per_dim": evaluate(train),
        "uniform_bits_per_dim": math.log2(N_LEVELS),
        "n_train": len(train),
        "n_test": len(test),
        "params": sum(p.numel() for p in flow.parameters()),
        "train_seconds": seconds,
        "config": vars(args),
        "log": log,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
    }
    print(
        f"{args.data}: test {result['test_bits_per_dim']:.3f} bits/dim, train {result['train_bits_per_dim']:.3f} "
        f"(uniform {result['uniform_bits_per_dim']:.3f}); {args.steps} steps in {seconds:.0f} s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

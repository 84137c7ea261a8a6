#!/usr/bin/env python
"""Train pygen.models.GAN on scikit-learn's digits and score its samples (not a test).

    python benchmarks/quality/gan_digits.py                      # the default GAN: 16x16, ~3 min on one free core
    python benchmarks/quality/gan_digits.py --ablations          # + the same run with DiffAugment, without R1
    python benchmarks/quality/gan_digits.py --steps 200 --no-save   # smoke run

Trains with :func:`pygen.train.fit` on the 1442 training digits (labels unused) and scores
64-d DigitsFeatures (the digits' FID space) of 355 samples with :func:`pygen.metrics.evaluate`:
FD, KID, precision / recall (k=3), density / coverage (k=5), beside the held-out test digits
(the floor) and a Gaussian fitted to the training pixels (the bar a model must beat), for the
EMA generator and the raw one. Prints a Markdown table; writes
``benchmarks/results/gan-digits-<date>.json`` (config, command, versions, metrics, training
log) and ``docs/gan-samples.png`` (64 EMA samples, seed 0).

Threads: one by default. These networks are tiny (ms per op); with two OpenMP threads on a
shared 2-core machine a step was 6x slower (161 vs 28 ms, measured) whenever the other core
was busy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import pygen
import pygen.data
from pygen.images import save_grid
from pygen.metrics import evaluate
from pygen.models.gan import GAN
from pygen.train import fit

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("fd", "kid", "precision", "recall", "density", "coverage")


class _Raw(torch.nn.Module):
    """The GAN's raw (non-EMA) generator behind evaluate()'s sample(n, *, seed, offset)."""

    def __init__(self, gan: GAN) -> None:
        super().__init__()
        self.gan = gan

    def sample(self, n: int, *, seed: int | None = None, offset: int = 0) -> torch.Tensor:
        return self.gan.sample(n, seed=seed, offset=offset, ema=False)


def build(args: argparse.Namespace, **override) -> GAN:
    cfg = dict(
        z_dim=args.z_dim, loss=args.loss, n_dis=args.n_dis, r1_gamma=args.r1, r1_every=args.r1_every,
        diffaugment=args.diffaugment, g_width=args.width, d_width=args.width, g_norm=args.g_norm,
        ema_decay=args.ema, lr_ratio=args.lr_ratio, betas=(args.beta1, 0.99),
    )  # fmt: skip
    cfg.update(override)
    torch.manual_seed(args.seed)
    return GAN((1, args.size, args.size), **cfg)


def train(args: argparse.Namespace, x: torch.Tensor, label: str, **override) -> tuple[GAN, dict]:
    gan = build(args, **override)
    print(f"[{label}] {json.dumps(gan.config)}", flush=True)
    t0 = time.perf_counter()
    history = fit(gan, x, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                  progress=args.progress, log_every=max(1, args.steps // 10))
    seconds = time.perf_counter() - t0
    for r in history:
        print(f"[{label}] step {r['step']:6d}  loss_d {r['loss_d']:.3f}  loss_g {r['loss_g']:.3f}  D(x) "
              f"{r['d_real']:+.3f}  D(G(z)) {r['d_fake']:+.3f}  |grad D| {r['grad_norm_d']:.3f}  "
              f"|grad G| {r['grad_norm_g']:.3f}  {r['steps_per_s']:.1f} steps/s", flush=True)
    return gan, {"config": gan.config, "train_seconds": seconds, "history": history}


def score(model, spec: str, args: argparse.Namespace) -> dict:
    return evaluate(model, spec, seed=args.eval_seed, kid_subsets=args.kid_subsets)


def row(name: str, metrics: dict) -> str:
    return f"| {name} | " + " | ".join(f"{metrics[k]:.4g}" for k in COLUMNS) + " |"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, choices=(8, 16),
                   help="digit size (default 16: at 8 px the GAN's FD was only ~2-5x below the Gaussian bar's)")
    p.add_argument("--steps", type=int, default=4000, help="trainer steps (default 4000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="G's Adam lr; D's is lr x --lr-ratio")
    p.add_argument("--lr-ratio", type=float, default=1.0)
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 (beta2 = 0.99)")
    p.add_argument("--loss", default="hinge", choices=("ns", "hinge", "wgan-gp"))
    p.add_argument("--n-dis", type=int, default=1)
    p.add_argument("--r1", type=float, default=0.1, help="R1 gamma (0: off)")
    p.add_argument("--r1-every", type=int, default=4)
    p.add_argument("--diffaugment", action="store_true", help="DiffAugment translation + cutout (off by default: "
                   "it slowed learning at this budget, see --ablations)")
    p.add_argument("--width", type=int, default=32, help="conv base width of G and D")
    p.add_argument("--g-norm", default="batch", choices=("batch", "group", "none"))
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the generator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ablations", action="store_true", help="also train with DiffAugment toggled and without R1")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar")
    p.add_argument("--no-save", action="store_true", help="write neither the JSON nor the PNG")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gan-digits-<date>.json)")
    p.add_argument("--samples", default=str(REPO / "docs" / "gan-samples.png"))
    args = p.parse_args(argv)
    if args.g_norm == "none":
        args.g_norm = None
    torch.set_num_threads(args.threads)
    spec = "digits" if args.size == 8 else f"digits{args.size}"
    x, _ = pygen.data.digits("train", args.size)  # unconditional: labels unused

    runs: dict[str, dict] = {}
    gan, runs["default"] = train(args, x, "default")
    results = {"GAN, EMA generator": score(gan, spec, args), "GAN, raw generator": score(_Raw(gan), spec, args)}
    if args.ablations:
        da = {"diffaugment": not args.diffaugment}
        variants = {("no DiffAugment" if args.diffaugment else "with DiffAugment"): da, "no R1": {"r1_gamma": 0.0}}
        for label, override in variants.items():
            if all(gan.config[k] == v for k, v in override.items()):
                continue  # the default already is this variant
            g, runs[label] = train(args, x, label, **override)
            results[f"{label}, EMA"] = score(g, spec, args)
            results[f"{label}, raw"] = score(_Raw(g), spec, args)
    first = next(iter(results.values()))
    floor, bar = first["baseline_data"], first["baseline_gaussian"]

    lines = [f"GAN on {spec} ({x.shape[0]} train digits), {args.steps} steps of batch {args.batch}; "
             f"{first['meta']['n']} samples vs the train split in DigitsFeatures space", "",
             "| model | FD | KID | precision | recall | density | coverage |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [row(name, r) for name, r in results.items()]
    lines += [row("fitted Gaussian (bar)", bar), row("held-out digits (floor)", floor)]
    table = "\n".join(lines)
    print()
    print(table)
    ema = results["GAN, EMA generator"]
    verdict = "beats" if ema["fd"] < bar["fd"] else "does NOT beat"
    print(f"\nEMA generator {verdict} the fitted Gaussian on FD ({ema['fd']:.3g} vs {bar['fd']:.3g}).")

    out = {
        "benchmark": "gan_digits",
        "command": " ".join(["python", "benchmarks/quality/gan_digits.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args),
        "data": spec,
        "n_train": int(x.shape[0]),
        "results": {name: {k: v for k, v in r.items() if not isinstance(v, dict)} for name, r in results.items()},
        "baseline_gaussian": bar,
        "baseline_data": floor,
        "meta": first["meta"],
        "runs": runs,
        "table": table,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pygen": str(pygen.__version__)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.no_save:
        default = REPO / "benchmarks" / "results" / f"gan-digits-{time.strftime('%Y%m%d')}.json"
        path = Path(args.out) if args.out else default
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        save_grid(gan.sample(64, seed=0), args.samples, nrow=8, scale=4)
        print(f"wrote {path} and {args.samples}")
    return out


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train a small Glow on scikit-learn's 8x8 digits through the model layer and measure it.

    python benchmarks/quality/flow_digits.py                     # ~40 s on 2 CPU cores
    python benchmarks/quality/flow_digits.py --steps 300 --out /tmp/flow   # quicker

pygen.models.Flow("glow", bins=17) trained by pygen.train.fit on the fixed train split of
pygen.data.digits (pixel levels v / 16, dequantised y = (v + u) / 17), then
pygen.metrics.evaluate on the held-out split: FD / KID / precision / recall / density /
coverage in the DigitsFeatures space and the exact test NLL in bits/dim, beside the
held-out-data floor and the fitted-Gaussian bar. Writes the JSON results (with versions and
the command) and a PNG grid of 64 samples.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import pygen
import pygen.data
import pygen.images
import pygen.metrics
import pygen.models
import pygen.train


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/pygen-flow-digits", help="training directory (checkpoints, log)")
    p.add_argument("--json", default=None, help="results file (default: <out>/results.json)")
    p.add_argument("--grid", default=None, help="sample grid PNG (default: <out>/samples.png)")
    args = p.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, _ = pygen.data.digits("train")
    model = pygen.models.Flow("glow", (1, 8, 8), bins=17, levels=2, depth=4, hidden=64)
    t0 = time.time()
    history = pygen.train.fit(model, x, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              out=args.out, resume=True, progress=sys.stderr.isatty(), log_every=500)
    train_s = time.time() - t0
    trained = pygen.models.load(args.out)
    results = pygen.metrics.evaluate(trained, "digits", seed=args.seed)
    print(pygen.metrics.format_table(results))
    grid = Path(args.grid or Path(args.out) / "samples.png")
    pygen.images.save_grid(trained.sample(64, seed=args.seed), grid, scale=4)
    record = {
        "command": "python benchmarks/quality/flow_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"pygen": pygen.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "model": {"family": "flow", **trained.config},
        "steps": args.steps, "train_seconds": round(train_s, 1), "final_train_log": history[-1] if history else None,
        "results": results,
    }
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=float))
    print(f"results: {out}; samples: {grid}")
    return record


if __name__ == "__main__":
    main()

"""Each family trained on Fashion-MNIST with `pygen train FAMILY --data fashion-mnist` and
nothing else (the defaults, cut to 20 minutes on the machine at hand), then `pygen eval` on
the official test split: FD in the FashionFeatures space beside the data floor (the test
images against the training images) and the fitted-Gaussian bar, bits/dim for the flow.

    python benchmarks/quality/fashion_mnist.py [--families vae,flow,gan,diffusion,latent-diffusion] [--n 2000] [--out DIR]
        [--minutes M]   (`pygen train ... --minutes M` instead of the default steps; recorded as "FAMILY (--minutes M)")

Runs the commands as a user would (subprocesses, 2 torch threads), one at a time; run it
with nothing else on the machine: the wall times are part of the result. Writes
benchmarks/results/fashion-mnist-<cpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import cpu_name  # noqa: E402


def guided(run: Path, fam: str, n: int, threads: int) -> dict:
    """A trained class-conditional run: the share of its samples that FashionFeatures
    classifies as the label asked for, at guidance scales 1, 2, 4 (n samples each, labels
    cycling through the classes), the sampling rate, and a grid (rows: the ten classes,
    guidance 2) written to docs/fashion-mnist-<family>.png."""
    import torch

    import pygen.images
    from pygen.metrics import FashionFeatures
    from pygen.models import load

    torch.set_num_threads(threads)
    model = load(run)
    if not (model.config.get("num_classes") or 0):
        return {}
    clf = FashionFeatures.pretrained()
    labels = torch.arange(n) % 10
    out: dict = {"guided_accuracy": {}, "n_guided": n}
    for s in (1.0, 2.0, 4.0):
        t0 = time.perf_counter()
        x = model.sample(n, seed=7, labels=labels, guidance_scale=s)
        dt = time.perf_counter() - t0
        out["guided_accuracy"][str(s)] = float((clf.predict(x) == labels).float().mean())
        out.setdefault("samples_per_s", {})[str(s)] = round(n / dt, 2)
        print(f"{fam}: guidance {s}: class accuracy {out['guided_accuracy'][str(s)]:.3f}, {n / dt:.1f} samples/s",
              flush=True)
    grid = model.sample(100, seed=1, labels=torch.arange(100) // 10, guidance_scale=2.0)
    pygen.images.save_grid(grid, REPO / "docs" / f"fashion-mnist-{fam}.png", nrow=10, scale=2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="vae,flow,gan,diffusion,latent-diffusion")
    p.add_argument("--n", type=int, default=2000, help="samples scored (the floor uses as many test images)")
    p.add_argument("--out", type=Path, default=Path("runs/fashion-mnist"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guided-n", type=int, default=500, help="samples per guidance scale (conditional families)")
    p.add_argument("--minutes", type=float, help="train with --minutes M (the whole budget) instead of the default steps")
    p.add_argument("--guided-only", action="store_true",
                   help="only the guided accuracy and grid of runs already trained under --out")
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
    cpu = cpu_name()
    results: dict = {"cpu": cpu, "threads": a.threads, "date": time.strftime("%Y-%m-%d"), "n": a.n, "families": {}}
    slug = "amd-epyc" if "AMD" in cpu else ("intel-xeon" if "Xeon" in cpu else "cpu")
    dest = REPO / "benchmarks" / "results" / f"fashion-mnist-{slug}-{a.threads}threads-{time.strftime('%Y%m%d')}.json"
    if dest.exists():  # the same day's runs of other families are kept
        results["families"] = json.loads(dest.read_text()).get("families", {})
    for fam in a.families.split(","):
        key = fam if a.minutes is None else f"{fam} (--minutes {a.minutes:g})"
        run = a.out / (fam if a.minutes is None else f"{fam}-{a.minutes:g}min")
        if a.guided_only:
            results["families"].setdefault(key, {}).update(guided(run, fam, a.guided_n, a.threads))
            dest.write_text(json.dumps(results, indent=1, default=float) + "\n")
            continue
        train_cmd = [sys.executable, "-m", "pygen", "train", fam, "--data", "fashion-mnist", "--out", str(run),
                     "--threads", str(a.threads), "--no-progress"]
        if a.minutes is not None:
            train_cmd += ["--minutes", f"{a.minutes:g}"]
        t0 = time.perf_counter()
        tr = subprocess.run(train_cmd, env=env, capture_output=True, text=True)
        train_s = time.perf_counter() - t0
        print(tr.stdout[-2000:], tr.stderr[-2000:], flush=True)
        if tr.returncode != 0:
            results["families"][key] = {"error": tr.stderr.strip().splitlines()[-1:], "train_seconds": train_s}
            continue
        rec = json.loads((run / "train.json").read_text())
        ev_json = run / "eval.json"
        t0 = time.perf_counter()
        ev = subprocess.run([sys.executable, "-m", "pygen", "eval", str(run), "--data", "fashion-mnist", "--n",
                             str(a.n), "--json", str(ev_json)], env=env, capture_output=True, text=True)
        eval_s = time.perf_counter() - t0
        print(ev.stdout[-3000:], ev.stderr[-1000:], flush=True)
        out = {"command": "pygen " + " ".join(train_cmd[3:]), "train_seconds": round(train_s, 1),
               "eval_seconds": round(eval_s, 1), "steps": rec["steps"], "batch_size": rec["batch_size"],
               "measured_seconds_per_step": rec.get("measured_seconds_per_step")}
        if "measured_seconds_per_first_stage_step" in rec:  # latent diffusion's autoencoder, timed apart
            out["measured_seconds_per_first_stage_step"] = rec["measured_seconds_per_first_stage_step"]
            out["first_stage_steps"] = rec["options"].get("ae_steps", rec.get("ae_steps"))
        if ev.returncode == 0:
            r = json.loads(ev_json.read_text())
            fd, floor, bar = r.get("fd"), r["baseline_data"].get("fd"), r["baseline_gaussian"].get("fd")
            out.update({"fd": fd, "fd_floor": floor, "fd_gaussian_bar": bar,
                        "fd_over_floor": fd / floor if fd and floor else None, "nll_bpd": r.get("nll_bpd"),
                        "eval": r})
        else:
            out["eval_error"] = ev.stderr.strip().splitlines()[-1:]
        if fam in ("diffusion", "latent-diffusion"):
            out.update(guided(run, fam, a.guided_n, a.threads))
        results["families"][key] = out
        dest.write_text(json.dumps(results, indent=1, default=float) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k != "eval"}), flush=True)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

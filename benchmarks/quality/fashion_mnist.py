"""Each family trained on Fashion-MNIST with `pygen train FAMILY --data fashion-mnist` and
nothing else (the defaults, cut to 20 minutes on the machine at hand), then `pygen eval` on
the official test split: FD in the FashionFeatures space beside the data floor (the test
images against the training images) and the fitted-Gaussian bar, bits/dim for the flow.

    python benchmarks/quality/fashion_mnist.py [--families vae,flow,gan,diffusion] [--n 2000] [--out DIR]

Runs the commands as a user would (subprocesses, 2 torch threads), one at a time; run it
with nothing else on the machine: the wall times are part of the result. Writes
benchmarks/results/fashion-mnist-<cpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="vae,flow,gan,diffusion")
    p.add_argument("--n", type=int, default=2000, help="samples scored (the floor uses as many test images)")
    p.add_argument("--out", type=Path, default=Path("runs/fashion-mnist"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
    cpu = _cpu()
    results: dict = {"cpu": cpu, "threads": a.threads, "date": time.strftime("%Y-%m-%d"), "n": a.n, "families": {}}
    slug = "amd-epyc" if "AMD" in cpu else ("intel-xeon" if "Xeon" in cpu else "cpu")
    dest = REPO / "benchmarks" / "results" / f"fashion-mnist-{slug}-{a.threads}threads-{time.strftime('%Y%m%d')}.json"
    for fam in a.families.split(","):
        run = a.out / fam
        train_cmd = [sys.executable, "-m", "pygen", "train", fam, "--data", "fashion-mnist", "--out", str(run),
                     "--threads", str(a.threads), "--no-progress"]
        t0 = time.perf_counter()
        tr = subprocess.run(train_cmd, env=env, capture_output=True, text=True)
        train_s = time.perf_counter() - t0
        print(tr.stdout[-2000:], tr.stderr[-2000:], flush=True)
        if tr.returncode != 0:
            results["families"][fam] = {"error": tr.stderr.strip().splitlines()[-1:], "train_seconds": train_s}
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
        if ev.returncode == 0:
            r = json.loads(ev_json.read_text())
            fd, floor, bar = r.get("fd"), r["baseline_data"].get("fd"), r["baseline_gaussian"].get("fd")
            out.update({"fd": fd, "fd_floor": floor, "fd_gaussian_bar": bar,
                        "fd_over_floor": fd / floor if fd and floor else None, "nll_bpd": r.get("nll_bpd"),
                        "eval": r})
        else:
            out["eval_error"] = ev.stderr.strip().splitlines()[-1:]
        results["families"][fam] = out
        dest.write_text(json.dumps(results, indent=1, default=float) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k != "eval"}), flush=True)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

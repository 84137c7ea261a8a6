#!/usr/bin/env python
"""Markdown table from a results file, for README tables that cite it.

    python benchmarks/summarize.py benchmarks/results/<file>.json

Reads either a pytest-benchmark JSON (bench_gaussian.py / bench_coupling.py,
--benchmark-json=...) or a gpu_bench.py JSON. One row per op (/ direction / K) / mode /
size (/ dtype): each provider's median time, then the fastest pygen provider's GB/s,
fraction of copy bandwidth and speedups. The direction and K columns appear when the file
has coupling ops. A time marked "!" failed its sanity check (gpu_bench.py keeps and flags
a broken baseline's time; the CPU suite does not time it).

Scheduler loops (bench_schedulers.py's JSON, or gpu_bench.py's "scheduler_loops"): one row
per scheduler / config / shape with pygen's and diffusers' median time of a 50-step loop,
diffusers / pygen, and the issue's goal (>= 1.5x at 64x4x32x32) where that shape ran.
"""

from __future__ import annotations

import json
import sys


def rows_from(data: dict) -> tuple[list[dict], float, str]:
    if "benchmarks" in data:  # pytest-benchmark
        recs = []
        for b in data["benchmarks"]:
            e = b.get("extra_info", {})
            if "op" not in e or not b.get("stats"):
                continue
            median = b["stats"]["median"]
            recs.append({"op": e["op"], "direction": e.get("direction"), "bins": e.get("bins"), "mode": e["mode"],
                         "provider": e["provider"], "size": b["group"].rsplit("-", 1)[-1],
                         "dtype": e.get("dtype", ""), "median_ms": median * 1e3, "gbps": e["bytes"] / median / 1e9})
        copy = data.get("pygen", {}).get("copy_bandwidth") or {}
        return recs, copy.get("gbps", float("nan")), "pytest-benchmark, CPU"
    recs = []
    for r in data["results"]:
        if r.get("median_ms") is None:
            continue
        n = r["numel_nominal"]
        k = n.bit_length() - 1
        recs.append({"op": r["op"], "direction": r.get("direction"), "bins": r.get("bins"), "mode": r["mode"],
                     "provider": r["provider"], "size": f"2^{k}" if n == 1 << k else str(n), "dtype": r["dtype"],
                     "median_ms": r["median_ms"], "gbps": r["gbps"], "check": r.get("check")})
    meta = data["metadata"]
    return recs, meta["copy_bandwidth"]["gbps"], f"gpu_bench.py, {meta['device']}"


def scheduler_rows(data: dict) -> tuple[list[dict], str]:
    """Scheduler-loop records: {scheduler, config, shape, impl, median_ms, other_cores, check}."""
    if "benchmarks" in data:
        recs = []
        for b in data["benchmarks"]:
            e = b.get("extra_info", {})
            if "scheduler" not in e or not b.get("stats"):
                continue
            recs.append({"scheduler": e["scheduler"], "config": e["config"], "shape": "x".join(map(str, e["shape"])),
                         "impl": e["impl"], "median_ms": b["stats"]["median"] * 1e3,
                         "other_cores": e.get("other_cores"), "steps": e.get("steps"), "goal": e.get("goal")})
        return recs, "pytest-benchmark, CPU"
    recs = [r for r in data.get("scheduler_loops") or [] if r.get("median_ms") is not None]
    return recs, f"gpu_bench.py, {data['metadata']['device']}" if recs else ""


def scheduler_table(path: str, data: dict) -> bool:
    """Print the scheduler-loop table; False when the file has no scheduler loops."""
    recs, source = scheduler_rows(data)
    if not recs:
        return False
    steps = recs[0].get("steps", 50)
    goal_shape, goal_speedup = recs[0].get("goal") or (None, None)  # bench_schedulers.GOAL_SHAPE, GOAL_SPEEDUP
    table: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        table.setdefault((r["scheduler"], r["config"], r["shape"]), {})[r["impl"]] = r
    print(f"Source: `{path}` ({source}). Median time of a whole {steps}-step loop (set_timesteps, "
          "scale_model_input and step; the model excluded: a fixed model_output tensor), ms; "
          "speedup = diffusers / pygen. busy: the most cores other processes kept busy during either "
          "side (> 0.1: suspect). ! = failed its sanity check.\n")
    print("| scheduler | config | shape | pygen ms | diffusers ms | pygen us/step | speedup | busy |")
    print("|---|---|---|---|---|---|---|---|")
    goal = []
    for (name, config, shape), by in table.items():
        p, d = by.get("pygen"), by.get("diffusers")
        cells = [f"{r['median_ms']:.3f}" + (" !" if r.get("check") else "") if r else "-" for r in (p, d)]
        us = f"{p['median_ms'] * 1e3 / steps:.1f}" if p else "-"
        sp = d["median_ms"] / p["median_ms"] if p and d else None
        busy = [r["other_cores"] for r in (p, d) if r and r.get("other_cores") is not None]
        print(f"| {name} | {config} | {shape} | {cells[0]} | {cells[1]} | {us} | "
              f"{f'{sp:.2f}x' if sp else '-'} | {f'{max(busy):.2f}' if busy else '-'} |")
        if shape == goal_shape and sp:
            goal.append((name, config, sp))
    if goal and goal_speedup:
        met = [g for g in goal if g[2] >= goal_speedup]
        print(f"\nGoal (>= {goal_speedup}x diffusers at {goal_shape}): met by {len(met)} of {len(goal)}; not met: "
              + (", ".join(f"{n} ({c}) {s:.2f}x" for n, c, s in goal if s < goal_speedup) or "none"))
    return True


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    had_loops = scheduler_table(path, data)
    recs, copy_gbps, source = rows_from(data)
    if had_loops:
        if not recs:
            return
        print()
    providers = list(dict.fromkeys(r["provider"] for r in recs))
    variants = any(r.get("direction") or r.get("bins") for r in recs)
    table: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        var = (r.get("direction") or "", r.get("bins") or "") if variants else ()
        table.setdefault((r["op"], *var, r["mode"], r["size"], r["dtype"]), {})[r["provider"]] = r
    print(f"Source: `{path}` ({source}; copy bandwidth {copy_gbps:.1f} GB/s). Times are medians in ms; "
          "GB/s, copy fraction and speedups are the fastest pygen provider's.\n")
    keys = ["op", *(["direction", "K"] if variants else []), "mode", "numel", "dtype"]
    print("| " + " | ".join(keys) + " | " + " | ".join(f"{p} ms" for p in providers)
          + " | GB/s | copy | vs eager | vs compile |")
    print("|" + "---|" * (len(keys) + len(providers) + 4))

    def cell(r: dict) -> str:
        return f"{r['median_ms']:.3f}" + (" !" if r.get("check") else "")

    for key, by in table.items():
        cells = [cell(by[p]) if p in by else "-" for p in providers]
        mine = [r for p, r in by.items() if p.startswith("pygen-")]
        if mine:
            best = min(mine, key=lambda r: r["median_ms"])
            sp = [f"{by[b]['median_ms'] / best['median_ms']:.2f}x" if b in by else "-" for b in ("eager", "compile")]
            tail = [f"{best['gbps']:.2f}", f"{best['gbps'] / copy_gbps:.1%}", *sp]
        else:
            tail = ["-"] * 4
        print("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells + tail) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

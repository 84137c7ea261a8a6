#!/usr/bin/env python
"""Markdown table from a results file, for README tables that cite it.

    python benchmarks/summarize.py benchmarks/results/<file>.json

Reads either a pytest-benchmark JSON (bench_gaussian.py / bench_coupling.py,
--benchmark-json=...) or a gpu_bench.py JSON. One row per op (/ direction / K) / mode /
size (/ dtype): each provider's median time, then the fastest pygen provider's GB/s,
fraction of copy bandwidth and speedups. The direction and K columns appear when the file
has coupling ops. A time marked "!" failed its sanity check (gpu_bench.py keeps and flags
a broken baseline's time; the CPU suite does not time it).
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


def main(path: str) -> None:
    with open(path) as fh:
        data = json.load(fh)
    recs, copy_gbps, source = rows_from(data)
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

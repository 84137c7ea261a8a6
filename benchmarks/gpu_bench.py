#!/usr/bin/env python
"""GPU benchmark of pygen's ops against eager torch and torch.compile.

    python benchmarks/gpu_bench.py --out /tmp/gpu.json                # on a CUDA machine
    python benchmarks/gpu_bench.py --dry-run --out /tmp/x.json        # CPU smoke test
    python benchmarks/gpu_bench.py --ops rq_spline,affine_coupling    # the coupling ops only
    python benchmarks/gpu_bench.py --ops ddim_step,ddim_step_prev,ddim_step_eta1,ddpm_step,diffusion_loss,euler_ancestral_step,dpmpp_2m_step

For each size (default 2**20, 2**24, 2**26 float32, plus 2**26 bfloat16), op
(reparameterize, gaussian_kl, reparameterize_kl, affine_coupling, rq_spline) and its
variants (direction forward / inverse for the couplings, K = 8, 16 bins for the spline,
which runs only where numel * K <= --spline-max-params, 2**27 by default: K 8 and 16 at
2**20, K 8 at 2**24), mode (forward, backward, forward_backward) and provider
(pygen-cuda, pygen-triton where available, eager, compile), time with
``triton.testing.do_bench(warmup=25, rep=100)`` (median and 20/80% quantiles) and report GB/s over the minimum bytes moved (_common.bytes_moved), its fraction of a measured
``dst.copy_(src)`` bandwidth (256 MiB, read + write bytes), peak extra memory, and speedups
over eager and compile. Inputs have shape (numel // 256, 256) (the spline's parameters
(..., K) and (..., K-1)). The eager baseline of the couplings is pygen's reference
(``affine_coupling_ref``, ``rq_spline_ref``: the usual chain of torch ops), compile is
``torch.compile`` of it.

- "backward" times only the backward: the graph is built once per input set and
  ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed.
- "forward_backward" times forward + ``torch.autograd.grad`` (no .grad accumulation).
- When one input set is smaller than 2x the L2 cache, several sets are rotated so that
  the cache does not flatter small sizes (do_bench also flushes L2 between calls).
- ``--dry-run``: CPU, tiny sizes, pygen's "cpp" backend and a perf_counter timer; it checks
  that the script works, its numbers mean little.
- A failed sanity check of a pygen provider is an error (exit status 1); of a baseline
  (eager, compile) a warning: the time is kept, flagged with the check's message.

Diffusion ops (ddim_step (eta 0), ddim_step_prev (eta 0, prev_sample only), ddim_step_eta1, ddpm_step, diffusion_loss,
euler_ancestral_step, dpmpp_2m_step; see _common.make_inputs and _baselines.py) run on
image shapes instead (--diffusion-shapes, default 256x3x64x64 (the issue's), 1024x3x64x64,
32x4x128x128, float32, plus bfloat16 at the largest; run in that order, after the other
ops' sizes unless a diffusion op comes first in --ops): the steps forward only, the loss
(q_sample + diffusion_mse) in every mode, its backward w.r.t. model_output alone. eager is
the unfused chain (coefficients gathered per sample on the device, torch.randn_like
noise, pygen.ops.diffusion' reference step), compile is torch.compile of it. An op that
this build of pygen.ops lacks is listed as unavailable, not run. The summary ends with the
issue's goal for the DDIM step (85% of copy bandwidth, 5x the eager chain).

Scheduler loops (after the ops; bench_schedulers.py's loop and checks, which see): a whole
50-step sampling loop (set_timesteps(50, device=...), scale_model_input, step; the model
excluded: one fixed precomputed model_output tensor) of pygen.diffusion's schedulers
against diffusers' of the same name and config, per --schedulers (default all five; ''
for none), --scheduler-configs (default, readme, sd) and --scheduler-shapes (default
1x4x32x32,16x4x32x32,8x4x64x64,64x4x32x32,256x4x32x32; dry run 1x4x8x8,2x4x8x8), float32,
a torch.Generator on the device re-seeded every loop (the stochastic schedulers draw their
noise: pygen in-kernel, diffusers with torch.randn). Timed with the same timer as the ops;
speedup = diffusers / pygen. Without diffusers the pygen loops are timed alone. A failed
check of pygen's loop is an error; of diffusers' a warning (time kept, flagged).

Writes a JSON with metadata (device, versions, date; no hostname) and one record per
(op, variant, mode, size, dtype, provider) ("results"; the scheduler loops in
"scheduler_loops"), and prints a table per configuration and a summary.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _baselines, _common

import torch  # noqa: E402

import pygen  # noqa: E402
from _common import (  # noqa: E402
    DIFFUSION_OPS,
    MB,
    OPS,
    SPLINE_BINS,
    bytes_moved,
    check_grads,
    check_outputs,
    cpu_bench,
    diff_outputs,
    fused_missing,
    grad_inputs,
    make_grads,
    make_inputs,
    op_modes,
    parse_shape,
    provider_fn,
    quantile_list,
    shape_for,
    shape_label,
    variant_label,
    variants,
)

MODES = ("forward", "backward", "forward_backward")
BASELINES = ("eager", "compile")
QUANTILES = (0.5, 0.2, 0.8)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSION_SHAPES = "256x3x64x64,1024x3x64x64,32x4x128x128"
DIFFUSION_DRY_SHAPES = "4x3x16x16,8x4x8x8"
GOALS = {"copy_fraction": 0.85, "speedup_vs_eager": 5.0}  # the issue's, for a DDIM step on an H100


# ---- arguments ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'2**20', '2^20', '1048576' or '1e6' -> int."""
    t = text.strip().replace("^", "**")
    if m := re.fullmatch(r"(\d+)\*\*(\d+)", t):
        return int(m.group(1)) ** int(m.group(2))
    value = float(t)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(value)


def parse_list(text: str, item=str) -> list:
    return [item(x) for x in text.split(",") if x.strip()]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    try:
        return parse_list(text, parse_shape)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_label(n: int) -> str:
    k = n.bit_length() - 1
    return f"2**{k}" if n == 1 << k else f"{n:.0e}".replace("+0", "").replace("+", "")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="PATH.json", help="write the results here (JSON)")
    p.add_argument("--sizes", help="comma list of element counts, e.g. 2**20,2**24 "
                                   "(default 2**20,2**24,2**26; dry run 2**12,2**14)")
    p.add_argument("--dtype", default="float32", help="comma list of dtypes for every size (default float32)")
    p.add_argument("--bf16-sizes", default=None,
                   help="extra bfloat16 runs at these sizes (default 2**26, the largest; '' for none)")
    p.add_argument("--ops", default=",".join(OPS),
                   help="comma list, run in this order within each size (default all)")
    p.add_argument("--bins", default=",".join(map(str, SPLINE_BINS)),
                   help="rq_spline's K values (default 8,16)")
    p.add_argument("--spline-max-params", type=parse_size, default=2**27,
                   help="run rq_spline only where numel * K <= this (default 2**27: 512 MB per float32 "
                        "parameter tensor; K 8 and 16 at 2**20, K 8 at 2**24)")
    p.add_argument("--diffusion-shapes", default=None,
                   help=f"shapes of the diffusion ops' tensors, e.g. 256x3x64x64 (default {DIFFUSION_SHAPES}; "
                        f"dry run {DIFFUSION_DRY_SHAPES})")
    p.add_argument("--diffusion-bf16-shapes", default=None,
                   help="extra bfloat16 runs of the diffusion ops at these shapes (default the largest; '' for none)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma list (default all; the diffusion steps run forward only)")
    p.add_argument("--providers", default=None,
                   help="comma list from pygen-cuda,pygen-triton,pygen-cpp,eager,compile (default: what runs here)")
    p.add_argument("--dim", type=int, default=256, help="elements per sample; B = numel // dim (default 256)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms (default 25)")
    p.add_argument("--rep", type=float, default=100, help="do_bench rep, ms (default 100)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new configuration after this many seconds (the rest is listed as skipped)")
    p.add_argument("--compile-dynamic", action="store_true", help="torch.compile(dynamic=None) instead of False")
    p.add_argument("--schedulers", default=None,
                   help="scheduler loops: comma list of pygen.diffusion scheduler classes (default all five; '' for none)")
    p.add_argument("--scheduler-configs", default="default,readme,sd",
                   help="scheduler loops: configs from default,readme,sd (sd: DDPM and DDIM only); default all")
    p.add_argument("--scheduler-shapes", default=None,
                   help="scheduler loops: sample shapes (default 1x4x32x32,16x4x32x32,8x4x64x64,64x4x32x32,"
                        "256x4x32x32; dry run 1x4x8x8,2x4x8x8)")
    p.add_argument("--no-check", action="store_true", help="skip the output/gradient sanity checks")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test: tiny sizes, backend cpp, perf_counter timer")
    args = p.parse_args(argv)
    args.sizes = parse_list(args.sizes or ("2**12,2**14" if args.dry_run else "2**20,2**24,2**26"), parse_size)
    try:
        args.diffusion_shapes = parse_shapes(args.diffusion_shapes or (DIFFUSION_DRY_SHAPES if args.dry_run
                                                                       else DIFFUSION_SHAPES))
        if args.diffusion_bf16_shapes is None:
            args.diffusion_bf16_shapes = ([] if args.dry_run or not args.diffusion_shapes
                                          else [max(args.diffusion_shapes, key=math.prod)])
        else:
            args.diffusion_bf16_shapes = parse_shapes(args.diffusion_bf16_shapes)
    except argparse.ArgumentTypeError as e:
        p.error(f"--diffusion-shapes / --diffusion-bf16-shapes: {e}")
    if args.bf16_sizes is None:
        args.bf16_sizes = [] if args.dry_run else [max(args.sizes)]
    else:
        args.bf16_sizes = parse_list(args.bf16_sizes, parse_size)
    try:
        args.dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",") if d.strip()]
    except KeyError as e:
        p.error(f"unknown dtype {e}; choose from {sorted(DTYPES)}")
    args.ops = parse_list(args.ops)
    args.modes = parse_list(args.modes)
    from bench_schedulers import CONFIGS as SCHED_CONFIGS
    from bench_schedulers import SCHEDULERS
    from bench_schedulers import SHAPES as SCHED_SHAPES

    args.schedulers = list(SCHEDULERS) if args.schedulers is None else parse_list(args.schedulers)
    args.scheduler_configs = parse_list(args.scheduler_configs)
    try:
        args.scheduler_shapes = parse_shapes(args.scheduler_shapes or ("1x4x8x8,2x4x8x8" if args.dry_run
                                                                       else ",".join(SCHED_SHAPES)))
    except argparse.ArgumentTypeError as e:
        p.error(f"--scheduler-shapes: {e}")
    for name, values, allowed in (("--schedulers", args.schedulers, SCHEDULERS),
                                  ("--scheduler-configs", args.scheduler_configs, SCHED_CONFIGS)):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    args.bins = parse_list(args.bins, int)
    if any(k < 2 for k in args.bins):
        p.error(f"--bins: K must be >= 2, got {args.bins}")
    for name, values, allowed in (("--ops", args.ops, OPS), ("--modes", args.modes, MODES)):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name}: unknown {bad}; choose from {allowed}")
    return args


# ---- timers ------------------------------------------------------------------------------


def make_timer(device: str, warmup: float, rep: float):
    """fn -> [median, q20, q80] in ms, and a description of the timer."""
    if device == "cpu":
        return (lambda fn: cpu_bench(fn, warmup=warmup, rep=rep, quantiles=QUANTILES),
                f"time.perf_counter (cpu_bench, warmup={warmup} ms, rep={rep} ms)")
    try:
        import triton.testing

        params = inspect.signature(triton.testing.do_bench).parameters
    except ImportError:
        return (lambda fn: cuda_event_bench(fn, warmup, rep), f"CUDA events (warmup={warmup} ms, rep={rep} ms)")
    kwargs = {"warmup": warmup, "rep": rep}
    if "return_mode" in params:
        kwargs["return_mode"] = "median"
    if "quantiles" in params:
        kwargs["quantiles"] = list(QUANTILES)

    def timer(fn):
        r = triton.testing.do_bench(fn, **kwargs)
        return [float(x) for x in r] if isinstance(r, (list, tuple)) else [float(r)] * 3

    return timer, f"triton.testing.do_bench({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def cuda_event_bench(fn, warmup: float, rep: float) -> list[float]:
    """do_bench's method without triton: CUDA events, L2 flushed before each call."""
    cache = torch.empty(256 * MB, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    n = max(1, int(rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return quantile_list([s.elapsed_time(e) for s, e in zip(starts, ends)], QUANTILES)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- measurements -----------------------------------------------------------------------


def copy_bandwidth(device: str, timer, nbytes: int) -> dict:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    q = timer(lambda: dst.copy_(src))
    del src, dst
    return {"tensor_bytes": nbytes, "bytes": 2 * nbytes, "median_ms": q[0], "gbps": 2 * nbytes / (q[0] * 1e-3) / 1e9,
            "method": "dst.copy_(src), float32, bytes read + written / median time"}


def l2_bytes(device: str) -> int:
    if device != "cuda":
        return 32 * MB  # a stand-in for a CPU's last-level cache in the dry run
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * MB)


def n_input_sets(set_bytes: int, l2: int, cap: int = 16) -> int:
    """Enough input sets that cycling through them spans 2x the L2 cache."""
    return 1 if set_bytes >= 2 * l2 else min(cap, math.ceil(2 * l2 / max(set_bytes, 1)))


def build_bench_fn(op: str, mode: str, f, sets: list, device: str):
    """The zero-argument callable to time, cycling through ``sets`` of (inputs, grads).

    Backward: from ``diff_outputs`` w.r.t. ``grad_inputs`` (every output and input, except
    for the diffusion loss: the loss w.r.t. model_output).
    """
    order = itertools.cycle(range(len(sets)))
    if mode == "forward":
        def run():
            inputs, _ = sets[next(order)]
            return f(*inputs)
    elif mode == "backward":
        # built once, reused
        graphs = [(diff_outputs(op, f(*inputs)), grad_inputs(inputs), g) for inputs, g in sets]

        def run():
            outs, wrt, grads = graphs[next(order)]
            return torch.autograd.grad(outs, wrt, grads, retain_graph=True)
    else:
        def run():
            inputs, grads = sets[next(order)]
            return torch.autograd.grad(diff_outputs(op, f(*inputs)), grad_inputs(inputs), grads)
    return run


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory a call allocates on top of what is already allocated (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def sanity(op: str, mode: str, f, inputs, grads, direction: str | None = None) -> str | None:
    if mode == "forward":  # (not under no_grad: compile would guard on it and compile twice)
        return check_outputs(op, f(*inputs), inputs, direction=direction)
    outs = f(*inputs)
    err = check_outputs(op, outs, inputs, direction=direction)
    if err:
        return err
    got = torch.autograd.grad(diff_outputs(op, outs), grad_inputs(inputs), grads)
    err = check_grads(op, inputs, grads, got, direction=direction, outs=outs)
    return f"backward: {err}" if err else None


# ---- metadata ----------------------------------------------------------------------------


def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception:  # no git, or not a checkout (a copied tree)
        return {"git_commit": None, "git_dirty": None}


def metadata(device: str, args, timer_desc: str, copy_bw: dict) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = torch.cuda.get_device_name(idx)
        dev = {"name": name, "capability": list(torch.cuda.get_device_capability(idx)),
               "total_memory": props.total_memory, "multi_processor_count": props.multi_processor_count,
               "l2_cache_bytes": l2_bytes(device)}
    else:
        name = "cpu-dry-run"
        dev = {"name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return {
        "script": "benchmarks/gpu_bench.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        "device_info": dev,
        "dry_run": args.dry_run,
        "versions": {"pygen": pygen.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": triton_version, "python": platform.python_version()},
        **git_info(),
        "backends_available": pygen.available_backends(),
        "timer": timer_desc,
        "compile": {"dynamic": None if args.compile_dynamic else False,
                    "donated_buffer": getattr(importlib.import_module("torch._functorch.config"),
                                              "donated_buffer", None)},
        "copy_bandwidth": copy_bw,
        "shape": f"(numel // {args.dim}, {args.dim}); diffusion ops: the given (B, C, H, W)",
        "bytes_model": "minimum traffic: each input read once, each output written once (see _common.bytes_moved)",
        "args": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()
                 if k not in ("dtypes",)} | {"dtypes": [str(d).replace("torch.", "") for d in args.dtypes]},
    }


# ---- main --------------------------------------------------------------------------------


def default_providers(device: str) -> list[str]:
    avail = pygen.available_backends()
    if device == "cpu":
        mine = ["pygen-cpp"] if "cpp" in avail else []
    else:
        mine = [f"pygen-{b}" for b in ("cuda", "triton") if b in avail]
    return mine + list(BASELINES)


def fmt_ms(x):
    return f"{x:.4f}" if x is not None else "-"


def main(argv=None) -> int:
    args = get_args(argv)
    if args.dry_run:
        device = "cpu"
        if args.warmup == 25 and args.rep == 100:
            args.warmup, args.rep = 5.0, 20.0
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or use --dry-run for a CPU smoke test", file=sys.stderr)
            return 2
        device = "cuda"
    providers = parse_list(args.providers) if args.providers else default_providers(device)
    if "compile" in providers and "backward" in args.modes:
        # Timing the backward alone calls it repeatedly (retain_graph=True), which AOTAutograd
        # refuses for a backward that donates its saved buffers; turn donation off (recorded).
        importlib.import_module("torch._functorch.config").donated_buffer = False
    timer, timer_desc = make_timer(device, args.warmup, args.rep)
    t_start = time.perf_counter()

    copy_bw = copy_bandwidth(device, timer, 64 * MB if args.dry_run else 256 * MB)
    meta = metadata(device, args, timer_desc, copy_bw)
    l2 = l2_bytes(device)
    print(f"device: {meta['device']}  torch {torch.__version__}  cuda {torch.version.cuda}  "
          f"triton {meta['versions']['triton']}  pygen {pygen.__version__}")
    print(f"timer: {timer_desc}")
    print(f"copy bandwidth: {copy_bw['gbps']:.1f} GB/s ({copy_bw['tensor_bytes'] >> 20} MiB dst.copy_(src), read+write)")
    print(f"providers: {providers}")
    if "rq_spline" in args.ops:
        print(f"rq_spline: K in {args.bins} where numel * K <= {args.spline_max_params}")

    # Diffusion ops this build lacks (the sigma-space steps land later): listed, not run.
    unavailable = {op: why for op in args.ops if op in DIFFUSION_OPS and (why := fused_missing(op))
                   and any(p.startswith("pygen-") for p in providers)}
    for op, why in unavailable.items():
        print(f"{op}: unavailable, not run: {why}")
    flat_ops = [op for op in args.ops if op not in DIFFUSION_OPS]
    diffusion_ops = [op for op in args.ops if op in DIFFUSION_OPS and op not in unavailable]
    if diffusion_ops:
        print(f"diffusion ops {diffusion_ops} at shapes {[shape_label(s) for s in args.diffusion_shapes]}"
              + (f" (+ bfloat16 at {[shape_label(s) for s in args.diffusion_bf16_shapes]})"
                 if args.diffusion_bf16_shapes else ""))

    # (numel_nominal, dtype, shape, size label, ops)
    configs, diffusion_configs = [], []
    if flat_ops:
        flat = [(n, dt) for n in args.sizes for dt in args.dtypes]
        flat += [(n, torch.bfloat16) for n in args.bf16_sizes if (n, torch.bfloat16) not in flat]
        configs = [(n, dt, shape_for(n, args.dim), size_label(n), flat_ops) for n, dt in flat]
        # Largest first, so that --max-seconds drops the small, latency-bound sizes first.
        configs.sort(key=lambda c: (-c[0], c[1] != torch.float32))
    if diffusion_ops:
        # In --diffusion-shapes order (the shape first), then the bfloat16 extras;
        # before the flat sizes when a diffusion op comes first in --ops.
        img = [(s, dt) for s in args.diffusion_shapes for dt in args.dtypes]
        img += [(s, torch.bfloat16) for s in args.diffusion_bf16_shapes if (s, torch.bfloat16) not in img]
        diffusion_configs = [(math.prod(s), dt, s, shape_label(s), diffusion_ops) for s, dt in img]
    configs = diffusion_configs + configs if args.ops[0] in DIFFUSION_OPS else configs + diffusion_configs
    results, errors, warnings, skipped = [], [], [], []
    for numel_nominal, dtype, shape, size_lbl, ops in configs:
        numel = math.prod(shape)
        for op, var, mode in planned(args, numel_nominal, ops):
            label = f"{variant_label(op, **var)}/{mode}/{size_lbl}/{str(dtype).replace('torch.', '')}"
            if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
                skipped.append(label)
                continue
            direction, bins = var.get("direction"), var.get("bins")
            nbytes = bytes_moved(op, mode, shape[0], numel, dtype.itemsize, **var)
            grad = mode != "forward"

            def input_set(s: int) -> tuple:
                inputs = make_inputs(shape, dtype, device, requires_grad=grad, seed=2 * s, op=op, bins=bins)
                return inputs, (make_grads(op, inputs[0], seed=2 * s + 1) if grad else None)

            sets = [input_set(0)]
            set_bytes = sum(t.numel() for t in sets[0][0]) * dtype.itemsize + (nbytes if grad else 0)
            n_sets = n_input_sets(set_bytes, l2)
            sets += [input_set(s) for s in range(1, n_sets)]
            rows = []
            for provider in providers:
                rec = {"op": op, **var, "mode": mode, "provider": provider, "numel": numel,
                       "numel_nominal": numel_nominal, "size": size_lbl, "shape": list(shape),
                       "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "input_sets": n_sets}
                try:
                    f = provider_fn(provider, op, direction=direction,
                                    compile_dynamic=None if args.compile_dynamic else False)
                    if not args.no_check:
                        inputs, g = sets[0]
                        if err := sanity(op, mode, f, inputs, g, direction):
                            rec["check"] = err
                            if provider.startswith("pygen-"):
                                errors.append(f"{label} {provider}: check failed: {err}")
                            else:  # a broken baseline is torch's problem: flagged, not our error
                                warnings.append(f"{label} {provider}: check failed (time kept, flagged): {err}")
                    fn = build_bench_fn(op, mode, f, sets, device)
                    q = timer(fn)
                    rec.update(median_ms=q[0], q20_ms=q[1], q80_ms=q[2], gbps=nbytes / (q[0] * 1e-3) / 1e9)
                    rec["copy_fraction"] = rec["gbps"] / copy_bw["gbps"]
                    rec["peak_extra_bytes"] = peak_extra_bytes(fn, device)
                    del fn
                except Exception as e:  # record and go on: one broken provider must not hide the rest
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    errors.append(f"{label} {provider}: {rec['error']}")
                    traceback.print_exc(limit=3)
                rows.append(rec)
            del sets
            base = {r["provider"]: r.get("median_ms") for r in rows}
            for r in rows:
                for b in BASELINES:
                    ok = r.get("median_ms") and base.get(b)
                    r[f"speedup_vs_{b}"] = base[b] / r["median_ms"] if ok else None
            results.extend(rows)
            print(f"\n== {label}: shape {shape}, {nbytes / 1e6:.1f} MB minimum traffic, {n_sets} input set(s)")
            print(f"{'provider':<13}{'median ms':>11}{'q20':>9}{'q80':>9}{'GB/s':>9}{'copy':>7}"
                  f"{'peak MB':>9}{'vs eager':>10}{'vs compile':>11}")
            for r in rows:
                if "error" in r:
                    print(f"{r['provider']:<13} ERROR {r['error']}")
                    continue
                peak = r["peak_extra_bytes"]
                sp = [f"{r[f'speedup_vs_{b}']:.2f}x" if r[f"speedup_vs_{b}"] else "-" for b in BASELINES]
                print(f"{r['provider']:<13}{r['median_ms']:>11.4f}{r['q20_ms']:>9.4f}{r['q80_ms']:>9.4f}"
                      f"{r['gbps']:>9.1f}{r['copy_fraction']:>7.1%}"
                      f"{(peak / 1e6 if peak is not None else float('nan')):>9.1f}{sp[0]:>10}{sp[1]:>11}"
                      + (f"  CHECK: {r['check']}" if "check" in r else ""))
            if device == "cuda":
                torch.cuda.empty_cache()

    loops = scheduler_loops(args, device, timer, t_start, errors, warnings, skipped, unavailable)
    summary(results, providers)
    goals(results)
    loop_summary(loops)
    if unavailable:
        print(f"\nunavailable in this build, not run: {', '.join(f'{op} ({why})' for op, why in unavailable.items())}")
    if warnings:
        print(f"\n{len(warnings)} warning(s):\n  " + "\n  ".join(warnings))
    if skipped:
        print(f"\nskipped after --max-seconds={args.max_seconds}: {len(skipped)} configuration(s): {', '.join(skipped)}")
    if errors:
        print(f"\n{len(errors)} error(s):\n  " + "\n  ".join(errors))
    meta["elapsed_s"] = time.perf_counter() - t_start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"metadata": meta, "results": results, "scheduler_loops": loops, "errors": errors,
                       "warnings": warnings, "skipped": skipped, "unavailable": unavailable}, fh, indent=1)
        print(f"\nwrote {args.out} ({len(results)} records, {len(loops)} scheduler loops, {meta['elapsed_s']:.0f} s)")
    return 1 if errors else 0


def scheduler_loops(args, device: str, timer, t_start: float, errors: list, warnings: list, skipped: list,
                    unavailable: dict) -> list[dict]:
    """The scheduler-loop section: pygen vs diffusers, one record per scheduler/config/shape/impl."""
    if not args.schedulers:
        return []
    from bench_schedulers import (
        GOAL_SHAPE,
        GOAL_SPEEDUP,
        MODEL_OUTPUT,
        SEED,
        STEPS,
        STOCHASTIC,
        check_pair,
        configs_for,
        loop_inputs,
        make_schedulers,
        sampling_loop,
        scheduler_setup,
    )

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
        unavailable["diffusers"] = "not installed: scheduler loops of pygen timed alone"
        print("scheduler loops: diffusers is not installed, pygen's loops are timed alone")
    print(f"\nscheduler loops ({STEPS} steps, model excluded) of {args.schedulers}, configs {args.scheduler_configs}, "
          f"shapes {[shape_label(s) for s in args.scheduler_shapes]}, diffusers {diffusers_version}")
    out = []
    for shape in args.scheduler_shapes:
        mo, x_T = loop_inputs(shape, device)
        for name in args.schedulers:
            for config in (c for c in configs_for(name) if c in args.scheduler_configs):
                label = f"loop/{name}/{config}/{shape_label(shape)}"
                if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
                    skipped.append(label)
                    continue
                ctor, step = scheduler_setup(name, config)
                rows = []
                try:
                    scheds = make_schedulers(name, config)
                    chk = {} if args.no_check else check_pair(name, config, mo, x_T, make_schedulers(name, config))
                    for impl, sched in scheds.items():
                        rec = {"scheduler": name, "config": config, "ctor_kwargs": ctor, "step_kwargs": step,
                               "impl": impl, "provider": impl, "shape": list(shape), "numel": math.prod(shape),
                               "dtype": "float32", "steps": STEPS, "stochastic": name in STOCHASTIC,
                               "model_output": MODEL_OUTPUT, "max_rel_diff": chk.get("max_rel_diff"),
                               "noise_check": chk.get("noise_check"), "goal": [GOAL_SHAPE, GOAL_SPEEDUP],
                               "diffusers_version": diffusers_version}
                        if err := chk.get(impl):
                            rec["check"] = err
                            if impl == "pygen":
                                errors.append(f"{label} pygen: check failed: {err}")
                            else:
                                warnings.append(f"{label} {impl}: check failed (time kept, flagged): {err}")
                        if impl == "pygen" and err:  # a broken loop is not timed
                            rows.append(rec)
                            continue
                        gen = torch.Generator(device=device)
                        q = timer(lambda sched=sched, gen=gen: sampling_loop(sched, mo, x_T, gen, seed=SEED,
                                                                             step_kwargs=step))
                        rec.update(median_ms=q[0], q20_ms=q[1], q80_ms=q[2])
                        rows.append(rec)
                except Exception as e:  # record and go on
                    errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    traceback.print_exc(limit=3)
                by = {r["impl"]: r for r in rows}
                p, d = by.get("pygen", {}), by.get("diffusers", {})
                sp = d["median_ms"] / p["median_ms"] if p.get("median_ms") and d.get("median_ms") else None
                if p:
                    p["speedup_vs_diffusers"] = sp
                print(f"{label:<60} pygen {fmt_ms(p.get('median_ms')):>10} ms  diffusers {fmt_ms(d.get('median_ms')):>10} ms"
                      f"  {(f'{sp:.2f}x' if sp else '-'):>7}" + "".join(f"  CHECK {r['impl']}: {r['check']}"
                                                                       for r in rows if "check" in r))
                out.extend(rows)
        del mo, x_T
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def loop_summary(loops: list[dict]) -> None:
    """One line per scheduler/config/shape: both medians and diffusers / pygen."""
    if not loops:
        return
    print("\n== scheduler loops: median ms of a whole loop (! = failed its sanity check), speedup = diffusers / pygen")
    by: dict[str, dict[str, dict]] = {}
    for r in loops:
        by.setdefault(f"{r['scheduler']}/{r['config']}/{shape_label(r['shape'])}", {})[r["impl"]] = r
    width = max(50, *(len(k) + 1 for k in by))
    print(f"{'scheduler/config/shape':<{width}}{'pygen':>12}{'diffusers':>12}{'speedup':>9}")
    for key, rows in by.items():
        p, d = rows.get("pygen", {}), rows.get("diffusers", {})
        sp = p.get("speedup_vs_diffusers")
        print(f"{key:<{width}}{fmt_ms(p.get('median_ms')) + ('!' if 'check' in p else ''):>12}"
              f"{fmt_ms(d.get('median_ms')) + ('!' if 'check' in d else ''):>12}{(f'{sp:.2f}x' if sp else '-'):>9}")


def planned(args, numel_nominal: int, ops: list[str] | None = None) -> list[tuple[str, dict, str]]:
    """(op, variant, mode) to run at this size, in order: --ops order, then variants, then
    the modes of --modes the op has (a diffusion step: forward only)."""
    out = []
    for op in args.ops if ops is None else ops:
        for var in variants(op, args.bins):
            if op == "rq_spline" and numel_nominal * var["bins"] > args.spline_max_params:
                continue
            out.extend((op, var, mode) for mode in args.modes if mode in op_modes(op))
    return out


def summary(results: list[dict], providers: list[str]) -> None:
    """One line per configuration: each provider's median ms, the best pygen's copy fraction and speedups."""
    print("\n== summary: median ms per provider (! = failed its sanity check); best pygen provider's "
          "fraction of copy bandwidth and speedups")
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in results:
        var = {k: r[k] for k in ("direction", "bins") if r.get(k) is not None}
        key = f"{variant_label(r['op'], **var)}/{r['mode']}/{r.get('size') or size_label(r['numel_nominal'])}/{r['dtype']}"
        by_cfg.setdefault(key, {})[r["provider"]] = r
    width = max([50] + [len(k) + 1 for k in by_cfg])
    head = f"{'op/mode/size/dtype':<{width}}" + "".join(f"{p:>13}" for p in providers) + f"{'copy':>7}{'vs eager':>10}{'vs comp':>10}"
    print(head)

    def cell(r: dict) -> str:
        return fmt_ms(r.get("median_ms")) + ("!" if r.get("check") else "")

    for key, rows in by_cfg.items():
        line = f"{key:<{width}}" + "".join(f"{cell(rows.get(p, {})):>13}" for p in providers)
        mine = [r for p, r in rows.items() if p.startswith("pygen-") and r.get("median_ms")]
        if mine:
            best = min(mine, key=lambda r: r["median_ms"])
            se, sc = best.get("speedup_vs_eager"), best.get("speedup_vs_compile")
            line += f"{best['copy_fraction']:>7.1%}{(f'{se:.2f}x' if se else '-'):>10}{(f'{sc:.2f}x' if sc else '-'):>10}"
        print(line)


def goals(results: list[dict]) -> None:
    """The issue's goal for one DDIM step: the best pygen provider at >= 85% of copy bandwidth
    and >= 5x the eager chain (measured on an H100; printed for every device)."""
    best: dict[str, dict] = {}
    for r in results:
        if r["op"] in ("ddim_step", "ddim_step_prev", "ddim_step_eta1") and r["provider"].startswith("pygen-") \
                and r.get("median_ms"):
            key = f"{r['op']}/{r['size']}/{r['dtype']}"
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    if not best:
        return
    print(f"\n== goal (the issue, on an H100): a DDIM step at >= {GOALS['copy_fraction']:.0%} of copy bandwidth "
          f"and >= {GOALS['speedup_vs_eager']:.0f}x the eager chain")
    for key, r in best.items():
        cf, se, sc = r["copy_fraction"], r.get("speedup_vs_eager"), r.get("speedup_vs_compile")
        ok = cf >= GOALS["copy_fraction"] and se is not None and se >= GOALS["speedup_vs_eager"]
        print(f"{key:<40} {r['provider']:<13} copy {cf:6.1%}  vs eager {(f'{se:.2f}x' if se else '-'):>8}  "
              f"vs compile {(f'{sc:.2f}x' if sc else '-'):>8}  {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())

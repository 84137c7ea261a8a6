"""CPU benchmarks of pygen's Gaussian ops against the eager and torch.compile baselines.

    python -m pytest benchmarks/bench_gaussian.py --benchmark-columns=median,iqr,ops \
        --benchmark-group-by=group
    PYGEN_BENCH_QUICK=1 python -m pytest benchmarks/bench_gaussian.py --benchmark-disable -q

provider {pygen-cpp, eager, compile} x op {reparameterize, gaussian_kl, reparameterize_kl}
x mode {forward, forward_backward} x numel {1e4, 1e5, 1e6, 1e7}, shape (numel // 256, 256),
float32. Each group "<op>-<mode>-<numel>" holds the providers side by side. extra_info has
the minimum bytes moved, the GB/s from the median and its fraction of the session's copy
bandwidth (conftest.py). See README.md for the definitions.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import pygen  # noqa: E402
from _common import (  # noqa: E402
    bytes_moved,
    check_grads,
    check_outputs,
    make_grads,
    make_inputs,
    provider_fn,
    shape_for,
)
from _common import CPU_SIZES as ALL_SIZES  # noqa: E402

DTYPE = torch.float32
MAX_ROUNDS = 100_000


def _rounds(target, setup, max_time: float, min_rounds: int) -> int:
    """Rounds that fill about ``max_time`` seconds (after the warm-up calls already made)."""
    best = math.inf
    for _ in range(2):
        if setup is not None:
            setup()
        t = time.perf_counter()
        target()
        best = min(best, time.perf_counter() - t)
    return int(min(MAX_ROUNDS, max(min_rounds, math.ceil(max_time / max(best, 1e-9)))))


def test_gaussian(benchmark, pytestconfig, copy_bandwidth, bench_record, op, mode, size, provider):
    if provider.startswith("pygen-") and provider[len("pygen-"):] not in pygen.available_backends():
        pytest.skip(f"backend {provider[len('pygen-'):]} is not available here: {pygen.available_backends()}")
    numel_nominal = ALL_SIZES[size]
    shape = shape_for(numel_nominal)
    numel = shape[0] * shape[1]
    backward = mode == "forward_backward"
    fn = provider_fn(provider, op)
    mu, logvar = make_inputs(shape, DTYPE, "cpu", requires_grad=backward)

    # Warm-up outside the timing (this is where torch.compile compiles), with a sanity check.
    outs = fn(mu, logvar)
    err = check_outputs(op, outs, mu, logvar)
    assert err is None, f"{provider} {op}: {err}"
    if backward:
        grads = make_grads(op, mu)

        def target():
            torch.autograd.backward(fn(mu, logvar), grads)

        def setup():  # what optimizer.zero_grad(set_to_none=True) does between steps
            mu.grad = None
            logvar.grad = None

        setup()
        torch.autograd.backward(outs, grads)
        err = check_grads(op, mu, logvar, grads, (mu.grad, logvar.grad))
        assert err is None, f"{provider} {op} backward: {err}"
        setup()
    else:

        def target():
            return fn(mu, logvar)

        setup = None
    del outs

    nbytes = bytes_moved(op, mode, shape[0], numel, DTYPE.itemsize)
    benchmark.group = f"{op}-{mode}-{size}"
    benchmark.extra_info.update(
        op=op, mode=mode, provider=provider, numel=numel, shape=list(shape), dtype=str(DTYPE).replace("torch.", ""),
        bytes=nbytes, threads=torch.get_num_threads(), copy_gbps=copy_bandwidth["gbps"],
    )
    if benchmark.disabled:
        benchmark.pedantic(target, setup=setup, rounds=1, iterations=1)
        return
    rounds = _rounds(target, setup, float(pytestconfig.getoption("benchmark_max_time")),
                     int(pytestconfig.getoption("benchmark_min_rounds")))
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)

    median = benchmark.stats.stats.median
    gbps = nbytes / median / 1e9
    benchmark.extra_info.update(rounds=rounds, gbps=gbps, copy_fraction=gbps / copy_bandwidth["gbps"])
    bench_record({"group": benchmark.group, "provider": provider, "median_s": median, "gbps": gbps,
                  "copy_fraction": gbps / copy_bandwidth["gbps"]})

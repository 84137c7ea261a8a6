"""CPU benchmarks of pygen's coupling ops against the torch reference chain and torch.compile of it.

    python -m pytest benchmarks/bench_coupling.py --benchmark-columns=median,iqr,ops \
        --benchmark-group-by=group
    PYGEN_BENCH_QUICK=1 python -m pytest benchmarks/bench_coupling.py --benchmark-disable -q

provider {pygen-cpp, eager, compile} x op {affine_coupling, rq_spline} x direction
{forward, inverse} (x K {8, 16} bins for rq_spline) x mode {forward, forward_backward}
x numel {1e4, 1e5, 1e6, 1e7}, x of shape (numel // 256, 256), float32, spline parameters
(..., K) and (..., K-1). Each group "<op>-<direction>[-K<bins>]-<mode>-<numel>" holds the
providers side by side.

- pygen-cpp: ``pygen.ops.affine_coupling`` / ``rq_spline`` with ``backend="cpp"``.
- eager: ``pygen.ops.affine_coupling_ref`` / ``rq_spline_ref``, which are the chains users
  write (exp, multiply-add, per-sample sum; softmax, cumsum, searchsorted, gather, ...).
- compile: ``torch.compile`` of the same reference, static shapes.

extra_info has the minimum bytes moved (_common.bytes_moved: affine 4N + B forward, spline
N(3K + 1) + B forward), the GB/s from the median and its fraction of the session's copy
bandwidth. The benchmark itself is conftest.py's ``run_benchmark``.

The torch reference of the spline at 1e7 elements is skipped (``skip_reason``; run it with
--bench-heavy / PYGEN_BENCH_HEAVY=1): 10x its 1e6 figures on the 2-core VM are 5-13 s per
forward+backward call (first call 30-45 s) and 7-10 GB of temporaries beyond its inputs,
so its 16 benchmarks would take roughly 10 minutes and half of the VM's 23 GB.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from _common import COUPLING_OPS, CPU_SIZES  # noqa: E402

BENCH_OPS = COUPLING_OPS  # conftest.pytest_generate_tests: op x direction (x bins) x mode x size x provider


def skip_reason(op: str, mode: str, size: str, provider: str, direction: str | None = None,
                bins: int | None = None) -> str | None:
    """Why a combination is too heavy for a small machine (None: run it)."""
    if op == "rq_spline" and CPU_SIZES[size] >= 10**7 and provider in ("eager", "compile"):
        return ("rq_spline's torch reference at 1e7 elements: 5-13 s per forward+backward call and "
                "7-10 GB of temporaries on a 2-core VM (10x its 1e6 figures); --bench-heavy runs it")
    return None


def test_coupling(run_benchmark, op, direction, bins, mode, size, provider):
    run_benchmark(op, mode, size, provider, direction=direction, bins=bins)

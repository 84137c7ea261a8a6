"""CPU benchmarks of pygen's Gaussian ops against the eager and torch.compile baselines.

    python -m pytest benchmarks/bench_gaussian.py --benchmark-columns=median,iqr,ops \
        --benchmark-group-by=group
    PYGEN_BENCH_QUICK=1 python -m pytest benchmarks/bench_gaussian.py --benchmark-disable -q

provider {pygen-cpp, eager, compile} x op {reparameterize, gaussian_kl, reparameterize_kl}
x mode {forward, forward_backward} x numel {1e4, 1e5, 1e6, 1e7}, shape (numel // 256, 256),
float32. Each group "<op>-<mode>-<numel>" holds the providers side by side. extra_info has
the minimum bytes moved, the GB/s from the median and its fraction of the session's copy
bandwidth. The parametrization and the benchmark itself (warm-up, sanity checks, rounds)
are conftest.py's, shared with bench_coupling.py. See README.md for the definitions.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

from _common import GAUSSIAN_OPS  # noqa: E402

BENCH_OPS = GAUSSIAN_OPS  # conftest.pytest_generate_tests: op x mode x size x provider


def test_gaussian(run_benchmark, op, mode, size, provider):
    run_benchmark(op, mode, size, provider)

"""CPU benchmarks of the two regressions issue 22 found, side by side so that they show again:

- ``randn``: ``pygen.ops.randn`` (broadcast zeros through the flat elementwise path) vs
  torch's in-place ``normal_`` and ``torch.randn``, and pygen's ``reparameterize`` on
  contiguous inputs (what randn must at least match); shapes (N,) and (N / 256, 256).
- ``double-backward-aliased``: the first derivative with ``create_graph=True`` of
  ``affine_coupling(x, shift, log_scale=x)`` (one tensor as two inputs), cpp vs the torch
  reference; each round checks the value against the reference (it was 2x).

    python -m pytest benchmarks/bench_noise.py --benchmark-group-by=group --benchmark-columns=median,iqr
    PYGEN_BENCH_QUICK=1 python -m pytest benchmarks/bench_noise.py --benchmark-disable -q

(DDIM's default loop, the third, is in bench_schedulers.py at 64x4x32x32 and 16x3x64x64.)
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import pygen  # noqa: E402
from pygen.ops import affine_coupling, randn, reparameterize  # noqa: E402

QUICK = os.environ.get("PYGEN_BENCH_QUICK") == "1"
SIZES = (1 << 16,) if QUICK else (1 << 20, 1 << 23)
RANDN = ("pygen-randn", "torch-normal_", "torch-randn", "pygen-reparameterize-contiguous")


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", RANDN)
def test_randn(benchmark, impl, size, layout):
    shape = (size,) if layout == "flat" else (size // 256, 256)
    if impl == "pygen-randn":
        fn = lambda: randn(*shape, seed=1)  # noqa: E731
    elif impl == "torch-normal_":
        buf = torch.empty(shape)
        fn = buf.normal_
    elif impl == "torch-randn":
        fn = lambda: torch.randn(shape)  # noqa: E731
    else:
        zeros = torch.zeros(shape)
        fn = lambda: reparameterize(zeros, zeros, seed=1, backend="cpp")  # noqa: E731
    benchmark.group = f"randn-{layout}-{size}"
    benchmark.extra_info.update(provider=impl, shape=list(shape), threads=torch.get_num_threads(),
                                bytes=4 * size, pygen_version=pygen.__version__)
    out = benchmark(fn)
    assert out.shape == shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_double_backward_aliased(benchmark, backend):
    n = 1 << 12 if QUICK else 1 << 18
    x0 = torch.randn(n // 64, 64, dtype=torch.float64) * 0.5

    def first_derivative(b: str) -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        y, ld = affine_coupling(x, x * 0.5, x, backend=b)
        (g,) = torch.autograd.grad(y.sum() + ld.sum(), x, create_graph=True)
        return g

    want = first_derivative("torch").detach()
    benchmark.group = f"double-backward-aliased-{n}"
    benchmark.extra_info.update(provider=backend, numel=n)
    got = benchmark(lambda: first_derivative(backend))
    torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-9)

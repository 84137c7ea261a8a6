#!/usr/bin/env python
"""Every Gaussian op, forward and backward, once per CUDA backend, on odd shapes.

Meant to run under compute-sanitizer (benchmarks/gpu_check.sh does):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/sanitize_smoke.py

(without the caching allocator every tensor is its own allocation, so an out-of-bounds
access is reported instead of landing in a neighbour inside a cached block). The shapes are
small and ragged (3 x 37, 2 x 5000, ...) so that tails, single-element rows and rows longer
than one block are all exercised. Exits 0 and prints "ok" when everything ran.
"""

from __future__ import annotations

import argparse
import sys

import torch

import pygen

SHAPES = [(3, 37), (2, 5000), (1, 1), (5, 3, 7), (7, 1)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def run_once(backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def leaf(*s, scale=0.5, shift=0.0):
        return (scale * torch.randn(s, generator=g, device="cuda") + shift).to(dtype).requires_grad_(True)

    mu, lv = leaf(*shape), leaf(*shape, shift=-0.5)
    pm, pl = leaf(*shape[1:]), leaf(shape[0], *shape[1:])  # a learned (D...) prior mean, a per-sample prior
    ops = pygen.ops
    z = ops.reparameterize(mu, lv, backend=backend, seed=1, offset=3)
    kl = ops.gaussian_kl(mu, lv, backend=backend)
    klp = ops.gaussian_kl(mu, lv, pm, pl, backend=backend)
    z2, kl2 = ops.reparameterize_kl(mu, lv, backend=backend, seed=2)
    outs = [z, kl, klp, z2, kl2]
    grads = [torch.randn(o.shape, generator=g, device="cuda").to(dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    # reparameterize_kl with only one of its outputs used (the other gradient is None)
    z3, kl3 = ops.reparameterize_kl(mu, lv, backend=backend, seed=3)
    torch.autograd.backward([z3], [grads[0]])
    z4, kl4 = ops.reparameterize_kl(mu, lv, backend=backend, seed=4)
    torch.autograd.backward([kl4], [grads[1]])
    torch.cuda.synchronize()
    for name, t in (("mu.grad", mu.grad), ("logvar.grad", lv.grad), ("prior_mu.grad", pm.grad),
                    ("prior_logvar.grad", pl.grad)):
        if t is None or not torch.isfinite(t.float()).all():
            raise AssertionError(f"{backend} {dtype} {shape}: {name} is missing or not finite")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda,triton", help="comma list; unavailable ones are skipped")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list from {','.join(DTYPES)}")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    avail = pygen.available_backends()
    backends = [b for b in args.backends.split(",") if b in avail]
    if not backends:
        print(f"none of {args.backends} is available (available: {avail})", file=sys.stderr)
        return 2
    n = 0
    for backend in backends:
        for dname in args.dtypes.split(","):
            for shape in SHAPES:
                run_once(backend, DTYPES[dname], shape)
                n += 1
    print(f"ok: {n} runs, backends {backends}, dtypes {args.dtypes}, shapes {SHAPES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

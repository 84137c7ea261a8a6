#!/usr/bin/env python
"""Every op, forward and backward, once per CUDA backend, on odd shapes.

Meant to run under compute-sanitizer (benchmarks/gpu_check.sh does):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/sanitize_smoke.py

(without the caching allocator every tensor is its own allocation, so an out-of-bounds
access is reported instead of landing in a neighbour inside a cached block). The shapes are
small and ragged (3 x 37, 2 x 5000, ...) so that tails, single-element rows and rows longer
than one block are all exercised. The Gaussian ops, then the coupling ops in both
directions: affine_coupling plain and with a soft clamp and a broadcast mask (the
grad_shift-writing path), rq_spline with K = 5 and x spread over the tails; then the
diffusion steps (DDIM, DDPM, Euler with churn, Euler-ancestral, DPM-Solver++ 2M, with and
without x0, per-sample timesteps including the first and last) and the training ops
forward + backward (``--ops`` picks groups). Exits 0 and prints "ok" when everything ran.

``--device cpu --backends cpp --dtypes float32`` runs the same calls on the CPU: a check of
the script itself, not of the CUDA kernels.
"""

from __future__ import annotations

import argparse
import sys

import torch

import pygen

SHAPES = [(3, 37), (2, 5000), (1, 1), (5, 3, 7), (7, 1)]
SPLINE_BINS = 5  # odd, and not a power of two
GROUPS = ("gaussian", "coupling", "diffusion")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def run_once(backend: str, dtype: torch.dtype, shape: tuple[int, ...], groups=GROUPS, device: str = "cuda") -> None:
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*s, scale=0.5, shift=0.0):
        return (scale * torch.randn(s, generator=g, device=device) + shift).to(dtype).requires_grad_(True)

    if "gaussian" in groups:
        run_gaussian(backend, dtype, shape, leaf, g, device)
    if "coupling" in groups:
        run_coupling(backend, dtype, shape, leaf, g, device)
    if "diffusion" in groups:
        run_diffusion(backend, dtype, shape, leaf, g, device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_gaussian(backend: str, dtype: torch.dtype, shape: tuple[int, ...], leaf, g, device: str) -> None:
    """reparameterize, gaussian_kl (with and without a prior), reparameterize_kl; forward + backward."""

    mu, lv = leaf(*shape), leaf(*shape, shift=-0.5)
    pm, pl = leaf(*shape[1:]), leaf(shape[0], *shape[1:])  # a learned (D...) prior mean, a per-sample prior
    ops = pygen.ops
    z = ops.reparameterize(mu, lv, backend=backend, seed=1, offset=3)
    kl = ops.gaussian_kl(mu, lv, backend=backend)
    klp = ops.gaussian_kl(mu, lv, pm, pl, backend=backend)
    z2, kl2 = ops.reparameterize_kl(mu, lv, backend=backend, seed=2)
    outs = [z, kl, klp, z2, kl2]
    grads = [torch.randn(o.shape, generator=g, device=device).to(dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    # reparameterize_kl with only one of its outputs used (the other gradient is None)
    z3, kl3 = ops.reparameterize_kl(mu, lv, backend=backend, seed=3)
    torch.autograd.backward([z3], [grads[0]])
    z4, kl4 = ops.reparameterize_kl(mu, lv, backend=backend, seed=4)
    torch.autograd.backward([kl4], [grads[1]])
    sync(device)
    for name, t in (("mu.grad", mu.grad), ("logvar.grad", lv.grad), ("prior_mu.grad", pm.grad),
                    ("prior_logvar.grad", pl.grad)):
        if t is None or not torch.isfinite(t.float()).all():
            raise AssertionError(f"{backend} {dtype} {shape}: {name} is missing or not finite")


def run_coupling(backend: str, dtype: torch.dtype, shape: tuple[int, ...], leaf, g, device: str) -> None:
    """affine_coupling and rq_spline, forward + backward, both directions."""
    ops = pygen.ops
    k = SPLINE_BINS
    for inverse in (False, True):
        x, t, s = leaf(*shape, scale=1.0), leaf(*shape), leaf(*shape)
        outs = list(ops.affine_coupling(x, t, s, inverse=inverse, backend=backend))
        # soft clamp and a mask broadcast over the batch: the path that writes grad_shift
        mask = (torch.arange(shape[-1], device=device) % 2).to(dtype).expand(shape[1:])
        outs += ops.affine_coupling(x, t, s, inverse=inverse, soft_clamp=2.0, mask=mask, backend=backend)
        xs = leaf(*shape, scale=2.0)  # about 13% of it beyond the tail bound 3
        w, h, d = leaf(*shape, k, scale=1.0), leaf(*shape, k, scale=1.0), leaf(*shape, k - 1, scale=1.0)
        outs += ops.rq_spline(xs, w, h, d, inverse=inverse, backend=backend)
        grads = [torch.randn(o.shape, generator=g, device=device).to(dtype) for o in outs]
        torch.autograd.backward(outs, grads)
        sync(device)
        for name, leaf_t in (("x", x), ("shift", t), ("log_scale", s), ("spline x", xs), ("widths", w),
                             ("heights", h), ("derivatives", d)):
            if leaf_t.grad is None or not torch.isfinite(leaf_t.grad.float()).all():
                raise AssertionError(f"{backend} {dtype} {shape} inverse={inverse}: {name}.grad is missing or not finite")


def run_diffusion(backend: str, dtype: torch.dtype, shape: tuple[int, ...], leaf, g, device: str) -> None:
    """Every sampler step (with and without x0, given and in-kernel noise) and the training ops."""
    ops = pygen.ops
    b = shape[0]
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
    sigmas = torch.cat([((1 - ac) / ac).sqrt().flip(0)[::100], ac.new_zeros(1)])  # 11 entries, last 0
    mo, x = leaf(*shape).detach(), leaf(*shape).detach()
    t = torch.randint(0, 1000, (b,), generator=g, device=device)
    t[0] = 0  # the last step
    prev_t = torch.where(t >= 100, t - 100, torch.full_like(t, -1))
    idx = torch.randint(0, len(sigmas) - 1, (b,), generator=g, device=device)
    idx[-1] = len(sigmas) - 2  # sigma_next = 0
    noise = leaf(*shape).detach()
    outs = []
    for return_x0 in (True, False):
        outs += ops.ddim_step(mo, x, t, ac, prev_t, eta=0.5, clip_sample=True, backend=backend, seed=1,
                              return_x0=return_x0)
        outs += ops.ddim_step(mo, x, t, ac, prev_t, eta=1.0, noise=noise, backend=backend, return_x0=return_x0)
        outs += ops.ddpm_step(mo, x, t, ac, prev_t, prediction_type="v_prediction", backend=backend, seed=2,
                              return_x0=return_x0)
        outs += ops.euler_step(mo, x, sigmas, idx, gamma=0.3, s_tmax=5.0, backend=backend, seed=3, return_x0=return_x0)
        outs += ops.euler_ancestral_step(mo, x, sigmas, idx, backend=backend, seed=4, return_x0=return_x0)
        outs += ops.euler_ancestral_step(mo, x, sigmas, idx, noise=noise, backend=backend, return_x0=return_x0)
    for solver in ("midpoint", "heun"):
        outs += ops.dpmpp_2m_step(mo, x, sigmas, idx, None, solver_type=solver, backend=backend)
        outs += ops.dpmpp_2m_step(mo, x, sigmas, idx, noise, solver_type=solver, backend=backend)
    mo_l, x0_l = leaf(*shape), leaf(*shape)
    x_t = ops.q_sample(x0_l, t, ac, seed=5, backend=backend)
    loss = ops.diffusion_mse(mo_l, x0_l, t, ac, seed=5, prediction_type="v_prediction", snr_gamma=5.0,
                             backend=backend)
    torch.autograd.backward([x_t, loss], [torch.ones_like(x_t), torch.ones_like(loss)])
    sync(device)
    for o in outs:
        if o is not None and not torch.isfinite(o.float()).all():
            raise AssertionError(f"{backend} {dtype} {shape}: a diffusion step output is not finite")
    for name, t_ in (("model_output", mo_l), ("x0", x0_l)):
        if t_.grad is None or not torch.isfinite(t_.grad.float()).all():
            raise AssertionError(f"{backend} {dtype} {shape}: {name}.grad is missing or not finite")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda,triton", help="comma list; unavailable ones are skipped")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma list from {','.join(DTYPES)}")
    p.add_argument("--ops", default=",".join(GROUPS), help=f"comma list from {','.join(GROUPS)} (default all)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu (with --backends cpp) checks the script itself")
    args = p.parse_args(argv)
    groups = [x for x in args.ops.split(",") if x]
    if bad := [x for x in groups if x not in GROUPS]:
        p.error(f"--ops: unknown {bad}; choose from {GROUPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
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
                run_once(backend, DTYPES[dname], shape, groups, args.device)
                n += 1
    print(f"ok: {n} runs, ops {groups}, backends {backends}, dtypes {args.dtypes}, shapes {SHAPES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the CPU suite (bench_gaussian.py) and the GPU script (gpu_bench.py).

- ``provider_fn``: the callable each provider runs ("pygen-<backend>", "eager", "compile").
- ``bytes_moved``: the minimum bytes an op must move (the bandwidth floor's numerator).
- ``make_inputs`` / ``make_grads``: (B, D) inputs and fixed, non-unit output gradients.
- ``check_outputs``: a cheap sanity check against pygen's references, outside any timing.
- ``cpu_bench``: a perf_counter timer with ``triton.testing.do_bench``'s interface.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import pygen
from _baselines import EAGER, compiled

OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl")
CPU_SIZES = {"1e4": 10**4, "1e5": 10**5, "1e6": 10**6, "1e7": 10**7}  # label -> nominal numel
D = 256  # elements per sample; B = numel // D
MB = 1 << 20


# ---- what each provider runs --------------------------------------------------------------


def provider_fn(provider: str, op: str, *, compile_dynamic: bool | None = False) -> Callable[[Tensor, Tensor], tuple]:
    """A callable (mu, logvar) -> tuple of outputs ((z,), (kl,) or (z, kl))."""
    if provider.startswith("pygen-"):
        f = functools.partial(getattr(pygen.ops, op), backend=provider[len("pygen-"):])
    elif provider == "eager":
        f = EAGER[op]
    elif provider == "compile":
        f = compiled(op, dynamic=compile_dynamic)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if op == "reparameterize_kl":
        return f

    def one(mu: Tensor, logvar: Tensor) -> tuple:
        return (f(mu, logvar),)

    return one


# ---- the bandwidth floor -------------------------------------------------------------------


def bytes_moved(op: str, mode: str, batch: int, numel: int, itemsize: int) -> int:
    """Bytes an ideal implementation must move: each input read once, each output written once.

    forward:  reparameterize     mu, logvar -> z                        3N
              gaussian_kl        mu, logvar -> kl (B,)                  2N + B
              reparameterize_kl  mu, logvar -> z, kl                    3N + B
    backward: reparameterize     grad_z, logvar -> grad_logvar          3N  (grad_mu aliases grad_z)
              gaussian_kl        mu, logvar, grad_kl -> grad_mu, grad_logvar          4N + B
              reparameterize_kl  grad_z, mu, logvar, grad_kl -> grad_mu, grad_logvar  5N + B
    forward_backward = forward + backward. The 8-byte seed is ignored; eps is generated
    in-kernel by pygen, so it is no traffic in the floor (the eager chain writes and reads it).
    """
    n, b = numel, batch
    fwd = {"reparameterize": 3 * n, "gaussian_kl": 2 * n + b, "reparameterize_kl": 3 * n + b}[op]
    bwd = {"reparameterize": 3 * n, "gaussian_kl": 4 * n + b, "reparameterize_kl": 5 * n + b}[op]
    elements = {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}[mode]
    return elements * itemsize


# ---- inputs -------------------------------------------------------------------------------


def shape_for(numel: int, d: int = D) -> tuple[int, int]:
    return (max(1, numel // d), d)


def make_inputs(
    shape: Sequence[int], dtype: torch.dtype, device: str | torch.device, *, requires_grad: bool, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """mu ~ N(0, 1/4) and logvar ~ N(-1/2, 1/4): the moderate values of a trained encoder."""
    g = torch.Generator(device=device).manual_seed(seed)
    mu = (0.5 * torch.randn(shape, generator=g, device=device)).to(dtype)
    logvar = (0.5 * torch.randn(shape, generator=g, device=device) - 0.5).to(dtype)
    return mu.requires_grad_(requires_grad), logvar.requires_grad_(requires_grad)


def make_grads(op: str, mu: Tensor, seed: int = 1) -> tuple[Tensor, ...]:
    """Fixed output gradients (not ones, so a kernel that ignores grad_output shows)."""
    g = torch.Generator(device=mu.device).manual_seed(seed)
    gz = torch.randn(mu.shape, generator=g, device=mu.device).to(mu.dtype)
    gkl = torch.randn(mu.shape[:1], generator=g, device=mu.device).to(mu.dtype)
    return {"reparameterize": (gz,), "gaussian_kl": (gkl,), "reparameterize_kl": (gz, gkl)}[op]


# ---- sanity check (never timed) -------------------------------------------------------------


def check_outputs(op: str, outs: tuple, mu: Tensor, logvar: Tensor) -> str | None:
    """None when ``outs`` look right for ``op`` on (mu, logvar), else what is wrong.

    KL is compared with ``pygen.ops.gaussian_kl_ref``; z (random) only for shape, dtype and
    finiteness, and that its noise has roughly unit scale.
    """
    with torch.no_grad():
        mu_d, lv_d = mu.detach(), logvar.detach()
        expect = {"reparameterize": 1, "gaussian_kl": 1, "reparameterize_kl": 2}[op]
        if len(outs) != expect:
            return f"expected {expect} outputs, got {len(outs)}"
        if op in ("reparameterize", "reparameterize_kl"):
            z = outs[0]
            if z.shape != mu.shape or z.dtype != mu.dtype:
                return f"z has shape {tuple(z.shape)} / {z.dtype}, expected {tuple(mu.shape)} / {mu.dtype}"
            if not torch.isfinite(z).all():
                return "z has non-finite values"
            # (z - mu) / sigma must look like N(0, 1): check its spread, not its formula.
            noise = (z.float() - mu_d.float()) / torch.exp(0.5 * lv_d.float())
            std = noise.std().item() if noise.numel() > 1 else 1.0
            if noise.numel() >= 1000 and not 0.9 < std < 1.1:
                return f"the noise in z has std {std:.3f}, expected about 1"
        if op in ("gaussian_kl", "reparameterize_kl"):
            kl = outs[-1]
            ref = pygen.ops.gaussian_kl_ref(mu_d.float(), lv_d.float())
            if kl.shape != ref.shape:
                return f"kl has shape {tuple(kl.shape)}, expected {tuple(ref.shape)}"
            low = mu.dtype in (torch.float16, torch.bfloat16)
            rtol = 3e-2 if low else 1e-4
            atol = (3e-2 if low else 1e-4) * mu.shape[-1]
            if not torch.allclose(kl.float(), ref, rtol=rtol, atol=atol):
                err = (kl.float() - ref).abs().max().item()
                return f"kl differs from gaussian_kl_ref by up to {err:.3g}"
    return None


def check_grads(op: str, mu: Tensor, logvar: Tensor, out_grads: Sequence[Tensor], grads: Sequence[Tensor | None]) -> str | None:
    """None when (grad_mu, grad_logvar) look right, else what is wrong.

    Deterministic parts are compared with autograd through pygen's references: the KL
    gradient (gaussian_kl_ref), and grad_mu = grad_z (+ dKL/dmu) for the samplers.
    grad_logvar of a sampler depends on the noise: only shape and finiteness are checked.
    """
    if len(grads) != 2 or any(g is None for g in grads):
        return "expected gradients for both mu and logvar"
    gmu, glv = grads
    for name, g in (("grad_mu", gmu), ("grad_logvar", glv)):
        if g.shape != mu.shape:
            return f"{name} has shape {tuple(g.shape)}, expected {tuple(mu.shape)}"
        if not torch.isfinite(g).all():
            return f"{name} has non-finite values"
    m = mu.detach().float().requires_grad_(True)
    lv = logvar.detach().float().requires_grad_(True)
    want_mu = want_lv = None
    if op in ("gaussian_kl", "reparameterize_kl"):
        kl_grads = torch.autograd.grad(pygen.ops.gaussian_kl_ref(m, lv), (m, lv), out_grads[-1].float())
        want_mu, want_lv = kl_grads
        if op == "reparameterize_kl":
            want_mu, want_lv = want_mu + out_grads[0].float(), None
    else:
        want_mu = out_grads[0].float()
    low = mu.dtype in (torch.float16, torch.bfloat16)
    tol = 3e-2 if low else 1e-5
    for name, got, want in (("grad_mu", gmu, want_mu), ("grad_logvar", glv, want_lv)):
        if want is not None and not torch.allclose(got.float(), want, rtol=tol, atol=tol):
            return f"{name} differs from autograd through the reference by up to {(got.float() - want).abs().max().item():.3g}"
    return None


# ---- timing helpers -----------------------------------------------------------------------


def cpu_bench(
    fn: Callable[[], object],
    warmup: float = 25,
    rep: float = 100,
    quantiles: Sequence[float] = (0.5, 0.2, 0.8),
    min_reps: int = 5,
) -> list[float]:
    """``triton.testing.do_bench`` for the CPU: time-based warmup/rep in ms, returns quantiles in ms."""
    fn()  # the first call may compile: not part of the estimate
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    estimate = max((time.perf_counter() - t0) / 3, 1e-7) * 1e3
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    times = []
    for _ in range(max(min_reps, int(rep / estimate))):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return quantile_list(times, quantiles)


def quantile_list(times: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    s = sorted(times)
    out = []
    for q in quantiles:
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def measure_cpu_copy_bandwidth(nbytes: int = 64 * MB, reps: int = 25) -> dict:
    """GB/s of ``dst.copy_(src)`` on float32 CPU tensors, counting bytes read + written."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    for _ in range(3):  # fault dst's pages in, warm the threads
        dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {
        "bytes": 2 * nbytes,
        "tensor_bytes": nbytes,
        "median_s": median,
        "gbps": 2 * nbytes / median / 1e9,  # the reference for copy_fraction
        "best_gbps": 2 * nbytes / min(times) / 1e9,
        "threads": torch.get_num_threads(),
    }

"""Shared by the CPU suites (bench_gaussian.py, bench_coupling.py) and the GPU script (gpu_bench.py).

- ``variants``: the settings of an op beyond (mode, size): direction, and K for the spline.
- ``provider_fn``: the callable each provider runs ("pygen-<backend>", "eager", "compile").
- ``bytes_moved``: the minimum bytes an op must move (the bandwidth floor's numerator).
- ``make_inputs`` / ``make_grads``: (B, D) inputs and fixed, non-unit output gradients.
- ``check_outputs`` / ``check_grads``: cheap sanity checks against pygen's references,
  outside any timing.
- ``cpu_bench``: a perf_counter timer with ``triton.testing.do_bench``'s interface.

Every helper takes the op's inputs as one tuple (``(mu, logvar)``, ``(x, shift, log_scale)``
or ``(x, widths, heights, derivatives)``) and returns outputs as a tuple.
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

GAUSSIAN_OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl")
COUPLING_OPS = ("affine_coupling", "rq_spline")
OPS = GAUSSIAN_OPS + COUPLING_OPS
DIRECTIONS = ("forward", "inverse")  # of the coupling ops (their ``inverse`` flag)
SPLINE_BINS = (8, 16)  # K, the spline's bins
CPU_SIZES = {"1e4": 10**4, "1e5": 10**5, "1e6": 10**6, "1e7": 10**7}  # label -> nominal numel
D = 256  # elements per sample; B = numel // D
MB = 1 << 20


# ---- ops and their settings ---------------------------------------------------------------


def variants(op: str, bins: Sequence[int] = SPLINE_BINS) -> list[dict]:
    """The settings an op is benchmarked with besides (mode, size), as keyword dicts.

    Gaussian ops: ``[{}]``. affine_coupling: ``direction`` in DIRECTIONS. rq_spline:
    ``direction`` x ``bins`` (K). ``direction`` is the op's ``inverse`` flag, spelled out.
    """
    if op in GAUSSIAN_OPS:
        return [{}]
    if op == "affine_coupling":
        return [{"direction": d} for d in DIRECTIONS]
    if op == "rq_spline":
        return [{"direction": d, "bins": k} for d in DIRECTIONS for k in bins]
    raise ValueError(f"unknown op {op!r}")


def variant_label(op: str, direction: str | None = None, bins: int | None = None) -> str:
    """'rq_spline-inverse-K8', 'affine_coupling-forward', 'gaussian_kl'."""
    return "-".join([op] + ([direction] if direction else []) + ([f"K{bins}"] if bins else []))


def _inverse(op: str, direction: str | None) -> bool:
    if direction not in (None, *DIRECTIONS):
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if op in GAUSSIAN_OPS and direction not in (None, "forward"):
        raise ValueError(f"{op} has no inverse")
    return direction == "inverse"


# ---- what each provider runs --------------------------------------------------------------


def provider_fn(
    provider: str, op: str, *, direction: str | None = None, compile_dynamic: bool | None = False
) -> Callable[..., tuple]:
    """A callable (*inputs) -> tuple of outputs: (z,), (kl,), (z, kl) or (y, logdet)."""
    opts = {"inverse": _inverse(op, direction)} if op in COUPLING_OPS else {}
    if provider.startswith("pygen-"):
        f = functools.partial(getattr(pygen.ops, op), backend=provider[len("pygen-"):], **opts)
    elif provider == "eager":
        f = functools.partial(EAGER[op], **opts) if opts else EAGER[op]
    elif provider == "compile":
        f = compiled(op, dynamic=compile_dynamic, **opts)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if op in ("reparameterize_kl", *COUPLING_OPS):
        return f

    def one(mu: Tensor, logvar: Tensor) -> tuple:
        return (f(mu, logvar),)

    return one


# ---- the bandwidth floor -------------------------------------------------------------------


def bytes_moved(
    op: str, mode: str, batch: int, numel: int, itemsize: int, *, direction: str | None = None, bins: int | None = None
) -> int:
    """Bytes an ideal implementation must move: each input read once, each output written once.

    N = numel of x (or mu), B = batch, K = bins; counts in elements, times ``itemsize``.

    forward:  reparameterize     mu, logvar -> z                        3N
              gaussian_kl        mu, logvar -> kl (B,)                  2N + B
              reparameterize_kl  mu, logvar -> z, kl                    3N + B
              affine_coupling    x, shift, log_scale -> y, logdet (B,)  4N + B  (either direction)
              rq_spline          x (N), widths, heights (2NK), derivatives (N(K-1))
                                 -> y (N), logdet (B)                   N(3K + 1) + B  (either direction)
    backward: reparameterize     grad_z, logvar -> grad_logvar          3N  (grad_mu aliases grad_z)
              gaussian_kl        mu, logvar, grad_kl -> grad_mu, grad_logvar          4N + B
              reparameterize_kl  grad_z, mu, logvar, grad_kl -> grad_mu, grad_logvar  5N + B
              affine_coupling, forward direction (y = x e^s + shift):
                                 grad_y, x, log_scale, grad_logdet -> grad_x, grad_log_scale
                                                                        5N + B
                  (grad_x = grad_y e^s, grad_log_scale = grad_y x e^s + grad_logdet: shift is
                  not needed, and grad_shift *is* grad_y, as for reparameterize)
              affine_coupling, inverse (y = (x - shift) e^-s):
                                 grad_y, x, shift, log_scale, grad_logdet
                                 -> grad_x, grad_shift, grad_log_scale  7N + B
                  (grad_shift = -grad_x is a tensor of its own: written, not aliased)
              rq_spline          grad_y (N), x (N), widths, heights, derivatives (N(3K-1)),
                                 grad_logdet (B) -> grad_x (N), grad_widths, grad_heights,
                                 grad_derivatives (N(3K-1))
                                 = 2N + N(3K-1) + B read + N + N(3K-1) written
                                 = N(6K + 1) + B  (either direction)
    forward_backward = forward + backward: affine 9N + 2B (inverse 11N + 2B), rq_spline
    N(9K + 2) + 2B. The 8-byte seed is ignored; eps is generated in-kernel by pygen, so it is
    no traffic in the floor (the eager chain writes and reads it). Knots, bin indices and
    the spline's other intermediates are recomputed in registers: no traffic either.
    """
    n, b = numel, batch
    inverse = _inverse(op, direction)
    if op == "rq_spline":
        if bins is None:
            raise ValueError("rq_spline needs bins (K)")
        k = bins
        fwd, bwd = n * (3 * k + 1) + b, n * (6 * k + 1) + b
    else:
        fwd = {"reparameterize": 3 * n, "gaussian_kl": 2 * n + b, "reparameterize_kl": 3 * n + b,
               "affine_coupling": 4 * n + b}[op]
        bwd = {"reparameterize": 3 * n, "gaussian_kl": 4 * n + b, "reparameterize_kl": 5 * n + b,
               "affine_coupling": (7 if inverse else 5) * n + b}[op]
    elements = {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}[mode]
    return elements * itemsize


# ---- inputs -------------------------------------------------------------------------------


def shape_for(numel: int, d: int = D) -> tuple[int, int]:
    return (max(1, numel // d), d)


def make_inputs(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    requires_grad: bool,
    seed: int = 0,
    op: str = "reparameterize",
    bins: int | None = None,
) -> tuple[Tensor, ...]:
    """The op's inputs, every one a leaf with ``requires_grad``.

    Gaussian ops: mu ~ N(0, 1/4) and logvar ~ N(-1/2, 1/4), the moderate values of a
    trained encoder. affine_coupling: x ~ N(0, 1), shift and log_scale ~ N(0, 1/4).
    rq_spline: x ~ N(0, 1) (0.3% of it in the linear tails beyond +-3), raw widths and
    heights (shape + (K,)) and derivatives (shape + (K-1,)) ~ N(0, 1), a conditioner's output.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(s, scale=1.0, shift=0.0):
        t = torch.randn(s, generator=g, device=device)
        if scale != 1.0:
            t = scale * t
        if shift != 0.0:
            t = t + shift
        return t.to(dtype).requires_grad_(requires_grad)

    shape = tuple(shape)
    if op in GAUSSIAN_OPS:
        return randn(shape, 0.5), randn(shape, 0.5, -0.5)
    if op == "affine_coupling":
        return randn(shape), randn(shape, 0.5), randn(shape, 0.5)
    if op == "rq_spline":
        if bins is None:
            raise ValueError("rq_spline needs bins (K)")
        return randn(shape), randn((*shape, bins)), randn((*shape, bins)), randn((*shape, bins - 1))
    raise ValueError(f"unknown op {op!r}")


def make_grads(op: str, x: Tensor, seed: int = 1) -> tuple[Tensor, ...]:
    """Fixed output gradients (not ones, so a kernel that ignores grad_output shows).

    ``x`` is the op's first input (mu or x): per-element outputs get its shape, per-sample
    ones (kl, logdet) its first dim.
    """
    g = torch.Generator(device=x.device).manual_seed(seed)
    gz = torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
    gkl = torch.randn(x.shape[:1], generator=g, device=x.device).to(x.dtype)
    return {"reparameterize": (gz,), "gaussian_kl": (gkl,), "reparameterize_kl": (gz, gkl),
            "affine_coupling": (gz, gkl), "rq_spline": (gz, gkl)}[op]


# ---- sanity check (never timed) -------------------------------------------------------------


CHECK_ROWS = 64  # coupling checks compare this many rows (samples) with a float64 reference


def check_outputs(op: str, outs: tuple, inputs: Sequence[Tensor], *, direction: str | None = None) -> str | None:
    """None when ``outs`` look right for ``op`` on ``inputs``, else what is wrong.

    KL is compared with ``pygen.ops.gaussian_kl_ref``; z (random) only for shape, dtype and
    finiteness, and that its noise has roughly unit scale. Coupling ops: y and logdet of
    the first CHECK_ROWS samples against the op's reference in float64.
    """
    if op in COUPLING_OPS:
        return _check_coupling(op, outs, inputs, direction)
    mu, logvar = inputs
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


def check_grads(
    op: str, inputs: Sequence[Tensor], out_grads: Sequence[Tensor], grads: Sequence[Tensor | None],
    *, direction: str | None = None,
) -> str | None:
    """None when the gradients of ``inputs`` look right, else what is wrong.

    Deterministic parts are compared with autograd through pygen's references: the KL
    gradient (gaussian_kl_ref), and grad_mu = grad_z (+ dKL/dmu) for the samplers.
    grad_logvar of a sampler depends on the noise: only shape and finiteness are checked.
    Coupling ops: every input's gradient, first CHECK_ROWS samples, against autograd
    through the op's reference in float64.
    """
    if len(grads) != len(inputs) or any(g is None for g in grads):
        return f"expected gradients for all {len(inputs)} inputs"
    for i, (g, t) in enumerate(zip(grads, inputs)):
        if g.shape != t.shape:
            return f"the gradient of input {i} has shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        if not torch.isfinite(g).all():
            return f"the gradient of input {i} has non-finite values"
    if op in COUPLING_OPS:
        return _check_coupling(op, None, inputs, direction, out_grads, grads)
    mu, logvar = inputs
    gmu, glv = grads
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


def _mostly_close(got: Tensor, want: Tensor, low: bool, scale: float = 1.0) -> str | None:
    """At most 1% of elements outside rtol/atol (1e-3 / 2e-4 * scale; 3e-2 in 16-bit).

    A float32 spline is ill-conditioned at rare near-degenerate bins (see
    tests/test_coupling.py::_close_spline); a wrong kernel fails most elements.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    rtol, atol = (3e-2, 3e-2 * scale) if low else (1e-3, 2e-4 * scale)
    bad = (got - want).abs() > rtol * want.abs() + atol
    if bad.double().mean().item() > 1e-2:
        return f"{int(bad.sum())} of {bad.numel()} elements off, up to {(got - want).abs().max().item():.3g}"
    return None


def _check_coupling(op, outs, inputs, direction, out_grads=None, grads=None) -> str | None:
    """Outputs (``outs``) or gradients (``grads``) of the first CHECK_ROWS samples vs float64."""
    ref_fn = {"affine_coupling": pygen.ops.affine_coupling_ref, "rq_spline": pygen.ops.rq_spline_ref}[op]
    x = inputs[0]
    rows = min(CHECK_ROWS, x.shape[0])
    low = x.dtype in (torch.float16, torch.bfloat16)
    sub = [t.detach()[:rows].double().requires_grad_(grads is not None) for t in inputs]
    want = ref_fn(*sub, inverse=_inverse(op, direction))
    per_sample = x[:rows].numel() // rows  # logdet is a sum of this many per-element terms
    if grads is None:
        if len(outs) != 2:
            return f"expected (y, logdet), got {len(outs)} outputs"
        y, logdet = outs
        if y.shape != x.shape or y.dtype != x.dtype or logdet.shape != x.shape[:1] or logdet.dtype != x.dtype:
            return (f"y, logdet have shapes {tuple(y.shape)}, {tuple(logdet.shape)} ({y.dtype}, {logdet.dtype}); "
                    f"expected {tuple(x.shape)}, {tuple(x.shape[:1])} ({x.dtype})")
        if not (torch.isfinite(y).all() and torch.isfinite(logdet).all()):
            return "y or logdet has non-finite values"
        for name, got, ref, scale in (("y", y[:rows], want[0], 1.0), ("logdet", logdet[:rows], want[1], per_sample)):
            if err := _mostly_close(got, ref, low, scale):
                return f"{name} differs from {ref_fn.__name__} (float64): {err}"
        return None
    want_grads = torch.autograd.grad(want, sub, [g[:rows].double() for g in out_grads])
    for i, (got, ref) in enumerate(zip(grads, want_grads)):
        if err := _mostly_close(got[:rows], ref, low):
            return f"the gradient of input {i} differs from autograd through {ref_fn.__name__} (float64): {err}"
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

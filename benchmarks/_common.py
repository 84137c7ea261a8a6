"""Shared by the CPU suites (bench_gaussian.py, bench_coupling.py, bench_diffusion.py) and the GPU script (gpu_bench.py).

- ``variants``: the settings of an op beyond (mode, size): direction, and K for the spline.
- ``provider_fn``: the callable each provider runs ("pygen-<backend>", "eager", "compile").
- ``bytes_moved``: the minimum bytes an op must move (the bandwidth floor's numerator).
- ``make_inputs`` / ``make_grads``: (B, D) inputs and fixed, non-unit output gradients.
- ``check_outputs`` / ``check_grads``: cheap sanity checks against pygen's references,
  outside any timing.
- ``cpu_bench``: a perf_counter timer with ``triton.testing.do_bench``'s interface.

Every helper takes the op's inputs as one tuple (``(mu, logvar)``, ``(x, shift, log_scale)``
or ``(x, widths, heights, derivatives)``; the diffusion ops' tuples are listed at
``make_inputs``) and returns outputs as a tuple. Backward passes differentiate
``diff_outputs(op, outs)`` with respect to ``grad_inputs(inputs)`` (every input of the
Gaussian and coupling ops; only model_output for the diffusion loss).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import pygen
from _baselines import EAGER, compiled

GAUSSIAN_OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl")
COUPLING_OPS = ("affine_coupling", "rq_spline")
# Diffusion: one sampler step each (forward only: sampling has no backward), and the
# training loss (q_sample + diffusion_mse, forward and backward w.r.t. model_output).
# ddim_step is eta = 0 (deterministic), ddim_step_eta1 eta = 1 (noise; DDPM's variance),
# ddim_step_prev eta = 0 returning prev_sample only (return_x0=False: x0 is not written).
DIFFUSION_STEP_OPS = ("ddim_step", "ddim_step_prev", "ddim_step_eta1", "ddpm_step", "euler_ancestral_step",
                      "dpmpp_2m_step")
DIFFUSION_OPS = ("ddim_step", "ddim_step_prev", "ddim_step_eta1", "ddpm_step", "diffusion_loss",
                 "euler_ancestral_step", "dpmpp_2m_step")
_ALPHA_STEPS = ("ddim_step", "ddim_step_prev", "ddim_step_eta1", "ddpm_step")  # inputs (mo, x, t, prev_t, table)
OPS = GAUSSIAN_OPS + COUPLING_OPS + DIFFUSION_OPS
# the pygen.ops functions each diffusion benchmark calls (the sigma-space ones land later)
DIFFUSION_FUSED = {"ddim_step": ("ddim_step",), "ddim_step_prev": ("ddim_step",), "ddim_step_eta1": ("ddim_step",), "ddpm_step": ("ddpm_step",),
                   "diffusion_loss": ("q_sample", "diffusion_mse"), "euler_ancestral_step": ("euler_ancestral_step",),
                   "dpmpp_2m_step": ("dpmpp_2m_step",)}
DIRECTIONS = ("forward", "inverse")  # of the coupling ops (their ``inverse`` flag)
SPLINE_BINS = (8, 16)  # K, the spline's bins
CPU_SIZES = {"1e4": 10**4, "1e5": 10**5, "1e6": 10**6, "1e7": 10**7}  # label -> nominal numel
# The diffusion ops run on image-shaped tensors (label -> shape): pixel-space 64x64 RGB at
# batch 256 (the size) and 16, and a latent-diffusion-like 4x32x32.
DIFFUSION_CPU_SHAPES = {"16x3x64x64": (16, 3, 64, 64), "64x4x32x32": (64, 4, 32, 32),
                        "256x3x64x64": (256, 3, 64, 64)}
DIFFUSION_QUICK_SHAPES = ("16x3x64x64",)
DIFFUSION_T = 1000  # training timesteps of the schedule (linear betas 1e-4 .. 2e-2)
DIFFUSION_STEPS = 50  # inference steps: t in {0, 20, ..., 980} ("leading" spacing)
D = 256  # elements per sample; B = numel // D
MB = 1 << 20


# ---- ops and their settings ---------------------------------------------------------------


def variants(op: str, bins: Sequence[int] = SPLINE_BINS) -> list[dict]:
    """The settings an op is benchmarked with besides (mode, size), as keyword dicts.

    Gaussian ops: ``[{}]``. affine_coupling: ``direction`` in DIRECTIONS. rq_spline:
    ``direction`` x ``bins`` (K). ``direction`` is the op's ``inverse`` flag, spelled out.
    """
    if op in GAUSSIAN_OPS or op in DIFFUSION_OPS:
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
    if (op in GAUSSIAN_OPS or op in DIFFUSION_OPS) and direction not in (None, "forward"):
        raise ValueError(f"{op} has no inverse")
    return direction == "inverse"


def op_modes(op: str) -> tuple[str, ...]:
    """The modes an op is benchmarked in: sampler steps have no backward (forward only)."""
    if op in DIFFUSION_STEP_OPS:
        return ("forward",)
    return ("forward", "backward", "forward_backward")


def fused_missing(op: str) -> str | None:
    """Why pygen's provider of ``op`` cannot run in this build (a pygen.ops function is missing), or None."""
    missing = [name for name in DIFFUSION_FUSED.get(op, ()) if not hasattr(pygen.ops, name)]
    return f"pygen.ops.{', '.join(missing)} not in this build of pygen" if missing else None


def grad_inputs(inputs: Sequence) -> list[Tensor]:
    """The inputs a backward differentiates: those with requires_grad (all of them, except
    for the diffusion loss, where it is model_output alone)."""
    return [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]


def diff_outputs(op: str, outs: tuple) -> tuple:
    """The outputs a backward starts from: all, except for the diffusion loss, where it is
    the loss alone (x_t does not depend on model_output, and x0 takes no gradient)."""
    return outs[1:] if op == "diffusion_loss" else outs


# ---- what each provider runs --------------------------------------------------------------


def provider_fn(
    provider: str, op: str, *, direction: str | None = None, compile_dynamic: bool | None = False
) -> Callable[..., tuple]:
    """A callable (*inputs) -> tuple of outputs: (z,), (kl,), (z, kl) or (y, logdet)."""
    opts = {"inverse": _inverse(op, direction)} if op in COUPLING_OPS else {}
    if provider.startswith("pygen-") and op in DIFFUSION_OPS:
        return fused_diffusion(op, provider[len("pygen-"):])
    if provider.startswith("pygen-"):
        f = functools.partial(getattr(pygen.ops, op), backend=provider[len("pygen-"):], **opts)
    elif provider == "eager":
        f = functools.partial(EAGER[op], **opts) if opts else EAGER[op]
    elif provider == "compile":
        f = compiled(op, dynamic=compile_dynamic, **opts)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if op in ("reparameterize_kl", *COUPLING_OPS, *DIFFUSION_OPS):
        return f

    def one(mu: Tensor, logvar: Tensor) -> tuple:
        return (f(mu, logvar),)

    return one


def fused_diffusion(op: str, backend: str) -> Callable[..., tuple]:
    """pygen's fused diffusion op as a callable of make_inputs' tuple, returning a tuple.

    Noise is drawn in the kernel from a seed the op draws from torch's default generator
    (what a call without ``seed=`` does). The loss draws one seed and passes it to
    q_sample and diffusion_mse, as ``pygen.ops.diffusion_loss`` does around the model.
    """
    ops = pygen.ops
    if op == "ddim_step":
        def f(model_output, sample, t, prev_t, alphas_cumprod):
            return ops.ddim_step(model_output, sample, t, alphas_cumprod, prev_t, eta=0.0, backend=backend)
    elif op == "ddim_step_prev":
        def f(model_output, sample, t, prev_t, alphas_cumprod):
            return ops.ddim_step(model_output, sample, t, alphas_cumprod, prev_t, eta=0.0, backend=backend,
                                 return_x0=False)[:1]
    elif op == "ddim_step_eta1":
        def f(model_output, sample, t, prev_t, alphas_cumprod):
            return ops.ddim_step(model_output, sample, t, alphas_cumprod, prev_t, eta=1.0, backend=backend)
    elif op == "ddpm_step":
        def f(model_output, sample, t, prev_t, alphas_cumprod):
            return ops.ddpm_step(model_output, sample, t, alphas_cumprod, prev_t, variance_type="fixed_small",
                                 backend=backend)
    elif op == "diffusion_loss":
        def f(model_output, x0, t, alphas_cumprod):
            seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=x0.device)
            x_t = ops.q_sample(x0, t, alphas_cumprod, seed=seed, backend=backend)
            return x_t, ops.diffusion_mse(model_output, x0, t, alphas_cumprod, seed=seed, backend=backend)
    elif op == "euler_ancestral_step":
        def f(model_output, sample, index, sigmas):
            return tuple(ops.euler_ancestral_step(model_output, sample, sigmas, index, backend=backend))
    elif op == "dpmpp_2m_step":
        def f(model_output, sample, index, sigmas, prev_x0):
            return tuple(ops.dpmpp_2m_step(model_output, sample, sigmas, index, prev_x0, backend=backend))
    else:
        raise ValueError(f"unknown diffusion op {op!r}")
    return f


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

    Diffusion ops (N = numel of the (B, C, H, W) sample; see DIFFUSION_BYTES):
    forward:  ddim_step, ddim_step_eta1, ddpm_step, euler_ancestral_step
                                 model_output, sample -> prev_sample, pred_original_sample  4N
              dpmpp_2m_step      model_output, sample, prev_x0 -> prev_sample, x0          5N
              diffusion_loss     q_sample: x0 -> x_t (2N); diffusion_mse: model_output, x0
                                 -> loss (B) (2N + B): two ops, as training runs them with
                                 the model in between                                      4N + B
    backward: diffusion_loss     grad_loss (B), model_output -> grad_model_output           2N + B
                  (epsilon target: eps is regenerated from the seed; x0 takes no gradient)
    The noise of the stochastic steps is drawn in the kernel: none counted (passed as a
    tensor it would add N). The per-sample timesteps / indices (B int64), the schedule
    table (T floats) and the seed are left out: 0.2% of the bytes at 16x3x64x64, 0.02% at
    256x3x64x64.
    """
    n, b = numel, batch
    inverse = _inverse(op, direction)
    if op in DIFFUSION_OPS:
        if mode not in op_modes(op):
            raise ValueError(f"{op} has no {mode} mode (a sampler step has no backward)")
        fwd = {"ddim_step_prev": 3 * n, "dpmpp_2m_step": 5 * n, "diffusion_loss": 4 * n + b}.get(op, 4 * n)
        bwd = 2 * n + b if op == "diffusion_loss" else 0
    elif op == "rq_spline":
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


DIFFUSION_BYTES = {
    "ddim_step": "model_output, sample -> prev, x0: 4N (noise none: eta = 0)",
    "ddim_step_prev": "model_output, sample -> prev: 3N (x0 not asked for; noise none: eta = 0)",
    "ddim_step_eta1": "model_output, sample -> prev, x0: 4N (noise drawn in-kernel: none)",
    "ddpm_step": "model_output, sample -> prev, x0: 4N (noise drawn in-kernel: none)",
    "euler_ancestral_step": "model_output, sample -> prev, x0: 4N (noise drawn in-kernel: none)",
    "dpmpp_2m_step": "model_output, sample, prev_x0 -> prev, x0: 5N",
    "diffusion_loss": "forward: x0 -> x_t, model_output, x0 -> loss: 4N + B; "
                      "backward: grad_loss, model_output -> grad_model_output: 2N + B",
}


def bytes_note(op: str) -> str | None:
    """What bytes_moved counts for a diffusion op, in words (None for the other ops: see README)."""
    return DIFFUSION_BYTES.get(op)


# ---- inputs -------------------------------------------------------------------------------


def shape_for(numel: int, d: int = D) -> tuple[int, int]:
    return (max(1, numel // d), d)


def parse_shape(text: str) -> tuple[int, ...]:
    """'256x3x64x64' -> (256, 3, 64, 64)."""
    if not re.fullmatch(r"\d+(x\d+)+", text.strip()):
        raise ValueError(f"bad shape {text!r}: expected e.g. 256x3x64x64")
    return tuple(int(v) for v in text.strip().split("x"))


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def bench_shape(size: str) -> tuple[int, ...]:
    """A size label of the CPU suites: '1e6' -> (numel // D, D); '256x3x64x64' -> that shape."""
    return shape_for(CPU_SIZES[size]) if size in CPU_SIZES else parse_shape(size)


def diffusion_tables(device: str | torch.device) -> dict[str, Tensor]:
    """The schedule tables: alphas_cumprod (T,) of linear betas, the DIFFUSION_STEPS
    inference timesteps (descending) and their sigmas with a final 0 (float32, on device)."""
    from pygen.diffusion import schedules as S

    ac = S.alphas_cumprod_from_betas(S.make_betas(DIFFUSION_T, dtype=torch.float64))
    ts = S.spaced_timesteps(DIFFUSION_STEPS, DIFFUSION_T)
    sigmas = torch.cat([S.sigmas_from_alphas_cumprod(ac)[ts], ac.new_zeros(1)])
    return {"alphas_cumprod": ac.float().to(device), "timesteps": ts.to(device), "sigmas": sigmas.float().to(device)}


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

    Diffusion ops (``shape`` = (B, C, H, W); every sample at its own timestep; the tables of
    ``diffusion_tables`` are float32 whatever ``dtype``; only model_output of the loss
    takes ``requires_grad``):
    - ddim_step, ddim_step_eta1, ddpm_step: (model_output, sample, t, prev_t, alphas_cumprod),
      model_output and sample ~ N(0, 1), t = 20 k with k ~ U{0..49} per sample,
      prev_t = t - 20 (-1, the final step, where t = 0).
    - diffusion_loss: (model_output, x0, t, alphas_cumprod), model_output ~ N(0, 1),
      x0 ~ N(0, 1/4), t ~ U{0..999} per sample.
    - euler_ancestral_step: (model_output, sample, index, sigmas), index ~ U{1..48} per
      sample (sigmas[index + 1] > 0), sample = x0 + sigma eps in sigma space.
    - dpmpp_2m_step: (model_output, sample, index, sigmas, prev_x0), index ~ U{1..48}
      (the second-order update: sigmas[index - 1] exists, sigmas[index + 1] > 0),
      sample ~ N(0, 1) (VP), prev_x0 ~ N(0, 1/4).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    if op in DIFFUSION_OPS:
        return _diffusion_inputs(op, tuple(shape), dtype, device, requires_grad, g)

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


def _diffusion_inputs(op, shape, dtype, device, requires_grad, g) -> tuple[Tensor, ...]:
    b, nd = shape[0], len(shape)
    tables = diffusion_tables(device)

    def randn(scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=g, device=device) * scale

    def ints(low: int, high: int) -> Tensor:
        return torch.randint(low, high, (b,), generator=g, device=device)

    model_output = randn()
    if op in _ALPHA_STEPS:
        stride = DIFFUSION_T // DIFFUSION_STEPS
        k = ints(0, DIFFUSION_STEPS)
        t = k * stride
        prev_t = torch.where(k > 0, t - stride, torch.full_like(t, -1))
        return model_output.to(dtype), randn().to(dtype), t, prev_t, tables["alphas_cumprod"]
    if op == "diffusion_loss":
        t = ints(0, DIFFUSION_T)
        return model_output.to(dtype).requires_grad_(requires_grad), randn(0.5).to(dtype), t, tables["alphas_cumprod"]
    sigmas = tables["sigmas"]
    index = ints(1, DIFFUSION_STEPS - 1)
    if op == "euler_ancestral_step":
        from pygen.ops.diffusion import gather

        sample = randn(0.5) + gather(sigmas, index, nd) * randn()
        return model_output.to(dtype), sample.to(dtype), index, sigmas
    if op == "dpmpp_2m_step":
        return model_output.to(dtype), randn().to(dtype), index, sigmas, randn(0.5).to(dtype)
    raise ValueError(f"unknown op {op!r}")


def make_grads(op: str, x: Tensor, seed: int = 1) -> tuple[Tensor, ...]:
    """Fixed output gradients (not ones, so a kernel that ignores grad_output shows).

    ``x`` is the op's first input (mu or x): per-element outputs get its shape, per-sample
    ones (kl, logdet) its first dim.
    """
    if op in DIFFUSION_STEP_OPS:
        return ()  # forward only
    g = torch.Generator(device=x.device).manual_seed(seed)
    if op == "diffusion_loss":  # the loss (B,), not a mean: grad_loss random rather than 1/B
        return (torch.randn(x.shape[:1], generator=g, device=x.device).to(x.dtype),)
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
    if op in DIFFUSION_OPS:
        return _check_loss(outs, inputs) if op == "diffusion_loss" else _check_step(op, outs, inputs)
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
    *, direction: str | None = None, outs: tuple | None = None,
) -> str | None:
    """None when the gradients of ``inputs`` look right, else what is wrong.

    Deterministic parts are compared with autograd through pygen's references: the KL
    gradient (gaussian_kl_ref), and grad_mu = grad_z (+ dKL/dmu) for the samplers.
    grad_logvar of a sampler depends on the noise: only shape and finiteness are checked.
    Coupling ops: every input's gradient, first CHECK_ROWS samples, against autograd
    through the op's reference in float64. diffusion_loss: ``grads`` are those of
    ``grad_inputs(inputs)`` (model_output alone) and ``outs`` the outputs they were taken
    from: grad_model_output = grad_loss 2 / D (model_output - eps), eps read off x_t.
    """
    if op in DIFFUSION_OPS:
        if op != "diffusion_loss":
            return f"{op} has no backward"
        return _check_loss(outs, inputs, out_grads, grads)
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


def _step_reference(op: str, inputs: Sequence[Tensor], rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(prev without its noise term, x0, the noise term's per-element std or None) of the
    first ``rows`` samples in float64, from pygen.ops.diffusion' references. The std is
    the reference with unit noise minus the reference without (DDPM: no noise at t = 0)."""
    from pygen.ops import diffusion as R

    mo, x = (t.detach()[:rows].double() for t in inputs[:2])
    nd = x.dim()
    if op in _ALPHA_STEPS:
        t, prev_t, ac = inputs[2][:rows], inputs[3][:rows], inputs[4].double()
        ab = R.gather(ac, t, nd)
        ab_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], 1.0).reshape(ab.shape)
        if op == "ddpm_step":
            mask = (t > 0).double().reshape(ab.shape)

            def step(z):
                return R.ddpm_step_ref(mo, x, ab, ab_prev, None if z is None else z * mask, variance_type="fixed_small")
        else:
            eta = 1.0 if op == "ddim_step_eta1" else 0.0

            def step(z):
                return R.ddim_step_ref(mo, x, ab, ab_prev, z, eta=eta)
    else:
        index, sigmas = inputs[2][:rows], inputs[3].double()
        s, sn = R.gather(sigmas, index, nd), R.gather(sigmas, index + 1, nd)
        if op == "dpmpp_2m_step":
            prev_x0 = inputs[4].detach()[:rows].double()
            return (*R.dpmpp_2m_step_ref(mo, x, s, sn, prev_x0, R.gather(sigmas, index - 1, nd)), None)

        def step(z):
            return R.euler_ancestral_step_ref(mo, x, s, sn, z)
    prev, x0 = step(None)
    if op in ("ddim_step", "ddim_step_prev"):
        return prev, x0, None
    return prev, x0, step(torch.ones_like(x))[0] - prev


def _noise_stats(z: Tensor, what: str) -> str | None:
    """None when ``z`` (float64, flat) looks like N(0, 1) draws, else what is wrong."""
    if z.numel() < 1000:
        return f"{what}: beyond 8 sigma" if z.numel() and z.abs().max().item() > 8 else None
    mean, std = z.mean().item(), z.std().item()
    wild = (z.abs() > 6).double().mean().item()
    if abs(mean) > 0.1 or not 0.9 < std < 1.1 or wild > 1e-4:
        return f"{what} has mean {mean:.3f}, std {std:.3f}, {wild:.2%} beyond 6 sigma; expected N(0, 1)"
    return None


def _check_step(op: str, outs: tuple, inputs: Sequence[Tensor]) -> str | None:
    """A sampler step's (prev_sample, pred_original_sample), first CHECK_ROWS samples, against
    the reference in float64: x0 and the deterministic part of prev elementwise (at most 1%
    of elements off, as _mostly_close), and where the step adds noise, (prev - mean) / std
    must look like N(0, 1) draws independent of model_output and sample (the noise is
    random: its values cannot be compared)."""
    x = inputs[1]
    want = 1 if op == "ddim_step_prev" else 2
    if len(outs) != want:
        return f"expected {('(prev_sample,)', '(prev_sample, pred_original_sample)')[want - 1]}, got {len(outs)} outputs"
    for name, o in zip(("prev_sample", "pred_original_sample"), outs):
        if o.shape != x.shape or o.dtype != x.dtype:
            return f"{name} has shape {tuple(o.shape)} / {o.dtype}, expected {tuple(x.shape)} / {x.dtype}"
        if not torch.isfinite(o).all():
            return f"{name} has non-finite values"
    rows = min(CHECK_ROWS, x.shape[0])
    low = x.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad():
        mean, x0, std = _step_reference(op, inputs, rows)
        prev = outs[0][:rows].double()
        if len(outs) > 1 and (err := _mostly_close(outs[1][:rows], x0, low)):
            return f"pred_original_sample differs from the reference (float64): {err}"
        noisy = std > 1e-9 if std is not None else torch.zeros_like(mean, dtype=torch.bool)
        if (~noisy).any() and (err := _mostly_close(prev[~noisy], mean[~noisy], low)):
            return f"prev_sample (where the step adds no noise) differs from the reference (float64): {err}"
        if noisy.any():
            z, sd = ((prev - mean)[noisy] / std[noisy]).flatten(), std[noisy].flatten()
            if err := _noise_stats(z, "(prev_sample - mean) / std"):
                return err
            # The noise must not depend on the inputs: a wrong coefficient in the mean of
            # prev shows as a slope of z on model_output / std or sample / std.
            for name, t in (("model_output", inputs[0]), ("sample", inputs[1])):
                p = t.detach()[:rows].double().expand_as(mean)[noisy].flatten() / sd
                ss = (p * p).sum()
                slope = ((z * p).sum() / ss).item() if ss > 0 else 0.0
                if abs(slope) > max(1e-3, 6 / max(ss.sqrt().item(), 1e-30)):
                    return (f"prev_sample's noise term depends on {name} (slope {slope:.3g}): "
                            f"its deterministic part differs from the reference")
    return None


def _check_loss(outs, inputs, out_grads=None, grads=None) -> str | None:
    """diffusion_loss's (x_t, loss) or the gradient of model_output, first CHECK_ROWS samples:
    eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) must look like N(0, 1) draws, loss must be
    mean((model_output - eps)^2) and grad_model_output grad_loss 2 / D (model_output - eps).
    In 16-bit only samples with 1 - ab >= 1/2 are compared (x_t's rounding, divided by a
    small sqrt(1 - ab), would swamp eps)."""
    if outs is None or len(outs) != 2:
        return "expected (x_t, loss)"
    mo, x0, t, ac = inputs
    x_t, loss = outs
    b = x0.shape[0]
    if x_t.shape != x0.shape or x_t.dtype != x0.dtype or loss.shape != (b,) or loss.dtype != x0.dtype:
        return (f"x_t, loss have shapes {tuple(x_t.shape)}, {tuple(loss.shape)} ({x_t.dtype}, {loss.dtype}); "
                f"expected {tuple(x0.shape)}, ({b},) ({x0.dtype})")
    if not (torch.isfinite(x_t).all() and torch.isfinite(loss).all()):
        return "x_t or loss has non-finite values"
    rows = min(CHECK_ROWS, b)
    low = x0.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad():
        ab = ac.double()[t[:rows]]
        keep = (1 - ab) >= (0.5 if low else 0.0)
        if not keep.any():
            return None
        ab_b = ab.reshape(-1, *([1] * (x0.dim() - 1)))
        eps = (x_t[:rows].double() - ab_b.sqrt() * x0.detach()[:rows].double()) / (1 - ab_b).sqrt()
        diff = (mo.detach()[:rows].double() - eps)[keep]
        if grads is None:
            if err := _noise_stats(eps[keep].flatten(), "eps implied by x_t"):
                return err
            want = diff.pow(2).flatten(1).mean(1)
            rtol = 3e-2 if low else 1e-3
            got = loss[:rows][keep].double()
            if not torch.allclose(got, want, rtol=rtol, atol=rtol * 1e-1):
                return f"loss differs from mean((model_output - eps)^2) by up to {(got - want).abs().max().item():.3g}"
            return None
        if len(grads) != 1 or grads[0] is None or grads[0].shape != mo.shape:
            return "expected one gradient, of model_output's shape"
        g = grads[0]
        if not torch.isfinite(g).all():
            return "the gradient of model_output has non-finite values"
        d = x0[0].numel()
        gl = out_grads[0][:rows][keep].double().reshape(-1, *([1] * (x0.dim() - 1)))
        want = gl * (2.0 / d) * diff
        if err := _mostly_close(g[:rows][keep], want, low, scale=2.0 / d):
            return f"the gradient of model_output differs from grad_loss 2 / D (model_output - eps): {err}"
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

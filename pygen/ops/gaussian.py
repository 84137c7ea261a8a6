"""Diagonal-Gaussian ops for VAEs: reparameterized sampling and KL divergence.

Public functions (shapes: ``mu`` and ``logvar`` are (B, ...); B is the batch):

- :func:`reparameterize` -> z = mu + exp(logvar / 2) * eps, shape of mu.
- :func:`gaussian_kl` -> KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), shape (B,).
- :func:`reparameterize_kl` -> (z, KL to N(0, I)) in one pass.

eps is drawn inside the kernel: element i (row-major within the batch) uses Philox
counter ``offset + i`` under a seed drawn from torch's generator, identically on every
backend; backward regenerates it instead of storing it. Each op has a pure-torch
reference (``*_ref``) used by the tests and benchmarks.

Backends: ``"cpp"`` (CPU), ``"cuda"``, ``"triton"``, ``"torch"`` (reference);
``"auto"`` picks the fastest available for the tensors' device and dtype.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from pygen import _backend, _ext, _rng
from pygen.ops._autograd import grads_via_reference, wants_graph
from pygen.ops._checks import cast, check_broadcastable, check_like, check_tensor, compute_dtype, kernel_dtype, row_dtype

__all__ = [
    "randn",
    "reparameterize",
    "gaussian_kl",
    "reparameterize_kl",
    "reparameterize_ref",
    "gaussian_kl_ref",
]


# ---- pure-torch references -----------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64


def exp_m1_m_x(x: Tensor) -> Tensor:
    """e^x - 1 - x without cancellation near 0 (the KL of a collapsed latent dimension).

    |x| < 0.5: the Taylor series through x^16/16! (full float64 accuracy); beyond, the
    direct formula loses at most a few ulp. The kernels compute the same
    (csrc/include/pygen/gaussian.h, kernels/_rowwise.py).
    """
    p = torch.full_like(x, 1.0 / math.factorial(16))
    for k in range(15, 1, -1):
        p = p * x + 1.0 / math.factorial(k)
    return torch.where(x.abs() < 0.5, x * x * p, torch.expm1(x) - x)


def reparameterize_ref(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) * eps, computed in float32 (float64 for float64), in the promoted dtype."""
    dt = compute_dtype(mu, logvar)
    ct = _compute_dtype(dt)
    return (mu.to(ct) + torch.exp(0.5 * logvar.to(ct)) * eps.to(ct)).to(dt)


def gaussian_kl_ref(
    mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None
) -> Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) summed over non-batch dims: (B,)
    in float32 (float64 for float64 inputs).

    A missing prior argument means 0 (so both missing is the standard normal). Per element
    0.5 (e^{lv-plv} - 1 - (lv-plv) + (mu-pmu)^2 e^{-plv}), the first part by :func:`exp_m1_m_x`.
    """
    ct = _compute_dtype(compute_dtype(mu, logvar, prior_mu, prior_logvar))
    m, lv = mu.to(ct), logvar.to(ct)
    if prior_mu is None and prior_logvar is None:
        term = exp_m1_m_x(lv) + m * m
    else:
        pm = prior_mu.to(ct) if prior_mu is not None else torch.zeros((), dtype=ct, device=mu.device)
        pl = prior_logvar.to(ct) if prior_logvar is not None else torch.zeros((), dtype=ct, device=mu.device)
        d = m - pm
        term = exp_m1_m_x(lv - pl) + d * d * torch.exp(-pl)
    term = torch.broadcast_to(term, mu.shape)
    return 0.5 * term.reshape(mu.shape[0], math.prod(mu.shape[1:])).sum(dim=1)


# ---- compiled ops: fake (meta) implementations and autograd ------------------------------
# The C++ ops (torch.ops.pygen.<name>, CPU and CUDA) are defined in csrc/ops.cpp; the Triton
# ones (torch.ops.pygen.triton_<name>) below. Both sets share these fakes and gradients.


def _register_fakes_and_autograd(prefix: str) -> None:
    ops = torch.ops.pygen

    def op(name):
        return getattr(ops, prefix + name)

    def qual(name):
        return f"pygen::{prefix}{name}"

    @torch.library.register_fake(qual("reparameterize"))
    def _(mu, logvar, seed, offset):
        return mu.new_empty(mu.shape)

    @torch.library.register_fake(qual("reparameterize_backward"))
    def _(grad_z, logvar, seed, offset):
        return logvar.new_empty(logvar.shape)

    @torch.library.register_fake(qual("reparameterize_kl"))
    def _(mu, logvar, seed, offset):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1], dtype=row_dtype(mu.dtype))

    @torch.library.register_fake(qual("reparameterize_kl_backward"))
    def _(grad_z, grad_kl, mu, logvar, seed, offset):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    @torch.library.register_fake(qual("gaussian_kl"))
    def _(mu, logvar, prior_mu, prior_logvar):
        return mu.new_empty(mu.shape[:1], dtype=row_dtype(mu.dtype))

    @torch.library.register_fake(qual("gaussian_kl_backward"))
    def _(grad_kl, mu, logvar, prior_mu, prior_logvar, prior_grads=True):
        return [mu.new_empty(mu.shape) for _ in range(4 if prior_mu is not None and prior_grads else 2)]

    # reparameterize: dz/dmu = 1, dz/dlogvar = sigma * eps / 2 with eps regenerated from
    # (seed, offset): only logvar (an input) and the 8-byte seed are kept for backward.
    def setup_sample(ctx, inputs, output):
        _, logvar, seed, offset = inputs
        ctx.save_for_backward(logvar, seed)
        ctx.offset = offset

    def backward_sample(ctx, grad_z):
        logvar, seed = ctx.saved_tensors
        if wants_graph():  # the same gradients in differentiable torch ops
            ct = _compute_dtype(logvar.dtype)
            eps = _eps(seed, ctx.offset, logvar.shape).to(ct)
            grad_lv = (0.5 * grad_z.to(ct) * torch.exp(0.5 * logvar.to(ct)) * eps).to(logvar.dtype)
            return grad_z, grad_lv, None, None
        grad_lv = op("reparameterize_backward")(grad_z, logvar, seed, ctx.offset) if ctx.needs_input_grad[1] else None
        return grad_z, grad_lv, None, None

    torch.library.register_autograd(qual("reparameterize"), backward_sample, setup_context=setup_sample)

    def setup_sample_kl(ctx, inputs, output):
        mu, logvar, seed, offset = inputs
        ctx.save_for_backward(mu, logvar, seed)
        ctx.offset = offset

    def backward_sample_kl(ctx, grad_z, grad_kl):
        mu, logvar, seed = ctx.saved_tensors
        if wants_graph():
            def ref(m, lv):
                return reparameterize_ref(m, lv, _eps(seed, ctx.offset, m.shape)), gaussian_kl_ref(m, lv)

            return (*grads_via_reference(ref, (mu, logvar), ctx.needs_input_grad[:2], (grad_z, grad_kl)), None, None)
        if grad_kl is None:
            if grad_z is None:
                return (None,) * 4
            grad_lv = op("reparameterize_backward")(grad_z, logvar, seed, ctx.offset) if ctx.needs_input_grad[1] else None
            return grad_z, grad_lv, None, None
        if grad_z is None:
            grad_mu, grad_lv = op("gaussian_kl_backward")(grad_kl, mu, logvar, None, None)
        else:
            grad_mu, grad_lv = op("reparameterize_kl_backward")(grad_z, grad_kl, mu, logvar, seed, ctx.offset)
        return grad_mu, grad_lv, None, None

    torch.library.register_autograd(qual("reparameterize_kl"), backward_sample_kl, setup_context=setup_sample_kl)

    def setup_kl(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_kl(ctx, grad_kl):
        mu, logvar, prior_mu, prior_logvar = ctx.saved_tensors
        if wants_graph():
            return tuple(grads_via_reference(gaussian_kl_ref, (mu, logvar, prior_mu, prior_logvar),
                                             ctx.needs_input_grad, (grad_kl,)))
        prior_grads = prior_mu is not None and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        grads = op("gaussian_kl_backward")(grad_kl, mu, logvar, prior_mu, prior_logvar, prior_grads)
        grads = list(grads) + [None] * (4 - len(grads))  # no prior gradients written unless asked for
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))

    torch.library.register_autograd(qual("gaussian_kl"), backward_kl, setup_context=setup_kl)


def _eps(seed: Tensor, offset: int, shape) -> Tensor:
    return _rng.philox_normal(seed, offset, shape)


_OPS: dict[str, SimpleNamespace] = {}
if _ext.HAS_CPP:
    _register_fakes_and_autograd("")
    _cpp = SimpleNamespace(
        reparameterize=torch.ops.pygen.reparameterize,
        reparameterize_kl=torch.ops.pygen.reparameterize_kl,
        gaussian_kl=torch.ops.pygen.gaussian_kl,
    )
    _OPS["cpp"] = _OPS["cuda"] = _cpp

if "triton" in _backend.available_backends():
    from pygen.kernels import gaussian as _tk

    @torch.library.custom_op("pygen::triton_reparameterize", mutates_args=())
    def _triton_reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor, offset: int) -> Tensor:
        return _tk.gaussian_forward(mu, logvar, None, None, seed, offset, sample=True, kl=False)[0]

    @torch.library.custom_op("pygen::triton_reparameterize_backward", mutates_args=())
    def _triton_reparameterize_backward(grad_z: Tensor, logvar: Tensor, seed: Tensor, offset: int) -> Tensor:
        return _tk.gaussian_backward(grad_z, None, None, logvar, None, None, seed, offset, write_grad_mu=False)[0]

    @torch.library.custom_op("pygen::triton_reparameterize_kl", mutates_args=())
    def _triton_reparameterize_kl(mu: Tensor, logvar: Tensor, seed: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        z, kl = _tk.gaussian_forward(mu, logvar, None, None, seed, offset, sample=True, kl=True)
        return z, kl

    @torch.library.custom_op("pygen::triton_reparameterize_kl_backward", mutates_args=())
    def _triton_reparameterize_kl_backward(
        grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor, offset: int
    ) -> tuple[Tensor, Tensor]:
        gmu, glv = _tk.gaussian_backward(grad_z, grad_kl, mu, logvar, None, None, seed, offset, write_grad_mu=True)
        return gmu, glv

    @torch.library.custom_op("pygen::triton_gaussian_kl", mutates_args=())
    def _triton_gaussian_kl(
        mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None
    ) -> Tensor:
        return _tk.gaussian_forward(mu, logvar, prior_mu, prior_logvar, None, 0, sample=False, kl=True)[1]

    @torch.library.custom_op("pygen::triton_gaussian_kl_backward", mutates_args=())
    def _triton_gaussian_kl_backward(
        grad_kl: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
        prior_grads: bool = True,
    ) -> list[Tensor]:
        return _tk.gaussian_backward(None, grad_kl, mu, logvar, prior_mu, prior_logvar, None, 0, write_grad_mu=True,
                                     prior_grads=prior_grads)

    _register_fakes_and_autograd("triton_")
    _OPS["triton"] = SimpleNamespace(
        reparameterize=torch.ops.pygen.triton_reparameterize,
        reparameterize_kl=torch.ops.pygen.triton_reparameterize_kl,
        gaussian_kl=torch.ops.pygen.triton_gaussian_kl,
    )


# ---- public API ------------------------------------------------------------------------


def _check_pair(mu: Tensor, logvar: Tensor) -> None:
    check_tensor(mu, "mu")
    check_like(logvar, mu, "logvar", "mu")


def _dtypes(*tensors) -> tuple[torch.dtype, torch.dtype]:
    """(result dtype, kernel dtype) for these inputs: promoted; float32 for CPU halves."""
    dt = compute_dtype(*tensors)
    return dt, kernel_dtype(dt, tensors[0].device)


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> Tensor:
    """Reparameterized sample z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) in-kernel.

    Args:
        mu, logvar: (B, ...) floating tensors of one shape and device (mixed dtypes are
            promoted as torch does, e.g. under autocast).
        generator: torch generator for the seed (default: torch's global one).
        seed: explicit Philox key instead of a generator draw (int or int64 tensor).
        offset: Philox counter of the first element; sample b's element j uses
            counter ``offset + b * N + j`` (N = elements per sample), so a sample's
            noise does not depend on the batch size, and chunk k of a batch can be
            drawn alone with ``offset = k_start * N``.
        backend: "auto" (default), "torch", "cpp", "cuda" or "triton".

    Returns:
        z: shape of mu, the promoted dtype of mu and logvar, contiguous. Differentiable in
        mu and logvar (to any order: a ``create_graph`` backward goes through the reference).
    """
    _check_pair(mu, logvar)
    dt, kt = _dtypes(mu, logvar)
    name = _backend.resolve(backend, mu.device, kt)
    seed_t = _rng.as_seed(seed, mu.device, generator)
    offset = _rng.check_offset(offset)
    if name == "torch":
        return reparameterize_ref(mu, logvar, _rng.philox_normal(seed_t, offset, mu.shape)).to(dt)
    return _OPS[name].reparameterize(cast(mu, kt), cast(logvar, kt), seed_t, offset).to(dt)


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Per-sample KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), summed over non-batch dims.

    Accurate near the prior (a collapsed latent dimension): the e^x - 1 - x part is computed
    without cancellation (:func:`exp_m1_m_x`) on every backend.

    Args:
        mu, logvar: (B, ...) floating tensors of one shape and device (dtypes may differ).
        prior_mu, prior_logvar: floating tensors that broadcast to mu's shape (e.g. a learned
            (D,) prior or a per-sample (B, D) one); a missing one means 0, both missing N(0, I).
        backend: as in :func:`reparameterize`.

    Returns:
        kl: (B,) float32 (float64 when an input is float64), whatever the input dtype.
    """
    _check_pair(mu, logvar)
    if prior_mu is not None:
        check_broadcastable(prior_mu, mu, "prior_mu", "mu")
    if prior_logvar is not None:
        check_broadcastable(prior_logvar, mu, "prior_logvar", "mu")
    _, kt = _dtypes(mu, logvar, prior_mu, prior_logvar)
    name = _backend.resolve(backend, mu.device, kt)
    if name == "torch":
        return gaussian_kl_ref(mu, logvar, prior_mu, prior_logvar)
    pm = pl = None
    if prior_mu is not None or prior_logvar is not None:
        zero = mu.new_zeros((), dtype=kt)
        pm = cast(prior_mu if prior_mu is not None else zero, kt).expand(mu.shape)
        pl = cast(prior_logvar if prior_logvar is not None else zero, kt).expand(mu.shape)
    return _OPS[name].gaussian_kl(cast(mu, kt), cast(logvar, kt), pm, pl)


def reparameterize_kl(
    mu: Tensor,
    logvar: Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(reparameterize(mu, logvar), gaussian_kl(mu, logvar))`` in one pass over the inputs.

    Same arguments as :func:`reparameterize`; the prior is N(0, I).

    Returns:
        z: shape of mu (promoted dtype); kl: (B,) float32 (float64 for float64).
    """
    _check_pair(mu, logvar)
    dt, kt = _dtypes(mu, logvar)
    name = _backend.resolve(backend, mu.device, kt)
    seed_t = _rng.as_seed(seed, mu.device, generator)
    offset = _rng.check_offset(offset)
    if name == "torch":
        eps = _rng.philox_normal(seed_t, offset, mu.shape)
        return reparameterize_ref(mu, logvar, eps).to(dt), gaussian_kl_ref(mu, logvar)
    z, kl = _OPS[name].reparameterize_kl(cast(mu, kt), cast(logvar, kt), seed_t, offset)
    return z.to(dt), kl


def randn(
    *shape: int,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` from pygen's Philox scheme (the eps of :func:`reparameterize`).

    Element i (row-major) uses counter ``offset + i``; seeds as in :func:`reparameterize`.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if len(shape) == 0:
        raise ValueError("randn needs a shape with a batch dimension, e.g. randn(B, D)")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"randn: shape must be non-negative ints, got {tuple(shape)}")
    zeros = torch.zeros((), dtype=dtype, device=device).expand(shape)
    return reparameterize(zeros, zeros, generator=generator, seed=seed, offset=offset, backend=backend)

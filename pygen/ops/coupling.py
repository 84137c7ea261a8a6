"""Coupling transforms of normalizing flows, with log-determinants.

- :func:`affine_coupling`: y = x * exp(s) + shift (inverse: (x - shift) * exp(-s)).
- :func:`rq_spline`: the monotone rational-quadratic spline of Neural Spline Flows
  (Durkan et al., 2019) on [-tail_bound, tail_bound], identity (linear) tails outside.

Both return ``(y, logdet)`` with ``logdet`` of shape (B,): log|det dy/dx| summed over
every non-batch dim. Each has a pure-torch reference (``*_ref``) beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pygen import _backend, _ext
from pygen.ops._autograd import grads_via_reference, wants_graph
from pygen.ops._checks import cast, check_broadcastable, check_like, check_tensor, compute_dtype, kernel_dtype, row_dtype

__all__ = ["affine_coupling", "affine_coupling_ref", "rq_spline", "rq_spline_ref"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(dim=1)


# ---- affine coupling ------------------------------------------------------------------------


def _soft_clamp(log_scale: Tensor, soft_clamp: float | None) -> Tensor:
    if soft_clamp is None:
        return log_scale
    return soft_clamp * torch.tanh(log_scale / soft_clamp)


def affine_coupling_ref(
    x: Tensor,
    shift: Tensor,
    log_scale: Tensor,
    *,
    inverse: bool = False,
    soft_clamp: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`affine_coupling`, computed in float32 (float64 for float64)."""
    dt = compute_dtype(x, shift, log_scale)
    ct = _compute_dtype(dt)
    xc, t = x.to(ct), shift.to(ct)
    s = _soft_clamp(log_scale.to(ct), soft_clamp)
    if mask is not None:
        m = mask.to(ct)
        s, t = s * m, t * m
    y = (xc - t) * torch.exp(-s) if inverse else xc * torch.exp(s) + t
    logdet = _row_sum(torch.broadcast_to(s, x.shape))
    return y.to(dt), (-logdet if inverse else logdet)


def affine_coupling(
    x: Tensor,
    shift: Tensor,
    log_scale: Tensor,
    *,
    inverse: bool = False,
    soft_clamp: float | None = None,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Affine coupling transform and its log-determinant.

    Args:
        x: (B, ...) input.
        shift, log_scale: the conditioner's outputs, shape of x.
        inverse: apply the inverse, x = (y - shift) * exp(-s); logdet is then negated.
        soft_clamp: if given, s = soft_clamp * tanh(log_scale / soft_clamp), which keeps
            |s| < soft_clamp (the Glow / NICE-style guard against exploding scales).
        mask: optional, broadcastable to x: elements where mask is 0 pass through
            unchanged and add nothing to logdet (checkerboard/channel masks, no split/cat).
        backend: "auto" (default), "torch", "cpp", "cuda" or "triton".

    Returns:
        y: shape of x; logdet: (B,), sum of s (of -s for the inverse) over non-batch dims.
    """
    _check_coupling(x, shift, log_scale, soft_clamp, mask)
    dt = compute_dtype(x, shift, log_scale)
    kt = kernel_dtype(dt, x.device)
    op = _pick(_AFFINE_OPS, "affine_coupling", backend, x, kt)
    if op is None:
        return affine_coupling_ref(x, shift, log_scale, inverse=inverse, soft_clamp=soft_clamp, mask=mask)
    m = _mask_rows(mask, x, kt) if mask is not None else None
    y, logdet = op(cast(x, kt), cast(shift, kt), cast(log_scale, kt), m, inverse, float(soft_clamp or 0.0))
    return y.to(dt), logdet


def _mask_rows(mask: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as a view of x's shape for the kernels. A mask shared by every sample (Glow's
    per-channel (C, 1, 1), a checkerboard (1, C, H, W)) is materialised as one row of N
    elements and read with row stride 0, never as a B x N tensor."""
    if mask.dim() < x.dim() or mask.shape[0] == 1:
        row = torch.broadcast_to(mask.to(dtype), (1, *x.shape[1:])).contiguous()
        return row.expand(x.shape)
    return mask.to(dtype).expand(x.shape)


def _pick(ops: dict, op_name: str, backend: str | None, x: Tensor, dtype: torch.dtype):
    """The compiled op for the resolved backend (kernels in ``dtype``); None means the torch reference.

    "auto" falls back to the reference while an op has no kernel for a backend yet; an
    explicit request for such a backend is an error, not a silent fallback.
    """
    name = _backend.resolve(backend, x.device, dtype)
    if name == "torch":
        return None
    if name in ops:
        return ops[name]
    if _backend.requested(backend) == "auto":
        return None
    raise RuntimeError(f"{op_name} has no {name!r} kernel yet; use backend='torch' or 'auto'")


def _check_coupling(x, shift, log_scale, soft_clamp, mask) -> None:
    check_tensor(x, "x")
    check_like(shift, x, "shift", "x")
    check_like(log_scale, x, "log_scale", "x")
    if soft_clamp is not None:
        if isinstance(soft_clamp, bool) or not isinstance(soft_clamp, (int, float)) or not soft_clamp > 0:
            raise ValueError(f"soft_clamp must be a positive number or None, got {soft_clamp!r}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        check_broadcastable(mask if mask.is_floating_point() else mask.to(x.dtype), x, "mask", "x")


# backend name -> op(x, shift, log_scale, mask, inverse, soft_clamp) -> (y, logdet); the
# C++ ops (csrc/ops.cpp) serve "cpp" and "cuda", the Triton ones below "triton".
_AFFINE_OPS: dict = {}


def _register_affine(prefix: str) -> None:
    ops = torch.ops.pygen
    fwd, bwd = getattr(ops, prefix + "affine_coupling"), getattr(ops, prefix + "affine_coupling_backward")

    @torch.library.register_fake(f"pygen::{prefix}affine_coupling")
    def _(x, shift, log_scale, mask, inverse, soft_clamp):
        return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=row_dtype(x.dtype))

    @torch.library.register_fake(f"pygen::{prefix}affine_coupling_backward")
    def _(grad_y, grad_logdet, x, shift, log_scale, mask, inverse, soft_clamp):
        return [x.new_empty(x.shape) for _ in range(3 if inverse or mask is not None else 2)]

    # Saved for backward: the inputs only (y is recomputed where needed).
    def setup(ctx, inputs, output):
        x, shift, log_scale, mask, inverse, soft_clamp = inputs
        ctx.save_for_backward(x, shift, log_scale, mask)
        ctx.inverse, ctx.soft_clamp = inverse, soft_clamp

    def backward(ctx, grad_y, grad_logdet):
        x, shift, log_scale, mask = ctx.saved_tensors
        if wants_graph():
            def ref(x, shift, log_scale):
                return affine_coupling_ref(x, shift, log_scale, inverse=ctx.inverse, soft_clamp=ctx.soft_clamp or None,
                                           mask=mask)

            return (*grads_via_reference(ref, (x, shift, log_scale), ctx.needs_input_grad[:3], (grad_y, grad_logdet)),
                    None, None, None)
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[:1], dtype=row_dtype(x.dtype))
        grads = bwd(grad_y, grad_logdet, x, shift, log_scale, mask, ctx.inverse, ctx.soft_clamp)
        grad_shift = grads[1] if len(grads) == 3 else grad_y  # forward, no mask: dy/dshift = 1
        return grads[0], grad_shift, grads[-1], None, None, None

    torch.library.register_autograd(f"pygen::{prefix}affine_coupling", backward, setup_context=setup)
    _AFFINE_OPS.update({"cpp": fwd, "cuda": fwd} if prefix == "" else {"triton": fwd})


if _ext.HAS_CPP:
    _register_affine("")

if "triton" in _backend.available_backends():
    from pygen.kernels import coupling as _tk

    @torch.library.custom_op("pygen::triton_affine_coupling", mutates_args=())
    def _triton_affine_coupling(
        x: Tensor, shift: Tensor, log_scale: Tensor, mask: Tensor | None, inverse: bool, soft_clamp: float
    ) -> tuple[Tensor, Tensor]:
        return _tk.affine_forward(x, shift, log_scale, mask, inverse, soft_clamp)

    @torch.library.custom_op("pygen::triton_affine_coupling_backward", mutates_args=())
    def _triton_affine_coupling_backward(
        grad_y: Tensor, grad_logdet: Tensor, x: Tensor, shift: Tensor, log_scale: Tensor,
        mask: Tensor | None, inverse: bool, soft_clamp: float,
    ) -> list[Tensor]:
        return _tk.affine_backward(grad_y, grad_logdet, x, shift, log_scale, mask, inverse, soft_clamp)

    _register_affine("triton_")


# ---- rational-quadratic spline ------------------------------------------------------------------


def _spline_knots(widths, heights, derivatives, tail_bound, min_bin_width, min_bin_height, min_derivative):
    """Knot positions (K+1), bin sizes (K) and knot derivatives (K+1) from raw parameters."""
    k = widths.shape[-1]

    def cum(raw, min_size):
        size = min_size + (1 - min_size * k) * torch.softmax(raw, dim=-1)
        knots = F.pad(torch.cumsum(size, dim=-1), (1, 0))
        knots = 2 * tail_bound * knots - tail_bound
        # pin the ends exactly (the cumulative sum can miss 1 by a few ulp)
        knots = torch.cat([torch.full_like(knots[..., :1], -tail_bound), knots[..., 1:-1],
                           torch.full_like(knots[..., :1], tail_bound)], dim=-1)
        return knots, knots[..., 1:] - knots[..., :-1]

    cw, w = cum(widths, min_bin_width)
    ch, h = cum(heights, min_bin_height)
    # boundary derivatives are 1 so that the linear tails join with slope 1
    boundary = math.log(math.expm1(1 - min_derivative))
    d = min_derivative + F.softplus(F.pad(derivatives, (1, 1), value=boundary))
    return cw, w, ch, h, d


def rq_spline_ref(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    *,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`rq_spline` (the usual chain of small torch ops), float32 or float64."""
    dt = compute_dtype(x, widths, heights, derivatives)
    ct = _compute_dtype(dt)
    xc = x.to(ct)
    cw, w, ch, h, d = _spline_knots(
        widths.to(ct), heights.to(ct), derivatives.to(ct), tail_bound, min_bin_width, min_bin_height, min_derivative
    )
    inside = (xc >= -tail_bound) & (xc <= tail_bound)
    xi = xc.clamp(-tail_bound, tail_bound)  # finite math (and gradients) for tail elements
    k = widths.shape[-1]
    knots = ch if inverse else cw
    idx = (torch.searchsorted(knots.contiguous(), xi[..., None].contiguous(), right=True) - 1).clamp(0, k - 1)

    def at(t):
        return t.gather(-1, idx)[..., 0]

    x_k, w_k, y_k, h_k = at(cw), at(w), at(ch), at(h)
    d_k, d_k1 = at(d[..., :-1]), at(d[..., 1:])
    s_k = h_k / w_k
    if inverse:
        dy = xi - y_k
        a = dy * (d_k + d_k1 - 2 * s_k) + h_k * (s_k - d_k)
        b = h_k * d_k - dy * (d_k + d_k1 - 2 * s_k)
        c = -s_k * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        theta = (2 * c) / (-b - torch.sqrt(disc))
        out = theta * w_k + x_k
    else:
        theta = (xi - x_k) / w_k
        num = h_k * (s_k * theta * theta + d_k * theta * (1 - theta))
        den0 = s_k + (d_k + d_k1 - 2 * s_k) * theta * (1 - theta)
        out = y_k + num / den0
    tt = theta * (1 - theta)
    den = s_k + (d_k + d_k1 - 2 * s_k) * tt
    dnum = s_k * s_k * (d_k1 * theta * theta + 2 * s_k * tt + d_k * (1 - theta) * (1 - theta))
    lad = torch.log(dnum) - 2 * torch.log(den)
    y = torch.where(inside, out, xc)
    # tails add 0 to the log-det; a NaN x adds NaN (NaN propagates within its row)
    lad = torch.where(inside, -lad if inverse else lad, torch.where(torch.isnan(xc), xc, torch.zeros_like(lad)))
    return y.to(dt), _row_sum(lad)


def _check_spline(x, widths, heights, derivatives, tail_bound, min_bin_width, min_bin_height, min_derivative) -> int:
    check_tensor(x, "x")
    for name, t in (("widths", widths), ("heights", heights), ("derivatives", derivatives)):
        check_tensor(t, name)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    k = widths.shape[-1] if widths.dim() == x.dim() + 1 else -1
    if widths.shape != (*x.shape, k) or not 2 <= k <= MAX_SPLINE_BINS:
        raise ValueError(
            f"widths must have shape x.shape + (K,) = {(*x.shape, 'K')} with K >= 2 and K <= {MAX_SPLINE_BINS}; "
            f"got {tuple(widths.shape)}"
        )
    if heights.shape != widths.shape:
        raise ValueError(f"heights must have the shape of widths, {tuple(widths.shape)}; got {tuple(heights.shape)}")
    if derivatives.shape != (*x.shape, k - 1):
        raise ValueError(
            f"derivatives must have shape x.shape + (K-1,) = {(*x.shape, k - 1)} (interior knots); "
            f"got {tuple(derivatives.shape)}"
        )
    if not tail_bound > 0:
        raise ValueError(f"tail_bound must be > 0, got {tail_bound}")
    if not (0 <= min_bin_width and min_bin_width * k < 1) or not (0 <= min_bin_height and min_bin_height * k < 1):
        raise ValueError(f"min_bin_width and min_bin_height must be in [0, 1/K) = [0, {1 / k:.3g}) for K = {k}")
    if not min_derivative > 0 or not min_derivative < 1:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative}")
    return k


def rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    *,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline with linear tails, and its log-determinant.

    The parameterisation of ``unconstrained_rational_quadratic_spline`` (nflows) with
    ``tails="linear"``: bins are softmax(widths) / softmax(heights) on
    [-tail_bound, tail_bound] (each at least min_bin_width / min_bin_height), knot
    derivatives are min_derivative + softplus(derivatives) inside and 1 at the ends.

    Args:
        x: (B, ...) input.
        widths, heights: (B, ..., K) unnormalised bin widths and heights, K >= 2.
        derivatives: (B, ..., K-1) unconstrained derivatives at the interior knots.
        inverse: apply the inverse (solves the quadratic; logdet negated).

    Returns:
        y: shape of x; logdet: (B,), log|dy/dx| summed over non-batch dims (tails add 0).
    """
    _check_spline(x, widths, heights, derivatives, tail_bound, min_bin_width, min_bin_height, min_derivative)
    dt = compute_dtype(x, widths, heights, derivatives)
    kt = kernel_dtype(dt, x.device)
    impl = _pick(_SPLINE_OPS, "rq_spline", backend, x, kt)
    kw = dict(inverse=inverse, tail_bound=float(tail_bound), min_bin_width=float(min_bin_width),
              min_bin_height=float(min_bin_height), min_derivative=float(min_derivative))
    if impl is None:
        return rq_spline_ref(x, widths, heights, derivatives, **kw)
    y, logdet = impl(cast(x, kt), cast(widths, kt), cast(heights, kt), cast(derivatives, kt), **kw)
    return y.to(dt), logdet


# backend name -> op(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width,
# min_bin_height, min_derivative) -> (y, logdet)
_SPLINE_OPS: dict = {}
MAX_SPLINE_BINS = 64  # kMaxSplineBins in csrc/include/pygen/rq_spline.h


def _register_spline(prefix: str) -> None:
    ops = torch.ops.pygen
    fwd, bwd = getattr(ops, prefix + "rq_spline"), getattr(ops, prefix + "rq_spline_backward")

    @torch.library.register_fake(f"pygen::{prefix}rq_spline")
    def _(x, widths, heights, derivatives, *consts):
        return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=row_dtype(x.dtype))

    @torch.library.register_fake(f"pygen::{prefix}rq_spline_backward")
    def _(grad_y, grad_logdet, x, widths, heights, derivatives, *consts):
        return x.new_empty(x.shape), x.new_empty(widths.shape), x.new_empty(heights.shape), x.new_empty(derivatives.shape)

    # Saved for backward: the inputs; the knots are recomputed in the fused backward.
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.consts = inputs[4:]

    def backward(ctx, grad_y, grad_logdet):
        x, widths, heights, derivatives = ctx.saved_tensors
        if wants_graph():
            names = ("inverse", "tail_bound", "min_bin_width", "min_bin_height", "min_derivative")
            kw = dict(zip(names, ctx.consts))
            grads = grads_via_reference(lambda *t: rq_spline_ref(*t, **kw), (x, widths, heights, derivatives),
                                        ctx.needs_input_grad[:4], (grad_y, grad_logdet))
            return (*grads, *(None,) * len(ctx.consts))
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[:1], dtype=row_dtype(x.dtype))
        grads = bwd(grad_y, grad_logdet, x, widths, heights, derivatives, *ctx.consts)
        return (*grads, *(None,) * len(ctx.consts))

    torch.library.register_autograd(f"pygen::{prefix}rq_spline", backward, setup_context=setup)

    def call(x, widths, heights, derivatives, *, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative):
        return fwd(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative)

    _SPLINE_OPS.update({"cpp": call, "cuda": call} if prefix == "" else {"triton": call})


if _ext.HAS_CPP:
    _register_spline("")

if "triton" in _backend.available_backends():
    from pygen.kernels import spline as _tks

    @torch.library.custom_op("pygen::triton_rq_spline", mutates_args=())
    def _triton_rq_spline(
        x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, inverse: bool, tail_bound: float,
        min_bin_width: float, min_bin_height: float, min_derivative: float,
    ) -> tuple[Tensor, Tensor]:
        return _tks.spline_forward(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width,
                                   min_bin_height, min_derivative)

    @torch.library.custom_op("pygen::triton_rq_spline_backward", mutates_args=())
    def _triton_rq_spline_backward(
        grad_y: Tensor, grad_logdet: Tensor, x: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor,
        inverse: bool, tail_bound: float, min_bin_width: float, min_bin_height: float, min_derivative: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _tks.spline_backward(grad_y, grad_logdet, x, widths, heights, derivatives, inverse, tail_bound,
                                    min_bin_width, min_bin_height, min_derivative)

    _register_spline("triton_")

"""Triton kernels for the rational-quadratic spline (forward/inverse, log-det, gradients).

The formulas of csrc/include/pygen/rq_spline.h. Each program holds a [rows, cols, K]
tile in registers: softmax and cumulative sums along K, the bin found by counting the
knots at or below the input (a comparison count over the K lanes already in registers;
nothing (..., K)-sized is written to memory), then the bin's values picked by a one-hot
sum. Arithmetic in float32 (float64 for float64); the log-det (B,) is returned in that dtype.

The grid is 1-D over (row block, column chunk) pairs: a 2-D grid's second dimension stops
at 65535 chunks (a row of ~1M elements at K = 64), and wider column blocks would grow the
[R, C, K] register tile instead.

NaN policy (every backend): a NaN input makes its element's y and its row's log-det NaN.
tl.minimum / tl.maximum drop NaNs by default, hence PropagateNan.ALL on data values below.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._rowwise import _INTERPRET, empty, reduction_dtype, rows_cols

_TILE_ELEMS = 1 << 14 if _INTERPRET else 1024  # elements x K lanes per program, roughly


@triton.jit
def _load_consts(ptr):
    """The spline constants, from a tensor in the accumulation dtype: scalar kernel
    arguments would be float32, too coarse for float64 (min_bin_width = 1e-3 is inexact)."""
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3), tl.load(ptr + 4)


@triton.jit
def _softplus(v):
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0, propagate_nan=tl.PropagateNan.ALL))))


@triton.jit
def _program_tile(chunks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(chunk index, row ids [R], rows [R, 1], columns [1, C]) of this program of the 1-D grid."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // chunks
    pid_c = pid - pid_r * chunks
    r1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64))[None, :]
    return pid_c, r1, r1[:, None], c


@triton.jit
def _knots(raw_ptr, base, kk, kmask, emask, K: tl.constexpr, bound, min_size, ACC_F64: tl.constexpr):
    """Softmax p, lower knots L_k = cw_k and upper knots U_k = cw_{k+1} ([R, C, KP] each)."""
    raw = tl.load(raw_ptr + base * K + kk, mask=emask & kmask, other=-float("inf"))
    if ACC_F64:
        raw = raw.to(tl.float64)
    else:
        raw = raw.to(tl.float32)
    mx = tl.max(raw, axis=2)
    e = tl.where(kmask, tl.exp(raw - mx[:, :, None]), 0.0)
    e = tl.where(emask, e, tl.where(kmask, 1.0, 0.0))  # keep masked-out elements finite
    p = e / tl.sum(e, axis=2)[:, :, None]
    size = tl.where(kmask, min_size + (1.0 - min_size * K) * p, 0.0)
    # the running sum in float64 (as torch.cumsum and the C++ kernels accumulate): in float32
    # its rounding grows with k and doubled the log-det error next to narrow bins
    size64 = size.to(tl.float64)
    cum = tl.cumsum(size64, axis=2)
    upper = tl.where(kk == K - 1, bound, (2.0 * bound * cum - bound).to(size.dtype))
    lower = tl.where(kk == 0, -bound, (2.0 * bound * (cum - size64) - bound).to(size.dtype))
    return p, lower, upper


@triton.jit
def _pick(t, onehot):
    return tl.sum(tl.where(onehot, t, 0.0), axis=2)


@triton.jit
def _locate(x_ptr, w_ptr, h_ptr, d_ptr, r, c, rows, cols, bound, min_w, min_h, min_d, bd,
            K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, ACC_F64: tl.constexpr):
    # r: [R, 1] rows, c: [1, C] columns; element tensors are [R, C], K-lane tensors [R, C, KP]
    emask2 = (r < rows) & (c < cols)
    e_idx2 = r * cols + c
    emask = emask2[:, :, None]
    e_idx = e_idx2[:, :, None]
    kk = tl.arange(0, KP)[None, None, :]
    kmask = kk < K
    v = tl.load(x_ptr + e_idx2, mask=emask2, other=0.0)
    if ACC_F64:
        v = v.to(tl.float64)
    else:
        v = v.to(tl.float32)
    inside = (v >= -bound) & (v <= bound)  # False for NaN: the tail path carries it
    vi = tl.minimum(tl.maximum(v, -bound), bound)  # tail elements only need finite math
    pw, lw, uw = _knots(w_ptr, e_idx, kk, kmask, emask, K, bound, min_w, ACC_F64)
    ph, lh, uh = _knots(h_ptr, e_idx, kk, kmask, emask, K, bound, min_h, ACC_F64)
    if INVERSE:
        below = tl.where(kmask & (lh <= vi[:, :, None]), 1, 0)
    else:
        below = tl.where(kmask & (lw <= vi[:, :, None]), 1, 0)
    k = tl.minimum(tl.maximum(tl.sum(below, axis=2) - 1, 0), K - 1)  # [R, C]
    onehot = kk == k[:, :, None]
    xk = _pick(lw, onehot)
    wk = _pick(uw - lw, onehot)
    yk = _pick(lh, onehot)
    hk = _pick(uh - lh, onehot)
    raw_d = tl.load(d_ptr + e_idx * (K - 1) + kk, mask=emask & (kk < K - 1), other=0.0)
    if ACC_F64:
        raw_d = raw_d.to(tl.float64)
    else:
        raw_d = raw_d.to(tl.float32)
    rd0 = _pick(raw_d, kk == k[:, :, None] - 1)  # raw of knot k (interior when k >= 1)
    rd1 = _pick(raw_d, onehot)  # raw of knot k + 1 (interior when k + 1 <= K - 1)
    d0 = tl.where(k == 0, bd, min_d + _softplus(rd0))
    d1 = tl.where(k == K - 1, bd, min_d + _softplus(rd1))
    s = hk / wk
    if INVERSE:
        dy = vi - yk
        span = d0 + d1 - 2.0 * s
        qa = dy * span + hk * (s - d0)
        qb = hk * d0 - dy * span
        qc = -s * dy
        disc = tl.maximum(qb * qb - 4.0 * qa * qc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        den = -qb - tl.sqrt(disc)
        theta = tl.where(den != 0.0, (2.0 * qc) / tl.where(den != 0.0, den, 1.0), 0.0)
    else:
        theta = (vi - xk) / wk
    return (v, inside, emask2, e_idx2, kk, kmask, onehot, k, pw, ph, rd0, rd1,
            xk, wk, yk, hk, d0, d1, s, theta)


@triton.jit
def _spline_fwd_kernel(
    x_ptr, w_ptr, h_ptr, d_ptr, y_ptr, ld_ptr, part_ptr,
    rows, cols, chunks, consts_ptr,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    bound, min_w, min_h, min_d, bd = _load_consts(consts_ptr)
    pid_c, r1, r, c = _program_tile(chunks, BLOCK_R, BLOCK_C)
    (v, inside, emask, e_idx, kk, kmask, onehot, k, pw, ph, rd0, rd1,
     xk, wk, yk, hk, d0, d1, s, th) = _locate(x_ptr, w_ptr, h_ptr, d_ptr, r, c, rows, cols, bound, min_w, min_h,
                                              min_d, bd, K, KP, INVERSE, ACC_F64)
    t = th * (1.0 - th)
    den = s + (d0 + d1 - 2.0 * s) * t
    dnum = s * s * (d1 * th * th + 2.0 * s * t + d0 * (1.0 - th) * (1.0 - th))
    lad = tl.log(dnum) - 2.0 * tl.log(den)
    if INVERSE:
        out = xk + th * wk
        lad = -lad  # per element: the launcher's sum of the chunk partials must not negate again
    else:
        out = yk + hk * (s * th * th + d0 * t) / den
    out = tl.where(inside, out, v)
    lad = tl.where(inside, lad, tl.where(v == v, 0.0, v))  # tails add 0, a NaN x adds NaN
    lad = tl.where(emask, lad, 0.0)
    tl.store(y_ptr + e_idx, out.to(y_ptr.dtype.element_ty), mask=emask)
    total = tl.sum(lad, axis=1)
    if chunks == 1:
        tl.store(ld_ptr + r1, total.to(ld_ptr.dtype.element_ty), mask=r1 < rows)
    else:
        tl.store(part_ptr + r1 * chunks + pid_c, total, mask=r1 < rows)


@triton.jit
def _knots_backward(g_lo, g_hi, k, kk, kmask, p, K: tl.constexpr, bound, min_size):
    c = 2.0 * bound * (1.0 - min_size * K)
    g_lo = tl.where(k >= 1, g_lo, 0.0)
    g_hi = tl.where(k + 1 <= K - 1, g_hi, 0.0)
    below = (c * (g_lo + g_hi))[:, :, None]
    at = (c * g_hi)[:, :, None]
    kb = k[:, :, None]
    gp = tl.where(kk < kb, below, tl.where(kk == kb, at, 0.0))
    gp = tl.where(kmask, gp, 0.0)
    dot = tl.sum(p * gp, axis=2)
    return p * (gp - dot[:, :, None])


@triton.jit
def _spline_bwd_kernel(
    x_ptr, w_ptr, h_ptr, d_ptr, gy_ptr, gld_ptr, gx_ptr, gw_ptr, gh_ptr, gd_ptr,
    rows, cols, chunks, consts_ptr,
    K: tl.constexpr, KP: tl.constexpr, INVERSE: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    bound, min_w, min_h, min_d, bd = _load_consts(consts_ptr)
    _, _, r, c = _program_tile(chunks, BLOCK_R, BLOCK_C)
    (v, inside, emask, e_idx, kk, kmask, onehot, k, pw, ph, rd0, rd1,
     xk, wk, yk, hk, d0, d1, s, th) = _locate(x_ptr, w_ptr, h_ptr, d_ptr, r, c, rows, cols, bound, min_w, min_h,
                                              min_d, bd, K, KP, INVERSE, ACC_F64)
    gy = tl.load(gy_ptr + e_idx, mask=emask, other=0.0)
    gl = tl.load(gld_ptr + r + c * 0, mask=emask, other=0.0)
    if ACC_F64:
        gy = gy.to(tl.float64)
        gl = gl.to(tl.float64)
    else:
        gy = gy.to(tl.float32)
        gl = gl.to(tl.float32)
    t = th * (1.0 - th)
    dt = 1.0 - 2.0 * th
    span = d0 + d1 - 2.0 * s
    den = s + span * t
    num = hk * (s * th * th + d0 * t)
    D = d1 * th * th + 2.0 * s * t + d0 * (1.0 - th) * (1.0 - th)
    inv_den = 1.0 / den
    q = num * inv_den * inv_den
    y_th = hk * (2.0 * s * th + d0 * dt) * inv_den - q * span * dt
    y_s = hk * th * th * inv_den - q * (1.0 - 2.0 * t)
    y_d0 = hk * t * inv_den - q * t
    y_d1 = -q * t
    y_h = (s * th * th + d0 * t) * inv_den
    l_th = (2.0 * d1 * th + 2.0 * s * dt - 2.0 * d0 * (1.0 - th)) / D - 2.0 * span * dt * inv_den
    l_s = 2.0 / s + 2.0 * t / D - 2.0 * (1.0 - 2.0 * t) * inv_den
    l_d0 = (1.0 - th) * (1.0 - th) / D - 2.0 * t * inv_den
    l_d1 = th * th / D - 2.0 * t * inv_den
    if INVERSE:
        gv = (gy - gl * l_th / wk) * wk / y_th
        fy = -gv
        fl = -gl
    else:
        gv = (gy * y_th + gl * l_th) / wk
        fy = gy
        fl = gl
    # tails: identity, no parameter gradient
    gv = tl.where(inside, gv, gy)
    fy = tl.where(inside, fy, 0.0)
    fl = tl.where(inside, fl, 0.0)
    g_th = fy * y_th + fl * l_th
    g_s = fy * y_s + fl * l_s
    g_d0 = fy * y_d0 + fl * l_d0
    g_d1 = fy * y_d1 + fl * l_d1
    g_xk = -g_th / wk
    g_wk = -g_th * th / wk - g_s * s / wk
    g_hk = fy * y_h + g_s / wk
    gw = _knots_backward(g_xk - g_wk, g_wk, k, kk, kmask, pw, K, bound, min_w)
    gh = _knots_backward(fy - g_hk, g_hk, k, kk, kmask, ph, K, bound, min_h)
    sig0 = 1.0 / (1.0 + tl.exp(-rd0))
    sig1 = 1.0 / (1.0 + tl.exp(-rd1))
    kb = k[:, :, None]
    gd = tl.where(kk == kb - 1, (g_d0 * sig0)[:, :, None], 0.0)
    gd = tl.where((kk == kb) & (kb + 1 <= K - 1), (g_d1 * sig1)[:, :, None], gd)
    em3 = emask[:, :, None]
    tl.store(gx_ptr + e_idx, gv.to(gx_ptr.dtype.element_ty), mask=emask)
    tl.store(gw_ptr + e_idx[:, :, None] * K + kk, gw.to(gw_ptr.dtype.element_ty), mask=em3 & kmask)
    tl.store(gh_ptr + e_idx[:, :, None] * K + kk, gh.to(gh_ptr.dtype.element_ty), mask=em3 & kmask)
    tl.store(gd_ptr + e_idx[:, :, None] * (K - 1) + kk, gd.to(gd_ptr.dtype.element_ty), mask=em3 & (kk < K - 1))


def _spline_tiles(rows: int, cols: int, k: int):
    """(KP, BLOCK_R, BLOCK_C, chunks per row, 1-D grid of row blocks x chunks)."""
    kp = triton.next_power_of_2(k)
    elems = max(1, _TILE_ELEMS // kp)
    block_c = min(triton.next_power_of_2(max(cols, 1)), elems)
    block_r = max(1, min(elems // block_c, triton.next_power_of_2(max(rows, 1))))
    chunks = max(1, triton.cdiv(cols, block_c))
    return kp, block_r, block_c, chunks, (triton.cdiv(rows, block_r) * chunks,)


_CONSTS: dict[tuple, torch.Tensor] = {}


def _consts(x, tail_bound, min_bin_width, min_bin_height, min_derivative) -> torch.Tensor:
    """The constants as a device tensor, cached: no host-to-device copy per call."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    key = (x.device, dtype, tail_bound, min_bin_width, min_bin_height, min_derivative)
    t = _CONSTS.get(key)
    if t is None:
        bd = min_derivative + math.log1p(math.expm1(1.0 - min_derivative))  # boundary derivative (= 1)
        vals = [tail_bound, min_bin_width, min_bin_height, min_derivative, bd]
        t = _CONSTS[key] = torch.tensor(vals, dtype=dtype, device=x.device)
    return t


def spline_forward(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width, min_bin_height,
                   min_derivative) -> tuple[torch.Tensor, torch.Tensor]:
    x, widths, heights, derivatives = (t.contiguous() for t in (x, widths, heights, derivatives))
    rows, cols = rows_cols(x)
    k = widths.shape[-1]
    acc = reduction_dtype(x.dtype)
    y, logdet = empty(x.shape, x), empty((rows,), x, acc)
    if rows == 0:
        return y, logdet
    kp, block_r, block_c, chunks, grid = _spline_tiles(rows, cols, k)
    part = empty((rows, chunks), x, acc) if chunks > 1 else None
    _spline_fwd_kernel[grid](
        x, widths, heights, derivatives, y, logdet, part if part is not None else x,
        rows, cols, chunks, _consts(x, tail_bound, min_bin_width, min_bin_height, min_derivative),
        K=k, KP=kp, INVERSE=inverse, ACC_F64=acc == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    if part is not None:
        torch.sum(part, dim=1, out=logdet)
    return y, logdet


def spline_backward(grad_y, grad_logdet, x, widths, heights, derivatives, inverse, tail_bound, min_bin_width,
                    min_bin_height, min_derivative) -> tuple[torch.Tensor, ...]:
    """grad_logdet may come in float32 for float16/bfloat16 inputs (the log-det's dtype)."""
    x, widths, heights, derivatives = (t.contiguous() for t in (x, widths, heights, derivatives))
    rows, cols = rows_cols(x)
    k = widths.shape[-1]
    outs = (empty(x.shape, x), empty(widths.shape, x), empty(heights.shape, x), empty(derivatives.shape, x))
    if rows * cols == 0:
        return outs
    kp, block_r, block_c, chunks, grid = _spline_tiles(rows, cols, k)
    _spline_bwd_kernel[grid](
        x, widths, heights, derivatives, grad_y.contiguous(), grad_logdet.contiguous(), *outs,
        rows, cols, chunks, _consts(x, tail_bound, min_bin_width, min_bin_height, min_derivative),
        K=k, KP=kp, INVERSE=inverse, ACC_F64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return outs

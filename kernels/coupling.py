"""Triton kernels for the affine coupling transform, its log-determinant and gradients.

Same formulas as csrc/cpu/coupling_cpu.cpp: s = log_scale, or c * tanh(log_scale / c);
a mask m multiplies s and shift, so m = 0 passes x through. The log-det (B,) is returned in
float32 (float64 for float64), the inverse's sign applied once, per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rowwise import empty, expm1, load_acc, view_2d, reduction_dtype, rows_cols, scalar_as, tile, tiles


@triton.jit
def _clamped(ls, clamp, CLAMP: tl.constexpr):
    """(s, ds/dlog_scale)."""
    if CLAMP:
        c = scalar_as(clamp, ls)
        u = ls / c
        # tanh(|u|) = -expm1(-2|u|) / (expm1(-2|u|) + 2): relative accuracy at every u (libdevice
        # tanh does not run under the interpreter; 2 sigmoid(2u) - 1 cancels for small u)
        e = expm1(-2.0 * tl.abs(u))
        th = -e / (e + 2.0)
        th = tl.where(u < 0.0, -th, th)
        return c * th, 1.0 - th * th
    else:
        return ls, ls * 0.0 + 1.0


@triton.jit
def _affine_fwd_kernel(
    x_ptr, t_ptr, ls_ptr, m_ptr, y_ptr, ld_ptr, part_ptr,
    rows, cols, x_sr, x_sc, t_sr, t_sc, l_sr, l_sc, m_sr, m_sc, clamp: tl.float64, chunks,
    INVERSE: tl.constexpr, CLAMP: tl.constexpr, MASK: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, r1, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    x = load_acc(x_ptr, r * x_sr + c * x_sc, inb, ACC_F64)
    t = load_acc(t_ptr, r * t_sr + c * t_sc, inb, ACC_F64)
    s, _ = _clamped(load_acc(ls_ptr, r * l_sr + c * l_sc, inb, ACC_F64), clamp, CLAMP)
    if MASK:
        m = load_acc(m_ptr, r * m_sr + c * m_sc, inb, ACC_F64)
        s = s * m
        t = t * m
    if INVERSE:
        y = (x - t) * tl.exp(-s)
    else:
        y = x * tl.exp(s) + t
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=inb)
    total = tl.sum(tl.where(inb, s, 0.0), axis=1)
    if INVERSE:
        total = -total  # per chunk: the launcher's sum of the partials must not negate again
    if chunks == 1:
        tl.store(ld_ptr + r1, total.to(ld_ptr.dtype.element_ty), mask=r1 < rows)
    else:
        tl.store(part_ptr + r1 * chunks + pid_c, total, mask=r1 < rows)


@triton.jit
def _affine_bwd_kernel(
    x_ptr, t_ptr, ls_ptr, m_ptr, gy_ptr, gld_ptr, gx_ptr, gt_ptr, gls_ptr,
    rows, cols, x_sr, x_sc, t_sr, t_sc, l_sr, l_sc, m_sr, m_sc, clamp: tl.float64,
    INVERSE: tl.constexpr, CLAMP: tl.constexpr, MASK: tl.constexpr, WRITE_GSHIFT: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _, _, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    s, ds = _clamped(load_acc(ls_ptr, r * l_sr + c * l_sc, inb, ACC_F64), clamp, CLAMP)
    m = s * 0.0 + 1.0
    if MASK:
        m = load_acc(m_ptr, r * m_sr + c * m_sc, inb, ACC_F64)
    s = s * m
    g = load_acc(gy_ptr, idx, inb, ACC_F64)
    gld = load_acc(gld_ptr, r, r < rows, ACC_F64)
    x = load_acc(x_ptr, r * x_sr + c * x_sc, inb, ACC_F64)
    if INVERSE:
        e = tl.exp(-s)
        y = (x - load_acc(t_ptr, r * t_sr + c * t_sc, inb, ACC_F64) * m) * e
        gx = g * e
        gt = -g * e * m
        gls = (-g * y - gld) * m * ds
    else:
        e = tl.exp(s)
        gx = g * e
        gt = g * m
        gls = (g * x * e + gld) * m * ds
    tl.store(gx_ptr + idx, gx.to(gx_ptr.dtype.element_ty), mask=inb)
    if WRITE_GSHIFT:
        tl.store(gt_ptr + idx, gt.to(gt_ptr.dtype.element_ty), mask=inb)
    tl.store(gls_ptr + idx, gls.to(gls_ptr.dtype.element_ty), mask=inb)


def affine_forward(
    x: torch.Tensor, shift: torch.Tensor, log_scale: torch.Tensor, mask: torch.Tensor | None,
    inverse: bool, soft_clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, logdet (B,) in float32, float64 for float64); x, shift and log_scale are read in
    place through (row, col) strides where their (B, N) view is one (the halves of a split);
    mask, if given, is expanded to x's shape in x's dtype (any strides)."""
    rows, cols = rows_cols(x)
    shape = x.shape
    (x, x_sr, x_sc), (shift, t_sr, t_sc), (log_scale, l_sr, l_sc) = (
        view_2d(v, rows, cols) for v in (x, shift, log_scale))
    acc = reduction_dtype(x.dtype)
    y = empty(shape, x)
    logdet = empty((rows,), x, acc)
    if rows == 0:
        return y, logdet
    block_r, block_c, chunks, grid = tiles(rows, cols)
    part = empty((rows, chunks), x, acc) if chunks > 1 else None
    m, m_sr, m_sc = view_2d(mask, rows, cols)
    _affine_fwd_kernel[grid](
        x, shift, log_scale, m if m is not None else x, y, logdet, part if part is not None else x,
        rows, cols, x_sr, x_sc, t_sr, t_sc, l_sr, l_sc, m_sr, m_sc, float(soft_clamp), chunks,
        INVERSE=inverse, CLAMP=soft_clamp > 0, MASK=m is not None, ACC_F64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    if part is not None:
        torch.sum(part, dim=1, out=logdet)  # the partials carry the inverse's sign already
    return y, logdet


def affine_backward(
    grad_y: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, shift: torch.Tensor,
    log_scale: torch.Tensor, mask: torch.Tensor | None, inverse: bool, soft_clamp: float,
) -> list[torch.Tensor]:
    """[grad_x, grad_log_scale], with grad_shift between them when inverse or masked.
    grad_logdet may come in float32 for float16/bfloat16 inputs (the log-det's dtype)."""
    rows, cols = rows_cols(x)
    write_shift = inverse or mask is not None
    outs = [empty(x.shape, x) for _ in range(3 if write_shift else 2)]
    (x, x_sr, x_sc), (shift, t_sr, t_sc), (log_scale, l_sr, l_sc) = (
        view_2d(v, rows, cols) for v in (x, shift, log_scale))
    if rows * cols == 0:
        return outs
    gx, gls = outs[0], outs[-1]
    gt = outs[1] if write_shift else gx
    block_r, block_c, _, grid = tiles(rows, cols)
    m, m_sr, m_sc = view_2d(mask, rows, cols)
    _affine_bwd_kernel[grid](
        x, shift, log_scale, m if m is not None else x, grad_y.contiguous(), grad_logdet.contiguous(),
        gx, gt, gls, rows, cols, x_sr, x_sc, t_sr, t_sc, l_sr, l_sc, m_sr, m_sc, float(soft_clamp),
        INVERSE=inverse, CLAMP=soft_clamp > 0, MASK=m is not None, WRITE_GSHIFT=write_shift,
        ACC_F64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return outs

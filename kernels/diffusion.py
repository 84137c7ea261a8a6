"""Triton kernels for the sampler steps (DDPM, DDIM; Euler, Euler-ancestral, DPM-Solver++ 2M)
and the training ops: the formulas of csrc/include/pygen/diffusion.h, per-sample coefficients
gathered from the schedule table inside the kernel, Philox noise drawn in-kernel (or read
when given).

Every tensor argument is made contiguous (or read with an explicit stride: a timestep /
index tensor of one element is shared by every row, stride 0). NaN policy of every backend:
a NaN input stays NaN in its element's outputs and its row's loss, so clamps of data values
use PropagateNan.ALL (tl.minimum / tl.maximum drop NaNs by default). Integer index clamps
need no such care. The (B,) loss is returned in float32 (float64 for float64)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rowwise import empty, load_acc, reduction_dtype, rows_cols, scalar_as, tile, tiles
from .philox import randn_at


@triton.jit
def _sqrt0(x):
    # schedule coefficients only (never data): 0 for x <= 0 and for NaN (a 0/0 variance at
    # abar = abar_prev = 1), as step_sqrt in csrc/include/pygen/diffusion.h
    return tl.where(x > 0.0, tl.sqrt(tl.maximum(x, 0.0)), 0.0)


def _stride(index: torch.Tensor) -> int:
    """Row stride of a per-sample index tensor: 0 for one value shared by every sample."""
    return 0 if index.numel() == 1 else 1


@triton.jit
def _alpha_step_kernel(
    mo_ptr, x_ptr, table_ptr, t_ptr, tp_ptr, noise_ptr, seed_ptr, prev_ptr, x0_ptr,
    rows, cols, offset, n_table, t_stride, tp_stride, final_ab: tl.float64, eta: tl.float64, clip: tl.float64,
    KIND: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr,
    GIVEN: tl.constexpr, DRAW: tl.constexpr, WRITE_X0: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, r1, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    rmask = r1 < rows
    # indices clamped into the table: unchecked on the GPU (a check would sync), never out of bounds
    t = tl.minimum(tl.maximum(tl.load(t_ptr + r1 * t_stride, mask=rmask, other=0), 0), n_table - 1)
    tp = tl.minimum(tl.load(tp_ptr + r1 * tp_stride, mask=rmask, other=0), n_table - 1)
    ab = load_acc(table_ptr, t, rmask, ACC_F64)
    final_ab, eta, clip = scalar_as(final_ab, ab), scalar_as(eta, ab), scalar_as(clip, ab)
    ab_prev = tl.where(tp < 0, final_ab, load_acc(table_ptr, tl.maximum(tp, 0), rmask, ACC_F64))
    sa = _sqrt0(ab)
    sb = _sqrt0(1.0 - ab)
    if KIND == 0:  # DDIM
        s = eta * _sqrt0((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        c_x0 = _sqrt0(ab_prev)
        c_eps = _sqrt0(1.0 - ab_prev - s * s)
        c_x = s * 0.0
        c_noise = s
    else:  # DDPM, fixed_small (1) or fixed_large (2)
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        c_x0 = _sqrt0(ab_prev) * beta / (1.0 - ab)
        c_eps = beta * 0.0
        c_x = _sqrt0(alpha) * (1.0 - ab_prev) / (1.0 - ab)
        if KIND == 1:
            var = tl.maximum((1.0 - ab_prev) / (1.0 - ab) * beta, 1e-20, propagate_nan=tl.PropagateNan.ALL)
        else:
            var = beta
        c_noise = tl.where(t > 0, _sqrt0(var), 0.0)
    mo = load_acc(mo_ptr, idx, inb, ACC_F64)
    x = load_acc(x_ptr, idx, inb, ACC_F64)
    sa2, sb2 = sa[:, None], sb[:, None]
    if PRED == 0:
        eps = mo
        x0 = (x - sb2 * eps) / sa2
    elif PRED == 1:
        x0 = mo
        eps = (x - sa2 * x0) / sb2
    else:
        x0 = sa2 * x - sb2 * mo
        eps = sa2 * mo + sb2 * x
    if CLIP:
        lim = clip[:, None]
        x0 = tl.minimum(tl.maximum(x0, -lim, propagate_nan=tl.PropagateNan.ALL), lim, propagate_nan=tl.PropagateNan.ALL)
        if CLIPPED_EPS:
            eps = (x - sa2 * x0) / sb2
    prev = c_x0[:, None] * x0 + c_eps[:, None] * eps + c_x[:, None] * x
    if GIVEN:
        prev += c_noise[:, None] * load_acc(noise_ptr, idx, inb, ACC_F64)
    if DRAW:
        z = randn_at(tl.load(seed_ptr), offset + idx).to(prev.dtype)
        prev += c_noise[:, None] * z
    tl.store(prev_ptr + idx, prev.to(prev_ptr.dtype.element_ty), mask=inb)
    if WRITE_X0:
        tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=inb)


def alpha_step(model_output, sample, alphas_cumprod, t, prev_t, final_alpha_cumprod, kind, prediction, eta,
               clip_range, clipped_eps, noise, seed, offset, write_x0=True) -> tuple[torch.Tensor, torch.Tensor]:
    mo, x = model_output.contiguous(), sample.contiguous()
    rows, cols = rows_cols(x)
    prev, x0 = empty(x.shape, x), (empty(x.shape, x) if write_x0 else x.new_empty(0))
    if rows * cols == 0:
        return prev, x0
    block_r, block_c, _, grid = tiles(rows, cols)
    acc64 = x.dtype == torch.float64
    table = alphas_cumprod.to(torch.float64 if acc64 else torch.float32).contiguous()
    _alpha_step_kernel[grid](
        mo, x, table, t.contiguous(), prev_t.contiguous(), noise.contiguous() if noise is not None else x,
        seed if seed is not None else t, prev, x0, rows, cols, offset, table.shape[0], _stride(t), _stride(prev_t),
        float(final_alpha_cumprod),
        float(eta),
        float(clip_range), KIND=kind, PRED=prediction, CLIP=clip_range > 0, CLIPPED_EPS=clipped_eps,
        GIVEN=noise is not None, DRAW=noise is None and seed is not None, WRITE_X0=write_x0, ACC_F64=acc64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return prev, x0


@triton.jit
def _sigma_step_kernel(
    mo_ptr, x_ptr, px0_ptr, sig_ptr, idx_ptr, noise_ptr, seed_ptr, prev_ptr, x0_ptr,
    rows, cols, offset, n_sigmas, i_stride, gamma: tl.float64, s_tmin: tl.float64, s_tmax: tl.float64, s_noise: tl.float64,
    KIND: tl.constexpr, PRED: tl.constexpr, HAS_PREV: tl.constexpr, GIVEN: tl.constexpr, DRAW: tl.constexpr,
    WRITE_X0: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """csrc/include/pygen/diffusion.h's sigma_coeffs / sigma_element on a tile."""
    pid_c, r1, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    rmask = r1 < rows
    # the index clamped into the table: unchecked on the GPU (a check would sync), never out of bounds
    i = tl.minimum(tl.maximum(tl.load(idx_ptr + r1 * i_stride, mask=rmask, other=0), 0), n_sigmas - 2)
    s_tab = tl.load(sig_ptr + i, mask=rmask, other=1.0)  # the table's own dtype (the churn gate compares it)
    s = tl.where(rmask, load_acc(sig_ptr, i, rmask, ACC_F64), 1.0)  # keep masked-out rows finite
    sn = load_acc(sig_ptr, i + 1, rmask, ACC_F64)
    zero = s * 0.0
    churn = zero
    c_noise = zero
    mo = load_acc(mo_ptr, idx, inb, ACC_F64)
    x = load_acc(x_ptr, idx, inb, ACC_F64)
    z = mo * 0.0
    if GIVEN:
        z = load_acc(noise_ptr, idx, inb, ACC_F64)
    if DRAW:
        z = randn_at(tl.load(seed_ptr), offset + idx).to(x.dtype)
    if KIND <= 1:  # Euler, Euler-ancestral: sample in sigma space
        s_hat = s
        if KIND == 0:
            # the gate compares the table's value in float64, as the C++ kernels and the schedulers do
            s64 = s_tab.to(tl.float64)
            g = tl.where((s64 >= s_tmin) & (s64 <= s_tmax), scalar_as(gamma, s), zero)
            s_hat = s * (g + 1.0)
            churn = tl.where(g > 0.0, _sqrt0(s_hat * s_hat - s * s) * scalar_as(s_noise, s), zero)
            c_dx = (sn - s_hat) / s_hat
        else:
            up = _sqrt0(sn * sn * (s * s - sn * sn) / (s * s))
            down = _sqrt0(sn * sn - up * up)
            c_dx = (down - s) / s
            c_noise = up
        if PRED == 0:
            px = zero + 1.0
            pm = -s_hat
        elif PRED == 1:
            px = zero
            pm = zero + 1.0
        else:
            s2 = s * s + 1.0
            px = 1.0 / s2
            pm = -s / tl.sqrt(s2)
        xh = x + churn[:, None] * z
        x0 = px[:, None] * xh + pm[:, None] * mo
        prev = xh + c_dx[:, None] * (xh - x0) + c_noise[:, None] * z
    else:  # DPM-Solver++ 2M on the VP sample
        al = 1.0 / tl.sqrt(s * s + 1.0)
        aln = 1.0 / tl.sqrt(sn * sn + 1.0)
        em1 = sn / s - 1.0
        c_x = sn * aln / (s * al)
        c_x0 = -aln * em1
        if PRED == 0:
            px = 1.0 / al
            pm = -s
        elif PRED == 1:
            px = zero
            pm = zero + 1.0
        else:
            px = al
            pm = -s * al
        x0 = px[:, None] * x + pm[:, None] * mo
        prev = c_x[:, None] * x + c_x0[:, None] * x0
        if HAS_PREV:
            second = (i >= 1) & (sn > 0.0) & rmask
            sp = load_acc(sig_ptr, tl.maximum(i - 1, 0), rmask, ACC_F64)
            h = tl.log(s / tl.where(second, sn, 0.5 * s))
            r = tl.log(tl.where(second, sp, 2.0 * s) / s) / h
            if KIND == 2:
                c_d = -aln * em1 / (2.0 * r)
            else:
                c_d = aln * (em1 / h + 1.0) / r
            c_d = tl.where(second, c_d, 0.0)
            p = load_acc(px0_ptr, idx, inb & second[:, None], ACC_F64)
            prev += c_d[:, None] * (x0 - p)
    tl.store(prev_ptr + idx, prev.to(prev_ptr.dtype.element_ty), mask=inb)
    if WRITE_X0:
        tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=inb)


def sigma_step(model_output, sample, sigmas, index, prev_x0, kind, prediction, gamma, s_tmin, s_tmax, s_noise,
               noise, seed, offset, write_x0=True) -> tuple[torch.Tensor, torch.Tensor]:
    mo, x = model_output.contiguous(), sample.contiguous()
    rows, cols = rows_cols(x)
    prev, x0 = empty(x.shape, x), (empty(x.shape, x) if write_x0 else x.new_empty(0))
    if rows * cols == 0:
        return prev, x0
    block_r, block_c, _, grid = tiles(rows, cols)
    acc64 = x.dtype == torch.float64
    table = (sigmas if sigmas.dtype in (torch.float32, torch.float64) else sigmas.float()).contiguous()
    # noise matters only where a row is noisy; the kernel draws or reads it for whole tiles
    noisy = kind == 1 or (kind == 0 and gamma > 0)
    _sigma_step_kernel[grid](
        mo, x, prev_x0.contiguous() if prev_x0 is not None else x, table, index.contiguous(),
        noise.contiguous() if noise is not None else x, seed if seed is not None else index, prev, x0,
        rows, cols, offset, table.shape[0], _stride(index), float(gamma), float(s_tmin), float(s_tmax), float(s_noise),
        KIND=kind, PRED=prediction, HAS_PREV=prev_x0 is not None and kind >= 2,
        GIVEN=noisy and noise is not None, DRAW=noisy and noise is None and seed is not None, WRITE_X0=write_x0,
        ACC_F64=acc64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return prev, x0


@triton.jit
def _loss_row(table_ptr, t_ptr, t_stride, n_table, r1, rmask, PRED: tl.constexpr, SNR: tl.constexpr, gamma,
              ACC_F64: tl.constexpr):
    """Per-row sqrt(ab), sqrt(1 - ab) and the Min-SNR-gamma weight (t clamped into the table)."""
    t = tl.minimum(tl.maximum(tl.load(t_ptr + r1 * t_stride, mask=rmask, other=0), 0), n_table - 1)
    ab = load_acc(table_ptr, t, rmask, ACC_F64)
    ab = tl.where(rmask, ab, 0.5)  # keep masked-out rows finite
    w = ab * 0.0 + 1.0
    if SNR:
        snr = ab / (1.0 - ab)
        m = tl.minimum(snr, scalar_as(gamma, snr), propagate_nan=tl.PropagateNan.ALL)
        if PRED == 0:
            w = m / snr
        elif PRED == 2:
            w = m / (snr + 1.0)
        else:
            w = m
    return _sqrt0(ab), _sqrt0(1.0 - ab), w


@triton.jit
def _q_sample_kernel(x0_ptr, table_ptr, t_ptr, seed_ptr, xt_ptr, rows, cols, offset, n_table, t_stride,
                     ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, r1, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    sa, sb, _ = _loss_row(table_ptr, t_ptr, t_stride, n_table, r1, r1 < rows, 0, False, 0.0, ACC_F64)
    x0 = load_acc(x0_ptr, idx, inb, ACC_F64)
    eps = randn_at(tl.load(seed_ptr), offset + idx).to(x0.dtype)
    tl.store(xt_ptr + idx, (sa[:, None] * x0 + sb[:, None] * eps).to(xt_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _mse_kernel(mo_ptr, x0_ptr, table_ptr, t_ptr, seed_ptr, gl_ptr, loss_ptr, part_ptr, gmo_ptr, gx0_ptr,
                rows, cols, offset, n_table, t_stride, gamma: tl.float64, chunks,
                PRED: tl.constexpr, SNR: tl.constexpr, BACKWARD: tl.constexpr, WRITE_GX0: tl.constexpr,
                ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c, r1, r, c, inb, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    rmask = r1 < rows
    sa, sb, w = _loss_row(table_ptr, t_ptr, t_stride, n_table, r1, rmask, PRED, SNR, gamma, ACC_F64)
    scale = (w / cols)[:, None]
    x0 = load_acc(x0_ptr, idx, inb, ACC_F64)
    mo = load_acc(mo_ptr, idx, inb, ACC_F64)
    eps = randn_at(tl.load(seed_ptr), offset + idx).to(x0.dtype)
    if PRED == 0:
        target = eps
        dt = x0 * 0.0
    elif PRED == 1:
        target = x0
        dt = x0 * 0.0 + 1.0
    else:
        target = sa[:, None] * eps - sb[:, None] * x0
        dt = x0 * 0.0 - sb[:, None]
    d = mo - target
    if BACKWARD:
        g = load_acc(gl_ptr, r, r < rows, ACC_F64)
        gm = g * scale * 2.0 * d
        tl.store(gmo_ptr + idx, gm.to(gmo_ptr.dtype.element_ty), mask=inb)
        if WRITE_GX0:  # only when x0 needs a gradient
            tl.store(gx0_ptr + idx, (-gm * dt).to(gx0_ptr.dtype.element_ty), mask=inb)
    else:
        total = tl.sum(tl.where(inb, d * d * scale, 0.0), axis=1)
        if chunks == 1:
            tl.store(loss_ptr + r1, total.to(loss_ptr.dtype.element_ty), mask=rmask)
        else:
            tl.store(part_ptr + r1 * chunks + pid_c, total, mask=rmask)


def _table_for(x, alphas_cumprod):
    return alphas_cumprod.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def q_sample(x0, alphas_cumprod, t, seed, offset) -> torch.Tensor:
    x0 = x0.contiguous()
    rows, cols = rows_cols(x0)
    xt = empty(x0.shape, x0)
    if rows * cols == 0:
        return xt
    block_r, block_c, _, grid = tiles(rows, cols)
    _q_sample_kernel[grid](x0, _table_for(x0, alphas_cumprod), t.contiguous(), seed, xt, rows, cols, offset,
                           alphas_cumprod.shape[0], _stride(t), ACC_F64=x0.dtype == torch.float64, BLOCK_R=block_r,
                           BLOCK_C=block_c)
    return xt


def diffusion_mse(grad_loss, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma,
                  write_grad_x0=True):
    """Forward (grad_loss None): the (B,) loss in float32 (float64 for float64). Backward:
    (grad_model_output, grad_x0), grad_x0 empty (0,) unless ``write_grad_x0``; grad_loss may
    come in float32 for float16/bfloat16 inputs."""
    x0, mo = x0.contiguous(), model_output.contiguous()
    rows, cols = rows_cols(x0)
    backward = grad_loss is not None
    acc = reduction_dtype(x0.dtype)
    outs = ((empty(x0.shape, x0), empty(x0.shape if write_grad_x0 else (0,), x0)) if backward
            else (empty((rows,), x0, acc),))
    if rows == 0 or (backward and cols == 0):
        return outs
    if cols == 0:
        outs[0].zero_()
        return outs
    block_r, block_c, chunks, grid = tiles(rows, cols)
    part = empty((rows, chunks), x0, acc) if (not backward and chunks > 1) else None
    dummy = x0
    _mse_kernel[grid](
        mo, x0, _table_for(x0, alphas_cumprod), t.contiguous(), seed,
        grad_loss.contiguous() if backward else dummy, dummy if backward else outs[0],
        part if part is not None else dummy, outs[0] if backward else dummy,
        outs[1] if backward and write_grad_x0 else dummy,
        rows, cols, offset, alphas_cumprod.shape[0], _stride(t), float(snr_gamma), chunks,
        PRED=prediction, SNR=snr_gamma > 0, BACKWARD=backward, WRITE_GX0=backward and write_grad_x0,
        ACC_F64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    if part is not None:
        torch.sum(part, dim=1, out=outs[0])
    return outs

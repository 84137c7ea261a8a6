"""Triton kernels for reparameterized sampling, Gaussian KL and their gradients.

Each program handles a (BLOCK_R rows x BLOCK_C columns) tile of the (B, N) view. A row
longer than BLOCK_C is split over several programs whose KL partials are summed in
column order afterwards (deterministic, no atomics). Arithmetic runs in float32
(float64 for float64 inputs); the noise is always drawn in float32, as on every backend.
The KL is returned in that accumulation dtype too (float16 KLs overflow), and its terms
use e^x - 1 - x without cancellation: exp(lv) - 1 - lv loses every digit as lv -> 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import randn_at

from ._rowwise import empty as _empty
from ._rowwise import exp_m1_m_x, expm1
from ._rowwise import load_acc as _load
from ._rowwise import view_2d as _view_2d
from ._rowwise import reduction_dtype
from ._rowwise import rows_cols as _rows_cols
from ._rowwise import tile
from ._rowwise import tiles as _tiles


@triton.jit
def _gaussian_fwd_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, seed_ptr, z_ptr, kl_ptr, part_ptr,
    rows, cols, offset, mu_sr, mu_sc, lv_sr, lv_sc, pmu_sr, pmu_sc, plv_sr, plv_sc, chunks,
    SAMPLE: tl.constexpr, KL: tl.constexpr, PRIOR: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, r1, r, c, mask, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    m = _load(mu_ptr, r * mu_sr + c * mu_sc, mask, ACC_F64)
    lv = _load(lv_ptr, r * lv_sr + c * lv_sc, mask, ACC_F64)
    if SAMPLE:
        seed = tl.load(seed_ptr)
        eps = randn_at(seed, offset + idx).to(m.dtype)
        z = m + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)
    if KL:
        if PRIOR:
            pm = _load(pmu_ptr, r * pmu_sr + c * pmu_sc, mask, ACC_F64)
            pl = _load(plv_ptr, r * plv_sr + c * plv_sc, mask, ACC_F64)
            d = m - pm
            term = exp_m1_m_x(lv - pl) + d * d * tl.exp(-pl)
        else:
            term = exp_m1_m_x(lv) + m * m
        s = tl.sum(tl.where(mask, term, 0.0), axis=1)
        if chunks == 1:
            tl.store(kl_ptr + r1, (0.5 * s).to(kl_ptr.dtype.element_ty), mask=r1 < rows)
        else:
            tl.store(part_ptr + r1 * chunks + pid_c, s, mask=r1 < rows)


@triton.jit
def _gaussian_bwd_kernel(
    mu_ptr, lv_ptr, pmu_ptr, plv_ptr, seed_ptr, gz_ptr, gkl_ptr,
    gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
    rows, cols, offset, mu_sr, mu_sc, lv_sr, lv_sc, pmu_sr, pmu_sc, plv_sr, plv_sc,
    GZ: tl.constexpr, GKL: tl.constexpr, PRIOR: tl.constexpr, WRITE_GMU: tl.constexpr, WRITE_PRIOR: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c, r1, r, c, mask, idx = tile(rows, cols, BLOCK_R, BLOCK_C)
    lv = _load(lv_ptr, r * lv_sr + c * lv_sc, mask, ACC_F64)
    g_mu = lv * 0.0
    g_lv = lv * 0.0
    if GZ:
        g = _load(gz_ptr, idx, mask, ACC_F64)
        seed = tl.load(seed_ptr)
        eps = randn_at(seed, offset + idx).to(lv.dtype)
        g_mu += g
        g_lv += 0.5 * g * tl.exp(0.5 * lv) * eps
    if GKL:
        gk = _load(gkl_ptr, r, r < rows, ACC_F64)
        m = _load(mu_ptr, r * mu_sr + c * mu_sc, mask, ACC_F64)
        if PRIOR:
            pl = _load(plv_ptr, r * plv_sr + c * plv_sc, mask, ACC_F64)
            d = m - _load(pmu_ptr, r * pmu_sr + c * pmu_sc, mask, ACC_F64)
            inv_pvar = tl.exp(-pl)
            ratio_m1 = expm1(lv - pl)  # var / prior var - 1
            dm = gk * d * inv_pvar
            g_mu += dm
            g_lv += 0.5 * gk * ratio_m1
            if WRITE_PRIOR:  # prior gradients only when asked for
                tl.store(gpmu_ptr + idx, (-dm).to(gpmu_ptr.dtype.element_ty), mask=mask)
                gpl = -0.5 * gk * (ratio_m1 + d * d * inv_pvar)
                tl.store(gplv_ptr + idx, gpl.to(gplv_ptr.dtype.element_ty), mask=mask)
        else:
            g_mu += gk * m
            g_lv += 0.5 * gk * expm1(lv)
    if WRITE_GMU:
        tl.store(gmu_ptr + idx, g_mu.to(gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + idx, g_lv.to(glv_ptr.dtype.element_ty), mask=mask)


def gaussian_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: int,
    sample: bool,
    kl: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """z (shape of mu) when ``sample``, per-row KL (B,) in float32 (float64 for float64) when
    ``kl``. mu and logvar are read in place through (row, col) strides when their (B, N) view
    is one (the halves of a chunk()ed encoder output); priors are expanded to mu (any strides)."""
    rows, cols = _rows_cols(mu)
    mu2, mu_sr, mu_sc = _view_2d(mu, rows, cols)
    lv2, lv_sr, lv_sc = _view_2d(logvar, rows, cols)
    acc = reduction_dtype(mu.dtype)
    z = _empty(mu.shape, mu) if sample else None
    kl_out = _empty((rows,), mu, acc) if kl else None
    if rows == 0 or (cols == 0 and not kl):
        return z, kl_out
    block_r, block_c, chunks, grid = _tiles(rows, cols)
    part = _empty((rows, chunks), mu, acc) if kl and chunks > 1 else None
    pmu, pmu_sr, pmu_sc = _view_2d(prior_mu, rows, cols)
    plv, plv_sr, plv_sc = _view_2d(prior_logvar, rows, cols)
    _gaussian_fwd_kernel[grid](
        mu2, lv2, pmu if pmu is not None else mu2, plv if plv is not None else mu2,
        seed if seed is not None else mu2, z if z is not None else mu2,
        kl_out if kl_out is not None else mu2, part if part is not None else mu2,
        rows, cols, offset, mu_sr, mu_sc, lv_sr, lv_sc, pmu_sr, pmu_sc, plv_sr, plv_sc, chunks,
        SAMPLE=sample, KL=kl, PRIOR=pmu is not None, ACC_F64=acc == torch.float64,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    if part is not None:
        torch.mul(part.sum(dim=1), 0.5, out=kl_out)  # the 0.5 of the single-chunk path, once
    return z, kl_out


def gaussian_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor | None,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None,
    prior_logvar: torch.Tensor | None,
    seed: torch.Tensor | None,
    offset: int,
    write_grad_mu: bool,
    prior_grads: bool = True,
) -> list[torch.Tensor]:
    """[grad_mu (if write_grad_mu), grad_logvar, grad_prior_mu, grad_prior_logvar (if prior and prior_grads)].
    grad_kl may come in float32 for float16/bfloat16 inputs (the KL's dtype): loads convert."""
    rows, cols = _rows_cols(logvar)
    has_prior = prior_mu is not None
    write_prior = has_prior and prior_grads
    outs = [_empty(logvar.shape, logvar) for _ in range(int(write_grad_mu) + 1 + 2 * int(write_prior))]
    if rows * cols == 0:
        return outs
    gmu = outs[0] if write_grad_mu else None
    glv = outs[int(write_grad_mu)]
    gpmu, gplv = (outs[-2], outs[-1]) if write_prior else (None, None)
    block_r, block_c, _, grid = _tiles(rows, cols)
    pmu, pmu_sr, pmu_sc = _view_2d(prior_mu, rows, cols)
    plv, plv_sr, plv_sc = _view_2d(prior_logvar, rows, cols)
    lv2, lv_sr, lv_sc = _view_2d(logvar, rows, cols)  # read in place where the strides allow
    mu2, mu_sr, mu_sc = _view_2d(mu, rows, cols) if mu is not None else (lv2, lv_sr, lv_sc)
    dummy = lv2
    _gaussian_bwd_kernel[grid](
        mu2, lv2, pmu if pmu is not None else dummy, plv if plv is not None else dummy,
        seed if seed is not None else dummy,
        grad_z.contiguous() if grad_z is not None else dummy,
        grad_kl.contiguous() if grad_kl is not None else dummy,
        gmu if gmu is not None else dummy, glv,
        gpmu if gpmu is not None else dummy, gplv if gplv is not None else dummy,
        rows, cols, offset, mu_sr, mu_sc, lv_sr, lv_sc, pmu_sr, pmu_sc, plv_sr, plv_sc,
        GZ=grad_z is not None, GKL=grad_kl is not None, PRIOR=has_prior, WRITE_GMU=write_grad_mu,
        WRITE_PRIOR=write_prior,
        ACC_F64=logvar.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return outs

"""Shared by pygen's Triton kernels on a (rows, cols) view with a per-row sum: tiling,
views, output allocation (with the test-suite's NaN poisoning) and loads in the
accumulation dtype."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter pays ~10 ms per program: give it few, large tiles.
_TILE = 1 << 16 if _INTERPRET else 2048
_MAX_GRID_1 = 65535


@triton.jit
def load_acc(ptr, idx, mask, ACC_F64: tl.constexpr):
    """Masked load, converted to float32 (float64 when ACC_F64)."""
    x = tl.load(ptr + idx, mask=mask, other=0.0)
    if ACC_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def exp_m1_m_x(x):
    """e^x - 1 - x without cancellation (every backend's formula): for |x| < 0.5 the Taylor
    series through x^16/16! in Horner form (truncation < 1e-19 relative: float64-exact),
    else expm1(x) - x, which cancels at most one bit there. NaN stays NaN (the else branch)."""
    p = 1.0 / 20922789888000.0  # 1/16!
    p = 1.0 / 1307674368000.0 + x * p
    p = 1.0 / 87178291200.0 + x * p
    p = 1.0 / 6227020800.0 + x * p
    p = 1.0 / 479001600.0 + x * p
    p = 1.0 / 39916800.0 + x * p
    p = 1.0 / 3628800.0 + x * p
    p = 1.0 / 362880.0 + x * p
    p = 1.0 / 40320.0 + x * p
    p = 1.0 / 5040.0 + x * p
    p = 1.0 / 720.0 + x * p
    p = 1.0 / 120.0 + x * p
    p = 1.0 / 24.0 + x * p
    p = 1.0 / 6.0 + x * p
    p = 0.5 + x * p
    return tl.where(tl.abs(x) < 0.5, x * x * p, (tl.exp(x) - 1.0) - x)


@triton.jit
def expm1(x):
    """e^x - 1, accurate near 0 (libdevice's expm1 does not run under the interpreter)."""
    return tl.where(tl.abs(x) < 0.5, exp_m1_m_x(x) + x, tl.exp(x) - 1.0)


@triton.jit
def scalar_as(v, like):
    """Scalar argument v as a tensor shaped and typed like ``like``. Kernels declare float
    scalars ``tl.float64`` (a plain Python float arrives as fp32, which would round eta,
    soft_clamp, ... in float64 kernels); adding them to a zero tensor keeps the float64 value
    (also under the interpreter, where a cast of the scalar would round it), and the cast
    keeps float32 kernels in float32."""
    return (tl.zeros_like(like) + v).to(like.dtype)


@triton.jit
def tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of the (rows, cols) view: (chunk index, row ids [R], rows [R, 1],
    columns [1, C], in-bounds mask [R, C], flat element indices [R, C]), int64 throughout."""
    pid_c = tl.program_id(1).to(tl.int64)
    r1 = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r = r1[:, None]
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
    inb = (r < rows) & (c < cols)
    return pid_c, r1, r, c, inb, r * cols + c


def tiles(rows: int, cols: int) -> tuple[int, int, int, tuple[int, int]]:
    block_c = min(triton.next_power_of_2(max(cols, 1)), _TILE)
    block_c = max(block_c, triton.next_power_of_2(triton.cdiv(cols, _MAX_GRID_1)))
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    chunks = max(1, triton.cdiv(cols, block_c))
    return block_r, block_c, chunks, (triton.cdiv(rows, block_r), chunks)


def rows_cols(x: torch.Tensor) -> tuple[int, int]:
    rows = x.shape[0]
    cols = 1
    for s in x.shape[1:]:
        cols *= s
    return rows, cols


def view_2d(p: torch.Tensor | None, rows: int, cols: int):
    """(p as (rows, cols), row stride, col stride): a view, read in place, whenever the strides
    allow it (a row-strided half of a split, a broadcast prior or mask); else a copy."""
    if p is None:
        return None, 0, 0
    p2 = p.reshape(rows, cols)
    return p2, p2.stride(0), p2.stride(1)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every (B,) reduction (KL, log-det, loss) of every backend: float32, float64 for float64
    (a float16 KL of a 4x64x64 latent overflows)."""
    return torch.promote_types(dtype, torch.float32)


def empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    from pygen import _alloc  # the poisoning hook of the test-suite

    return _alloc.empty(shape, dtype or like.dtype, like.device)



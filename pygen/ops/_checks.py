"""Argument checks shared by the ops: clear Python errors naming the argument."""

from __future__ import annotations

import torch


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__}"


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (B, ...) with a batch dimension, got a 0-dim tensor")
    return x


def check_like(x, ref: torch.Tensor, name: str, ref_name: str) -> torch.Tensor:
    """x must match ref in shape and device; any floating dtype (the ops promote, see
    :func:`compute_dtype`)."""
    check_tensor(x, name)
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}; got {tuple(x.shape)}")
    return x


def check_broadcastable(x, ref: torch.Tensor, name: str, ref_name: str) -> torch.Tensor:
    """x must be a floating tensor that broadcasts to ref's shape, on ref's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {_describe(x)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    try:
        ok = torch.broadcast_shapes(x.shape, ref.shape) == ref.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the shape of {ref_name}, {tuple(ref.shape)}; got {tuple(x.shape)}"
        )
    return x


# ---- dtypes ----------------------------------------------------------------------------
# Inputs of mixed floating dtypes (autocast: a bf16 conditioner output with a float32 x)
# are promoted as torch's arithmetic would, and the kernels run in that dtype. On CPU the
# compiled kernels compute float16/bfloat16 in float32: the inputs are cast (autograd casts
# the gradients back). Per-row results (KL, log-det, loss) are float32, or float64 for
# float64 inputs, on every backend (a float16 KL over a 4x64x64 latent overflows).

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors) -> torch.dtype:
    """The promoted dtype of the given tensors (None entries are skipped)."""
    dt = None
    for t in tensors:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the kernels run in for results of ``dtype`` on ``device``."""
    return torch.float32 if device.type == "cpu" and dtype in _HALF else dtype


def row_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-row results for inputs of ``dtype``: float32, or float64."""
    return torch.promote_types(dtype, torch.float32)


def cast(t, dtype: torch.dtype):
    """t in dtype (None stays None; no copy when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)

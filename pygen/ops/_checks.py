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
    """x must match ref in shape, dtype and device."""
    check_tensor(x, name)
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}; got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name}, {ref.dtype}; got {x.dtype}")
    return x


def check_broadcastable(x, ref: torch.Tensor, name: str, ref_name: str) -> torch.Tensor:
    """x must broadcast to ref's shape, with ref's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {_describe(x)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; both must be on one device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name}, {ref.dtype}; got {x.dtype}")
    try:
        ok = torch.broadcast_shapes(x.shape, ref.shape) == ref.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the shape of {ref_name}, {tuple(ref.shape)}; got {tuple(x.shape)}"
        )
    return x

"""Backend names, availability and selection (argument > ``use_backend`` > ``"auto"``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from pygen import _ext

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
# dtypes each compiled backend implements; "torch" takes any floating dtype.
CPP_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA_AVAILABLE = torch.cuda.is_available()


def _triton_status() -> str | None:
    """None when Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not (_CUDA_AVAILABLE or _INTERPRET):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing pygen to run Triton on CPU)"
    return None


_UNAVAILABLE: dict[str, str] = {}
if not _ext.HAS_CPP:
    _UNAVAILABLE["cpp"] = f"the compiled extension pygen._C did not load ({_ext.LOAD_ERROR})"
if not _ext.HAS_CUDA_KERNELS:
    _UNAVAILABLE["cuda"] = "pygen was built without CUDA kernels"
elif not _CUDA_AVAILABLE:
    _UNAVAILABLE["cuda"] = "no CUDA device is available"
if (why := _triton_status()) is not None:
    _UNAVAILABLE["triton"] = why

_stack: list[str] = []


def available_backends() -> list[str]:
    """The backends that can run on this machine, e.g. ``['torch', 'cpp']``."""
    return [b for b in BACKENDS[1:] if b not in _UNAVAILABLE]


def _validate(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in _UNAVAILABLE:
        raise RuntimeError(
            f"backend {name!r} is not available: {_UNAVAILABLE[name]}; "
            f"available backends: {available_backends()}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pygen ops in this block on ``name`` unless a call passes ``backend=`` itself."""
    _stack.append(_validate(name))
    try:
        yield
    finally:
        _stack.pop()


def requested(backend: str | None) -> str:
    """What the caller asked for: the argument, else the ``use_backend`` setting, else "auto"."""
    return backend if backend is not None else (_stack[-1] if _stack else "auto")


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for a call on tensors of ``device`` and ``dtype``."""
    name = _validate(requested(backend))
    if name == "auto":
        if device.type == "cuda":
            if "cuda" not in _UNAVAILABLE and dtype in GPU_DTYPES:
                return "cuda"
            if "triton" not in _UNAVAILABLE and dtype in GPU_DTYPES:
                return "triton"
        elif device.type == "cpu" and "cpp" not in _UNAVAILABLE and dtype in CPP_DTYPES:
            return "cpp"
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors; got tensors on {device}")
        if dtype not in CPP_DTYPES:
            raise TypeError(f"backend 'cpp' supports float32 and float64; got {dtype} (use backend='torch')")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors; got tensors on {device}")
        if dtype not in GPU_DTYPES:
            raise TypeError(f"backend 'cuda' supports {GPU_DTYPES}; got {dtype}")
    elif name == "triton":
        if device.type == "cpu" and not _INTERPRET:
            raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton' runs on CUDA tensors; got tensors on {device}")
        if dtype not in GPU_DTYPES:
            raise TypeError(f"backend 'triton' supports {GPU_DTYPES}; got {dtype}")
    return name

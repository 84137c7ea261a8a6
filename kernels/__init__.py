"""Triton kernels of pygen, installed as ``pygen.kernels``.

Import-safe without triton: callers check :data:`HAS_TRITON` first.
"""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]

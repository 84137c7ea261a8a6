"""Loads the compiled extension ``pygen._C`` (which registers ``torch.ops.pygen.*``)."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from pygen import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as e:  # a source checkout that was not built, or a broken build
    _C = None
    LOAD_ERROR = str(e)

HAS_CPP = _C is not None
HAS_CUDA_KERNELS = bool(_C is not None and _C.cuda_enabled())

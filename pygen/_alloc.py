"""Output allocation for the Python-launched kernels (Triton), with the tests' poison hook.

``pygen.testing.poison_outputs()`` flips :data:`POISON` (and the C++ twin in ``pygen._C``)
so that every output starts as NaN: an element a kernel forgets to write then fails the
comparison with the reference instead of passing on leftover memory.
"""

from __future__ import annotations

import torch

POISON = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan"))
    return t

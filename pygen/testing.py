"""Helpers for pygen's test-suite (and for users testing code built on pygen)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pygen import _alloc, _ext


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel writes it (all backends)."""
    _alloc.POISON = True
    if _ext.HAS_CPP:
        _ext._C._set_poison(True)
    try:
        yield
    finally:
        _alloc.POISON = False
        if _ext.HAS_CPP:
            _ext._C._set_poison(False)

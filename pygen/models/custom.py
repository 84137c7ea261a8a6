"""Your own networks inside pygen's models: a network named by an import spec.

A spec is ``"package.module:Class"`` or ``{"target": "package.module:Class", "kwargs": {...}}``
(JSON: it is saved in the model's config, and :func:`pygen.models.load` rebuilds the network by
importing it again: the module must be importable where the model is loaded). The class must
be an ``nn.Module`` subclass (checked before anything is called: a checkpoint cannot make
pygen call an arbitrary function). Keyword arguments the family knows (``shape``,
``num_classes``, ``latent_dim``, ``z_dim``) are passed when the constructor takes them by
that name and the spec's kwargs do not set them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

__all__ = ["NetSpec", "normalize_spec", "build_network"]

NetSpec = str | dict[str, Any]


def normalize_spec(spec: NetSpec, role: str) -> dict[str, Any]:
    """``spec`` as ``{"target": "pkg.mod:Class", "kwargs": {...}}`` (ValueError naming ``role`` otherwise)."""
    if isinstance(spec, str):
        spec = {"target": spec, "kwargs": {}}
    if not isinstance(spec, dict) or set(spec) - {"target", "kwargs"} or not isinstance(spec.get("target"), str):
        raise ValueError(f"{role} must be 'package.module:Class' or {{'target': 'package.module:Class', 'kwargs': "
                         f"{{...}}}}, got {spec!r}")  # fmt: skip
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{role}: kwargs must be a JSON object, got {kwargs!r}")
    module, sep, name = spec["target"].partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{role}: target must be 'package.module:Class', got {spec['target']!r}")
    return {"target": spec["target"], "kwargs": dict(kwargs)}


def build_network(spec: NetSpec, role: str, **known: Any) -> nn.Module:
    """Import and construct the network of ``spec`` (see the module docstring)."""
    spec = normalize_spec(spec, role)
    module_name, _, qualname = spec["target"].partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{role}: cannot import {module_name!r} for {spec['target']!r} ({e}); the module must be "
                         f"importable (installed, or on PYTHONPATH) wherever the model is built or loaded") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{role}: module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ValueError(f"{role}: {spec['target']!r} is not an nn.Module class")
    params = inspect.signature(obj).parameters
    extra = {k: v for k, v in known.items() if k not in spec["kwargs"] and k in params}
    try:
        return obj(**spec["kwargs"], **extra)
    except TypeError as e:
        raise ValueError(f"{role}: {spec['target']}(**{spec['kwargs']}) failed: {e}") from None

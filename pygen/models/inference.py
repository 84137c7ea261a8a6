"""A model at sampling time: its device, eval mode around a call, and the decorator every
family's ``sample`` (and other generation methods) wears.

Sampling runs in eval mode: dropout and batch-norm statistics in training mode would make
"sample i depends only on (seed, i)" false (the same seed twice would differ, and
``sample(8)[:4]`` would differ from ``sample(4)``). The caller's mode is restored after.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["eval_mode", "sampling", "model_device", "compile_denoisers"]

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; every submodule's own training flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def sampling(fn: F) -> F:
    """Decorate a model method that generates: it runs without gradients and in eval mode,
    and the model's modes are restored after."""

    @functools.wraps(fn)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), eval_mode(self):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for anything else)."""
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
    return torch.device("cpu")


def compile_denoisers(model: nn.Module, **options: Any) -> int:
    """``torch.compile`` in place the network of every diffusion model inside ``model`` (the
    model itself, a latent model's denoiser and its EMA, a cascade's stages): what a sampling
    loop calls steps x chunks times. Returns how many were compiled (0: nothing to compile).
    Samples change by float rounding only (inductor reorders arithmetic). ``options`` go to
    torch.compile."""
    from pygen.models.diffusion import Diffusion  # below this module: diffusion imports it

    targets = [m for m in model.modules() if isinstance(m, Diffusion)]
    for m in targets:
        if not isinstance(m.net, torch._dynamo.eval_frame.OptimizedModule):
            m.net = torch.compile(m.net, **options)
    return len(targets)

"""Double backward of the fused ops through their references.

The fused backward kernels are not themselves differentiable: ``create_graph=True`` (R1 /
WGAN-GP gradient penalties, some flow objectives) would silently get zeros. When autograd
asks for a graph of the backward (grad mode is on inside ``backward`` exactly then), the
ops' backward functions recompute the forward with the pure-torch reference from the saved
inputs and differentiate that instead: slower, but exact to any order, on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def wants_graph() -> bool:
    """True inside a backward called with ``create_graph=True``."""
    return torch.is_grad_enabled()


def grads_via_reference(
    ref: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
    grad_outputs: Sequence[Tensor | None],
) -> list[Tensor | None]:
    """Gradients of ``ref(*inputs)`` w.r.t. the inputs marked in ``needs``, with a graph.

    ``inputs`` are the saved op inputs (their autograd history intact), ``grad_outputs``
    the incoming gradients, one per output of ``ref`` (None: that output got none).
    Returns one entry per input (None where not needed).
    """
    with torch.enable_grad():
        # one view per input slot: when one tensor is passed as two inputs (x and log_scale),
        # the gradient w.r.t. each slot is its own partial derivative; w.r.t. the tensor itself
        # it would be the total, returned for both slots and summed twice by autograd
        slots = [t.view_as(t) if isinstance(t, Tensor) and t.requires_grad else t for t in inputs]
        outs = ref(*slots)
        outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wrt = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and isinstance(t, Tensor) and t.requires_grad]
        result: list[Tensor | None] = [None] * len(inputs)
        if not pairs or not wrt:
            return result
        grads = torch.autograd.grad([o for o, _ in pairs], [slots[i] for i in wrt], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    for i, g in zip(wrt, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return result

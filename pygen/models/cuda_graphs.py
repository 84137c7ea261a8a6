"""Replaying a whole sampling loop from a CUDA graph: no per-step launch overhead at small batch.

:class:`GraphCache` captures ``run(*inputs)`` once per key (after a warm-up on a side stream,
which does the lazy initialisation and allocations a capture must not) and replays it: each
call copies its inputs (tensors, None, or dicts of tensors) into the graph's static copies, so
everything that changes between calls (the noise, the labels, the step seeds) must be an input.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["GraphCache"]


class GraphCache:
    """CUDA graphs of ``run(*inputs) -> Tensor``, one per key."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[Any, ...], Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, run: Callable[..., Tensor], *inputs: Any) -> Tensor:
        if key not in self._graphs:
            static = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, allocator)
                run(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = run(*static)
            self._graphs[key] = (graph, static, result)
        graph, static, result = self._graphs[key]
        for dst, src in zip(tree_leaves(static), tree_leaves(inputs)):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        return result.clone()

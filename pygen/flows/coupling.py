"""Coupling layers: transform the masked part of x conditioned on the rest.

With mask m (1 = transformed, see :mod:`pygen.flows.masks`) and conditioner NN:

- :class:`AffineCoupling` (RealNVP / Glow): z = x * exp(s) + t where m = 1, z = x where
  m = 0, with (t, s) = NN(x_pass). The fused op :func:`pygen.ops.affine_coupling` takes
  the mask itself, so x is never split or re-concatenated.
- :class:`SplineCoupling` (Neural Spline Flows): z = RQS(x; NN(x_pass)) where m = 1. The
  spline op has no mask, so the transformed elements are gathered (one index_select),
  splined, and written back (one index_copy).

What the conditioner sees (``x_pass``): for a channel mask the pass-through channels
``x[:, a:b]`` (a view); for any other mask ``x * (1 - m)`` (all C channels). It must
return (B, P * C, *spatial) parameters for every element (those of pass-through elements
are ignored): P = 2 for affine (channels [0, C) the shift, [C, 2C) the log-scale), and
P = 3K - 1 for a K-bin spline, laid out (C, P) with per element K widths, K heights and
K - 1 interior-knot derivatives. Any ``nn.Module`` with that contract can be passed; it is
called as ``conditioner(x_pass)`` or, with a context, ``conditioner(x_pass, context)``.
The defaults (:class:`~pygen.flows.conditioners.MLP` for (C,) masks,
:class:`~pygen.flows.conditioners.ConvNet` for (C, H, W) ones) start at zero output,
and both couplings map zero parameters to the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pygen.ops import affine_coupling, rq_spline
from pygen.flows.base import Transform
from pygen.flows.conditioners import MLP, ConvNet
from pygen.flows.masks import identity_block

__all__ = ["AffineCoupling", "SplineCoupling"]


class _Coupling(Transform):
    """Mask bookkeeping, input checks and the conditioner call shared by both couplings."""

    params_per_element: int

    def __init__(
        self,
        mask: Tensor,
        params_per_element: int,
        conditioner: nn.Module | None,
        hidden: int,
        context_features: int | None,
    ) -> None:
        super().__init__()
        if not isinstance(mask, Tensor) or mask.dim() not in (1, 3):
            raise ValueError("mask must be a (C,) tensor for vectors or (C, H, W) / (C, 1, 1) for images")
        mask = mask.detach().to(torch.float32).cpu()
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (pass through) and 1 (transformed)")
        if not bool((mask == 0).any()) or not bool((mask == 1).any()):
            raise ValueError("mask must have both pass-through (0) and transformed (1) elements")
        # part of the architecture (rebuilt by the constructor), so not saved in state_dict
        self.register_buffer("mask", mask, persistent=False)
        self.channels = mask.shape[0]
        self.params_per_element = params_per_element
        self.context_features = context_features
        self._pass_block = identity_block(mask)
        if conditioner is None:
            in_ch = self.channels if self._pass_block is None else self._pass_block.stop - self._pass_block.start
            out_ch = params_per_element * self.channels
            if mask.dim() == 1:
                conditioner = MLP(in_ch, out_ch, hidden, context_features=context_features)
            else:
                conditioner = ConvNet(in_ch, out_ch, hidden, context_features=context_features)
        self.conditioner = conditioner

    def _event(self) -> str:
        spatial = ", ".join("*" if s == 1 else str(s) for s in self.mask.shape[1:])
        return f"(B, {self.channels}{', ' + spatial if spatial else ''})"

    def _check(self, x: Tensor, name: str) -> None:
        ok = isinstance(x, Tensor) and x.dim() == self.mask.dim() + 1 and x.shape[1] == self.channels
        ok = ok and all(m in (1, s) for m, s in zip(self.mask.shape[1:], x.shape[2:]))
        if not ok:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects {name} of shape {self._event()}; got {got}")

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner output for x's pass-through part: (B, P * C, *spatial)."""
        if self._pass_block is not None:
            h = x[:, self._pass_block]
        else:
            h = x * (1 - self.mask.to(x.dtype))
        out = self.conditioner(h) if context is None else self.conditioner(h, context)
        expected = (x.shape[0], self.params_per_element * self.channels, *x.shape[2:])
        if out.shape != expected:
            raise ValueError(f"the conditioner must return shape {expected}; got {tuple(out.shape)}")
        return out

    def extra_repr(self) -> str:
        return f"mask={tuple(self.mask.shape)}, context_features={self.context_features}"


class AffineCoupling(_Coupling):
    """Affine coupling: z = x * exp(s) + t on the masked elements (s soft-clamped if asked).

    Args:
        mask: (C,) or (C, H, W) / (C, 1, 1), 1 where x is transformed.
        conditioner: optional network (see the module docstring); default MLP / ConvNet
            with ``hidden`` units, zero-initialised output (identity at start).
        context_features: size of the optional conditioning vector.
        soft_clamp: s = soft_clamp * tanh(raw / soft_clamp) bounds |s|; recommended, it keeps
            exp(s) finite whatever the conditioner outputs.

    Shapes: x (B, C) or (B, C, H, W) matching the mask; logdet (B,).
    """

    def __init__(
        self,
        mask: Tensor,
        conditioner: nn.Module | None = None,
        *,
        hidden: int = 64,
        context_features: int | None = None,
        soft_clamp: float | None = None,
    ) -> None:
        super().__init__(mask, 2, conditioner, hidden, context_features)
        self.soft_clamp = soft_clamp

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, "z" if inverse else "x")
        shift, log_scale = self._params(x, context).chunk(2, dim=1)
        return affine_coupling(
            x, shift, log_scale, inverse=inverse, soft_clamp=self.soft_clamp, mask=self.mask.to(x.dtype)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # the pass-through part of z equals that of x, so the conditioner sees the same input
        return self._couple(z, context, inverse=True)


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Neural Spline Flows) on the masked elements.

    Args:
        mask, conditioner, hidden, context_features: as in :class:`AffineCoupling`.
        n_bins: K, the number of spline bins.
        tail_bound: B; the spline acts on [-B, B] and is the identity outside.
        min_bin_width, min_bin_height, min_derivative: the floors of :func:`pygen.ops.rq_spline`.

    The raw derivative outputs are offset by log(expm1(1 - min_derivative)) so that zero
    conditioner output gives unit derivatives and uniform bins: the identity map.

    Shapes: x (B, C) or (B, C, H, W) matching the mask; logdet (B,).
    """

    def __init__(
        self,
        mask: Tensor,
        conditioner: nn.Module | None = None,
        *,
        n_bins: int = 8,
        tail_bound: float = 3.0,
        hidden: int = 64,
        context_features: int | None = None,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        if not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
        super().__init__(mask, 3 * n_bins - 1, conditioner, hidden, context_features)
        self.n_bins, self.tail_bound = n_bins, float(tail_bound)
        self.min_bin_width, self.min_bin_height, self.min_derivative = min_bin_width, min_bin_height, min_derivative
        self._derivative_offset = math.log(math.expm1(1 - min_derivative))
        self._index_cache: dict[tuple, Tensor] = {}

    def _transformed_index(self, x: Tensor) -> Tensor:
        """Flat indices (into x.reshape(B, -1)) of the transformed elements, cached per shape/device."""
        key = (tuple(x.shape[1:]), x.device)
        idx = self._index_cache.get(key)
        if idx is None:
            m = self.mask.expand(x.shape[1:]).reshape(-1)
            idx = (m != 0).nonzero().flatten().to(x.device)
            self._index_cache[key] = idx
        return idx

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, "z" if inverse else "x")
        b, k, p = x.shape[0], self.n_bins, self.params_per_element
        params = self._params(x, context)
        # (B, C*P, *spatial) -> (B, C, *spatial, P) -> (B, N, P): element-major like x.reshape(B, -1)
        params = params.reshape(b, self.channels, p, *x.shape[2:]).movedim(2, -1).reshape(b, -1, p)
        idx = self._transformed_index(x)
        flat = x.reshape(b, -1)
        x_t = flat.index_select(1, idx)
        p_t = params.index_select(1, idx)
        widths, heights, derivs = p_t.split([k, k, k - 1], dim=-1)
        y_t, logdet = rq_spline(
            x_t,
            widths,
            heights,
            derivs + self._derivative_offset,
            inverse=inverse,
            tail_bound=self.tail_bound,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
        )
        return flat.index_copy(1, idx, y_t).view_as(x), logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, context, inverse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_bins={self.n_bins}, tail_bound={self.tail_bound}"

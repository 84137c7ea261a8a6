"""Normalizing flows on pygen's coupling ops.

Layers (``forward(x, context=None) -> (z, logdet)`` maps data to latent,
``inverse(z, context=None) -> (x, logdet)`` maps back; see :mod:`pygen.flows.base`):
:class:`AffineCoupling`, :class:`SplineCoupling`, :class:`ActNorm`, :class:`InvConv1x1`,
:class:`Permutation`, :class:`Squeeze`, :class:`MultiScale`, composed with :class:`Chain`.

Distributions: :class:`StandardNormal`, :class:`FlowDistribution` (``log_prob``, ``sample``,
``sample_and_log_prob``, ``bits_per_dim``) and the models :class:`RealNVP`, :class:`NSF`,
:class:`Glow`.

>>> import torch
>>> from pygen.flows import NSF
>>> flow = NSF(features=2, hidden=32, n_layers=4)
>>> flow.log_prob(torch.randn(5, 2)).shape
torch.Size([5])
"""

from pygen.flows.base import Chain, Transform
from pygen.flows.conditioners import MLP, ConvNet
from pygen.flows.coupling import AffineCoupling, SplineCoupling
from pygen.flows.distribution import FlowDistribution, StandardNormal, dequantize
from pygen.flows.image import MultiScale, Squeeze
from pygen.flows.linear import InvConv1x1, Permutation
from pygen.flows.masks import channel_mask, checkerboard_mask
from pygen.flows.models import NSF, Glow, RealNVP
from pygen.flows.normalization import ActNorm

__all__ = [
    "Transform",
    "Chain",
    "AffineCoupling",
    "SplineCoupling",
    "channel_mask",
    "checkerboard_mask",
    "MLP",
    "ConvNet",
    "ActNorm",
    "InvConv1x1",
    "Permutation",
    "Squeeze",
    "MultiScale",
    "StandardNormal",
    "FlowDistribution",
    "dequantize",
    "RealNVP",
    "NSF",
    "Glow",
]


def __getattr__(name: str):
    # pygen.flows.Flow was renamed FlowDistribution (pygen.models.Flow is the trainable
    # generative-model adapter); the old name still works, with a warning
    if name == "Flow":
        import warnings

        warnings.warn("pygen.flows.Flow is now pygen.flows.FlowDistribution (pygen.models.Flow is the "
                      "generative-model adapter)", DeprecationWarning, stacklevel=2)
        return FlowDistribution
    raise AttributeError(f"module 'pygen.flows' has no attribute {name!r}")

"""Drop-in modules built on pygen's fused ops."""

from pygen.nn.gaussian import GaussianReparameterize, GaussianSample

__all__ = ["GaussianReparameterize", "GaussianSample"]

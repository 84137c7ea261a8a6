"""pygen's fused ops. Each has a pure-torch reference ``<op>_ref`` beside it."""

from pygen.ops.gaussian import (
    gaussian_kl,
    gaussian_kl_ref,
    reparameterize,
    reparameterize_kl,
    reparameterize_ref,
)

__all__ = ["reparameterize", "gaussian_kl", "reparameterize_kl", "reparameterize_ref", "gaussian_kl_ref"]

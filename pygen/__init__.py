"""pygen: fused C++/CUDA and Triton kernels for generative models.

>>> import torch, pygen
>>> mu, logvar = torch.zeros(8, 16), torch.zeros(8, 16)
>>> z, kl = pygen.ops.reparameterize_kl(mu, logvar)
"""

from pygen import diffusion, flows, nn, ops
from pygen._backend import available_backends, backend_status, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "nn", "flows", "diffusion", "available_backends", "backend_status", "use_backend", "__version__"]

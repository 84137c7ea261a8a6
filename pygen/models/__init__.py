"""Generative models behind one interface (:class:`GenerativeModel`), and :func:`load`.

>>> import torch, pygen.models
>>> model = pygen.models.Flow("realnvp", (2,), hidden=16, n_layers=2)
>>> model.loss(torch.randn(8, 2))["loss"].shape
torch.Size([])
>>> model.sample(4, seed=0).shape
torch.Size([4, 2])
"""

from pygen._io import CorruptCheckpoint
from pygen.models.base import GenerativeModel, TrainingDiverged, families, load
from pygen.models.conditioned import Cascade, Colorization, SuperResolution
from pygen.models.diffusion import Diffusion
from pygen.models.flow import Flow
from pygen.models.gan import GAN
from pygen.models.latent import LatentDiffusion
from pygen.models.vae import VAE

__all__ = ["GenerativeModel", "TrainingDiverged", "CorruptCheckpoint", "Flow", "GAN", "VAE", "Diffusion", "LatentDiffusion", "SuperResolution", "Colorization", "Cascade", "load", "families"]

"""Training for :mod:`pygen.models`: :func:`fit` (loop, checkpoints, resume, DDP under torchrun).

>>> import torch, pygen.models, pygen.train
>>> model = pygen.models.Flow("realnvp", (2,), hidden=16, n_layers=2)
>>> history = pygen.train.fit(model, torch.randn(256, 2), steps=5, batch_size=64, progress=False)
>>> history[-1]["step"]
5
"""

from pygen._lock import DirectoryBusy
from pygen.train.checkpoint import read_checkpoint, write_checkpoint
from pygen.train.loop import BatchOrder, TrainingDiverged, as_tensors, fit

__all__ = ["fit", "TrainingDiverged", "DirectoryBusy", "BatchOrder", "as_tensors", "read_checkpoint", "write_checkpoint"]

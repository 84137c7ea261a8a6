"""Data for the model layer: real data sets shipped with scikit-learn, toy densities, files.

Nothing is downloaded: scikit-learn bundles the digits and the two sample photographs.

>>> import pygen.data
>>> x, y = pygen.data.digits("train")            # (1442, 1, 8, 8) float32 in [0, 1], (1442,) int64
>>> pts = pygen.data.toy2d("8gaussians", 1000)   # (1000, 2) float32
>>> d = pygen.data.load("digits16")              # Data: .data, .labels, .shape, .name, .split
>>> loader = pygen.data.InMemoryLoader((x, y), 64, seed=0)
>>> for xb, yb in loader.batches_from(step=0): ...   # resumable at any step
"""

from pygen.data.datasets import (
    DIGITS_SIZES,
    SPLITS,
    TOY2D,
    TOY2D_DENSITIES,
    digits,
    digits_split_index,
    patches,
    toy2d,
    toy2d_log_prob,
)
from pygen.data.files import FASHION_MNIST_CLASSES, NAMES, Data, DataError, fashion_mnist, load, train_test
from pygen.data.loader import InMemoryLoader, TensorData, as_tensors, default_workers, epoch_permutation, prefetched

__all__ = [
    "SPLITS",
    "DIGITS_SIZES",
    "TOY2D",
    "TOY2D_DENSITIES",
    "NAMES",
    "fashion_mnist",
    "FASHION_MNIST_CLASSES",
    "digits",
    "digits_split_index",
    "toy2d",
    "toy2d_log_prob",
    "patches",
    "Data",
    "DataError",
    "load",
    "train_test",
    "TensorData",
    "InMemoryLoader",
    "prefetched",
    "default_workers",
    "epoch_permutation",
    "as_tensors",
]

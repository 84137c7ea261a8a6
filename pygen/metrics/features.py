"""Feature networks: FD on a small classifier's penultimate layer is its data's FID.

:class:`DigitsFeatures` (scikit-learn's 8x8 digits) and :class:`FashionFeatures`
(Fashion-MNIST, 28x28). The weights (``digits_features.pt``, ``fashion_features.pt``) are
committed beside this file and made by ``python -m pygen.metrics.train_features [--net
fashion]`` (deterministic; see there).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureNet", "DigitsFeatures", "FashionFeatures", "WEIGHTS", "FASHION_WEIGHTS"]

WEIGHTS = Path(__file__).with_name("digits_features.pt")
FASHION_WEIGHTS = Path(__file__).with_name("fashion_features.pt")


class FeatureNet(nn.Module):
    """A classifier whose penultimate layer is a feature space: subclasses define ``conv``,
    ``fc``, ``head``, ``dim`` (the feature width), :meth:`prepare` and the weights file."""

    dim: int
    weights: Path

    @classmethod
    def pretrained(cls, path: str | Path | None = None) -> FeatureNet:
        """The committed weights, on the CPU, in eval mode (move with ``.to(device)``);
        ``test_accuracy`` as measured when they were made."""
        net = cls()
        state = torch.load(path or cls.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"] if "model" in state else state)
        net.test_accuracy = state.get("test_accuracy")
        return net.eval().requires_grad_(False)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, x: Tensor, *, batch_size: int = 1024) -> Tensor:
        """(N, ...) images -> (N, dim) features, in batches, without gradients."""
        x = self.prepare(x)
        p = self.head.weight
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                out.append(self.embed(x[i : i + batch_size].to(device=p.device, dtype=p.dtype)))
        return torch.cat(out) if out else x.new_zeros(0, self.dim)

    def predict(self, x: Tensor, *, batch_size: int = 1024) -> Tensor:
        """(N, ...) images -> (N,) int64 predicted classes."""
        f = self.features(x, batch_size=batch_size)
        with torch.no_grad():
            return self.head(f).argmax(1)

    def embed(self, x: Tensor) -> Tensor:
        """A prepared batch -> (B, dim) penultimate activations, with autograd (for training)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """A prepared batch -> (B, 10) logits, with autograd."""
        return self.head(self.embed(x))


class DigitsFeatures(FeatureNet):
    """A small convnet classifier of scikit-learn's 8x8 digits; its 64-d penultimate layer is a feature space.

    Input (N, 1, S, S) in [0, 1], S = 8, 16 or 32; 16 and 32 are first area-downsampled to
    8 (mean of S/8 x S/8 blocks), so ``pygen.data.digits(size=16)`` round-trips. Layers:
    conv3x3(1->16) ReLU, conv3x3(16->32) ReLU, maxpool2, conv3x3(32->64) ReLU, maxpool2,
    linear(256->64) ReLU [= features], linear(64->10) [= logits]. 40.4k parameters.

    ``DigitsFeatures.pretrained()`` has test accuracy 99.72% (354 of 355) on the fixed held-out
    split of :func:`pygen.data.digits`, the same at sizes 16 and 32; the test-suite checks > 97%.
    """

    dim = 64
    weights = WEIGHTS

    def __init__(self) -> None:
        super().__init__()
        self.test_accuracy: float | None = None
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(64 * 2 * 2, 64)
        self.head = nn.Linear(64, 10)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """(N, 1, S, S), S in {8, 16, 32} -> (N, 1, 8, 8) float32 (area downsampling)."""
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] not in (8, 16, 32):
            raise ValueError(f"DigitsFeatures takes (N, 1, S, S) images with S in (8, 16, 32), got {tuple(x.shape)}")
        x = x.float()
        return F.avg_pool2d(x, x.shape[2] // 8) if x.shape[2] != 8 else x


class FashionFeatures(FeatureNet):
    """A small convnet classifier of Fashion-MNIST; its 128-d penultimate layer is a feature space.

    Input (N, 1, 28, 28) in [0, 1]. Layers: conv3x3(1->16) ReLU maxpool2, conv3x3(16->32)
    ReLU maxpool2, conv3x3(32->64) ReLU maxpool2 (7 -> 3), linear(576->128) ReLU [=
    features], linear(128->10) [= logits]. 99k parameters, 2 M multiply-adds a image. Trained
    on the official 60k training images only (so the test images are held out from it too);
    its test accuracy is in the weights file (``FashionFeatures.pretrained().test_accuracy``)
    and the README.
    """

    dim = 128
    weights = FASHION_WEIGHTS

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(64 * 3 * 3, 128)
        self.head = nn.Linear(128, 10)
        self.test_accuracy: float | None = None

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"FashionFeatures takes (N, 1, 28, 28) images, got {tuple(x.shape)}")
        return x.float()

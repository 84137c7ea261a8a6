"""Class labels of conditional models: a trainer batch split into (x, labels), the labels a
``sample()`` call uses (given, or random by the counter rule), and their one-hot form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pygen.models.seeding import Stream, derive_seed, uniform_labels

__all__ = ["Batch", "split_batch", "sample_labels", "one_hot", "num_classes_of", "conditional_by_default",
           "training_data"]

Batch = Any  # a Tensor, or a tuple (x, labels): what the trainer hands to loss()


def split_batch(batch: Batch, num_classes: int | None, owner: str,
                shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """(x, labels) of a trainer batch (a tensor or (x, labels)): labels None for an
    unconditional model (labels in the batch are ignored), int64 for a conditional one, which
    refuses unlabelled batches; ``shape``: the one example shape x may have (B, *shape)."""
    x, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"batch must be (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if not num_classes:
        return x, None
    if labels is None:
        raise ValueError(f"this {owner} is class-conditional (num_classes={num_classes}): batches are (x, labels)")
    return x, labels.long()


def sample_labels(labels: Tensor | int | None, n: int, num_classes: int | None, *, seed: int, offset: int = 0,
                  device: torch.device | str | None = None, owner: str = "model") -> Tensor | None:
    """The (n,) int64 labels of samples offset .. offset + n - 1 of a ``sample()`` call.

    Unconditional (``num_classes`` None): None, and ``labels`` must be None. Conditional:
    ``labels`` (an int, a 0-dim or an (n,) tensor) checked against [0, num_classes), or when
    None, uniform labels where label i is a function of (seed, offset + i) only (stream
    :attr:`Stream.LABELS` of the sample seed), like the samples' latents.
    """
    if not num_classes:
        if labels is not None:
            raise ValueError(f"labels= given to an unconditional {owner} (num_classes is None)")
        return None
    if labels is None:
        return uniform_labels(n, num_classes, seed=derive_seed(seed, Stream.LABELS), offset=offset, device=device)
    labels = torch.as_tensor(labels, device=device)
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.dim() == 0 or labels.numel() == 1:
        labels = labels.reshape(()).expand(n)
    if labels.shape != (n,):
        raise ValueError(f"labels must be an int or ({n},), got shape {tuple(labels.shape)}")
    if n and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(n, num_classes) one-hot rows of int labels (n,), in ``dtype`` (a network's context)."""
    return F.one_hot(labels.long(), num_classes).to(dtype)


def conditional_by_default(data: Any, options: dict[str, Any], unconditional: bool = False) -> dict[str, Any]:
    """``options`` under the diffusion families' rule: class-conditional on the data's labels
    when it has some (``num_classes`` from :func:`num_classes_of`), unless ``unconditional``
    or ``options`` give ``num_classes``."""
    if unconditional:
        return {**options, "num_classes": None}
    if getattr(data, "labels", None) is not None and "num_classes" not in options:
        return {**options, "num_classes": num_classes_of(data)}
    return options


def num_classes_of(data: Any) -> int:
    """The number of classes of labelled data (``data.labels``: max label + 1)."""
    labels = getattr(data, "labels", None)
    if labels is None:
        raise ValueError(f"a class-conditional model needs labelled data; {getattr(data, 'name', 'the data')} has no labels")
    return int(labels.max()) + 1


def training_data(model: Any, data: Any) -> Any:
    """What :func:`pygen.train.fit` trains ``model`` on from a :class:`pygen.data.Data`: (x,
    labels) for a class-conditional model, else x (super-resolution models make their
    low-resolution inputs from x themselves); x is the data's ``source`` (images held as
    uint8 stay so: the trainer reads float32 batches from it)."""
    if (getattr(model, "config", None) or {}).get("num_classes") and data.labels is not None:
        return (data.source, data.labels)
    return data.source

"""Complete, atomic training checkpoints and RNG state capture.

A training directory holds ``ckpt-<step>.pt`` files (step = completed optimizer steps) and
``latest``, a one-line text file naming the newest. Each file is written to a temp file in
the same directory, fsynced and renamed (:func:`pygen._io.save_atomic`), and
``latest`` is replaced the same way only after its checkpoint is complete: a kill at any
moment leaves ``latest`` naming a readable checkpoint. Older checkpoints beyond ``keep``
are removed after that.

Checkpoint keys: ``family``, ``config``, ``model`` (state dict), ``ema`` (state dict of the
averaged model or None), ``ema_n_averaged``, ``optimizers``, ``schedulers`` (state dicts),
``step``, ``rng`` (one entry per rank: torch CPU [+ CUDA], numpy, python), ``train``
(seed, batch_size, world_size), ``versions``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pygen._io import LATEST, checkpoints, load_checkpoint, save_atomic, select_checkpoint, write_text_atomic

__all__ = ["write_checkpoint", "read_checkpoint", "rng_state", "set_rng_state", "remove_temp_files"]


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def remove_temp_files(out: Path) -> None:
    """Remove temp files a killed writer left behind (they are never read)."""
    for p in out.glob(".tmp-*"):
        p.unlink(missing_ok=True)


def write_checkpoint(out: Path, ckpt: dict[str, Any], keep: int = 2) -> Path:
    """Write ``out/ckpt-<step>.pt``, point ``latest`` at it, keep the newest ``keep`` checkpoints."""
    path = out / f"ckpt-{ckpt['step']}.pt"
    save_atomic(ckpt, path)
    write_text_atomic(out / LATEST, path.name + "\n")  # only after the checkpoint is complete
    for _, old in checkpoints(out)[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(out: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The checkpoint ``latest`` names in ``out`` and its path, or None if there is none.
    Verified: a damaged one gives way to the newest intact one, with a warning
    (:func:`pygen._io.select_checkpoint`)."""
    path = select_checkpoint(out, "latest") if out.is_dir() else None
    if path is None:
        return None
    return load_checkpoint(path, map_location, verify=False), path


def is_run_directory(out: Path) -> bool:
    return (out / LATEST).exists() or bool(checkpoints(out))


def describe(path: os.PathLike | None) -> str:
    return str(path) if path is not None else "none (no checkpoint was written)"

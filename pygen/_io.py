"""Atomic file writes: a path holds either its old complete content or the new one, never
half a file, whatever happens in between (Ctrl-C, SIGKILL, a full disk, power loss).
Used by checkpoints, saved models, PNG grids and the sampling job's shards; and the layout
of a training directory (``ckpt-<step>.pt`` files, ``latest``)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "fsync_dir", "save_atomic", "write_text_atomic", "checkpoints", "resolve_checkpoint",
           "select_checkpoint", "LATEST", "BEST"]


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def fsync_dir(directory: Path) -> None:
    # the rename itself is durable only once the directory entry is on disk (POSIX)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Write via a temp file in the same directory, fsync, then os.replace: ``path`` is
    always either its old complete content or the new one, whatever happens in between."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: leave no temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


# ---- saved models and training directories ------------------------------------------------
# Below pygen.models and pygen.train, which both read them.

LATEST = "latest"  # the file in a training directory naming its newest checkpoint
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), "w")


def checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``ckpt-<step>.pt`` files of a directory as (step, path), oldest first."""
    d = Path(directory)
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))] if d.is_dir() else []
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint file: ``path`` itself, or for a directory the one its ``latest`` names
    (the newest ``ckpt-*.pt`` when there is no ``latest``); None for a directory without one."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint or directory at {path}")
        return path
    latest = path / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        if not (path / name).exists():
            raise FileNotFoundError(f"{latest} names {name!r}, which does not exist")
        return path / name
    found = checkpoints(path)
    return found[-1][1] if found else None


BEST = "best.pt"  # the checkpoint of the best held-out metric (pygen.train.callbacks.BestCheckpoint)


def select_checkpoint(path: str | os.PathLike, which: str | int | None = None) -> Path | None:
    """The checkpoint to sample or evaluate: ``path`` itself when it is a file; in a training
    directory ``which`` = "best" (``best.pt``), "latest" (what ``latest`` names), a step
    (``ckpt-<step>.pt``), or None: best.pt when the run kept one, else the latest.
    None for a directory without checkpoints; FileNotFoundError for one asked for and absent."""
    path = Path(path)
    if not path.is_dir():
        if which is not None:
            raise ValueError(f"{path} is a checkpoint file: choosing a checkpoint ({which!r}) needs a training directory")
        return resolve_checkpoint(path)
    if which is None:
        return path / BEST if (path / BEST).is_file() else resolve_checkpoint(path)
    if which == "best":
        if not (path / BEST).is_file():
            raise FileNotFoundError(f"{path} holds no {BEST} (train with --keep-best to keep one)")
        return path / BEST
    if which == "latest":
        return resolve_checkpoint(path)
    step = int(which) if isinstance(which, int) or (isinstance(which, str) and which.isdigit()) else None
    if step is None:
        raise ValueError(f"checkpoint must be 'best', 'latest' or a step number, got {which!r}")
    file = path / f"ckpt-{step}.pt"
    if not file.is_file():
        kept = ", ".join(str(s) for s, _ in checkpoints(path)) or "none"
        raise FileNotFoundError(f"{path} holds no checkpoint of step {step} (kept steps: {kept})")
    return file

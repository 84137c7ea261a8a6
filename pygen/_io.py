"""Atomic file writes: a path holds either its old complete content or the new one, never
half a file, whatever happens in between (Ctrl-C, SIGKILL, a full disk, power loss).
Used by checkpoints, saved models, PNG grids and the sampling job's shards; and the layout
of a training directory (``ckpt-<step>.pt`` files, ``latest``)."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "fsync_dir", "save_atomic", "write_text_atomic", "checkpoints", "resolve_checkpoint",
           "select_checkpoint", "verify_checkpoint", "load_checkpoint", "CorruptCheckpoint", "memory_bytes", "LATEST",
           "BEST"]


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


def gigabytes(nbytes: float) -> str:
    """``nbytes`` for a message: "1.23 GB"."""
    return f"{nbytes / 1e9:.3g} GB"


def memory_bytes() -> int:
    """This machine's RAM: the bound on what a file (a data header, a checkpoint config) may
    claim, and on the model a command may build."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound worth guessing
        return 1 << 50


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
    found = checkpoints(path)
    if latest.exists():
        name = latest.read_text(errors="replace").strip()
        if _CKPT_RE.match(name) and (path / name).is_file():
            return path / name
        if not found:
            raise FileNotFoundError(f"{latest} names {name[:80]!r}, which is not a checkpoint of {path}")
        warnings.warn(f"{latest} names {name[:80]!r}, which is not a checkpoint of {path} (damaged?); "
                      f"using the newest, {found[-1][1].name}", stacklevel=2)  # fmt: skip
    return found[-1][1] if found else None


BEST = "best.pt"  # the checkpoint of the best held-out metric (pygen.train.callbacks.BestCheckpoint)


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is damaged (flipped bytes, truncated) or not a checkpoint at all."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a ``torch.save`` file before use: it must be a complete zip archive whose every
    record matches its CRC-32 (``torch.load`` checks neither: flipped weight bytes load
    silently). Reads the whole file once; raises :class:`CorruptCheckpoint` naming it."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except OSError:
        raise
    except Exception as e:  # BadZipFile, or header fields damaged into nonsense (zlib, struct, ...)
        raise CorruptCheckpoint(f"{path} is corrupt, truncated or not a checkpoint (not a complete torch.save "
                                f"archive: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if bad is not None:
        raise CorruptCheckpoint(f"{path} is corrupt: its record {bad!r} fails its CRC check (damaged bytes)")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, verify: bool = True) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a verified file (:func:`verify_checkpoint`;
    ``verify=False`` for one :func:`select_checkpoint` just verified); a file that holds
    something else than tensors and plain values is :class:`CorruptCheckpoint` too."""
    import pickle

    import torch

    if verify:
        verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpoint(f"{path} is not a pygen checkpoint (a weights-only load refuses it: {first})") from None
    if not isinstance(ckpt, dict):
        raise CorruptCheckpoint(f"{path} is not a pygen checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def _intact(path: Path, file: Path, which: str | int | None) -> Path:
    """``file`` if it verifies; for the default or "latest" choice in a training directory the
    newest intact ``ckpt-*.pt`` instead (with a warning naming both); else CorruptCheckpoint."""
    try:
        verify_checkpoint(file)
        return file
    except CorruptCheckpoint as e:
        if not (path.is_dir() and which in (None, "latest")):
            raise
        for _, older in reversed(checkpoints(path)):
            if older == file:
                continue
            try:
                verify_checkpoint(older)
            except CorruptCheckpoint:
                continue
            warnings.warn(f"{e}; falling back to {older}, the newest intact checkpoint", stacklevel=3)
            return older
        raise CorruptCheckpoint(f"{e}; no intact checkpoint is left in {path}") from None


def select_checkpoint(path: str | os.PathLike, which: str | int | None = None, *, verify: bool = True) -> Path | None:
    """The checkpoint to sample, evaluate or resume from: ``path`` itself when it is a file; in
    a training directory ``which`` = "best" (``best.pt``), "latest" (what ``latest`` names), a
    step (``ckpt-<step>.pt``), or None: best.pt when the run kept one, else the latest.
    None for a directory without checkpoints; FileNotFoundError for one asked for and absent.

    ``verify``: the file is checked (:func:`verify_checkpoint`); a damaged default or latest
    choice falls back to the newest intact checkpoint of the directory, with a warning; a
    damaged file asked for by name or step raises :class:`CorruptCheckpoint`."""
    file = _select(Path(path), which)
    return _intact(Path(path), file, which) if verify and file is not None else file


def _select(path: Path, which: str | int | None) -> Path | None:
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

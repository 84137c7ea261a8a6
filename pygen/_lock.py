"""One job per directory: an exclusive lock on a training run or a sampling directory.

Two jobs writing one directory interleave silently (a checkpoint of one seed under the other's
settings; shards of two seeds under one manifest), so every job that writes a run or sampling
directory holds ``DIR/.pygen.lock`` first. It is an ``flock`` on that file, which the kernel
releases when the holder exits, however it exits: a crashed or SIGKILLed job leaves no stale
lock to clean up. The file records the holder (pid, host, command) for the message the next
job prints; it is never deleted, because unlinking a lock file that another process has open
would let two holders lock two different files.

Under torchrun only rank 0 takes the lock (the ranks are one job) and tells the others.
Within one process the lock is re-entrant (the CLI holds it around ``fit``, which takes it too).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; jobs are not protected from each other there
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK", "DirectoryBusy", "lock_directory"]

LOCK = ".pygen.lock"

_held: set[Path] = set()  # the (resolved) directories this process holds


class DirectoryBusy(RuntimeError):
    """Another live job holds the directory."""


def _owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that has not yet written its name"


@contextmanager
def lock_directory(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold ``directory`` (created if needed) for this job; :class:`DirectoryBusy` naming the
    owner if another live job holds it. ``what`` names the directory in that message."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = d.resolve()
    if key in _held:  # held by an outer call in this process: its release is the one that counts
        yield
        return
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DirectoryBusy(f"{what} {d} is in use by another pygen job ({_owner(fd)}); "
                                    "wait for it to end or use another directory") from None  # fmt: skip
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the flock

"""One training run per output folder: an ``fcntl`` lock on an open file in the folder.

    with output_lock(out):      # ValueError naming the holder's pid when another live process holds it
        ...                     # write checkpoint, metrics, plots

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``OUT/.ssmkit-train.lock``, which holds the holder's pid as
text. The operating system drops the lock when the holding process dies, however it dies, so a stale
lock file never blocks a later run; the file itself stays (its pid is then only a record). The lock is
re-entrant within a process (the driver takes it around the whole run, the trainer again inside), and
POSIX-only (``fcntl``), as ssmkit's kernels are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".ssmkit-train.lock"

_held: dict[Path, int] = {}  # lock path -> nesting depth in this process


class OutputLocked(ValueError):
    """Another live process holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``out_dir`` (created if missing) for the duration of the ``with`` block."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = (out / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputLocked(
                f"--out {out}: another ssmkit train (pid {holder}) is writing into this folder; "
                "wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = 1
        try:
            yield path
        finally:
            del _held[path]
    finally:
        os.close(fd)  # closing the descriptor releases the lock

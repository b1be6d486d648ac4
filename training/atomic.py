"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A write that fails (a full disk, a quota, a read-only file system) leaves ``path`` as it was and no temp
file behind, and raises the ``OSError`` with its errno and ``path`` as its file name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then make it ``path`` durably."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _name_file(e, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _name_file(e, path)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _name_file(e: BaseException, path: Path) -> None:
    """An ``OSError`` from a plain write names no file: name the one being written (not its temp file)."""
    temp = str(path.parent / f".{path.name}.")
    if isinstance(e, OSError) and e.errno is not None and (e.filename is None or str(e.filename).startswith(temp)):
        e.filename = str(path)

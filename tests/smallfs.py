"""A small file system of the test's own (a tmpfs it mounts), to fill up and to make read-only.

Mounting needs root (CAP_SYS_ADMIN); where the test cannot mount, ``small_filesystem`` skips it and says
why. The mount is the test's alone and is lazily unmounted at the end even if a process still holds a
file on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``3m``) mounted at ``path`` for the block's duration."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a small tmpfs (the runs folder's disk filling up)")
    done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, *options: str) -> None:
    """Remount the test's tmpfs with ``options`` (``size=200m``, ``ro``, ``rw``)."""
    done = _mount("-o", ",".join(("remount", *options)), str(path))
    assert done.returncode == 0, done.stderr


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for every write by path (a read-only bind mount over it) while the block runs.

    ``mount -o remount,ro`` refuses a file system with files open for writing (EBUSY: a worker's log and
    lock); a read-only bind mount of the folder over itself is what a worker then meets when it creates a
    checkpoint, a progress or result file, or opens its lock: EROFS. Leaving the block unmounts it."""
    for args in (("--bind", str(path), str(path)), ("-o", "remount,bind,ro", str(path))):
        done = _mount(*args)
        assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=True)

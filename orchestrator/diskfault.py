"""A full disk, a quota or a read-only file system: the machine's trouble, never the run's.

An ``OSError`` with ENOSPC, EDQUOT or EROFS wherever adareg writes (checkpoints, progress and result
files, run logs, worker specs) ends an attempt without counting it against the run and without marking it
FAILED: the run stays resumable from its last good checkpoint. The worker reports such an attempt as
``disk_full`` (``orchestrator.run.ending.End.DISK_FULL``: in ``result.json`` when it can still write it, by
its exit code ``EXIT_DISK`` when it cannot); the scheduler then starts no new run until the runs folder
takes writes again (``DiskWatch``, the disk's twin of the scheduler's ``StoreWatch``) and gives up after a
timeout, every run resumable.

This module is a leaf: it knows errnos, paths and free space, nothing of runs or MLflow.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
CHECKPOINTS_NEEDED = 2  # free space a run needs before it starts: its checkpoint and the temp copy of the next
MIN_FREE = 256 * 1024  # ... and at least this much (logs, progress files) before any checkpoint is known
PROBE_BYTES = 4096


def human(n: float) -> str:
    """``1536`` -> ``1.5 KB`` (powers of 1024, as ``df -h``)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent (what ``statvfs`` can be asked about)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def space(path: str | os.PathLike) -> str:
    """``'12.0 KB free of 3.0 MB'`` for the file system holding ``path`` ('' if it cannot be asked)."""
    try:
        usage = shutil.disk_usage(existing(path))
    except OSError:
        return ""
    return f"{human(usage.free)} free of {human(usage.total)}"


@dataclass(frozen=True)
class DiskFault:
    """A write refused by the disk: its errno and the path written (None if unknown)."""

    errno: int
    path: str | None = None
    need: int = 0  # set when a run was refused before it started: the bytes it needs

    @property
    def read_only(self) -> bool:
        return self.errno == errno.EROFS

    def describe(self) -> str:
        """In words, with how much is free: ``no space left on device: /r/k/checkpoint.pt (12.0 KB free of 3.0 MB)``."""
        where = f": {self.path}" if self.path else ""
        if self.read_only:
            return f"read-only file system{where}"
        free = space(self.path) if self.path else ""
        if self.need:
            return f"{self.path}: {free or 'too little free'}, less than a run needs ({human(self.need)})"
        what = "disk quota exceeded" if self.errno == errno.EDQUOT else "no space left on device"
        return f"{what}{where}" + (f" ({free})" if free else "")


class DiskFull(UserError):
    """A command stopped by a full or read-only disk: one ``error:`` line, exit 75 (run it again once there
    is room; nothing is lost)."""

    exit_code = 75


def _chain(e: BaseException):
    """``e``, then its causes and contexts (torch wraps the OSError of a failed write in a RuntimeError)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 20:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_fault(e: BaseException) -> DiskFault | None:
    """The disk fault behind ``e`` (itself or anywhere in its cause/context chain), else None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return DiskFault(x.errno, None if x.filename is None else str(x.filename))
    return None


def reason(e: BaseException) -> str:
    """Why an attempt failed, in words a user reads: an ``OSError`` behind ``e`` by its errno and path
    (``EIO Input/output error: /r/k/checkpoint.pt``), not the wrapper's internals; else ``Type: message``."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno is not None:
            code = errno.errorcode.get(x.errno, str(x.errno))
            where = f": {x.filename}" if x.filename is not None else ""
            return f"{code} {x.strerror or os.strerror(x.errno)}{where}"
    return f"{type(e).__name__}: {e}"


def checkpoint_bytes(runs_dir: str | os.PathLike) -> int:
    """The largest ``checkpoint.pt`` in the run folders under ``runs_dir`` (0 if there is none yet)."""
    largest = 0
    try:
        for path in Path(runs_dir).glob("*/checkpoint.pt"):
            try:
                largest = max(largest, path.stat().st_size)
            except OSError:
                pass
    except OSError:
        pass
    return largest


def check(folder: str | os.PathLike, need: int = 0, write: bool = False) -> DiskFault | None:
    """Whether ``folder`` takes a run's writes now: not read-only, ``need`` bytes free and, with ``write``,
    a small file written, synced and removed (the one way to see a quota). None when it does."""
    target = existing(folder)
    try:
        st = os.statvfs(target)
    except OSError:
        return None  # cannot ask: let the writes themselves tell
    if st.f_flag & os.ST_RDONLY:
        return DiskFault(errno.EROFS, str(folder))
    if st.f_bavail * st.f_frsize < need:
        return DiskFault(errno.ENOSPC, str(folder), need=need)
    if write:
        probe = target / f".adareg-space-probe.{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                return DiskFault(e.errno, str(folder))
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    return None


class DiskWatch:
    """Whether the runs folder takes writes; re-checked now and then while it is thought full or read-only.

    ``refuse()`` is asked before a run starts: a folder with less free space than ``CHECKPOINTS_NEEDED``
    of the sweep's largest checkpoint (at least ``MIN_FREE``) is treated as full, with the numbers."""

    def __init__(self, folder: str | os.PathLike | None, every_s: float = 5.0, need_every_s: float = 30.0):
        self.folder = Path(folder) if folder is not None else None
        self.every_s, self.need_every_s = every_s, need_every_s
        self.down_since: float | None = None  # monotonic
        self.fault: DiskFault | None = None
        self._last = 0.0
        self._need, self._need_at = 0, -1e9

    def need(self) -> int:
        """Bytes a run needs free before it starts (the largest checkpoint is looked up every ``need_every_s``)."""
        now = time.monotonic()
        if self.folder is not None and now - self._need_at >= self.need_every_s:
            self._need, self._need_at = max(MIN_FREE, CHECKPOINTS_NEEDED * checkpoint_bytes(self.folder)), now
        return self._need

    def refuse(self) -> DiskFault | None:
        """Before a run starts: a fault if the folder is read-only or too full for it (nothing is written)."""
        return None if self.folder is None else check(self.folder, self.need())

    def mark_down(self, fault: DiskFault) -> bool:
        """Note a disk fault; True if it is news."""
        self.fault = fault
        if self.down_since is not None:
            return False
        self.down_since, self._last = time.monotonic(), time.monotonic()
        return True

    def poll(self) -> bool | None:
        """While down: check again every ``every_s``; True once the folder takes writes (and has room) again."""
        if self.down_since is None or self.folder is None:
            return None
        now = time.monotonic()
        if now - self._last < self.every_s:
            return None
        self._last = now
        fault = check(self.folder, self.need(), write=True)
        if fault is not None:
            self.fault = fault
            return None
        self.down_since, self.fault = None, None
        return True

    def describe(self) -> str:
        """The fault in words, with the free space as it is now."""
        return self.fault.describe() if self.fault is not None else ""

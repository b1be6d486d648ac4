"""The run folder ``<runs dir>/<run key>/``: the one module that knows its layout.

    spec.json       what to run (``WorkerSpec``), written atomically by whoever starts the worker
    lock            an exclusive ``flock`` held by the live worker (its pid inside): the local fast path of
                    ownership; the claim in the tracking store (``orchestrator.store.claims``) is what decides
    checkpoint.pt   the last finished epoch (``training.checkpoint``); one that cannot be resumed is moved
                    aside to ``checkpoint.pt.broken`` (``.broken.1``, ...) and kept
    progress.json   the worker's heartbeat: epoch, total, last metrics, pid, time, and notes for the user
    result.json     the latest attempt (``Attempt``): ``started`` while it runs, then how it ended (``status``,
                    an ``orchestrator.run.ending.End``; message, MLflow run id, epochs done), with the count
                    of starts and of attempts that ended in an error
    stop            a request to stop after the current epoch (a pruned trial)
    worker.log      the worker's stdout and stderr
    claim-seen.json when this host first saw another host's claim of the run unchanged
                    (``orchestrator.store.claims.Sightings``, on this host's monotonic clock)

Every JSON file is written atomically (temp file, fsync, rename; ``claim-seen.json`` without fsync).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.run.ending import End, Then
from training.atomic import atomic_write

SPEC, LOCK, CHECKPOINT, PROGRESS, RESULT, STOP, LOG, SIGHTINGS = (
    "spec.json", "lock", "checkpoint.pt", "progress.json", "result.json", "stop", "worker.log", "claim-seen.json")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    payload = json.dumps(data, indent=1).encode()
    atomic_write(path, lambda f: f.write(payload))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Attempt:
    """``result.json``: the latest attempt at a run, and how it ended."""

    status: End = End.STARTED
    message: str = ""
    run_id: str | None = None
    epochs_done: int = 0
    starts: int = 0  # attempts started in this folder
    failures: int = 0  # attempts that ended in an error
    pid: int = 0
    host: str = ""
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.status = End(self.status)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Attempt | None:
        if data is None:
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except (TypeError, ValueError):
            return None

    @property
    def exit_code(self) -> int:
        return self.status.exit_code


class RunFolder:
    """Paths and files of one run's folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    spec = property(lambda self: self.path / SPEC)
    lock_path = property(lambda self: self.path / LOCK)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    progress_path = property(lambda self: self.path / PROGRESS)
    result_path = property(lambda self: self.path / RESULT)
    stop_path = property(lambda self: self.path / STOP)
    log = property(lambda self: self.path / LOG)
    sightings_path = property(lambda self: self.path / SIGHTINGS)

    # -- the lock: exclusive, non-blocking flock; the kernel drops it when the process dies
    def acquire(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return True

    def lock_id(self) -> str:
        """The held lock file as ``<device>:<inode>`` (recorded in the run's claim: a process of this kernel
        that holds the same file's lock later knows the claim's worker is gone); "" when not held."""
        if self._lock_fd is None:
            return ""
        st = os.fstat(self._lock_fd)
        return f"{st.st_dev}:{st.st_ino}"

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lock_holder(self) -> int | None:
        """The pid in ``lock`` while a live process holds it (0 if unreadable), else None.

        Probes with a shared non-blocking ``flock`` that is dropped at once; a worker starting in that
        instant finds the run locked and reports ``busy``, which the scheduler retries without counting.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.pread(fd, 32, 0).decode().strip() or 0)
            except (OSError, ValueError):
                return 0
        finally:
            os.close(fd)  # also drops the probe's lock
        return None

    # -- progress.json: the heartbeat
    def write_progress(self, **fields: Any) -> None:
        _write_json(self.progress_path, {**fields, "pid": os.getpid(), "time": time.time()})

    def read_progress(self) -> dict[str, Any] | None:
        return _read_json(self.progress_path)

    # -- result.json: the latest attempt
    def read_attempt(self) -> Attempt | None:
        return Attempt.from_json(_read_json(self.result_path))

    def start_attempt(self, host: str) -> Attempt:
        """Record a new attempt (``started``). The count of failed attempts carries over (errors the worker
        caught, even before the first epoch); a previous attempt still ``started`` died without a word, most
        often with its orchestrator (a SIGKILL, a reboot), which is not the run's fault and is not counted."""
        before = self.read_attempt() or Attempt(starts=0)
        failures = 0 if before.status.then is Then.DONE else before.failures
        attempt = Attempt(starts=before.starts + 1, failures=failures, pid=os.getpid(), host=host,
                          run_id=before.run_id, epochs_done=before.epochs_done)
        self.write_attempt(attempt)
        return attempt

    def write_attempt(self, attempt: Attempt) -> None:
        attempt.time = time.time()
        _write_json(self.result_path, asdict(attempt))

    # -- stop requests
    def request_stop(self, reason: str) -> None:
        _write_json(self.stop_path, {"reason": reason, "time": time.time()})

    def stop_requested(self) -> str | None:
        data = _read_json(self.stop_path)
        return str(data.get("reason") or "stop requested") if data is not None else None

    def clear_stop(self) -> None:
        try:
            self.stop_path.unlink()
        except FileNotFoundError:
            pass

    def log_line(self, text: str) -> None:
        """Append one ``--- `` line to the run's log (the orchestrator's word, e.g. why it killed it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

"""One run, start to end: the body of ``adareg train`` and of every sweep worker process.

    python -m orchestrator.worker RUN_DIR/spec.json

The spec is plain JSON (written atomically by whoever starts the worker). The worker holds an
exclusive lock on ``RUN_DIR/lock`` for its whole life, so a run never executes twice at once; the
kernel drops the lock when the process dies, however it dies. Exit codes: 0 finished (or already
finished), 3 diverged (not worth retrying), 4 locked by another live worker, 130/143 interrupted
(the run is KILLED and resumable), 1 any other failure (resumable from its last checkpoint).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.errors import UserError
from orchestrator.identity import run_key
from training.atomic import atomic_write
from training.callbacks import Callback
from training.config import ConfigError, DataError, RunConfig

EXIT_OK, EXIT_FAILED, EXIT_DIVERGED, EXIT_LOCKED, EXIT_USER = 0, 1, 3, 4, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"
SPEC = "spec.json"


def default_runs_dir() -> Path:
    """Where run folders live: ``$ADAREG_RUNS_DIR``, else ``./adareg_runs``."""
    return Path(os.environ.get("ADAREG_RUNS_DIR") or "adareg_runs")


@dataclass
class WorkerSpec:
    """What crosses the process boundary: plain JSON."""

    config: dict[str, Any]
    experiment: str
    run_dir: str
    tracking_uri: str | None = None
    sweep: str | None = None
    device: str = "cpu"
    threads: int | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def write(self, path: str | os.PathLike) -> None:
        data = json.dumps(dataclasses.asdict(self), indent=2).encode()
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def read(cls, path: str | os.PathLike) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Outcome:
    status: str  # finished | already_finished | diverged | killed | locked | a StopRun's kind
    run_id: str | None = None
    message: str = ""
    exit_code: int = EXIT_OK


class StopRun(Exception):
    """Raised by a callback to end a run early on purpose (a pruned trial, say): the run ends KILLED
    with tag ``adareg.failure`` = ``kind`` and stays resumable."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt."""


class ProgressFile(Callback):
    """Writes ``progress.json`` (epoch, total, last metrics) atomically after every epoch."""

    def __init__(self, path: Path, logger: tracking.RunLogger):
        self.path, self.logger, self.total = path, logger, 0

    def on_start(self, config, plan, history) -> None:
        self.total = len(plan)
        last = history[-1] if history else {}
        self._write(int(last.get("epoch", 0)), last)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._write(epoch, metrics)

    def _write(self, epoch: int, metrics: dict[str, float]) -> None:
        data = json.dumps({"epoch": epoch, "total": self.total, "run_id": self.logger.run_id, "pid": os.getpid(),
                           "test_error": metrics.get("test_error"),
                           "images_per_second": metrics.get("images_per_second")}).encode()
        atomic_write(self.path, lambda f: f.write(data))


class RunLock:
    """Exclusive, non-blocking ``flock`` on ``RUN_DIR/lock``; released by the kernel at process death."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def execute(spec: WorkerSpec, callbacks: Sequence[Callback] = ()) -> Outcome:
    """Run (or resume) one configuration under its lock, mirrored into MLflow."""
    config = RunConfig.from_dict(spec.config)
    client = tracking.connect(spec.tracking_uri)
    experiment_id = tracking.ensure_experiment(client, spec.experiment)
    run_dir = Path(spec.run_dir)
    lock = RunLock(run_dir)
    if not lock.acquire():
        return Outcome("locked", message=f"run {run_key(config)} is already running ({lock.path})",
                       exit_code=EXIT_LOCKED)
    try:
        existing = tracking.find_run(client, experiment_id, run_key(config))
        if existing is not None and existing.info.status == "FINISHED":
            return Outcome("already_finished", existing.info.run_id, f"run {existing.info.run_id} is already finished")
        logger = tracking.RunLogger(client, experiment_id, spec.sweep, existing, tags=spec.tags)
        progress = ProgressFile(run_dir / PROGRESS, logger)
        from training.loop import Diverged, train  # torch loads here, not when the CLI starts
        try:
            train(config, [logger, progress, *callbacks], device=spec.device,
                  checkpoint_path=run_dir / CHECKPOINT, threads=spec.threads)
        except Diverged as e:
            logger.finish("FAILED", "diverged", str(e))
            return Outcome("diverged", logger.run_id, str(e), EXIT_DIVERGED)
        except StopRun as e:
            logger.finish("KILLED", e.kind, str(e))
            return Outcome(e.kind, logger.run_id, str(e))
        except (KeyboardInterrupt, Terminated) as e:
            _ignore_signals()  # a second signal must not cut the marking short (the run would stay RUNNING)
            logger.finish("KILLED", "killed", "interrupted")
            code = EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
            return Outcome("killed", logger.run_id, "interrupted; resumable", code)
        except (ConfigError, DataError, UserError):
            logger.finish("FAILED", "error", traceback.format_exc(limit=1))
            raise
        except Exception as e:
            logger.finish("FAILED", "error", f"{type(e).__name__}: {e}")
            raise
        logger.finish("FINISHED")
        return Outcome("finished", logger.run_id)
    finally:
        lock.release()


def _ignore_signals() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the orchestrator that spawned it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker RUN_DIR/spec.json", file=sys.stderr)
        return EXIT_USER

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        _die_with_parent()
        spec = WorkerSpec.read(argv[0])
        outcome = execute(spec)
    except Terminated:
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except (UserError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED
    print(f"{outcome.status}: {outcome.message}".rstrip(": "), flush=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())

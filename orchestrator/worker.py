"""One run, start to end: the body of ``adareg train``, of every sweep worker process and of every trial.

    python -P -m orchestrator.worker RUN_DIR/spec.json

The spec is plain JSON (``WorkerSpec``, written atomically by whoever starts the worker). The worker
holds its run folder's lock for its whole life (the local fast path), claims the run in the tracking
store (``orchestrator.claims``: what decides between processes that share only the store), trains, and
writes how the attempt ended to ``RUN_DIR/result.json`` (``orchestrator.runfolder``): that file, not an
exit code or a log line, is what the orchestrator reads. A checkpoint that cannot be read is moved aside
(kept) and the run restarts from epoch 1 in a fresh MLflow run if the old one holds epochs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import claims, tracking
from orchestrator.errors import UserError
from orchestrator.identity import run_key
from orchestrator.runfolder import RunFolder
from training.atomic import atomic_write
from training.callbacks import Callback
from training.config import ConfigError, DataError, RunConfig

# Exit codes, for shells and for ``adareg train``; the orchestrator reads result.json instead.
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_DIVERGED, EXIT_BUSY, EXIT_STORE = 0, 1, 2, 3, 4, 75
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
PARENT_PID_ENV = "ADAREG_PARENT_PID"
START_BUDGET_S = 60.0  # store outage tolerated before training starts (then the whole --store-timeout)


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
    store_timeout: float = tracking.DEFAULT_STORE_TIMEOUT_S
    claim_lease: float = claims.DEFAULT_LEASE_S

    def write(self, path: str | os.PathLike) -> None:
        data = json.dumps(dataclasses.asdict(self), indent=2).encode()
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def read(cls, path: str | os.PathLike) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Outcome:
    """How one attempt ended; ``status`` is result.json's (see ``orchestrator.runfolder``)."""

    status: str  # finished | already_finished | diverged | bad_input | error | killed | store_down | busy | stopped
    run_id: str | None = None
    message: str = ""
    exit_code: int = EXIT_OK
    epochs_done: int = 0


class StopRun(Exception):
    """Raised by a callback to end a run early on purpose (a pruned trial, say): the run ends KILLED
    with tag ``adareg.failure`` = ``kind`` and stays resumable."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt."""


class ProgressFile(Callback):
    """The worker's heartbeat in ``progress.json``: epoch, total, last metrics, and notes for the user."""

    def __init__(self, folder: RunFolder):
        self.folder, self.total, self.epoch = folder, 0, 0
        self.metrics: dict[str, float] = {}
        self.notes: list[str] = []
        self.note_count = 0
        self.run_id: str | None = None

    def on_start(self, config, plan, history) -> None:
        self.total = len(plan)
        last = history[-1] if history else {}
        self.epoch, self.metrics = int(last.get("epoch", 0)), dict(last)
        self.write()

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epoch, self.metrics = epoch, dict(metrics)
        self.write()

    def note(self, message: str) -> None:
        print(message, flush=True)
        self.notes = [*self.notes, message][-5:]
        self.note_count += 1
        self.write()

    def write(self) -> None:
        m = self.metrics
        error = m.get("test_error", m.get("val_error"))
        self.folder.write_progress(epoch=self.epoch, total=self.total, run_id=self.run_id, test_error=error,
                                   images_per_second=m.get("images_per_second"),
                                   epoch_seconds=m.get("epoch_seconds"), notes=self.notes,
                                   note_count=self.note_count)


class StopWhenAsked(Callback):
    """Ends the run after an epoch once ``RUN_DIR/stop`` exists (how a tuner prunes a trial elsewhere)."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_start(self, config, plan, history) -> None:
        self.on_epoch_end(0, {})

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        reason = self.folder.stop_requested()
        if reason is not None:
            raise StopRun("pruned" if reason.startswith("pruned") else "stopped", reason)


def execute(spec: WorkerSpec, callbacks: Sequence[Callback] = ()) -> Outcome:
    """Run (or resume) one configuration under its folder lock and its claim, mirrored into MLflow; the
    outcome is also written to ``result.json``. Bad input is raised (after being recorded)."""
    config = RunConfig.from_dict(spec.config)
    folder = RunFolder(spec.run_dir)
    if not folder.acquire():
        holder = folder.lock_holder()
        return Outcome("busy", message=f"run {run_key(config)} is already running here"
                       + (f" (pid {holder})" if holder else "") + f": {folder.lock_path}", exit_code=EXIT_BUSY)
    attempt = folder.start_attempt(claims.hostname())
    outcome: Outcome | None = None
    try:
        outcome = _execute(spec, config, folder, callbacks)
        return outcome
    except (ConfigError, DataError, UserError) as e:
        outcome = Outcome("bad_input", message=str(e), exit_code=EXIT_USER)
        raise
    except (KeyboardInterrupt, Terminated):
        outcome = Outcome("killed", message="interrupted; resumable", exit_code=EXIT_SIGTERM)
        raise
    except BaseException as e:
        outcome = Outcome("error", message=f"{type(e).__name__}: {e}"[:2000], exit_code=EXIT_FAILED)
        raise
    finally:
        failed = outcome.status == "error"
        folder.write_result(dataclasses.replace(
            attempt, status=outcome.status, message=outcome.message, run_id=outcome.run_id or attempt.run_id,
            epochs_done=outcome.epochs_done or attempt.epochs_done, failures=attempt.failures + failed))
        folder.release()


def _execute(spec: WorkerSpec, config: RunConfig, folder: RunFolder, callbacks: Sequence[Callback]) -> Outcome:
    progress = ProgressFile(folder)
    store = tracking.Store(spec.tracking_uri, budget_s=spec.store_timeout, on_wait=progress.note)
    key = run_key(config)
    try:  # a store down before anything started: say so soon; the orchestrator waits for it to answer
        experiment_id = store.call(lambda: tracking.ensure_experiment(store.client, spec.experiment),
                                   budget_s=START_BUDGET_S)
        existing = store.call(lambda: tracking.find_run(store.client, experiment_id, key), budget_s=START_BUDGET_S)
    except tracking.StoreDown as e:
        return Outcome("store_down", message=str(e), exit_code=EXIT_STORE)
    if existing is not None and existing.info.status == "FINISHED":
        return Outcome("already_finished", existing.info.run_id, f"run {existing.info.run_id} is already finished")
    if existing is not None:  # cheap look before loading anything; the claim itself is taken on start
        holder = claims.holder(existing.data.tags, lease_s=spec.claim_lease, my_run_dir=str(folder.path))
        if holder is not None and holder.live:
            return Outcome("busy", existing.info.run_id, f"running elsewhere: {holder.describe()}",
                           exit_code=EXIT_BUSY)
    _check_checkpoint(folder, config, progress.note)

    owner = claims.Owner.me(str(folder.path))
    logger = tracking.RunLogger(store, experiment_id, spec.sweep, spec.tags, owner=owner, lease_s=spec.claim_lease,
                                note=progress.note)
    logger.candidate = existing
    from training.loop import Diverged, train  # torch loads here, not when the CLI starts

    class RunId(Callback):  # progress.json names the MLflow run once the logger has it
        def on_start(self, config, plan, history):
            progress.run_id = logger.run_id

    done = lambda: progress.epoch  # noqa: E731
    try:
        train(config, [logger, RunId(), progress, *callbacks, StopWhenAsked(folder)], device=spec.device,
              checkpoint_path=folder.checkpoint, threads=spec.threads)
    except tracking.AlreadyFinished as e:
        return Outcome("already_finished", e.run_id, str(e))
    except claims.Busy as e:
        logger.abandon()  # not ours (or no longer): leave it to its owner
        return Outcome("busy", logger.run_id, str(e), EXIT_BUSY, done())
    except tracking.StoreDown as e:
        logger.finish("KILLED", "store_down", str(e), blocking=False)
        return Outcome("store_down", logger.run_id, str(e), EXIT_STORE, done())
    except Diverged as e:
        logger.finish("FAILED", "diverged", str(e))
        return Outcome("diverged", logger.run_id, str(e), EXIT_DIVERGED, done())
    except StopRun as e:
        logger.finish("KILLED", e.kind, str(e))
        folder.clear_stop()
        return Outcome("stopped", logger.run_id, str(e), EXIT_OK, done())
    except (KeyboardInterrupt, Terminated) as e:
        _ignore_signals()  # a second signal must not cut the marking short (the run would stay RUNNING)
        logger.finish("KILLED", "killed", "interrupted", blocking=False)
        code = EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
        return Outcome("killed", logger.run_id, "interrupted; resumable", code, done())
    except (ConfigError, DataError, UserError):
        logger.finish("FAILED", "error", traceback.format_exc(limit=1), blocking=False)
        raise
    except Exception as e:
        logger.finish("FAILED", "error", f"{type(e).__name__}: {e}", blocking=False)
        raise
    try:
        logger.finish("FINISHED")
    except tracking.StoreDown as e:
        return Outcome("store_down", logger.run_id, str(e), EXIT_STORE, done())
    return Outcome("finished", logger.run_id, exit_code=EXIT_OK, epochs_done=done())


def _check_checkpoint(folder: RunFolder, config: RunConfig, note) -> None:
    """Move a checkpoint that cannot be resumed aside (kept beside it), saying which file and why."""
    from training.checkpoint import CheckpointError, load_checkpoint, set_aside

    try:
        load_checkpoint(folder.checkpoint, identity=config.identity_dict())
    except CheckpointError as e:
        moved = set_aside(folder.checkpoint)
        note(f"checkpoint {folder.checkpoint} cannot be resumed ({e.what}); kept as {moved.name}; "
             "restarting from epoch 1")


def _ignore_signals() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that spawned it dies.

    The spawner hands down its pid (``ADAREG_PARENT_PID``): "my parent is pid 1" does not mean "my parent
    died" where the orchestrator itself is pid 1 (a container's entrypoint without an init)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):  # it died before prctl took effect
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

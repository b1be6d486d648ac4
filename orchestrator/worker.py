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

import contextlib
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

from orchestrator import claims, diskfault, tracking
from orchestrator.errors import UserError
from orchestrator.identity import run_key
from orchestrator.runfolder import Result, RunFolder
from training.atomic import atomic_write
from training.callbacks import Callback
from training.config import ConfigError, DataError, RunConfig

# Exit codes, for shells and for ``adareg train``; the orchestrator reads result.json instead.
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_DIVERGED, EXIT_BUSY, EXIT_STORE = 0, 1, 2, 3, 4, 75
EXIT_DISK = diskfault.EXIT_DISK  # 74: a full or read-only disk ended the attempt (result.json may be unwritten)
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

    status: str  # finished | already_finished | diverged | bad_input | error | killed | store_down | disk_full
    #              | busy | stopped
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
        self.notes = [*self.notes, message][-5:]
        self.note_count += 1
        try:  # a note is for the user: a full disk under the log or progress file must not end the run here
            say(message)
            self.write()
        except OSError as e:
            if diskfault.disk_fault(e) is None:
                raise

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


@dataclass
class Member:
    """One run inside a worker process: alone, or a member of a pack."""

    spec: WorkerSpec
    config: RunConfig
    folder: RunFolder
    attempt: Result | None = None  # None: its folder is locked by another live process
    outcome: Outcome | None = None
    logger: tracking.RunLogger | None = None
    progress: ProgressFile | None = None

    def callbacks(self) -> list[Callback]:
        """What a run's training reports to: the MLflow logger, progress.json, the stop request."""
        member = self

        class RunId(Callback):  # progress.json names the MLflow run once the logger has it
            def on_start(self, config, plan, history):
                member.progress.run_id = member.logger.run_id

        return [self.logger, RunId(), self.progress]

    def result(self) -> Outcome:
        return self.outcome or Outcome("error", message="ended without an outcome", exit_code=EXIT_FAILED)

    def end(self, status: str, message: str = "", code: int = EXIT_OK) -> None:
        self.outcome = Outcome(status, self.logger.run_id, message, code, self.progress.epoch)


def _ended_early(member: Member, e: BaseException) -> bool:
    """The outcome of a run (alone or in a pack) whose training ``e`` ended early for a reason of its own:
    found finished, its claim lost, the store down past its budget, a stop request. False otherwise."""
    logger = member.logger
    if isinstance(e, tracking.AlreadyFinished):
        member.outcome = Outcome("already_finished", e.run_id, str(e))
    elif isinstance(e, claims.Busy):
        logger.abandon()  # not ours (or no longer): leave it to its owner
        member.end("busy", str(e), EXIT_BUSY)
    elif isinstance(e, tracking.StoreDown):
        logger.finish("KILLED", "store_down", str(e), blocking=False)
        member.end("store_down", str(e), EXIT_STORE)
    elif isinstance(e, StopRun):
        logger.finish("KILLED", e.kind, str(e))
        member.folder.clear_stop()
        member.end("stopped", str(e))
    elif (fault := diskfault.disk_fault(e)) is not None:  # not the run's fault: KILLED, resumable, not counted
        logger.finish("KILLED", diskfault.STATUS, fault.describe(), blocking=False)
        member.end(diskfault.STATUS, fault.describe(), EXIT_DISK)
    else:
        return False
    return True


def _interrupted(member: Member, e: BaseException) -> None:
    """A signal ended the run: KILLED in MLflow (without waiting for the store), resumable."""
    member.logger.finish("KILLED", "killed", "interrupted", blocking=False)
    member.end("killed", "interrupted; resumable", EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT)


def _finished(member: Member) -> None:
    try:
        member.logger.finish("FINISHED")
    except tracking.StoreDown as e:
        return member.end("store_down", str(e), EXIT_STORE)
    member.end("finished")


def _lock(spec: WorkerSpec) -> Member:
    config = RunConfig.from_dict(spec.config)
    member = Member(spec, config, RunFolder(spec.run_dir))
    if not member.folder.acquire():
        holder = member.folder.lock_holder()
        member.outcome = Outcome("busy", message=f"run {run_key(config)} is already running here"
                                 + (f" (pid {holder})" if holder else "") + f": {member.folder.lock_path}",
                                 exit_code=EXIT_BUSY)
        return member
    member.attempt = member.folder.start_attempt(claims.hostname())
    member.progress = ProgressFile(member.folder)
    return member


def _unlock(member: Member, raised: BaseException | None = None) -> None:
    """Write the attempt's outcome to result.json (an exception's if one ended it) and release the lock."""
    if member.attempt is None:
        return
    if member.outcome is None and raised is not None:
        if isinstance(raised, (ConfigError, DataError, UserError)):
            member.outcome = Outcome("bad_input", message=str(raised), exit_code=EXIT_USER)
        elif isinstance(raised, (KeyboardInterrupt, Terminated)):
            member.outcome = Outcome("killed", message="interrupted; resumable", exit_code=EXIT_SIGTERM)
        elif (fault := diskfault.disk_fault(raised)) is not None:
            member.outcome = Outcome(diskfault.STATUS, message=fault.describe(), exit_code=EXIT_DISK)
        else:
            member.outcome = Outcome("error", message=diskfault.reason(raised)[:2000], exit_code=EXIT_FAILED)
    outcome, attempt = member.result(), member.attempt
    try:
        member.folder.write_result(dataclasses.replace(
            attempt, status=outcome.status, message=outcome.message, run_id=outcome.run_id or attempt.run_id,
            epochs_done=outcome.epochs_done or attempt.epochs_done,
            failures=attempt.failures + (outcome.status == "error")))
    except OSError as e:  # the disk is full or read-only: the exit code tells the orchestrator instead
        if (fault := diskfault.disk_fault(e)) is None:
            raise
        outcome.exit_code = EXIT_DISK
        with contextlib.suppress(OSError):
            say(f"cannot write {member.folder.result_path} ({fault.describe()}); the attempt ended {outcome.status}")
    finally:
        member.folder.release()


def _connect(spec: WorkerSpec, note) -> tuple[tracking.Store, str]:
    """The store and the experiment's id; a store down before anything started is said soon (StoreDown
    after START_BUDGET_S): the orchestrator waits for it to answer."""
    store = tracking.Store(spec.tracking_uri, budget_s=spec.store_timeout, on_wait=note)
    experiment_id = store.call(lambda: tracking.ensure_experiment(store.client, spec.experiment),
                               budget_s=START_BUDGET_S)
    return store, experiment_id


def _prepare(member: Member, store: tracking.Store, experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Look at the key's run before loading anything (finished, or held by a live process elsewhere: an
    outcome now), move a broken checkpoint aside, and make the member's logger."""
    spec, config, folder = member.spec, member.config, member.folder
    existing = store.call(lambda: tracking.find_run(store.client, experiment_id, run_key(config)),
                          budget_s=START_BUDGET_S)
    if existing is not None and existing.info.status == "FINISHED":
        member.outcome = Outcome("already_finished", existing.info.run_id,
                                 f"run {existing.info.run_id} is already finished")
        return
    if existing is not None:  # the claim itself is taken on start
        holder = claims.holder(existing.data.tags, lease_s=spec.claim_lease, my_run_dir=str(folder.path))
        if holder is not None and holder.live:
            member.outcome = Outcome("busy", existing.info.run_id, f"running elsewhere: {holder.describe()}",
                                     exit_code=EXIT_BUSY)
            return
    _check_checkpoint(folder, config, member.progress.note)
    member.logger = tracking.RunLogger(store, experiment_id, spec.sweep, {**spec.tags, **(tags or {})},
                                       owner=claims.Owner.me(str(folder.path)), lease_s=spec.claim_lease,
                                       note=member.progress.note)
    member.logger.candidate = existing


def execute(spec: WorkerSpec, callbacks: Sequence[Callback] = ()) -> Outcome:
    """Run (or resume) one configuration under its folder lock and its claim, mirrored into MLflow; the
    outcome is also written to ``result.json``. Bad input is raised (after being recorded)."""
    member = _lock(spec)
    if member.attempt is None:
        return member.result()
    raised: BaseException | None = None
    try:
        _execute(member, callbacks)
    except BaseException as e:
        raised = e
        if diskfault.disk_fault(e) is None:
            raise
    finally:
        _unlock(member, raised)
    return member.result()  # a disk fault (raised before training, say) is an outcome: disk_full


def _execute(member: Member, callbacks: Sequence[Callback]) -> None:
    spec, config, folder, progress = member.spec, member.config, member.folder, member.progress
    try:
        store, experiment_id = _connect(spec, progress.note)
        _prepare(member, store, experiment_id)
    except tracking.StoreDown as e:
        member.outcome = Outcome("store_down", message=str(e), exit_code=EXIT_STORE)
    if member.outcome is not None:
        return
    logger = member.logger
    from training.loop import Diverged, train  # torch loads here, not when the CLI starts

    try:
        train(config, [*member.callbacks(), *callbacks, StopWhenAsked(folder)], device=spec.device,
              checkpoint_path=folder.checkpoint, threads=spec.threads)
    except Diverged as e:
        logger.finish("FAILED", "diverged", str(e))
        return member.end("diverged", str(e), EXIT_DIVERGED)
    except (KeyboardInterrupt, Terminated) as e:
        _ignore_signals()  # a second signal must not cut the marking short (the run would stay RUNNING)
        return _interrupted(member, e)
    except (ConfigError, DataError, UserError):
        logger.finish("FAILED", "error", traceback.format_exc(limit=1), blocking=False)
        raise
    except Exception as e:
        if _ended_early(member, e):
            return
        logger.finish("FAILED", "error", diskfault.reason(e), blocking=False)
        raise
    _finished(member)


# ------------------------------------------------------------------------------------------------ packs


TAG_PACK = "adareg.pack"  # "<pack id>/<size>" on every member's MLflow run


@dataclass
class PackSpec:
    """A pack: the spec files of its members (each in its own run folder), trained as one fused model."""

    pack_id: str
    members: list[str]  # the members still to train (a re-run leaves out those already finished)
    size: int = 0  # the pack's size as the sweep formed it (0: len(members))

    def write(self, path: str | os.PathLike) -> None:
        data = json.dumps(dataclasses.asdict(self), indent=2).encode()
        atomic_write(path, lambda f: f.write(data))


class _PackDone(Exception):
    """Every member of the pack has an outcome: stop training it."""


class _Guard(Callback):
    """One member's callbacks inside a pack: what would end a solo run (stop request, claim lost, store
    down past its budget, an error in its logger) ends this member only; the others train on."""

    def __init__(self, member: Member, group: Sequence[Member]):
        self.member, self.group = member, group
        self.inner = [*member.callbacks(), StopWhenAsked(member.folder)]

    def _call(self, fn) -> None:
        m = self.member
        if m.outcome is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - this member's trouble, not the pack's
            if not _ended_early(m, e):
                with contextlib.suppress(Exception):
                    m.logger.finish("FAILED", "error", diskfault.reason(e), blocking=False)
                m.end("error", diskfault.reason(e)[:2000], EXIT_FAILED)
        if all(x.outcome is not None for x in self.group):
            raise _PackDone()

    def on_start(self, config, plan, history) -> None:
        def start() -> None:
            for cb in self.inner:
                cb.on_start(config, plan, history)

        self._call(start)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        def end() -> None:
            for cb in self.inner:
                cb.on_epoch_end(epoch, metrics)

        self._call(end)

    def on_diverged(self, epoch: int, message: str) -> None:
        m = self.member
        if m.outcome is None:
            m.logger.finish("FAILED", "diverged", message)
            m.end("diverged", message, EXIT_DIVERGED)


def execute_pack(pack: PackSpec) -> list[Outcome]:
    """Train the members of a pack as one fused model (``training.packed.train_packed``). Each member is
    a run like any other: its folder lock, its claim, its MLflow run (tagged ``adareg.pack``), its
    checkpoint in the solo format, its ``result.json``. Members found finished, held elsewhere or with a
    checkpoint of another epoch are left out or trained in a pack of their own epoch."""
    members = [_lock(WorkerSpec.read(path)) for path in pack.members]
    ready = [m for m in members if m.attempt is not None]
    raised: BaseException | None = None
    try:
        if ready:
            _execute_pack(pack, ready)
        return [m.result() for m in members]
    except BaseException as e:
        raised = e
        raise
    finally:
        for m in ready:
            _unlock(m, raised)


def _execute_pack(pack: PackSpec, members: list[Member]) -> None:
    from training.checkpoint import load_checkpoint
    from training.packed import group_by_epoch
    from training.schedules import plan_for

    lead = members[0].spec
    try:
        store, experiment_id = _connect(lead, members[0].progress.note)
        for m in members:
            _prepare(m, store, experiment_id, {TAG_PACK: f"{pack.pack_id}/{pack.size or len(pack.members)}"})
    except tracking.StoreDown as e:
        for m in members:
            m.outcome = m.outcome or Outcome("store_down", message=str(e), exit_code=EXIT_STORE)
        return
    for m in members:  # claim every member before the pack starts: one held elsewhere is left out
        if m.outcome is None:
            payload = load_checkpoint(m.folder.checkpoint)
            try:
                m.logger.attach(m.config, plan_for(m.config), list(payload["history"]) if payload else [])
            except (tracking.AlreadyFinished, claims.Busy, tracking.StoreDown) as e:
                _ended_early(m, e)
    todo = [m for m in members if m.outcome is None]
    for indices in group_by_epoch([m.folder.checkpoint for m in todo]).values():
        _train_group([todo[i] for i in indices], lead)


def _train_group(group: list[Member], lead: WorkerSpec) -> None:
    from training.packed import train_packed

    try:
        train_packed([m.config for m in group], [[_Guard(m, group)] for m in group], device=lead.device,
                     checkpoint_paths=[m.folder.checkpoint for m in group], threads=lead.threads)
    except _PackDone:
        return
    except (KeyboardInterrupt, Terminated) as e:
        _ignore_signals()
        for m in group:
            if m.outcome is None:
                _interrupted(m, e)
        raise
    except Exception as e:  # noqa: BLE001 - the pack itself failed: every member still in it
        for m in group:
            if m.outcome is None and not (diskfault.disk_fault(e) and _ended_early(m, e)):  # disk: resumable
                with contextlib.suppress(Exception):
                    m.logger.finish("FAILED", "error", diskfault.reason(e), blocking=False)
                m.end("error", diskfault.reason(e)[:2000], EXIT_FAILED)
        return
    for m in group:
        if m.outcome is None:
            _finished(m)


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
        data = json.loads(Path(argv[0]).read_text())
        if "members" in data:
            outcomes = execute_pack(PackSpec(**data))
            for o in outcomes:
                print(f"{o.status}: {o.message}".rstrip(": "), flush=True)
            return max((o.exit_code for o in outcomes), default=EXIT_OK)
        outcome = execute(WorkerSpec(**data))
    except Terminated:
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except (UserError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER
    except Exception as e:
        if (fault := diskfault.disk_fault(e)) is not None:  # before the attempt was recorded (lock, result.json)
            with contextlib.suppress(OSError):
                say(f"{diskfault.STATUS}: {fault.describe()}")
            return _quiet_exit(EXIT_DISK)
        traceback.print_exc()
        return EXIT_FAILED
    with contextlib.suppress(OSError):  # the log may sit on the full disk: the exit code still tells
        say(f"{outcome.status}: {outcome.message}".rstrip(": "))
    return _quiet_exit(outcome.exit_code)


def say(message: str) -> None:
    """One line to the worker's log (its stdout)."""
    print(message, flush=True)


def _quiet_exit(code: int) -> int:
    """``code``, made sure to be the exit status: Python exits 120 when it cannot flush stdout at exit (a log on
    a full disk), so output that cannot be written is dropped now."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.flush()
        except (OSError, ValueError):
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - lives until exit
    return code


if __name__ == "__main__":
    sys.exit(main())

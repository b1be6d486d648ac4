"""One run inside a worker process, alone or as a member of a pack: its folder lock, its claim, its
callbacks, and how its attempt ended (an ``End``, the one vocabulary of ``orchestrator.run.ending``).

Both the solo worker and the pack worker go through the same steps here: ``lock`` (the folder lock and a
new attempt in ``result.json``), ``connect`` (the store and the experiment), ``prepare`` (finished or held
elsewhere already? a broken checkpoint moved aside; the run's logger), training (theirs), then
``unlock`` (the attempt's end written, the lock released). ``Member.end`` is the one mapping from how a
training ended to the MLflow run's status, its ``adareg.failure`` tag and the attempt's end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.diskfault import disk_fault, reason
from orchestrator.errors import UserError
from orchestrator.run.ending import EXIT_DISK, EXIT_SIGINT, End
from orchestrator.run.folder import Attempt, RunFolder
from orchestrator.run.spec import WorkerSpec
from orchestrator.store import claims
from orchestrator.store.client import Store, StoreDown, StoreRefused, refusal
from orchestrator.store.logger import AlreadyFinished, RunLogger
from orchestrator.store.runs import ensure_experiment
from training.callbacks import Callback
from training.config import ConfigError, DataError, RunConfig

START_BUDGET_S = 60.0  # store outage tolerated before training starts (then the whole --store-timeout)


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
            if disk_fault(e) is None:
                raise

    def write(self) -> None:
        m = self.metrics
        self.folder.write_progress(epoch=self.epoch, total=self.total, run_id=self.run_id,
                                   test_error=m.get("test_error"), val_error=m.get("val_error"),
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
    attempt: Attempt | None = None  # this attempt as started; None: another live process holds the folder
    ended: Attempt | None = None  # how it ended, once it has
    logger: RunLogger | None = None
    progress: ProgressFile | None = None
    sigint: bool = False  # interrupted by SIGINT (Ctrl-C): the worker exits 130 rather than 143
    unrecorded: bool = False  # its end could not be written to result.json (a full disk): the exit code says it

    def exit_code(self) -> int:
        """The worker's exit code for this member's attempt."""
        end = self.result().status
        if self.unrecorded:
            return EXIT_DISK
        return EXIT_SIGINT if end is End.KILLED and self.sigint else end.exit_code

    def callbacks(self, extra: Sequence[Callback] = ()) -> list[Callback]:
        """What a run's training reports to: the MLflow logger, progress.json, ``extra``, the stop request."""
        member = self

        class RunId(Callback):  # progress.json names the MLflow run once the logger has it
            def on_start(self, config, plan, history):
                member.progress.run_id = member.logger.run_id

        return [self.logger, RunId(), self.progress, *extra, StopWhenAsked(self.folder)]

    def result(self) -> Attempt:
        return self.ended or Attempt(End.ERROR, "ended without an end")

    def record(self, end: End, message: str = "", run_id: str | None = None) -> None:
        """Note how the attempt ended (the first word stands)."""
        if self.ended is None:
            run_id = run_id or (self.logger.run_id if self.logger is not None else None)
            epochs = self.progress.epoch if self.progress is not None else 0
            self.ended = Attempt(end, message, run_id=run_id, epochs_done=epochs)

    def end(self, end: End, message: str = "", *, failure: str | None = None, blocking: bool = True) -> None:
        """End the attempt with ``end``: its MLflow run gets ``end.mlflow_status`` (tag ``adareg.failure`` =
        ``failure`` or the end's word; without waiting for the store unless ``blocking``), then the end is
        recorded. A store that stays down while a FINISHED run is written makes it ``store_down``; one that
        refuses this user the write, ``refused``."""
        status = end.mlflow_status
        if self.logger is not None and status is not None:
            try:
                self.logger.finish(status, None if end is End.FINISHED else (failure or end.value), message,
                                   blocking=blocking)
            except StoreDown as e:
                return self.record(End.STORE_DOWN, str(e))
            except Exception as e:
                if (refused := self.refusal(e)) is None:
                    raise
                return self.record(End.REFUSED, str(refused))
        elif self.logger is not None and end in (End.BUSY, End.REFUSED):
            self.logger.abandon()  # not ours (or no longer), or not ours to write: leave it as it stands
        self.record(end, message)

    def ended_early(self, e: BaseException) -> bool:
        """End the attempt if training ``e`` ended it early for a reason of its own (found finished, its
        claim lost, the store down past its budget, the server refusing this user, a stop request); False for
        any other exception."""
        if isinstance(e, AlreadyFinished):
            self.record(End.ALREADY_FINISHED, str(e), e.run_id)
        elif isinstance(e, claims.Busy):
            self.end(End.BUSY, str(e))
        elif isinstance(e, StoreDown):
            self.end(End.STORE_DOWN, str(e), blocking=False)
        elif (refused := self.refusal(e)) is not None:  # bad input, not the run's fault: resumable, not counted
            self.end(End.REFUSED, str(refused))
        elif isinstance(e, StopRun):
            self.end(End.STOPPED, str(e), failure=e.kind)
            self.folder.clear_stop()
        elif (fault := disk_fault(e)) is not None:  # not the run's fault: KILLED, resumable, not counted
            self.end(End.DISK_FULL, fault.describe(), blocking=False)
        else:
            return False
        return True

    def refusal(self, e: BaseException) -> StoreRefused | None:
        """``e`` as a ``StoreRefused`` when it is the tracking server's 401/403 (a write refused mid-run: the
        user's permission revoked, or run creation refused where the write probe passed), else None."""
        if isinstance(e, StoreRefused):
            return e
        run_id = self.logger.run_id if self.logger is not None else None
        endpoint = re.search(r"endpoint (/\S+)", str(e))
        what = (f"writing to run {run_id}" if run_id else f"a request for run {self.folder.path.name}") \
            + (f" ({endpoint.group(1)})" if endpoint else "")
        return refusal(e, self.spec.tracking_uri, what)

    def interrupted(self, e: BaseException) -> None:
        """A signal ended the run: KILLED in MLflow (without waiting for the store), resumable."""
        self.sigint = isinstance(e, KeyboardInterrupt)
        self.end(End.KILLED, "interrupted; resumable", blocking=False)

    def failed(self, e: BaseException) -> None:
        """An exception the worker caught ended the run (counted against it), said in words (an OSError by its
        errno and path, not the internals that wrapped it)."""
        self.end(End.ERROR, reason(e)[:2000], blocking=False)


def lock(spec: WorkerSpec) -> Member:
    """The member of ``spec`` with its folder locked and a new attempt started, or (``attempt`` None)
    ended ``busy`` when another live process holds the folder."""
    config = RunConfig.from_dict(spec.config)
    member = Member(spec, config, RunFolder(spec.run_dir))
    if not member.folder.acquire():
        holder = member.folder.lock_holder()
        member.record(End.BUSY, f"run {member.folder.path.name} is already running here"
                      + (f" (pid {holder})" if holder else "") + f": {member.folder.lock_path}")
        return member
    member.attempt = member.folder.start_attempt(claims.hostname())
    member.progress = ProgressFile(member.folder)
    return member


def unlock(member: Member, raised: BaseException | None = None) -> Attempt:
    """Write the attempt's end to result.json (an exception's if one ended it), release the lock; the end."""
    if member.attempt is None:
        return member.result()
    if raised is not None:
        if isinstance(raised, StoreRefused):
            member.record(End.REFUSED, str(raised))
        elif isinstance(raised, (ConfigError, DataError, UserError)):
            member.record(End.BAD_INPUT, str(raised))
        elif isinstance(raised, (KeyboardInterrupt, Terminated)):
            member.record(End.KILLED, "interrupted; resumable")
        elif (fault := disk_fault(raised)) is not None:
            member.record(End.DISK_FULL, fault.describe())
        else:
            member.record(End.ERROR, reason(raised)[:2000])
    ended, attempt = member.result(), member.attempt
    final = dataclasses.replace(
        attempt, status=ended.status, message=ended.message, run_id=ended.run_id or attempt.run_id,
        epochs_done=ended.epochs_done or attempt.epochs_done,
        failures=attempt.failures + ended.status.counted_in_folder)
    try:
        member.folder.write_attempt(final)
    except OSError as e:  # the disk is full or read-only: the exit code tells the orchestrator instead
        if (fault := disk_fault(e)) is None:
            raise
        member.unrecorded = True
        with contextlib.suppress(OSError):
            say(f"cannot write {member.folder.result_path} ({fault.describe()}); the attempt ended {ended.status}")
    finally:
        member.folder.release()
    return final


def connect(spec: WorkerSpec, note) -> tuple[Store, str]:
    """The store and the experiment's id; a store down before anything started is said soon (StoreDown
    after START_BUDGET_S): the orchestrator waits for it to answer."""
    store = Store(spec.tracking_uri, budget_s=spec.store_timeout, on_wait=note)
    experiment_id = store.call(lambda: ensure_experiment(store.client, spec.experiment), budget_s=START_BUDGET_S)
    return store, experiment_id


def prepare(member: Member, store: Store, experiment_id: str, tags: dict[str, str] | None = None) -> None:
    """Look at the key's run before loading anything (finished, or held by a live process elsewhere: an
    end now), move a broken checkpoint aside, and make the member's logger."""
    spec, config, folder = member.spec, member.config, member.folder
    seen = claims.Sightings(folder.sightings_path)
    logger = RunLogger(store, experiment_id, spec.sweep, {**spec.tags, **(tags or {})},
                       owner=claims.Owner.me(str(folder.path), folder.lock_id(), spec.claim_lease),
                       lease_s=spec.claim_lease,
                       note=member.progress.note, seen=seen, sweep_yaml=spec.sweep_yaml)
    existing = store.call(lambda: logger.existing(config), budget_s=START_BUDGET_S)
    if existing is not None and existing.info.status == "FINISHED":
        return member.record(End.ALREADY_FINISHED, f"run {existing.info.run_id} is already finished",
                             existing.info.run_id)
    if existing is not None:  # the claim itself is taken on start
        holder = claims.holder(existing.data.tags, lease_s=spec.claim_lease, mine=logger.owner, seen=seen)
        if holder is not None and holder.live:
            return member.record(End.BUSY, f"running elsewhere: {holder.describe()}", existing.info.run_id)
    check_checkpoint(folder, config, member.progress.note)
    member.logger, logger.candidate = logger, existing


def check_checkpoint(folder: RunFolder, config: RunConfig, note) -> None:
    """Move a checkpoint that cannot be resumed aside (kept beside it), saying which file and why."""
    from training.checkpoint import CheckpointError, load_checkpoint, set_aside

    try:
        load_checkpoint(folder.checkpoint, identity=config.identity_dict())
    except CheckpointError as e:
        moved = set_aside(folder.checkpoint)
        note(f"checkpoint {folder.checkpoint} cannot be resumed ({e.what}); kept as {moved.name}; "
             "restarting from epoch 1")


def say(message: str) -> None:
    """One line to the worker's log (its stdout)."""
    print(message, flush=True)


def ignore_signals() -> None:
    """After a first signal: a second must not cut the marking of the runs short (they would stay RUNNING)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        pass

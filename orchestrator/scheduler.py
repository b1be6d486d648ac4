"""Run what a sweep has left to do: device slots, one worker process per run, retries, signals.

``run_sweep`` is what ``adareg sweep run`` calls: it initialises the MLflow store and experiment
once, reconciles the sweep with MLflow and the run folders, and hands the runs that are not done to
a ``Scheduler``, which keeps every slot busy through a backend (local subprocesses or Ray tasks):

- a slot is a GPU share (CUDA_VISIBLE_DEVICES of its own) or a set of CPU threads;
- a run whose folder lock a live process holds waits until it is free; a run that a live process elsewhere
  has claimed in the store is looked at again every ``busy_wait_s`` until it is done or its claim is stale;
- how an attempt ended is read from the worker's ``result.json`` (``orchestrator.runfolder``): finished;
  diverged and bad input are final; an error or a crash (no result written) is retried up to ``retries``
  times from the last checkpoint; busy, store-down and stalled attempts are retried without counting
  against the run (a stalled one counts: it may stall again);
- a worker whose progress file shows no new epoch for the stall timeout is SIGKILLed and retried, and its
  log says why;
- while the tracking store is unreachable no new run is started (running ones keep training and buffer
  their metrics); after ``store_timeout`` of outage the sweep ends, its runs resumable;
- the same while the runs folder is full or read-only (``orchestrator.diskfault``: a worker's attempt ended
  ``disk_full``, a spec or log could not be written, or too little is free for a run to start): its attempts
  are not counted, the folder is re-checked every few seconds, and after ``disk_timeout`` the sweep ends;
- the first SIGINT/SIGTERM stops dispatching, gives workers that got the signal too (Ctrl-C reaches
  the whole process group) a moment, then sends SIGTERM to the rest and waits: their runs end KILLED
  and stay resumable. A second signal SIGKILLs the workers and returns at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator import claims, diskfault, tracking
from orchestrator.backends import Backend, Job, LocalBackend, RayBackend, Slot, check_shared
from orchestrator.errors import UserError
from orchestrator.reconcile import DEFAULT_RETRIES, TODO, RunState, inspect_sweep
from orchestrator.runfolder import COUNTED, DONE, Result, RunFolder
from orchestrator.worker import EXIT_BUSY, EXIT_SIGINT, EXIT_SIGTERM, PackSpec, WorkerSpec
from training.config import RunConfig

POLL_S = 0.2
LOCK_WAIT_S = 1.0  # a run locked here is looked at again after this
BUSY_WAIT_S = 15.0  # a run claimed elsewhere is looked at again after this
RETRY_DELAY_S = 2.0
GRACE_S = 2.0  # after the first signal, before SIGTERM goes to workers that did not get it themselves
STOP_TIMEOUT_S = 120.0  # after the first signal, before stragglers are SIGKILLed
MIN_STALL_S = 1200.0  # the default stall timeout: max(20 min, STALL_EPOCHS x the slowest epoch seen)
STALL_EPOCHS = 5
PROBE_EVERY_S = 5.0
EXIT_STORE_DOWN = 75  # the sweep ended because the tracking store stayed down: everything is resumable
DISK_NOTE_EVERY_S = 60.0  # while the runs folder is full: how often the progress output says so again


# ------------------------------------------------------------------------------------------- slots


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES values of the GPUs this process sees (its own mask applied), in order."""
    import torch  # device_count asks NVML and does not initialise CUDA here

    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [d.strip() for d in mask.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def parse_gpus(gpus: str | None, visible: Sequence[str]) -> list[str]:
    """``--gpus``: 'all' (or None), 'none', or indices '0,1' into the visible GPUs -> their ids."""
    if gpus is None or gpus.strip().lower() == "all":
        return list(visible)
    if gpus.strip().lower() == "none":
        return []
    chosen = []
    for part in gpus.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UserError(f"--gpus {gpus!r}: expected all, none or GPU indices such as 0,1")
        if int(part) >= len(visible):
            seen = f"{len(visible)} GPU{'s' if len(visible) != 1 else ''}" + (
                f" (0-{len(visible) - 1})" if visible else "")
            raise UserError(f"--gpus {gpus!r}: GPU {part} is not visible; this machine has {seen}")
        if visible[int(part)] not in chosen:
            chosen.append(visible[int(part)])
    return chosen


def device_slots(gpus: Sequence[str], jobs_per_gpu: int = 1, max_parallel: int | None = None,
                 cores: int | None = None) -> list[Slot]:
    """K slots per GPU (spread over the GPUs first), capped by ``max_parallel``; without GPUs,
    ``max_parallel`` CPU slots (default: half the cores). Threads: the cores shared out."""
    cores = cores or os.cpu_count() or 1
    if jobs_per_gpu < 1:
        raise UserError(f"--jobs-per-gpu {jobs_per_gpu}: must be at least 1")
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel}: must be at least 1")
    if gpus:
        places = [(g, j) for j in range(jobs_per_gpu) for g in gpus][:max_parallel]
        threads = max(1, cores // len(places))
        return [Slot(f"gpu{g}.{j}", "cuda", g, threads, 1.0 / jobs_per_gpu) for g, j in places]
    n = max_parallel or max(1, cores // 2)
    threads = max(1, cores // n)
    return [Slot(f"cpu{i}", "cpu", None, threads) for i in range(n)]


# -------------------------------------------------------------------------------------- scheduling


@dataclass
class Task:
    """One run the scheduler owes: its attempts and how it ended in this sweep."""

    key: str
    config: RunConfig
    run_dir: Path
    total_epochs: int = 0
    failures: int = 0  # failed attempts in this sweep run
    starts: int = 0
    not_before: float = 0.0
    result: str = "skipped"  # finished | failed | diverged | killed | stopped | interrupted | skipped
    message: str = ""
    started_at: float = 0.0
    dispatched_at: float = 0.0  # wall clock: a result.json older than this is an earlier attempt's
    waiting_for: int | None = None  # pid holding the run's lock
    busy: str = ""  # why the last attempt found the run held elsewhere
    progress_epoch: int = -1
    progress_at: float = 0.0
    slowest_epoch: float = 0.0
    stalled: str = ""
    notes_seen: int = 0
    members: list[Task] = field(default_factory=list)  # a pack: its runs (``run_dir`` is the pack's folder)
    pack_size: int = 0  # a pack: its size as formed from the whole sweep (members: those still to train)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def runs(self) -> list[Task]:
        """The runs this job trains: the pack's members, or the run itself."""
        return self.members or [self]


class View(Protocol):
    """What the scheduler tells the user (see orchestrator.progress)."""

    def started(self, task: Task, slot: Slot) -> None: ...
    def ended(self, task: Task, slot: Slot, status: str) -> None: ...
    def note(self, message: str) -> None: ...
    def update(self, active: Sequence[tuple[Task, Slot]]) -> None: ...


class TaskSource(Protocol):
    """Where more tasks come from once the queue is empty (ask-and-tell: a tuner hands out trials)."""

    def more(self) -> list[Task]:
        """Tasks to queue now that a slot is free and the queue is empty; [] when there are none (yet)."""
        ...

    def running(self) -> bool:
        """Whether the source may still hand out tasks (the scheduler ends once it is False and idle)."""
        ...

    def progress(self, task: Task, progress: dict) -> None:
        """Each poll, a running task's progress.json (this attempt's)."""
        ...

    def ended(self, task: Task) -> None:
        """A task ended for good in this scheduler (``task.result`` says how); not called for requeued ones."""
        ...


class QuietView:
    def started(self, task, slot): pass
    def ended(self, task, slot, status): pass
    def note(self, message): pass
    def update(self, active): pass


class _Abort(Exception):
    """A second signal: stop at once."""


class StoreWatch:
    """Whether the tracking store answers, probed in the background while it is thought down."""

    def __init__(self, probe: Callable[[], bool] | None, every_s: float = PROBE_EVERY_S):
        self.probe, self.every_s = probe, every_s
        self.down_since: float | None = None  # monotonic
        self.down_wall = 0.0
        self._thread: threading.Thread | None = None
        self._last = 0.0
        self._ok = False

    def mark_down(self) -> bool:
        """Note an outage; True if it is news."""
        if self.down_since is not None:
            return False
        self.down_since, self.down_wall = time.monotonic(), time.time()
        return True

    def poll(self) -> bool | None:
        """While down: start a probe now and then; True once the store answers again."""
        if self.down_since is None or self.probe is None:
            return None
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            if self._ok:
                self.down_since = None
                return True
        now = time.monotonic()
        if self._thread is None and now - self._last >= self.every_s:
            self._last, self._ok = now, False

            def run() -> None:
                with contextlib.suppress(Exception):
                    self._ok = bool(self.probe())

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()
        return None


class Scheduler:
    """Keeps every slot busy with the queue's runs; ``run`` returns the stopping signal or None."""

    def __init__(self, backend: Backend, slots: Sequence[Slot], write_spec: Callable[[Task, Slot], Path],
                 retries: int = DEFAULT_RETRIES, view: View | None = None, poll_s: float = POLL_S,
                 grace_s: float = GRACE_S, lock_wait_s: float = LOCK_WAIT_S, retry_delay_s: float = RETRY_DELAY_S,
                 busy_wait_s: float = BUSY_WAIT_S, stall_timeout_s: float | None = None,
                 store_probe: Callable[[], bool] | None = None,
                 store_timeout_s: float = tracking.DEFAULT_STORE_TIMEOUT_S, source: TaskSource | None = None,
                 runs_dir: Path | None = None, disk_timeout_s: float | None = None):
        if not slots:
            raise UserError("no device slot to run on")
        self.backend, self.slots, self.write_spec = backend, list(slots), write_spec
        self.retries, self.view, self.poll_s, self.grace_s = retries, view or QuietView(), poll_s, grace_s
        self.lock_wait_s, self.retry_delay_s, self.busy_wait_s = lock_wait_s, retry_delay_s, busy_wait_s
        self.stall_timeout_s, self.store_timeout_s = stall_timeout_s, store_timeout_s
        self.store = StoreWatch(store_probe)
        # the runs folder full or read-only: the twin of the store's outage (no new run; gives up after a while)
        self.disk = diskfault.DiskWatch(runs_dir)
        self.disk_timeout_s = store_timeout_s if disk_timeout_s is None else disk_timeout_s
        self.disk_gave_up = False
        self._disk_said = 0.0
        self.source = source
        self.queue: deque[Task] = deque()
        self.active: dict[str, tuple[Task, Slot, Job]] = {}
        self.stop_signal: int | None = None
        self.store_gave_up = False
        self.aborted = False
        self._stop_time = 0.0
        self._forwarded = False
        self._announced = False

    # -- signals
    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is None:  # only flags: the loop does the talking
            self.stop_signal, self._stop_time = signum, time.monotonic()
        elif not self.aborted:  # the second; any further one finds the workers being killed already
            self.aborted = True
            raise _Abort()

    # -- the loop
    def run(self, tasks: Iterable[Task]) -> int | None:
        self.queue.extend(tasks)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            while True:
                now = time.monotonic()
                if self.stop_signal is None:
                    self._watch_store(now)
                    self._watch_disk(now)
                    if self.store.down_since is None and not self.store_gave_up and self.disk.down_since is None \
                            and not self.disk_gave_up:
                        self._dispatch(now)
                else:
                    if not self._announced:
                        self._announced = True
                        self.view.note(f"{signal.Signals(self.stop_signal).name}: stopping; runs in progress end "
                                       "KILLED and stay resumable (signal again to stop at once)")
                    self._stop_workers(now)
                self._watch_workers(now)
                self._collect()
                idle = self.stop_signal is not None or self.store_gave_up or self.disk_gave_up or not (
                    self.queue or (self.source is not None and self.source.running()))
                if not self.active and idle:
                    break
                self.view.update([(t, s) for t, s, _ in self.active.values()])
                time.sleep(self.poll_s)
        except _Abort:
            for task, _, job in self.active.values():
                job.kill()
                task.result, task.message = "killed", "SIGKILLed by a second signal"
            for _, _, job in self.active.values():
                with contextlib.suppress(Exception):  # SIGKILLed: gone either way
                    job.result(timeout=5)
            self.active.clear()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.store_gave_up:
            for task in self.queue:
                task.result, task.message = "interrupted", "tracking store unreachable; resumable"
        elif self.disk_gave_up:
            for task in self.queue:
                task.result, task.message = "interrupted", f"{self.disk.describe()}; resumable"
        return self.stop_signal

    def _watch_store(self, now: float) -> None:
        if self.store.poll():
            self.view.note("tracking store answers again: starting runs again")
        down = self.store.down_since
        if down is not None and not self.store_gave_up and now - down >= self.store_timeout_s:
            self.store_gave_up = True
            self.view.note(f"tracking store unreachable for {now - down:.0f}s (--store-timeout "
                           f"{self.store_timeout_s:.0f}): starting nothing more; every run stays resumable")

    def _store_down(self, why: str) -> None:
        if self.store.mark_down():
            self.view.note(f"tracking store unreachable since {time.strftime('%H:%M:%S')} ({why}): no new run "
                           "starts until it answers; running ones keep training and buffer their metrics")

    def _watch_disk(self, now: float) -> None:
        """While the runs folder is full or read-only: re-check it, say so now and then, give up in the end."""
        down = self.disk.down_since
        if down is None or self.disk_gave_up:
            return
        if self.disk.poll():
            self.view.note(f"runs folder {self.disk.folder} takes writes again ({diskfault.space(self.disk.folder)}): "
                           "starting runs again")
        elif now - down >= self.disk_timeout_s:
            self.disk_gave_up = True
            self.view.note(f"runs folder still unusable after {now - down:.0f}s (--disk-timeout "
                           f"{self.disk_timeout_s:.0f}): {self.disk.describe()}; starting nothing more; every run "
                           "stays resumable: make room and run the same command again")
        elif now - self._disk_said >= DISK_NOTE_EVERY_S:
            self._disk_said = now
            self.view.note(f"waiting for the runs folder ({now - down:.0f}s of --disk-timeout "
                           f"{self.disk_timeout_s:.0f}): {self.disk.describe()}")

    def _disk_full(self, fault: diskfault.DiskFault, why: str) -> None:
        """A disk fault (a worker's, a spec or log of ours, or too little room to start a run): start no new run."""
        if self.disk.folder is None and fault.path:  # a scheduler made without a runs folder watches the fault's
            self.disk.folder = diskfault._existing(Path(fault.path).parent)
        if self.disk.mark_down(fault):
            self._disk_said = time.monotonic()
            self.view.note(f"runs folder {self.disk.folder} cannot take writes ({why}): {self.disk.describe()}; "
                           f"no new run starts until it can (re-checked every {self.disk.every_s:.0f}s, "
                           f"--disk-timeout {self.disk_timeout_s:.0f}s); runs that cannot write stop resumable, "
                           "their attempts not counted")

    def _dispatch(self, now: float) -> None:
        for slot in self.slots:
            if slot.name in self.active:
                continue
            task = self._next_ready(now)
            if task is None and not self.queue and self.source is not None and self.source.running():
                self.queue.extend(self.source.more())
                task = self._next_ready(now)
            if task is None:
                return
            if (fault := self.disk.refuse()) is not None:  # too little room for a run: do not start it
                self.queue.appendleft(task)
                return self._disk_full(fault, "before starting a run")
            try:
                spec_path = self.write_spec(task, slot)
                task.dispatched_at = time.time()
                job = self.backend.submit(spec_path, task.folder.log, slot)
            except OSError as e:
                if (fault := diskfault.disk_fault(e)) is not None:  # its spec or log: not the run's fault
                    self.queue.appendleft(task)
                    return self._disk_full(fault, f"starting {task.key}")
                task.result, task.message = "failed", f"cannot start: {e}"
                self.view.note(f"{task.key}: {task.message}")
                continue
            for run in {id(t): t for t in (task, *task.runs)}.values():
                run.starts += 1
                run.started_at = run.progress_at = time.monotonic()
                run.dispatched_at = task.dispatched_at
                run.waiting_for, run.progress_epoch, run.stalled, run.notes_seen = None, -1, "", 0
            self.active[slot.name] = (task, slot, job)
            for run in task.runs:
                self.view.started(run, slot)

    def _next_ready(self, now: float) -> Task | None:
        """The first queued run whose time has come and whose lock is free."""
        for _ in range(len(self.queue)):
            task = self.queue.popleft()
            if task.not_before <= now:
                holder = next((h for r in task.runs if (h := r.folder.lock_holder()) is not None), None)
                if holder is None:
                    return task
                if task.waiting_for is None:
                    self.view.note(f"{task.key}: waiting for the live process holding its lock"
                                   + (f" (pid {holder})" if holder else ""))
                task.waiting_for, task.not_before = holder or 0, now + self.lock_wait_s
            self.queue.append(task)
        return None

    def _watch_workers(self, now: float) -> None:
        """Progress, notes and stalls of the running workers (from their progress.json)."""
        for task, _, job in self.active.values():
            for run in task.runs:
                progress = run.folder.read_progress()
                if progress is not None and float(progress.get("time") or 0) >= task.dispatched_at - 1.0:
                    self._read_progress(run, progress, now)  # else none yet, or the previous attempt's
                    if self.source is not None:
                        self.source.progress(run, progress)
            if task.members:  # a pack progresses while any member does
                task.progress_at = max(r.progress_at for r in task.members)
                task.slowest_epoch = max(r.slowest_epoch for r in task.members)
            limit = self.stall_timeout_s or max(MIN_STALL_S, STALL_EPOCHS * task.slowest_epoch)
            if not task.stalled and now - task.progress_at > limit:
                task.stalled = f"stalled: no new epoch for {now - task.progress_at:.0f}s (stall timeout {limit:.0f}s)"
                with contextlib.suppress(OSError):  # the log may be on a full disk: the kill matters
                    task.folder.log_line(f"{task.stalled}; killed by the orchestrator (SIGKILL) and retried")
                self.view.note(f"{task.key}: {task.stalled}; killing it")
                job.kill()

    def _read_progress(self, task: Task, progress: dict, now: float) -> None:
        notes, count = progress.get("notes") or [], int(progress.get("note_count") or 0)
        fresh = notes[len(notes) - min(len(notes), count - task.notes_seen):] if count > task.notes_seen else []
        for note in fresh:
            self.view.note(f"{task.key}: {note}")
            if "tracking store unreachable" in note:
                self._store_down("a worker cannot log")
        task.notes_seen = count
        epoch = int(progress.get("epoch") or 0)
        if epoch != task.progress_epoch:
            task.progress_epoch, task.progress_at = epoch, now
            task.slowest_epoch = max(task.slowest_epoch, float(progress.get("epoch_seconds") or 0.0))

    def _collect(self) -> None:
        for name, (task, slot, job) in list(self.active.items()):
            if job.done():
                del self.active[name]
                code = job.result()
                for run in task.runs:  # a pack's members are settled one by one, retried alone
                    run.stalled = run.stalled or task.stalled
                    self._settle(run, slot, code)

    def _outcome(self, task: Task, code: int) -> Result:
        """The attempt's result.json, or a crash if the worker wrote none for this attempt."""
        result = task.folder.read_result()
        fresh = result is not None and result.status != "started" and result.time >= task.dispatched_at - 1.0
        if not fresh and code == EXIT_BUSY:  # it found the folder locked: it writes nothing into a folder it lacks
            return Result("busy", "held by a live worker here (its run folder is locked)")
        if not fresh and code == diskfault.EXIT_DISK:  # it could not write result.json: its disk is full or read-only
            fault = diskfault.check(task.run_dir, write=True) or diskfault.DiskFault(errno.ENOSPC, str(task.run_dir))
            return Result(diskfault.STATUS, fault.describe())
        if not fresh:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            tail = log_tail(task.folder.log)
            result = Result("crashed", f"worker died without a result ({how})" + (f": {tail}" if tail else ""))
        if task.stalled:
            result = Result("stalled", task.stalled)
        return result

    def _settle(self, task: Task, slot: Slot, code: int) -> None:
        now = time.monotonic()
        result = self._outcome(task, code)
        status, task.message = result.status, result.message
        if status in DONE:
            task.result, task.message = "finished", ""
        elif status == "diverged":
            task.result = "diverged"
        elif status == "bad_input":
            task.result = "failed"
        elif status == "stopped":
            task.result = "stopped"
        elif self.stop_signal is not None:
            task.result, task.message = "killed", "interrupted; resumable"
        elif status == "busy":  # held by a live process elsewhere: look again later, without counting
            task.result = "skipped"
            task.not_before = now + (self.lock_wait_s if " here" in task.message else self.busy_wait_s)
            if task.busy != task.message:
                self.view.note(f"{task.key}: {task.message}; will look again")
            task.busy = task.message
            self.queue.append(task)
        elif status == "store_down":
            task.result, task.not_before = "skipped", now + self.retry_delay_s
            self._store_down(task.message)
            self.queue.appendleft(task)
        elif status == diskfault.STATUS:  # a full or read-only disk, as store_down: not counted, no new run for now
            task.result, task.not_before = "skipped", now + self.retry_delay_s
            self._disk_full(diskfault.check(task.run_dir) or diskfault.DiskFault(errno.ENOSPC, str(task.run_dir)),
                            f"run {task.key} could not write")
            self.queue.appendleft(task)
        else:  # error, crashed, stalled, killed from outside: retried from the last checkpoint
            task.failures += 1
            if status not in COUNTED and status != "stalled":
                task.message = f"{status}: {task.message}"
            if task.failures <= self.retries:
                task.result, task.not_before = "skipped", now + self.retry_delay_s
                self.view.note(f"{task.key}: attempt failed ({task.message}); retry {task.failures} of "
                               f"{self.retries} from its last checkpoint")
                self.queue.append(task)
            else:
                task.result = "failed"
        self.view.ended(task, slot, status)
        if self.source is not None and task not in self.queue:
            self.source.ended(task)

    def _stop_workers(self, now: float) -> None:
        waited = now - self._stop_time
        if not self._forwarded and waited >= self.grace_s:
            self._forwarded = True
            for _, _, job in self.active.values():
                job.terminate()
        if waited >= STOP_TIMEOUT_S:
            for _, _, job in self.active.values():
                job.kill()


def log_tail(path: Path, limit: int = 8192) -> str:
    """The last meaningful line of a worker log (its error, usually)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith("--- "):
            return line[:500]
    return ""


# ------------------------------------------------------------------------------------------ sweeps


@dataclass
class SweepResult:
    """How ``run_sweep`` ended: every run's final state, the tasks it ran, the exit code."""

    states: list[RunState]
    tasks: dict[str, Task] = field(default_factory=dict)
    stopped_by: int | None = None
    aborted: bool = False
    exit_code: int = 0

    store_down: bool = False  # ended because the tracking store stayed unreachable
    disk_full: str = ""  # ended because the runs folder stayed full or read-only: what is wrong, in words
    experiment_id: str | None = None

    def outcome(self, state: RunState) -> tuple[str, str]:
        """(state, reason) for the summary: MLflow's word, or the scheduler's when MLflow has none."""
        task = self.tasks.get(state.run_key)
        if task is not None and task.result in ("failed", "diverged") and state.state != "failed":
            return "failed", task.message
        if task is not None and task.result == "interrupted" and state.state != "done":
            return "resumable", task.message
        return state.state, state.reason if state.state in ("failed", "running") else ""


def run_sweep(sweep, configs: Sequence[RunConfig], *, tracking_uri: str | None, runs_dir: Path,
              backend: str = "local", gpus: str | None = None, jobs_per_gpu: int = 1,
              max_parallel: int | None = None, retries: int = DEFAULT_RETRIES, retry_failed: bool = False,
              ray_address: str | None = None, shared_runs_dir: bool = False,
              stall_timeout: float | None = None, store_timeout: float = tracking.DEFAULT_STORE_TIMEOUT_S,
              claim_lease: float = claims.DEFAULT_LEASE_S, pack: int | str | None = None,
              disk_timeout: float | None = None,
              view_factory: Callable[[list[RunState], list[Task]], View] | None = None) -> SweepResult:
    """Run every run of ``configs`` that is not done yet; safe to run again at any time, and from several
    orchestrators (or machines) sharing the tracking store at once."""
    if retries < 0:
        raise UserError(f"--retries {retries}: must be >= 0")
    for option, value in (("--stall-timeout", stall_timeout), ("--store-timeout", store_timeout),
                          ("--claim-lease", claim_lease), ("--disk-timeout", disk_timeout)):
        if value is not None and value <= 0:
            raise UserError(f"{option} {value:g}: must be > 0 seconds")
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r}: expected local or ray")
    pack = checked_pack(sweep.pack if pack is None else pack)  # checked before anything is touched
    slots: list[Slot] = []
    if backend == "local":  # checked before anything is touched
        visible = [] if (gpus or "").strip().lower() == "none" else visible_gpus()
        slots = device_slots(parse_gpus(gpus, visible), jobs_per_gpu, max_parallel)
    else:
        _check_ray_gpus(gpus)
        device_slots([], jobs_per_gpu, max_parallel)  # validates the counts
    uri = tracking.absolute_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    runs_dir = Path(runs_dir).resolve()
    if backend == "ray":
        check_shared(ray_address, uri, runs_dir, shared_runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    client = tracking.connect(uri)
    experiment_id = tracking.ensure_experiment(client, sweep.experiment, describe(sweep))  # once
    tracking.end_strays(client, experiment_id, claim_lease)

    states = inspect_sweep(configs, sweep.experiment, uri, runs_dir, retries, claim_lease)
    tasks = [Task(s.run_key, s.config, runs_dir / s.run_key, s.total_epochs) for s in to_run(states, retry_failed)]
    if not tasks:
        return _finish(states, {}, None, experiment_id=experiment_id)

    chosen: Backend
    if backend == "ray":
        no_gpus = (gpus or "").strip().lower() == "none"
        chosen = RayBackend(ray_address, num_gpus=0 if no_gpus else None)
        slots = ray_slots(chosen.resources(), no_gpus, jobs_per_gpu, max_parallel)
    else:
        chosen = LocalBackend()

    def write_spec(task: Task, slot: Slot) -> Path:
        def spec_for(run: Task) -> WorkerSpec:
            config = run.config.replace(data_dir=os.path.abspath(run.config.data_dir))  # workers run elsewhere
            return WorkerSpec(config=config.to_dict(), experiment=sweep.experiment, run_dir=str(run.run_dir),
                              tracking_uri=uri, sweep=sweep.name, device=slot.device, threads=slot.threads,
                              store_timeout=store_timeout, claim_lease=claim_lease)

        return write_job_spec(task, spec_for)

    for task in tasks:
        try:
            task.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a full or read-only runs folder: the scheduler waits for it (see _disk_full)
            if diskfault.disk_fault(e) is None:
                raise
    view = view_factory(states, tasks) if view_factory else QuietView()
    jobs = jobs_of(pack, slots, runs_dir / PACKS, calibrate=backend == "local", note=view.note)(
        tasks, {s.run_key: s.config for s in states})
    scheduler = Scheduler(chosen, slots, write_spec, retries, view, stall_timeout_s=stall_timeout,
                          store_probe=lambda: tracking.probe(uri), store_timeout_s=store_timeout,
                          runs_dir=runs_dir, disk_timeout_s=disk_timeout)
    try:
        stopped_by = scheduler.run(jobs)
    finally:
        close = getattr(view, "close", None)
        if close:
            close()
        chosen.close()
    by_key = {t.key: t for t in tasks}
    if scheduler.aborted:  # stop at once: no final look at MLflow
        return _finish(states, by_key, stopped_by, aborted=True, experiment_id=experiment_id)
    try:
        final = inspect_sweep(configs, sweep.experiment, uri, runs_dir, retries, claim_lease)
    except Exception as e:  # noqa: BLE001 - the store went down again: report what the scheduler saw
        if not (scheduler.store_gave_up or tracking.is_transient(e)):
            raise
        final = states
        scheduler.store_gave_up = True
    return _finish(final, by_key, stopped_by, store_down=scheduler.store_gave_up, experiment_id=experiment_id,
                   disk_full=scheduler.disk.describe() if scheduler.disk_gave_up else "")


PACKS = "packs"  # <runs dir>/packs/<pack id>/: a pack's spec and log (its members keep their own folders)


def write_job_spec(task: Task, spec_for: Callable[[Task], WorkerSpec]) -> Path:
    """Write every run's worker spec (``spec_for(run)``) and a pack's own spec; the spec the worker gets."""
    for run in task.runs:
        spec_for(run).write(run.folder.spec)
    if task.members:
        PackSpec(task.key, [str(r.folder.spec) for r in task.members], task.pack_size).write(task.folder.spec)
    return task.folder.spec


def jobs_of(pack: int | str, slots: Sequence[Slot], packs_dir: Path, *, calibrate: bool = True,
            note: Callable[[str], None] = lambda message: None) -> Callable[..., list[Task]]:
    """``jobs(tasks, everything=None)``: the tasks as the scheduler's jobs, in packs per ``pack`` (sizes are
    decided once per shape: ``pack_sizes``; layout: ``form_packs``)."""
    from training.config import shape_of

    sizes: dict[tuple, int] = {}

    def jobs(tasks: Sequence[Task], everything: dict[str, RunConfig] | None = None) -> list[Task]:
        configs = list(everything.values()) if everything is not None else [t.config for t in tasks]
        if not {shape_of(c) for c in configs} <= sizes.keys():
            sizes.update(pack_sizes(pack, configs, slots, packs_dir, calibrate=calibrate, note=note))
        return form_packs(tasks, sizes, packs_dir, everything) if max(sizes.values(), default=1) > 1 else list(tasks)

    return jobs


def checked_pack(pack: int | str) -> int | str:
    """``--pack`` / ``pack:`` as a size N >= 1 or ``auto`` (``off`` is 1); UserError otherwise."""
    from orchestrator.sweepfile import parse_pack

    try:
        pack = parse_pack(pack)
    except ValueError:
        raise UserError(f"--pack {pack!r}: expected a pack size >= 1, auto or off") from None
    return 1 if pack == "off" else pack


def pack_sizes(pack: int | str, configs: Sequence[RunConfig], slots: Sequence[Slot], packs_dir: Path, *,
               calibrate: bool = True, note: Callable[[str], None] = lambda message: None) -> dict[tuple, int]:
    """Runs per worker process for each pack shape (``training.config.shape_of``) among the sweep's
    ``configs``: N as given, or for ``auto`` 1 on the CPU and on GPUs what a short calibration chooses
    (``autopack``; without ``calibrate``, e.g. on a Ray cluster, ``autopack.FALLBACK``)."""
    from orchestrator import autopack
    from training.config import shape_of

    by_shape: dict[tuple, list] = {}
    for config in configs:
        by_shape.setdefault(shape_of(config), []).append(config)
    if pack != "auto":
        return {shape: int(pack) for shape in by_shape}
    if not calibrate:
        size = autopack.FALLBACK if any(s.device == "cuda" for s in slots) else 1
        return {shape: size for shape in by_shape}
    sizes, notes = autopack.auto_sizes(by_shape, slots, packs_dir)
    for message in notes:
        note(message)
    return sizes


def form_packs(tasks: Sequence[Task], sizes: dict[tuple, int], packs_dir: Path,
               everything: dict[str, RunConfig] | None = None) -> list[Task]:
    """Jobs for the scheduler. The packs are laid out over ``everything`` (the whole sweep, ``{run key:
    config}``; default: the tasks): runs of one shape (``training.config.shape_of``), sorted by run key,
    in packs of ``sizes[shape]``, so a re-run forms the same packs whatever has finished. Each pack's job
    trains its members among ``tasks``, even a lone one (it trains as it does in its pack: see
    ``training.packed``); a run laid out alone is a job of its own."""
    from training.config import shape_of

    todo = {t.key: t for t in tasks}
    layout = everything if everything is not None else {t.key: t.config for t in tasks}
    by_shape: dict[tuple, list[str]] = {}
    for key, config in layout.items():
        by_shape.setdefault(shape_of(config), []).append(key)
    jobs: list[Task] = []
    for shape, keys in by_shape.items():
        keys, size = sorted(keys), sizes.get(shape, 1)
        for i in range(0, len(keys), size):
            chunk = keys[i:i + size]
            members = [todo[k] for k in chunk if k in todo]
            if not members:
                continue
            if len(chunk) == 1:
                jobs.extend(members)
                continue
            pack_id = "pack-" + hashlib.sha256(" ".join(chunk).encode()).hexdigest()[:10]
            label = members[0].config.replace(scheme=f"pack of {len(members)}")
            jobs.append(Task(pack_id, label, packs_dir / pack_id, max(t.total_epochs for t in members),
                             members=members, pack_size=len(chunk)))
    order = {t.key: i for i, t in enumerate(tasks)}  # the tasks' order (resumable runs first)
    return sorted(jobs, key=lambda job: min(order[r.key] for r in job.runs))


def describe(sweep) -> str:
    """The experiment's description in the MLflow UI: the sweep file's own, else what the sweep runs."""
    own = getattr(sweep, "description", None)
    if own:
        return str(own)
    return (f"adareg sweep '{sweep.name}' (Adapting Regularization with Learning Rate): schemes "
            f"{', '.join(sweep.schemes)}; archs {', '.join(sweep.archs)}; datasets {', '.join(sweep.datasets)}; "
            f"seeds {', '.join(map(str, sweep.seeds))}. Each run is tagged adareg.run_key / adareg.group_key; "
            "per-epoch metrics: train/test loss and error, lr, weight_decay, grad_sparsity.")


def to_run(states: Sequence[RunState], retry_failed: bool = False) -> list[RunState]:
    """What a sweep run owes: running (once free), resumable and pending runs, resumable first; with
    ``retry_failed`` also runs that failed with an error (never diverged ones: they would again)."""
    todo = [s for s in states
            if s.state in TODO or (retry_failed and s.state == "failed" and s.failure != "diverged")]
    return sorted(todo, key=lambda s: s.state == "pending")


def _check_ray_gpus(gpus: str | None) -> None:
    if gpus is not None and gpus.strip().lower() not in ("all", "none"):
        raise UserError(f"--gpus {gpus!r}: with --backend ray use all or none (Ray places runs on GPUs)")


def ray_slots(resources: dict[str, float], no_gpus: bool, jobs_per_gpu: int, max_parallel: int | None
              ) -> list[Slot]:
    """Slots on a Ray cluster: K per cluster GPU (Ray picks the GPU), else CPU slots as locally."""
    n_gpus = 0 if no_gpus else int(resources.get("GPU", 0))
    slots = device_slots([str(i) for i in range(n_gpus)], jobs_per_gpu, max_parallel, int(resources.get("CPU", 1)))
    return [Slot(f"ray-{s.name}", s.device, None, s.threads, s.gpu_fraction) for s in slots]


def _finish(states: list[RunState], tasks: dict[str, Task], stopped_by: int | None,
            aborted: bool = False, store_down: bool = False, experiment_id: str | None = None,
            disk_full: str = "") -> SweepResult:
    result = SweepResult(states, tasks, stopped_by, aborted=aborted, store_down=store_down,
                         experiment_id=experiment_id, disk_full=disk_full)
    if stopped_by is not None:
        result.exit_code = EXIT_SIGINT if stopped_by == signal.SIGINT else EXIT_SIGTERM
    elif any(result.outcome(s)[0] == "failed" for s in states):
        result.exit_code = 1
    elif store_down or disk_full:  # infrastructure, not the runs: every run resumable, run it again
        result.exit_code = EXIT_STORE_DOWN
    return result

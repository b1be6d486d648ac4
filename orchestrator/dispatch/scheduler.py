"""The scheduler: keeps every device slot busy with a queue of runs, one worker process each (or each pack).

- a run whose folder lock a live process holds waits until it is free; a run that a live process elsewhere
  has claimed in the store is looked at again every ``busy_wait_s`` until it is done or its claim is stale;
- how an attempt ended is the worker's ``result.json`` (an ``End``), or what the scheduler alone sees (a
  crash without one, a stall, a locked folder); what follows is the end's policy (``End.then``,
  ``orchestrator.run.ending``): done, failed for good, retried (counted, up to ``retries`` times from the
  last checkpoint), waited for (uncounted) or kept resumable. A task that has ended for good in this
  scheduler carries the ``State`` it leaves its run in;
- a worker whose progress file shows no new epoch for the stall timeout is SIGKILLed and retried, and its
  log says why;
- while the tracking store is unreachable no new run is started (running ones keep training and buffer
  their metrics); after ``store_timeout`` of outage the scheduler ends, its runs resumable;
- the same while the runs folder is full or read-only (``orchestrator.diskfault``: a worker's attempt ended
  ``disk_full``, a spec or log could not be written, or too little is free for a run to start): its attempts
  are not counted, the folder is re-checked every few seconds, and after ``disk_timeout`` the scheduler ends;
- a run that the tracking server refused (HTTP 401/403: ``End.REFUSED``, this user may not write there) starts
  nothing more: every other run would be refused too. Running workers end on their own, the queue stays
  resumable, no attempt is counted, and ``refused`` says what was refused (the launch's one error line);
- the first SIGINT/SIGTERM stops dispatching, gives workers that got the signal too (Ctrl-C reaches
  the whole process group) a moment, then sends SIGTERM to the rest and waits: their runs end KILLED
  and stay resumable. A second signal SIGKILLs the workers and returns at once.

``orchestrator.dispatch.launch`` is what starts one (for a sweep, a tuning study or ``adareg train``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from orchestrator import diskfault
from orchestrator.dispatch.backends import Backend, Job
from orchestrator.dispatch.slots import Slot
from orchestrator.dispatch.storewatch import StoreWatch
from orchestrator.dispatch.task import QuietView, Task, TaskSource, View
from orchestrator.errors import UserError
from orchestrator.run.ending import DEFAULT_RETRIES, EXIT_BUSY, EXIT_DISK, End, State, Then, leaves, out_of_retries
from orchestrator.run.folder import Attempt
from orchestrator.store.client import DEFAULT_STORE_TIMEOUT_S

POLL_S = 0.2
LOCK_WAIT_S = 1.0  # a run locked here is looked at again after this
BUSY_WAIT_S = 15.0  # a run claimed elsewhere is looked at again after this
RETRY_DELAY_S = 2.0
GRACE_S = 2.0  # after the first signal, before SIGTERM goes to workers that did not get it themselves
STOP_TIMEOUT_S = 120.0  # after the first signal, before stragglers are SIGKILLed
MIN_STALL_S = 1200.0  # the default stall timeout: max(20 min, STALL_EPOCHS x the slowest epoch seen)
STALL_EPOCHS = 5
DISK_NOTE_EVERY_S = 60.0  # while the runs folder is full: how often the progress output says so again


class _Abort(Exception):
    """A second signal: stop at once."""


class Scheduler:
    """Keeps every slot busy with the queue's runs; ``run`` returns the stopping signal or None."""

    def __init__(self, backend: Backend, slots: Sequence[Slot], write_spec: Callable[[Task, Slot], Path],
                 retries: int = DEFAULT_RETRIES, view: View | None = None, poll_s: float = POLL_S,
                 grace_s: float = GRACE_S, lock_wait_s: float = LOCK_WAIT_S, retry_delay_s: float = RETRY_DELAY_S,
                 busy_wait_s: float = BUSY_WAIT_S, stall_timeout_s: float | None = None,
                 store_probe: Callable[[], bool] | None = None,
                 store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S, source: TaskSource | None = None,
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
        self.refused = ""  # what the tracking server refused a worker (End.REFUSED): nothing more starts
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
                            and not self.disk_gave_up and not self.refused:
                        self._dispatch(now)
                else:
                    if not self._announced:
                        self._announced = True
                        self.view.note(f"{signal.Signals(self.stop_signal).name}: stopping; runs in progress end "
                                       "KILLED and stay resumable (signal again to stop at once)")
                    self._stop_workers(now)
                self._watch_workers(now)
                self._collect()
                idle = self.stop_signal is not None or self.store_gave_up or self.disk_gave_up or self.refused or not (
                    self.queue or (self.source is not None and self.source.running()))
                if not self.active and idle:
                    break
                self.view.update([(t, s) for t, s, _ in self.active.values()])
                time.sleep(self.poll_s)
        except _Abort:
            for task, _, job in self.active.values():
                job.kill()
                task.end, task.state, task.message = End.KILLED, State.RESUMABLE, "SIGKILLed by a second signal"
            for _, _, job in self.active.values():
                with contextlib.suppress(Exception):  # SIGKILLed: gone either way
                    job.result(timeout=5)
            self.active.clear()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.store_gave_up:
            for task in self.queue:
                task.end, task.state = End.STORE_DOWN, State.RESUMABLE
                task.message = "tracking store unreachable; resumable"
        elif self.disk_gave_up:
            for task in self.queue:
                task.end, task.state = End.DISK_FULL, State.RESUMABLE
                task.message = f"{self.disk.describe()}; resumable"
        elif self.refused:
            for task in self.queue:  # not started: the server would refuse it too
                task.end, task.state, task.message = End.REFUSED, State.RESUMABLE, "not started: refused by the store"
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
            self.disk.folder = diskfault.existing(Path(fault.path).parent)
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
                task.end, task.state, task.message = End.ERROR, State.FAILED, f"cannot start: {e}"
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

    def _attempt(self, task: Task, code: int) -> Attempt:
        """The attempt's result.json, or what the scheduler saw if the worker wrote none for this attempt."""
        attempt = task.folder.read_attempt()
        fresh = (attempt is not None and attempt.status is not End.STARTED
                 and attempt.time >= task.dispatched_at - 1.0)
        if not fresh and code == EXIT_BUSY:  # it found the folder locked: it writes nothing into a folder it lacks
            return Attempt(End.BUSY, "held by a live worker here (its run folder is locked)")
        if not fresh and code == EXIT_DISK:  # it could not write result.json: its disk is full or read-only
            fault = diskfault.check(task.run_dir, write=True) or diskfault.DiskFault(errno.ENOSPC, str(task.run_dir))
            return Attempt(End.DISK_FULL, fault.describe())
        if not fresh:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            tail = log_tail(task.folder.log)
            attempt = Attempt(End.CRASHED, f"worker died without a result ({how})" + (f": {tail}" if tail else ""))
        if task.stalled:
            attempt = Attempt(End.STALLED, task.stalled)
        return attempt

    def _settle(self, task: Task, slot: Slot, code: int) -> None:
        """What follows an attempt: the end's policy (``End.then``), applied."""
        now = time.monotonic()
        attempt = self._attempt(task, code)
        end = task.end = attempt.status
        task.message = attempt.message
        then = end.then_while(stopping=self.stop_signal is not None)
        if then is Then.DONE:
            task.message = ""
        elif then is Then.KEEP and end.then is not Then.KEEP:  # stopping: whatever it was, it stays resumable
            task.message = "interrupted; resumable"
        if end is End.REFUSED and not self.refused:
            self.refused = task.message
            self.view.note(f"{task.key}: {task.message}; starting nothing more (every run would be refused)")
        if then is Then.WAIT:
            if end is End.STORE_DOWN:
                task.not_before = now + self.retry_delay_s
                self._store_down(task.message)
                self.queue.appendleft(task)
            elif end is End.DISK_FULL:  # as the store: not counted, no new run for now
                task.not_before = now + self.retry_delay_s
                fault = diskfault.check(task.run_dir) or diskfault.DiskFault(errno.ENOSPC, str(task.run_dir))
                self._disk_full(fault, f"run {task.key} could not write")
                self.queue.appendleft(task)
            else:  # held by a live process here or elsewhere: look again later
                task.not_before = now + (self.lock_wait_s if " here" in task.message else self.busy_wait_s)
                if task.busy != task.message:
                    self.view.note(f"{task.key}: {task.message}; will look again")
                task.busy = task.message
                self.queue.append(task)
        elif then is Then.RETRY:
            task.failures += 1
            if end not in (End.ERROR, End.CRASHED, End.STALLED):
                task.message = f"{end}: {task.message}"
            if not out_of_retries(task.failures, self.retries):
                task.not_before = now + self.retry_delay_s
                self.view.note(f"{task.key}: attempt failed ({task.message}); retry {task.failures} of "
                               f"{self.retries} from its last checkpoint")
                self.queue.append(task)
            else:
                task.state = State.FAILED
        else:
            task.state = leaves(then)
        self.view.ended(task, slot)
        if self.source is not None and task.state is not None:
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


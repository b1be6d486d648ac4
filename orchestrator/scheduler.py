"""Run what a sweep has left to do: device slots, one worker process per run, retries, signals.

``run_sweep`` is what ``adareg sweep run`` calls: it initialises the MLflow store and experiment
once, reconciles the sweep with MLflow and the run folders, and hands the runs that are not done to
a ``Scheduler``, which keeps every slot busy through a backend (local subprocesses or Ray tasks):

- a slot is a GPU share (CUDA_VISIBLE_DEVICES of its own) or a set of CPU threads;
- before dispatching a run it checks the run's lock; a run held by a live process (say, a worker
  left behind by a killed orchestrator, about to die with it) waits until the lock is free;
- exit codes of ``orchestrator.worker``: 0 done; 1 (or death by a signal) retried up to ``retries``
  times, resuming from the checkpoint; 3 diverged and 2 bad input are failed, never retried;
  4 "locked" waits and tries again without counting;
- the first SIGINT/SIGTERM stops dispatching, gives workers that got the signal too (Ctrl-C reaches
  the whole process group) a moment, then sends SIGTERM to the rest and waits: their runs end KILLED
  and stay resumable. A second signal SIGKILLs the workers and returns at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator import tracking
from orchestrator.backends import Backend, Job, LocalBackend, RayBackend, Slot, check_shared
from orchestrator.errors import UserError
from orchestrator.reconcile import (
    DEFAULT_RETRIES,
    LOG,
    TODO,
    RunState,
    absolute_tracking_uri,
    inspect_sweep,
    lock_holder,
)
from orchestrator.worker import (
    EXIT_DIVERGED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USER,
    SPEC,
    WorkerSpec,
)
from training.config import RunConfig

POLL_S = 0.2
LOCK_WAIT_S = 1.0  # a locked run is looked at again after this
RETRY_DELAY_S = 2.0
GRACE_S = 2.0  # after the first signal, before SIGTERM goes to workers that did not get it themselves
STOP_TIMEOUT_S = 120.0  # after the first signal, before stragglers are SIGKILLed


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
    result: str = "skipped"  # finished | failed | diverged | killed | skipped
    message: str = ""
    started_at: float = 0.0
    waiting_for: int | None = None  # pid holding the run's lock


class View(Protocol):
    """What the scheduler tells the user (see orchestrator.progress)."""

    def started(self, task: Task, slot: Slot) -> None: ...
    def ended(self, task: Task, slot: Slot, exit_code: int) -> None: ...
    def note(self, message: str) -> None: ...
    def update(self, active: Sequence[tuple[Task, Slot]]) -> None: ...


class QuietView:
    def started(self, task, slot): pass
    def ended(self, task, slot, exit_code): pass
    def note(self, message): pass
    def update(self, active): pass


class _Abort(Exception):
    """A second signal: stop at once."""


class Scheduler:
    """Keeps every slot busy with the queue's runs; ``run`` returns the stopping signal or None."""

    def __init__(self, backend: Backend, slots: Sequence[Slot], write_spec: Callable[[Task, Slot], Path],
                 retries: int = DEFAULT_RETRIES, view: View | None = None, poll_s: float = POLL_S,
                 grace_s: float = GRACE_S, lock_wait_s: float = LOCK_WAIT_S, retry_delay_s: float = RETRY_DELAY_S):
        if not slots:
            raise UserError("no device slot to run on")
        self.backend, self.slots, self.write_spec = backend, list(slots), write_spec
        self.retries, self.view, self.poll_s, self.grace_s = retries, view or QuietView(), poll_s, grace_s
        self.lock_wait_s, self.retry_delay_s = lock_wait_s, retry_delay_s
        self.queue: deque[Task] = deque()
        self.active: dict[str, tuple[Task, Slot, Job]] = {}
        self.stop_signal: int | None = None
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
                    self._dispatch(now)
                else:
                    if not self._announced:
                        self._announced = True
                        self.view.note(f"{signal.Signals(self.stop_signal).name}: stopping; runs in progress end "
                                       "KILLED and stay resumable (signal again to stop at once)")
                    self._stop_workers(now)
                self._collect()
                if not self.active and (self.stop_signal is not None or not self.queue):
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
        return self.stop_signal

    def _dispatch(self, now: float) -> None:
        for slot in self.slots:
            if slot.name in self.active:
                continue
            task = self._next_ready(now)
            if task is None:
                return
            try:
                spec_path = self.write_spec(task, slot)
                job = self.backend.submit(spec_path, task.run_dir / LOG, slot)
            except OSError as e:
                task.result, task.message = "failed", f"cannot start: {e}"
                self.view.note(f"{task.key}: {task.message}")
                continue
            task.starts += 1
            task.started_at = time.monotonic()
            task.waiting_for = None
            self.active[slot.name] = (task, slot, job)
            self.view.started(task, slot)

    def _next_ready(self, now: float) -> Task | None:
        """The first queued run whose time has come and whose lock is free."""
        for _ in range(len(self.queue)):
            task = self.queue.popleft()
            if task.not_before <= now:
                holder = lock_holder(task.run_dir)
                if holder is None:
                    return task
                if task.waiting_for is None:
                    self.view.note(f"{task.key}: waiting for the live process holding its lock"
                                   + (f" (pid {holder})" if holder else ""))
                task.waiting_for, task.not_before = holder or 0, now + self.lock_wait_s
            self.queue.append(task)
        return None

    def _collect(self) -> None:
        for name, (task, slot, job) in list(self.active.items()):
            if job.done():
                del self.active[name]
                self._settle(task, slot, job.result())

    def _settle(self, task: Task, slot: Slot, code: int) -> None:
        now = time.monotonic()
        if code == EXIT_OK:
            task.result, task.message = "finished", ""
        elif code == EXIT_DIVERGED:
            task.result, task.message = "diverged", log_tail(task.run_dir / LOG).removeprefix("diverged: ")
        elif code == EXIT_USER:
            task.result, task.message = "failed", log_tail(task.run_dir / LOG)
        elif self.stop_signal is not None:
            task.result, task.message = "killed", "interrupted; resumable"
        elif code == EXIT_LOCKED:  # someone else holds it: look again later, without counting
            task.result, task.not_before = "skipped", now + self.lock_wait_s
            self.queue.appendleft(task)
        else:
            task.failures += 1
            task.message = log_tail(task.run_dir / LOG) or f"exit code {code}"
            if task.failures <= self.retries:
                task.result, task.not_before = "skipped", now + self.retry_delay_s
                self.view.note(f"{task.key}: attempt failed ({task.message}); retry {task.failures} of "
                               f"{self.retries} from its last checkpoint")
                self.queue.append(task)
            else:
                task.result = "failed"
        self.view.ended(task, slot, code)

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

    def outcome(self, state: RunState) -> tuple[str, str]:
        """(state, reason) for the summary: MLflow's word, or the scheduler's when MLflow has none."""
        task = self.tasks.get(state.run_key)
        if task is not None and task.result in ("failed", "diverged") and state.state != "failed":
            return "failed", task.message
        return state.state, state.reason if state.state == "failed" else ""


def run_sweep(sweep, configs: Sequence[RunConfig], *, tracking_uri: str | None, runs_dir: Path,
              backend: str = "local", gpus: str | None = None, jobs_per_gpu: int = 1,
              max_parallel: int | None = None, retries: int = DEFAULT_RETRIES, retry_failed: bool = False,
              ray_address: str | None = None, shared_runs_dir: bool = False,
              view_factory: Callable[[list[RunState], list[Task]], View] | None = None) -> SweepResult:
    """Run every run of ``configs`` that is not done yet; safe to run again at any time."""
    if retries < 0:
        raise UserError(f"--retries {retries}: must be >= 0")
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r}: expected local or ray")
    slots: list[Slot] = []
    if backend == "local":  # checked before anything is touched
        visible = [] if (gpus or "").strip().lower() == "none" else visible_gpus()
        slots = device_slots(parse_gpus(gpus, visible), jobs_per_gpu, max_parallel)
    else:
        _check_ray_gpus(gpus)
        device_slots([], jobs_per_gpu, max_parallel)  # validates the counts
    uri = absolute_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    runs_dir = Path(runs_dir).resolve()
    if backend == "ray":
        check_shared(ray_address, uri, runs_dir, shared_runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tracking.ensure_experiment(tracking.connect(uri), sweep.experiment)  # once, before any worker starts

    states = inspect_sweep(configs, sweep.experiment, uri, runs_dir, retries)
    tasks = [Task(s.run_key, s.config, runs_dir / s.run_key, s.total_epochs) for s in to_run(states, retry_failed)]
    if not tasks:
        return _finish(states, {}, None)

    chosen: Backend
    if backend == "ray":
        no_gpus = (gpus or "").strip().lower() == "none"
        chosen = RayBackend(ray_address, num_gpus=0 if no_gpus else None)
        slots = ray_slots(chosen.resources(), no_gpus, jobs_per_gpu, max_parallel)
    else:
        chosen = LocalBackend()

    def write_spec(task: Task, slot: Slot) -> Path:
        path = task.run_dir / SPEC
        WorkerSpec(config=task.config.to_dict(), experiment=sweep.experiment, run_dir=str(task.run_dir),
                   tracking_uri=uri, sweep=sweep.name, device=slot.device, threads=slot.threads).write(path)
        return path

    for task in tasks:
        task.run_dir.mkdir(parents=True, exist_ok=True)
    view = view_factory(states, tasks) if view_factory else QuietView()
    scheduler = Scheduler(chosen, slots, write_spec, retries, view)
    try:
        stopped_by = scheduler.run(tasks)
    finally:
        close = getattr(view, "close", None)
        if close:
            close()
        chosen.close()
    by_key = {t.key: t for t in tasks}
    if scheduler.aborted:  # stop at once: no final look at MLflow
        return _finish(states, by_key, stopped_by, aborted=True)
    return _finish(inspect_sweep(configs, sweep.experiment, uri, runs_dir, retries), by_key, stopped_by)


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
            aborted: bool = False) -> SweepResult:
    result = SweepResult(states, tasks, stopped_by, aborted=aborted)
    if stopped_by is not None:
        result.exit_code = EXIT_SIGINT if stopped_by == signal.SIGINT else EXIT_SIGTERM
    elif any(result.outcome(s)[0] == "failed" for s in states):
        result.exit_code = 1
    return result

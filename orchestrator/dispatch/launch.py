"""One way to launch runs: what ``adareg sweep run`` and ``adareg tune run`` (and notebooks) go through.

``LaunchOptions`` are the options every launch shares, checked once, in library terms (``BadValue``
names the argument; the CLI names it as its flag). ``Launch.open`` does the steps every launch shares,
in one order: the pack size, the device slots, the store URI, the runs folder, the store and the
experiment (initialised once, from this process). ``Launch.run`` then writes every job's worker specs
(so an option added here reaches every worker) and runs the ``Scheduler`` over a backend; ``exit_code``
turns how it ended into the process's exit code. ``run_sweep`` is a sweep's launch: reconcile, run what
is owed, reconcile again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.diskfault import disk_fault
from orchestrator.dispatch.backends import Backend, LocalBackend, RayBackend, check_shared
from orchestrator.dispatch.packs import PACKS, Jobs, checked_pack, write_job_spec
from orchestrator.dispatch.scheduler import Scheduler
from orchestrator.dispatch.slots import Slot, check_ray_gpus, device_slots, parse_gpus, ray_slots, visible_gpus
from orchestrator.dispatch.task import QuietView, Task, TaskSource, View
from orchestrator.errors import BadValue, arg
from orchestrator.identity import Planned
from orchestrator.run.ending import (
    DEFAULT_RETRIES,
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_STORE,
    EXIT_USER,
    TODO,
    State,
)
from orchestrator.run.spec import WorkerSpec
from orchestrator.store.claims import DEFAULT_LEASE_S
from orchestrator.store.client import DEFAULT_STORE_TIMEOUT_S, Store, StoreUnreachable, connect, is_transient, probe
from orchestrator.store.provenance import run_tags
from orchestrator.store.runs import check_writable, end_strays, ensure_experiment
from orchestrator.store.uri import absolute_tracking_uri, resolve_tracking_uri
from orchestrator.sweep.file import resolved_yaml
from orchestrator.sweep.reconcile import RunState, inspect_sweep


@dataclass(frozen=True)
class LaunchOptions:
    """How runs are launched; every field is checked here, once."""

    gpus: str | None = None  # 'all' (None), 'none', or indices into the visible GPUs: '0,1'
    jobs_per_gpu: int = 1
    max_parallel: int | None = None
    retries: int = DEFAULT_RETRIES
    backend: str = "local"  # local | ray
    ray_address: str | None = None
    shared_runs_dir: bool = False
    stall_timeout: float | None = None  # None: max(20 min, 5 x the slowest epoch)
    store_timeout: float = DEFAULT_STORE_TIMEOUT_S
    claim_lease: float = DEFAULT_LEASE_S
    disk_timeout: float | None = None  # None: store_timeout
    pack: int | str | None = None  # None: the sweep file's

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise BadValue(f"{arg('retries')} {self.retries}: must be >= 0")
        for name in ("stall_timeout", "store_timeout", "claim_lease", "disk_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadValue(f"{arg(name)} {value:g}: must be > 0 seconds")
        if self.backend not in ("local", "ray"):
            raise BadValue(f"{arg('backend')} {self.backend!r}: expected local or ray")
        if self.pack is not None:
            checked_pack(self.pack)
        if self.backend == "ray":
            check_ray_gpus(self.gpus)
        device_slots([], self.jobs_per_gpu, self.max_parallel)  # the counts

    @property
    def no_gpus(self) -> bool:
        return (self.gpus or "").strip().lower() == "none"


@dataclass
class Launch:
    """A launch under way: its sweep, options, store and experiment, runs folder and slots."""

    sweep: object
    options: LaunchOptions
    uri: str
    runs_dir: Path
    client: object
    experiment_id: str
    pack: int | str
    slots: list[Slot] = field(default_factory=list)
    scheduler: Scheduler | None = None
    store: Store | None = None  # retries the launch's own store calls (up to --store-timeout)
    provenance: dict[str, str] = field(default_factory=dict)  # every run's version, commit, command tags
    sweep_yaml: str | None = None  # the resolved sweep file, every run's sweep.yaml artifact

    @classmethod
    def open(cls, sweep, options: LaunchOptions, *, tracking_uri: str | None, runs_dir: Path,
             slots: Sequence[Slot] | None = None, note: Callable[[str], None] | None = None) -> Launch:
        """Everything checked before anything is touched, then the store and experiment, initialised once.
        ``slots``: these instead of the options' device slots (``adareg train``'s one device). A locked or
        restarting database is waited for, up to ``--store-timeout`` (``note`` hears of each wait); an
        unreachable server is said at once (``StoreUnreachable``, exit 75)."""
        pack = checked_pack(sweep.pack if options.pack is None else options.pack)
        slots = list(slots or [])
        if options.backend == "local" and not slots:
            visible = [] if options.no_gpus else visible_gpus()
            slots = device_slots(parse_gpus(options.gpus, visible), options.jobs_per_gpu, options.max_parallel)
        uri = absolute_tracking_uri(resolve_tracking_uri(tracking_uri))
        runs_dir = Path(runs_dir).resolve()
        if options.backend == "ray":
            check_shared(options.ray_address, uri, runs_dir, options.shared_runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)

        def experiment() -> tuple[object, str]:
            client = connect(uri)
            experiment_id = ensure_experiment(client, sweep.experiment, describe(sweep))
            if uri.startswith(("http://", "https://")):  # a server may refuse this user's writes: said now
                check_writable(client, experiment_id, sweep.experiment)
            end_strays(client, experiment_id, options.claim_lease)
            return client, experiment_id

        store = Store(uri, budget_s=options.store_timeout, on_wait=note)
        client, experiment_id = store.call(experiment, "opening the experiment")
        return cls(sweep, options, uri, runs_dir, client, experiment_id, pack, slots, store=store,
                   provenance=run_tags(),
                   sweep_yaml=resolved_yaml(sweep) if hasattr(sweep, "model_dump") else None)

    def task(self, run: Planned) -> Task:
        """The scheduler's task of one planned run (its folder made)."""
        task = Task(run.key, run.config, self.runs_dir / run.key, run.total_epochs)
        try:
            task.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a full or read-only runs folder: the scheduler waits for it (see Scheduler._disk_full)
            if disk_fault(e) is None:
                raise
        return task

    def jobs(self, note: Callable[[str], None]) -> Jobs:
        """``jobs(tasks, everything=None)``: tasks as the scheduler's jobs, packed per this launch's pack."""
        return Jobs(self.pack, self.slots, self.runs_dir / PACKS, calibrate=self.options.backend == "local", note=note)

    def backend(self) -> Backend:
        """The backend to run workers on (for Ray, the slots are the cluster's)."""
        o = self.options
        if o.backend == "local":
            return LocalBackend()
        ray = RayBackend(o.ray_address, num_gpus=0 if o.no_gpus else None)
        self.slots = ray_slots(ray.resources(), o.no_gpus, o.jobs_per_gpu, o.max_parallel)
        return ray

    def spec(self, run: Task, slot: Slot, tags: dict[str, str] | None = None) -> WorkerSpec:
        """The worker spec of one run on ``slot``: every launch option a worker needs goes through here."""
        config = run.config.replace(data_dir=os.path.abspath(run.config.data_dir))  # workers run elsewhere
        return WorkerSpec(config=config.to_dict(), experiment=self.sweep.experiment, run_dir=str(run.run_dir),
                          tracking_uri=self.uri, sweep=self.sweep.name, device=slot.device,
                          threads=slot.threads or None, tags={**self.provenance, **(tags or {})},
                          store_timeout=self.options.store_timeout, claim_lease=self.options.claim_lease,
                          sweep_yaml=self.sweep_yaml)

    def run(self, jobs: Sequence[Task], view: View | None = None, *, source: TaskSource | None = None,
            tags: Callable[[Task], dict[str, str]] | None = None, poll_s: float | None = None) -> int | None:
        """Run ``jobs`` (and what ``source`` hands out) to the end: the stopping signal, or None."""
        o, view = self.options, view or QuietView()
        backend = self.backend()

        def write_spec(task: Task, slot: Slot) -> Path:
            return write_job_spec(task, lambda run: self.spec(run, slot, tags(run) if tags else None))

        extra = {"poll_s": poll_s} if poll_s else {}
        self.scheduler = Scheduler(backend, self.slots, write_spec, o.retries, view, source=source,
                                   stall_timeout_s=o.stall_timeout, store_probe=lambda: probe(self.uri),
                                   store_timeout_s=o.store_timeout, runs_dir=self.runs_dir,
                                   disk_timeout_s=o.disk_timeout, **extra)
        try:
            return self.scheduler.run(jobs)
        finally:
            close = getattr(view, "close", None)
            if close:
                close()
            backend.close()


def exit_code(stopped_by: int | None, *, failed: bool, store_down: bool, refused: bool = False) -> int:
    """A launch's exit code: 130/143 interrupted, 2 the tracking server refused this user (bad input: every
    run resumable, no attempt counted), 1 some run failed for good, 75 the store stayed down (or the runs
    folder full: infrastructure, every run resumable)."""
    if stopped_by is not None:
        return EXIT_SIGINT if stopped_by == signal.SIGINT else EXIT_SIGTERM
    if refused:
        return EXIT_USER
    if failed:
        return EXIT_FAILED
    return EXIT_STORE if store_down else 0


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
    refused: str = ""  # ended because the tracking server refused this user (HTTP 401/403): what, in words
    experiment_id: str | None = None

    def final(self, state: RunState) -> tuple[State, str]:
        """(state, reason) for the summary: MLflow's word, or the scheduler's when MLflow has none yet."""
        task = self.tasks.get(state.run_key)
        if task is not None and task.state is State.FAILED and state.state is not State.FAILED:
            return State.FAILED, task.message
        if task is not None and task.state is State.RESUMABLE and state.state is not State.DONE and task.message:
            return State.RESUMABLE, task.message
        return state.state, state.reason if state.state in (State.FAILED, State.RUNNING) else ""


def run_sweep(sweep, planned: Sequence[Planned], options: LaunchOptions | None = None, *,
              tracking_uri: str | None, runs_dir: Path, retry_failed: bool = False,
              view_factory: Callable[[list[RunState], list[Task]], View] | None = None,
              note: Callable[[str], None] | None = None) -> SweepResult:
    """Run every planned run (``orchestrator.sweep.file.expand``) that is not done yet; safe to run again at
    any time, and from several orchestrators (or machines) sharing the tracking store at once. ``note`` hears
    of waits for the store before the runs start."""
    o = options or LaunchOptions()
    launch = Launch.open(sweep, o, tracking_uri=tracking_uri, runs_dir=runs_dir, note=note)

    def inspect() -> list[RunState]:
        return inspect_sweep(planned, sweep.experiment, launch.uri, launch.runs_dir, o.retries, o.claim_lease)

    states = launch.store.call(inspect, "reading the sweep's runs")
    owed = {p.key: p for p in planned}
    tasks = [launch.task(owed[s.run_key]) for s in to_run(states, retry_failed)]
    if not tasks:
        return _finish(states, {}, None, experiment_id=launch.experiment_id)
    view = view_factory(states, tasks) if view_factory else QuietView()
    jobs = launch.jobs(view.note)(tasks, {s.run_key: s.config for s in states})
    stopped_by = launch.run(jobs, view)
    scheduler, by_key = launch.scheduler, {t.key: t for t in tasks}
    if scheduler.aborted:  # stop at once: no final look at MLflow
        return _finish(states, by_key, stopped_by, aborted=True, experiment_id=launch.experiment_id)
    try:
        final = inspect()
    except Exception as e:  # noqa: BLE001 - the store went down again: report what the scheduler saw
        if not (scheduler.store_gave_up or is_transient(e) or isinstance(e, StoreUnreachable)):
            raise
        final = states
        scheduler.store_gave_up = True
    return _finish(final, by_key, stopped_by, store_down=scheduler.store_gave_up, experiment_id=launch.experiment_id,
                   disk_full=scheduler.disk.describe() if scheduler.disk_gave_up else "", refused=scheduler.refused)


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
            if s.state in TODO or (retry_failed and s.state is State.FAILED and s.failure != "diverged")]
    return sorted(todo, key=lambda s: s.state is State.PENDING)


def _finish(states: list[RunState], tasks: dict[str, Task], stopped_by: int | None,
            aborted: bool = False, store_down: bool = False, experiment_id: str | None = None,
            disk_full: str = "", refused: str = "") -> SweepResult:
    result = SweepResult(states, tasks, stopped_by, aborted=aborted, store_down=store_down, disk_full=disk_full,
                         refused=refused, experiment_id=experiment_id)
    failed = any(result.final(s)[0] is State.FAILED for s in states)
    result.exit_code = exit_code(stopped_by, failed=failed, store_down=store_down or bool(disk_full),
                                 refused=bool(refused))
    return result

"""``adareg tune``: Optuna search over Table 1-shaped taper schedules, scored on a validation split.

ask -> a taper (``TuneSpace`` of the sweep file) -> one RunConfig per tuning seed (``tune.seeds``, with
``validation`` = ``tune.validation``, so the test split is never read) -> the same ``Scheduler``, backends and
worker as a sweep (device slots, locks, claims, checkpoints) -> per-epoch mean over the seeds, reported to the
pruner once every seed reached the epoch (read from ``progress.json`` and MLflow), a pruned trial's runs are
stopped through their run folders -> tell (the mean over seeds of the objective at the last epoch).

The tuner is a ``TaskSource`` of the scheduler (ask-and-tell): whenever a slot is free and the queue is
empty it asks for the next trial, so one command keeps every local slot busy. Several tuners (terminals or
machines) may share a study:

- each process seeds its TPE sampler with ``tune.sampler_seed`` mixed with a random number, and TPE runs
  with ``constant_liar`` (running trials count as bad guesses), so they propose different tapers;
- each trial's runs carry ``variant`` = ``<study>/trial-<n>``: two trials never share a run key, even with
  equal parameters; a retried trial keeps the variant of the trial it retries, so its runs resume from
  their checkpoints, and a finished run is never trained again;
- a tuner heartbeats its running trials; a trial whose tuner died (no heartbeat for ``--trial-lease``) is
  failed by the next tuner that looks and enqueued again with the same parameters
  (``RetryHeartbeatStaleTrialCallback``). RDB storages use Optuna's own heartbeat; the journal file, which
  has none, gets an equivalent here (a system attribute renewed by the tuner);
- every trial run is a child (``mlflow.parentRunId``) of one MLflow run per study (tag
  ``adareg.study_run``); of two created at once, the earlier wins and the other is deleted.

Optuna's MLflowCallback is deprecated; trials are logged by adareg's own run logger in the workers.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.dispatch.launch import Launch, LaunchOptions, exit_code
from orchestrator.dispatch.progress import ended_word
from orchestrator.dispatch.scheduler import QuietView
from orchestrator.errors import BadValue, UserError
from orchestrator.identity import plan
from orchestrator.run.ending import End, State
from orchestrator.store.claims import SETTLE_S, created_first
from orchestrator.store.tags import TAG_NOTE, TAG_PARENT, TAG_STUDY, TAG_STUDY_RUN, TAG_TRIAL
from orchestrator.sweep.file import Range, Sweep, TuneSpace
from training.atomic import atomic_write

ATTR_VARIANT = "variant"  # user attr of a trial: the variant of its runs (kept by a retry)
ATTR_RUNS = "mlflow_run_ids"
ATTR_FAILURE = "failure"
SYS_HEARTBEAT = "adareg:heartbeat"  # journal storages: the tuner's clock, renewed while the trial runs
STUDY_ATTRS = ("objective", "validation", "seeds")  # fixed per study
STEPS = 5
DEFAULT_TRIAL_LEASE_S = 120.0
MAX_RETRY = 3
BASELINES = {"wd-1e-4": {"weight_decay": 1e-4}, "wd-1e-3": {"weight_decay": 1e-3}, "wd-8e-3": {"weight_decay": 8e-3}}


# --------------------------------------------------------------------------------------- the space


def space_of(sweep: Sweep) -> TuneSpace:
    if sweep.tune is None:
        raise UserError(f"sweep {sweep.name!r} has no 'tune' section: add one (see sweeps/tune.yaml)")
    lr = sweep.schedule.lr
    steps = len(lr[0]) if lr and isinstance(lr[0], (list, tuple)) else (len(lr) if isinstance(lr, list) else STEPS)
    if steps != STEPS:
        raise UserError(f"sweep {sweep.name!r}: tune needs {STEPS} learning-rate steps per phase, the schedule has "
                        f"{steps}")
    if sweep.tune.seeds > len(sweep.seeds):
        raise UserError(f"tune.seeds: {sweep.tune.seeds} tuning seeds, but the sweep lists {len(sweep.seeds)} "
                        f"seed{'s' if len(sweep.seeds) != 1 else ''}")
    return sweep.tune


def _suggest(trial, name: str, value: Range | float) -> float:
    if isinstance(value, Range):
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    return float(value)


def taper(base: float, peak: float, sparsity: float, phases: int) -> dict[str, Any]:
    """Scheme values of a trial: weight decay [b, b, p/2, p, p] in every phase, sparsity in phase 1."""
    sparse = [[0.0, 0.0, sparsity, sparsity, sparsity]] + [[0.0] * STEPS for _ in range(phases - 1)]
    return {"weight_decay": [base, base, peak / 2, peak, peak], "grad_sparsity": sparse}


def trial_scheme(sweep: Sweep, params: dict[str, float]) -> dict[str, Any]:
    space = space_of(sweep)
    value = lambda name: params.get(name, getattr(space, name))  # noqa: E731 (fixed values are not params)
    return taper(float(value("weight_decay_base")), float(value("weight_decay_peak")),
                 float(value("grad_sparsity")), len(sweep.schedule.epochs_per_step))


def variant_of(study_name: str, number: int) -> str:
    return f"{study_name}/trial-{number}"


def trial_configs(sweep: Sweep, params: dict[str, float], variant: str, number: int) -> list:
    """The RunConfigs of one trial: the sweep's first dataset and arch, its first ``tune.seeds`` seeds, the
    trial's taper, a validation hold-out and the trial's variant."""
    from training.config import RunConfig

    space = space_of(sweep)
    scheme = next(iter(sweep.schemes))
    out = []
    for seed in sweep.seeds[:space.seeds]:
        base = sweep.run_config(scheme, sweep.archs[0], sweep.datasets[0], seed)
        out.append(RunConfig.from_dict({**base.to_dict(), **trial_scheme(sweep, params), "scheme": f"trial-{number}",
                                        "validation": space.validation, "variant": variant}))
    return out


# ------------------------------------------------------------------------------------------ storage


def default_storage(sweep: Sweep) -> str:
    return str(Path("adareg_tune") / f"{sweep.name}.journal")


def is_rdb(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str, *, create: bool = True, lease_s: float = DEFAULT_TRIAL_LEASE_S):
    """An Optuna storage: an RDB URL (with Optuna's heartbeat and retry of stale trials) or a journal file."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if is_rdb(storage):
        interval = max(1, int(lease_s / 4))
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)
        last: Exception | None = None
        for attempt in range(5):  # several tuners creating the tables of a fresh database at once
            try:
                return RDBStorage(storage, heartbeat_interval=interval, grace_period=max(interval + 1, int(lease_s)),
                                  heartbeat_stale_trial_callback=retry)
            except Exception as e:  # noqa: BLE001 - retried, then named
                last = e
                time.sleep(0.5 + attempt)
        raise BadValue(f"{{storage}} {storage}: {type(last).__name__}: {str(last).splitlines()[0][:300]}")
    path = Path(storage)
    if not create and not path.exists():
        raise UserError(f"{storage}: no such study journal (run 'adareg tune run FILE' first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return JournalStorage(JournalFileBackend(str(path)))


def process_seed(sampler_seed: int) -> int:
    """The sampler seed of this process: ``tune.sampler_seed`` mixed with a random number (the same seed in
    two tuners would make them propose the same tapers)."""
    return (sampler_seed * 1_000_003 + uuid.uuid4().int) % 2**32


def open_study(sweep: Sweep, storage: str | None, create: bool = True, lease_s: float = DEFAULT_TRIAL_LEASE_S,
               seed: int | None = None):
    """The sweep's study (named after the sweep) in a journal file or an RDB URL."""
    import optuna

    space = space_of(sweep)
    backend = open_storage(storage or default_storage(sweep), create=create, lease_s=lease_s)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if space.pruner == "median"
              else optuna.pruners.NopPruner())
    sampler = optuna.samplers.TPESampler(seed=process_seed(space.sampler_seed) if seed is None else seed,
                                         constant_liar=True)
    try:
        if create:
            study = optuna.create_study(storage=backend, study_name=sweep.name, direction="minimize",
                                        load_if_exists=True, pruner=pruner, sampler=sampler)
        else:
            study = optuna.load_study(storage=backend, study_name=sweep.name, pruner=pruner, sampler=sampler)
    except KeyError:
        raise UserError(f"{storage or default_storage(sweep)}: no study named {sweep.name!r}") from None
    if create:
        _check_study_attrs(study, space)
    return study


def _check_study_attrs(study, space: TuneSpace) -> None:
    """``tune.objective``, ``tune.validation`` and ``tune.seeds`` are fixed per study: values scored
    differently are not comparable."""
    have = study.user_attrs
    for name in STUDY_ATTRS:
        mine = getattr(space, name)
        if name not in have:
            study.set_user_attr(name, mine)
        elif have[name] != mine:
            raise UserError(f"tune.{name}: {mine!r}, but study {study.study_name!r} was run with {have[name]!r} "
                            "(trials scored differently cannot be compared: use another sweep name or storage)")


# ----------------------------------------------------------------------------------- MLflow parent


def study_run(client, experiment_id: str, study_name: str, settle_s: float = SETTLE_S) -> str:
    """The id of the study's MLflow run (tag ``adareg.study_run``), created if needed: trial runs are its
    children. Of runs created at once, the earliest (start time, id) wins; the others are deleted."""
    def find() -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.`{TAG_STUDY_RUN}` = '{study_name}'",
                                  max_results=100)

    found = find()
    if not found:
        mine = client.create_run(experiment_id, run_name=f"study-{study_name}",
                                 tags={TAG_STUDY_RUN: study_name, TAG_STUDY: study_name,
                                       TAG_NOTE: f"Optuna study {study_name}: its trials' runs are nested "
                                                          "here (scored on a validation split)"})
        client.set_terminated(mine.info.run_id, status="FINISHED")
        time.sleep(settle_s)
        found = find()
        first = created_first(found or [mine])
        if first.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        return first.info.run_id
    return created_first(found).info.run_id


# ------------------------------------------------------------------------------------------ trials


@dataclass
class TrialRuns:
    """One trial in flight: its Optuna trial and one scheduler task per seed."""

    trial: Any
    variant: str
    tasks: dict[str, Any]  # run key -> Task
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # run key -> epoch -> objective
    seen_epoch: dict[str, int] = field(default_factory=dict)
    reported: int = 0
    pruned: str = ""
    ended: dict[str, str] = field(default_factory=dict)  # run key -> the task's result


class Tuner:
    """The scheduler's task source: asks Optuna for trials while slots are free, reports and prunes from the
    workers' progress, tells Optuna how each trial ended. Also renews its trials' heartbeats."""

    def __init__(self, sweep: Sweep, study, client, trials: int, launch: Launch, *, parent_run_id: str | None = None,
                 lease_s: float = DEFAULT_TRIAL_LEASE_S, note=None):
        self.sweep, self.study, self.client, self.budget = sweep, study, client, trials
        self.launch = launch
        self.jobs = launch.jobs(note or (lambda message: None))  # a trial's runs -> jobs (its seeds packed, or not)
        self.space = space_of(sweep)
        self.parent_run_id, self.lease_s = parent_run_id, lease_s
        self.note = note or (lambda message: None)
        self.storage = study._storage
        self.rdb = _heartbeat_enabled(self.storage)
        self.asked = 0
        self.live: dict[int, TrialRuns] = {}  # trial id -> in flight
        self.by_key: dict[str, TrialRuns] = {}
        self.told: dict[int, str] = {}  # trial number -> state name
        self.tags: dict[str, dict[str, str]] = {}  # run key -> MLflow tags of its run
        self.errors: list[str] = []  # trials that failed with an error: no further trial is asked
        self.halted = False
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- heartbeat and recovery
    def start(self) -> None:
        self.recover()
        self._beat = threading.Thread(target=self._heartbeat, name="adareg-tune-heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)

    def _beat_once(self, trial_id: int) -> None:
        if self.rdb:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_system_attr(trial_id, SYS_HEARTBEAT, time.time())

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.5, self.lease_s / 4)):
            with self.lock:
                ids = list(self.live)
            for trial_id in ids:
                with contextlib.suppress(Exception):  # finished meanwhile, or a missed beat: the lease is 4 beats
                    self._beat_once(trial_id)

    def recover(self) -> list[int]:
        """Fail the running trials of dead tuners (no heartbeat for the lease) and enqueue them again (same
        parameters and variant); the numbers of the trials failed here."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        before = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        if self.rdb:
            optuna.storages.fail_stale_trials(self.study)
        else:
            retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)
            now = time.time()
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t._trial_id in self.live:
                    continue
                start = t.datetime_start.timestamp() if t.datetime_start else now
                beat = float(t.system_attrs.get(SYS_HEARTBEAT, start))
                if now - beat <= self.lease_s:
                    continue
                try:  # the reason first: a finished trial takes no attribute
                    self.storage.set_trial_user_attr(t._trial_id, ATTR_FAILURE, f"its tuner stopped heartbeating "
                                                     f"{now - beat:.0f}s ago (lease {self.lease_s:.0f}s)")
                    if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                        continue
                except (UpdateFinishedTrialError, KeyError):
                    continue  # failed by another tuner first
                retry(self.study, self.storage.get_trial(t._trial_id))
        failed = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.number not in before]
        if failed:
            self.note(f"trial{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of a tuner that "
                      "stopped: failed and enqueued again (same parameters; their runs resume)")
        return failed

    # -- TaskSource
    def running(self) -> bool:
        return self.asked < self.budget and not self.halted

    def more(self) -> list:
        if not self.running():
            return []
        self.recover()
        trial = self.study.ask()
        self.asked += 1
        with self.lock:
            self._beat_once(trial._trial_id)
            frozen = self.storage.get_trial(trial._trial_id)
            variant = frozen.user_attrs.get(ATTR_VARIANT) or variant_of(self.sweep.name, trial.number)
            number = int(variant.rsplit("-", 1)[1])
            trial.set_user_attr(ATTR_VARIANT, variant)
            params = {name: _suggest(trial, name, getattr(self.space, name))
                      for name in ("weight_decay_base", "weight_decay_peak", "grad_sparsity")}
            tasks = {}
            for config in trial_configs(self.sweep, params, variant, number):
                task = self.launch.task(plan(config))
                key = task.key
                self.tags[key] = {TAG_STUDY: self.sweep.name, TAG_TRIAL: str(number),
                                  **({TAG_PARENT: self.parent_run_id} if self.parent_run_id else {})}
                tasks[key] = task
            runs = TrialRuns(trial, variant, tasks, values={k: dict() for k in tasks})
            for v in frozen.intermediate_values:  # a retry inherits what its predecessor reported
                runs.reported = max(runs.reported, int(v))
            self.live[trial._trial_id] = runs
            self.by_key.update({k: runs for k in tasks})
        retried = f" (retry of trial {number})" if number != trial.number else ""
        self.note(f"trial {trial.number}{retried}: {', '.join(f'{k} {v:.3g}' for k, v in params.items())}")
        return self.jobs(list(tasks.values()))

    def progress(self, task, progress: dict) -> None:
        with self.lock:
            runs = self.by_key.get(task.key)
            if runs is None or runs.trial._trial_id not in self.live:
                return
            epoch = int(progress.get("epoch") or 0)
            if epoch <= runs.seen_epoch.get(task.key, 0):
                return
            runs.seen_epoch[task.key] = epoch
            run_id = progress.get("run_id")
            if run_id:
                with contextlib.suppress(Exception):  # the store is down: the next epoch reads it again
                    runs.values[task.key].update(self._history(run_id))
            if progress.get(self.space.objective) is not None:  # progress.json holds the last val_error
                runs.values[task.key][epoch] = float(progress[self.space.objective])
            self._report(runs)

    def _history(self, run_id: str) -> dict[int, float]:
        return {int(m.step): float(m.value) for m in self.client.get_metric_history(run_id, self.space.objective)}

    def _report(self, runs: TrialRuns) -> None:
        """Report the mean over seeds of every epoch all seeds reached; prune if Optuna says so."""
        common = min((max(v) if v else 0) for v in runs.values.values())
        for epoch in range(runs.reported + 1, common + 1):
            if not all(epoch in v for v in runs.values.values()):
                continue  # an epoch missed on the way: the next read of MLflow fills it
            mean = statistics.fmean(v[epoch] for v in runs.values.values())
            runs.trial.report(mean, epoch)
            runs.reported = epoch
            if not runs.pruned and self.space.pruner != "none" and runs.trial.should_prune():
                runs.pruned = f"pruned: trial {runs.trial.number} at epoch {epoch} ({self.space.objective} {mean:.4f})"
                self.note(runs.pruned)
                for key, task in runs.tasks.items():
                    if key not in runs.ended:
                        task.folder.request_stop(runs.pruned)

    def ended(self, task) -> None:
        with self.lock:
            runs = self.by_key.get(task.key)
            if runs is None or runs.trial._trial_id not in self.live:
                return
            runs.ended[task.key] = task
            if len(runs.ended) == len(runs.tasks):
                self._tell(runs)

    def _tell(self, runs: TrialRuns) -> None:
        from optuna.trial import TrialState

        trial = runs.trial
        states = {t.state for t in runs.ended.values()}
        run_ids = [(t.folder.read_attempt() or _NoResult).run_id for t in runs.tasks.values()]
        trial.set_user_attr(ATTR_RUNS, [r for r in run_ids if r])
        del self.live[trial._trial_id]
        for key in runs.tasks:
            self.by_key.pop(key, None)
        if states == {State.DONE}:
            finals = []
            for key, run_id in zip(runs.tasks, run_ids):
                try:
                    history = self._history(run_id) if run_id else {}
                except Exception as e:  # noqa: BLE001 - the store is down: the retry reads the finished runs
                    return self._retry(runs, f"cannot read {self.space.objective} of run {key} from MLflow "
                                             f"({type(e).__name__}); enqueued again (its runs are finished)")
                runs.values[key].update(history)
                if not history:
                    return self._fail(runs, f"run {key} has no {self.space.objective}")
                finals.append(history[max(history)])
            self._report(runs)
            value = statistics.fmean(finals)
            self.study.tell(trial, value)
            self.told[trial.number] = "complete"
            return None
        stopped = all(t.state is State.DONE or t.end is End.STOPPED for t in runs.ended.values())
        if runs.pruned or stopped:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.told[trial.number] = "pruned"
            return None
        if State.RESUMABLE in states:  # interrupted: another tuner (or this one, again) resumes it
            return self._retry(runs, "interrupted; enqueued again (its runs resume)")
        messages = [f"{key}: {ended_word(t)}: {t.message}" for key, t in runs.tasks.items()
                    if t.state is not State.DONE]
        if any(t.state is State.FAILED and t.end is not End.DIVERGED for t in runs.ended.values()):
            # an error that retries did not cure, or bad input: the next trial would fail too
            self.errors.append(f"trial {trial.number}: " + "; ".join(messages))
            self.halted = True
        return self._fail(runs, "; ".join(messages)[:2000])

    def _retry(self, runs: TrialRuns, why: str) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self._fail(runs, why)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)(
            self.study, self.storage.get_trial(runs.trial._trial_id))

    def _fail(self, runs: TrialRuns, why: str) -> None:
        from optuna.trial import TrialState

        runs.trial.set_user_attr(ATTR_FAILURE, why)
        self.study.tell(runs.trial, state=TrialState.FAIL)
        self.told[runs.trial.number] = "fail"
        self.note(f"trial {runs.trial.number} failed: {why}")

    def abandon(self) -> None:
        """The scheduler stopped (a signal, the store down): trials still in flight are failed and enqueued
        again, for this or another tuner to resume."""
        self.halted = True
        with self.lock:
            for runs in list(self.live.values()):
                with contextlib.suppress(Exception):
                    self._retry(runs, "interrupted; enqueued again (its runs resume)")
            self.live.clear()


class _NoResult:
    run_id = None


def _heartbeat_enabled(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


@dataclass
class TuneResult:
    """How ``run_tune`` ended: the study, how each trial this process asked ended, errors, the exit code."""

    study: Any
    told: dict[int, str]
    errors: list[str] = field(default_factory=list)
    exit_code: int = 0


def run_tune(sweep: Sweep, trials: int, options: LaunchOptions | None = None, *, storage: str | None,
             tracking_uri: str | None, runs_dir: Path, trial_lease: float = DEFAULT_TRIAL_LEASE_S, view=None,
             poll_s: float | None = None) -> TuneResult:
    """Run ``trials`` more trials of the sweep's study through the one launch path (every free slot gets the
    next trial's runs; with ``options.pack`` (default: the sweep file's) a trial's seeds train as one fused
    model); safe beside other tuners on the same study and store."""
    space_of(sweep)
    if trial_lease <= 0:
        raise BadValue(f"{{trial_lease}} {trial_lease:g}: must be > 0 seconds")
    options = options or LaunchOptions()
    if options.backend != "local":
        raise BadValue("{backend} " + f"{options.backend!r}: tuning runs its trials on this machine (local)")
    launch = Launch.open(sweep, options, tracking_uri=tracking_uri, runs_dir=runs_dir)
    study = open_study(sweep, storage, lease_s=trial_lease)
    parent = study_run(launch.client, launch.experiment_id, sweep.name)
    view = view or QuietView()
    tuner = Tuner(sweep, study, launch.client, trials, launch, parent_run_id=parent, lease_s=trial_lease,
                  note=view.note)
    tuner.start()
    try:
        stopped_by = launch.run([], view, source=tuner, tags=lambda run: tuner.tags[run.key], poll_s=poll_s)
    finally:
        tuner.close()
        tuner.abandon()  # trials still in flight (stopped by a signal, or the store went down): retried later
    down = launch.scheduler.store_gave_up or launch.scheduler.disk_gave_up  # either: everything resumable
    code = exit_code(stopped_by, failed=bool(tuner.errors), store_down=down)
    return TuneResult(study, tuner.told, tuner.errors, code)


# ------------------------------------------------------------------------------------------ export


def best_sweep(sweep: Sweep, study) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best trial summary, a sweep document that trains the best taper, as scheme ``tuned``, on the full
    training set over all the file's seeds, beside the baselines wd-1e-4, wd-1e-3, wd-8e-3 and the file's
    own schemes)."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise UserError(f"study {sweep.name!r} has no completed trial yet")
    best = study.best_trial
    scheme = trial_scheme(sweep, best.params)
    doc = sweep.model_dump(mode="json", exclude={"tune"}, exclude_none=True)
    doc["name"] = f"{sweep.name}-best"
    doc.setdefault("train", {}).pop("validation", None)  # the full training set; the test split scores it
    doc["train"].pop("variant", None)
    own = doc["schemes"]
    doc["schemes"] = {"tuned": scheme, **{k: v for k, v in BASELINES.items() if k not in own}, **own}
    summary = {"trial": best.number, "value": best.value, "objective": space_of(sweep).objective,
               "params": best.params, "trials": len(study.trials), "completed": len(done), "scheme": scheme}
    return summary, doc


def export_sweep(doc: dict[str, Any], path: str | Path, summary: dict[str, Any] | None = None) -> None:
    where = (f"# Best trial {summary['trial']}: mean {summary['objective']} {summary['value']:.4f} on the validation "
             "split.\n") if summary else ""
    text = ("# Written by 'adareg tune best --export': the best taper found, as scheme 'tuned' (selected on\n"
            "# validation, trained here on the full training set and scored on the test split), beside the\n"
            "# baselines. Run it over all seeds with 'adareg sweep run'.\n" + where
            + yaml.safe_dump(doc, sort_keys=False)).encode()
    atomic_write(path, lambda f: f.write(text))


def dashboard(sweep: Sweep, storage: str | None, port: int) -> None:
    """optuna-dashboard on the study's storage, bound to 127.0.0.1 (blocks until interrupted)."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError("optuna-dashboard is not installed: pip install optuna-dashboard") from None
    backend = open_storage(storage or default_storage(sweep), create=False)
    optuna_dashboard.run_server(backend, host="127.0.0.1", port=port)

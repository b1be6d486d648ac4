"""``adareg tune``: Optuna search over taper schedules (any field of a scheme), scored on a validation split.

ask -> a taper (``TuneSpace`` of the sweep file) -> one RunConfig per tuning seed (``tune.seeds``, with
``validation`` = ``tune.validation``, so the test split is never read) -> the same ``Scheduler``, backends and
worker as a sweep (device slots, locks, claims, checkpoints) -> per-epoch mean over the seeds, reported to the
pruner once every seed reached the epoch (read from ``progress.json`` and MLflow), a pruned trial's runs are
stopped through their run folders -> tell (the mean over seeds of the objective at the last epoch).

The tuner is a ``TaskSource`` of the scheduler (ask-and-tell): whenever a slot is free and the queue is
empty it asks for the next trial, so one command keeps every local slot busy; with ``--pack N`` it asks for
as many trials as one pack holds (N // ``tune.seeds``) and their runs train as one fused model. Several
tuners (terminals or machines) may share a study:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.dispatch.launch import Launch, LaunchOptions, exit_code
from orchestrator.dispatch.progress import ended_word
from orchestrator.dispatch.task import QuietView
from orchestrator.errors import BadValue, arg
from orchestrator.identity import plan
from orchestrator.run.ending import End, State
from orchestrator.store.client import StoreRefused
from orchestrator.store.tags import TAG_PARENT, TAG_STUDY, TAG_TRIAL
from orchestrator.sweep.schema import Sweep
from orchestrator.tune.space import parameters, space_of, suggest, trial_configs, variant_of
from orchestrator.tune.study import DEFAULT_TRIAL_LEASE_S, MAX_RETRY, heartbeat_enabled, open_study, study_run

ATTR_VARIANT = "variant"  # user attr of a trial: the variant of its runs (kept by a retry)
ATTR_RUNS = "mlflow_run_ids"
ATTR_FAILURE = "failure"
SYS_HEARTBEAT = "adareg:heartbeat"  # journal storages: the tuner's clock, renewed while the trial runs


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
        self.jobs = launch.jobs(note or (lambda message: None))  # trials' runs -> jobs (packed, or not)
        self.space = space_of(sweep)
        self.parent_run_id, self.lease_s = parent_run_id, lease_s
        self.note = note or (lambda message: None)
        self.storage = study._storage
        self.rdb = heartbeat_enabled(self.storage)
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
        """The next trials' runs as jobs: as many trials as one pack of their shape holds (``--pack N`` with
        ``tune.seeds`` S: N // S trials, their runs trained as one fused model), else one trial."""
        if not self.running():
            return []
        self.recover()
        tasks = self._ask()
        per_job = self.jobs.size(tasks[0].config) // len(tasks)
        for _ in range(per_job - 1):
            if not self.running():
                break
            tasks += self._ask()
        return self.jobs(tasks)

    def _ask(self) -> list:
        """Ask Optuna for one trial: its runs, one per tuning seed."""
        trial = self.study.ask()
        self.asked += 1
        with self.lock:
            self._beat_once(trial._trial_id)
            frozen = self.storage.get_trial(trial._trial_id)
            variant = frozen.user_attrs.get(ATTR_VARIANT) or variant_of(self.sweep.name, trial.number)
            number = int(variant.rsplit("-", 1)[1])
            trial.set_user_attr(ATTR_VARIANT, variant)
            params = {name: suggest(trial, name, value) for name, value in parameters(self.space).items()}
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
        return list(tasks.values())

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
        raise BadValue(f"{arg('trial_lease')} {trial_lease:g}: must be > 0 seconds")
    options = options or LaunchOptions()
    if options.backend != "local":
        raise BadValue(f"{arg('backend')} {options.backend!r}: tuning runs its trials on this machine (local)")
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
    if launch.scheduler.refused and stopped_by is None:  # the server refused this user a write: bad input
        raise StoreRefused(launch.scheduler.refused)
    down = launch.scheduler.store_gave_up or launch.scheduler.disk_gave_up  # either: everything resumable
    code = exit_code(stopped_by, failed=bool(tuner.errors), store_down=down)
    return TuneResult(study, tuner.told, tuner.errors, code)


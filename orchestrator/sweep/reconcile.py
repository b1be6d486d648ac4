"""What is left to do: every run's state, from its MLflow run and its run folder.

``classify`` and ``reconcile`` are pure; ``inspect_sweep`` gathers their inputs (one bulk MLflow
query, one look into each run folder). Superseded MLflow runs are not seen at all. The states:

- done: the MLflow run is FINISHED.
- running: a live process holds the run: its folder's lock here, or a live claim in the store (another
  orchestrator, machine or tuner; see ``orchestrator.store.claims``). Never start it a second time.
- failed: FAILED because it diverged (retrying repeats the divergence), or after ``1 + retries`` failed
  attempts (counted in MLflow and in the run folder, so attempts that fail before the first epoch count).
- resumable: an MLflow run exists (RUNNING with a stale claim, KILLED, or FAILED with attempts left) or a
  checkpoint does.
- pending: neither exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.identity import Planned
from orchestrator.run.ending import DEFAULT_RETRIES, STATES, State, out_of_retries
from orchestrator.run.folder import Attempt, RunFolder
from orchestrator.store import claims
from orchestrator.store.client import connect
from orchestrator.store.runs import find_runs
from orchestrator.store.tags import TAG_ATTEMPTS, TAG_FAILURE, TAG_FAILURE_REASON
from orchestrator.store.uri import store_exists
from training.config import RunConfig


@dataclass(frozen=True)
class RunDir:
    """What a run's folder says about it."""

    checkpoint: bool = False
    locked_by: int | None = None
    progress: dict[str, Any] | None = None
    attempt: Attempt | None = None

    @classmethod
    def inspect(cls, path: Path) -> RunDir:
        if not path.is_dir():
            return cls()
        folder = RunFolder(path)
        return cls(folder.checkpoint.exists(), folder.lock_holder(), folder.read_progress(), folder.read_attempt())


@dataclass(frozen=True)
class RunState:
    """One run of a sweep and where it stands."""

    config: RunConfig
    run_key: str
    group_key: str
    state: State
    total_epochs: int
    epoch: int = 0
    test_error: float | None = None  # the evaluation split's error (the validation split's for a trial)
    images_per_second: float | None = None
    run_id: str | None = None
    failure: str = ""  # the adareg.failure tag: diverged | error | killed
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", State(self.state))

    def as_json(self) -> dict[str, Any]:
        """The ``sweep plan --format json`` object of this run."""
        c = self.config
        return {"run_key": self.run_key, "group_key": self.group_key, "arch": c.arch, "dataset": c.dataset,
                "scheme": c.scheme, "seed": c.seed, "state": self.state, "epoch": self.epoch,
                "total_epochs": self.total_epochs, "test_error": self.test_error, "run_id": self.run_id,
                "reason": self.reason, "params": c.to_dict()}


def classify(run: Any, run_dir: RunDir, retries: int = DEFAULT_RETRIES,
             lease_s: float = claims.DEFAULT_LEASE_S) -> tuple[State, str]:
    """``(state, reason)`` of a run from its MLflow run (or None) and its folder."""
    status = run.info.status if run is not None else None
    if status == "FINISHED":
        return State.DONE, ""
    if run_dir.locked_by is not None:
        pid = f" (pid {run_dir.locked_by})" if run_dir.locked_by else ""
        return State.RUNNING, f"held by a live worker here{pid}"
    if run is not None and (holder := claims.live_holder(run.data.tags, lease_s)) is not None:
        return State.RUNNING, f"running elsewhere: {holder.describe()}"
    attempt = run_dir.attempt
    folder_failures = attempt.failures if attempt is not None else 0
    if run is None:
        if out_of_retries(folder_failures, retries):
            return State.FAILED, f"{attempt.message or 'error'} (after {folder_failures} failed attempts)"
        return (State.RESUMABLE, "checkpoint without an MLflow run") if run_dir.checkpoint else (State.PENDING, "")
    tags = run.data.tags
    failure, reason = tags.get(TAG_FAILURE, ""), tags.get(TAG_FAILURE_REASON, "")
    if status == "FAILED" and failure == "diverged":
        return State.FAILED, reason or "diverged"
    attempts = _int(tags.get(TAG_ATTEMPTS))
    if status == "FAILED" and out_of_retries(attempts, retries):
        return State.FAILED, f"{reason or 'error'} (after {attempts} attempts)"
    if out_of_retries(folder_failures, retries):
        return State.FAILED, f"{attempt.message or reason or 'error'} (after {folder_failures} failed attempts)"
    return State.RESUMABLE, f"{status.lower()}" + (f": {reason}" if status == "FAILED" and reason else "")


def reconcile(planned: Sequence[Planned], runs: Mapping[str, Any], dirs: Mapping[str, RunDir],
              retries: int = DEFAULT_RETRIES, lease_s: float = claims.DEFAULT_LEASE_S) -> list[RunState]:
    """Each planned run's state from ``runs`` (``{run_key: MLflow Run}``) and ``dirs`` (``{run_key: RunDir}``)."""
    out = []
    for p in planned:
        run, run_dir = runs.get(p.key), dirs.get(p.key, RunDir())
        state, reason = classify(run, run_dir, retries, lease_s)
        epoch, test_error, ips = _latest(run, run_dir.progress)
        out.append(RunState(
            config=p.config, run_key=p.key, group_key=p.group, state=state, total_epochs=p.total_epochs,
            epoch=epoch, test_error=test_error, images_per_second=ips,
            run_id=run.info.run_id if run is not None else None,
            failure=run.data.tags.get(TAG_FAILURE, "") if run is not None else "",
            reason=reason))
    return out


def _latest(run: Any, progress: dict[str, Any] | None) -> tuple[int, float | None, float | None]:
    """Last epoch, its test error and images/s: from progress.json when it is as new as MLflow."""
    epoch, test_error, ips = 0, None, None
    if run is not None:
        metrics = {m.key: m for m in getattr(run.data, "_metric_objs", ())}  # latest value of each, with its step
        if "test_error" in metrics:
            epoch, test_error = int(metrics["test_error"].step), metrics["test_error"].value
        if "images_per_second" in metrics:
            ips = metrics["images_per_second"].value
    if progress and (run is None or progress.get("run_id") in (None, run.info.run_id)):
        p_epoch = _int(progress.get("epoch"))
        if p_epoch >= epoch:
            epoch = p_epoch
            test_error = progress.get("test_error", progress.get("val_error", test_error))
            ips = progress.get("images_per_second", ips)
    return epoch, test_error, ips


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def fetch_runs(tracking_uri: str, experiment: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``{run_key: Run}`` (of ``keys``, else every active run of the experiment) in one bulk query; no store is
    created where none exists yet."""
    if not store_exists(tracking_uri):
        return {}
    return find_runs(connect(tracking_uri), experiment, keys)


def inspect_sweep(planned: Sequence[Planned], experiment: str, tracking_uri: str, runs_dir: Path,
                  retries: int = DEFAULT_RETRIES, lease_s: float = claims.DEFAULT_LEASE_S,
                  runs: Mapping[str, Any] | None = None) -> list[RunState]:
    """The state of every planned run: one MLflow query (none when ``runs``, ``fetch_runs``'s answer, is
    given) plus a look into each run folder."""
    keys = [p.key for p in planned]
    if runs is None:
        runs = fetch_runs(tracking_uri, experiment, keys)
    dirs = {key: RunDir.inspect(runs_dir / key) for key in keys}
    return reconcile(planned, runs, dirs, retries, lease_s)


def counts(states: Iterable[RunState]) -> dict[str, int]:
    """``{state: how many}`` in the order of STATES."""
    n = {s: 0 for s in STATES}
    for st in states:
        n[st.state] += 1
    return n

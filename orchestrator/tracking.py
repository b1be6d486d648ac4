"""MLflow: the source of truth for what is done. The one module of the run's life that talks to it.

A run is found by its tag ``adareg.run_key``; it carries ``adareg.group_key`` and ``adareg.sweep``,
a param for every config field, and per-epoch metrics (step = epoch, from 1) written with
``log_batch``. ``RunLogger`` creates the MLflow run only once training really starts (data loaded,
checkpoint restored), so bad input never leaves a run behind; on resume it first logs the epochs the
checkpoint holds and MLflow lacks, so no epoch is lost and none is logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.identity import TAG_GROUP_KEY, TAG_RUN_KEY, TAG_SWEEP, group_key, run_key
from training.callbacks import METRICS, Callback, history_metrics
from training.config import RunConfig
from training.schedules import EpochPlan

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_FAILURE = "adareg.failure"  # "diverged" | "error" | "killed"
TAG_FAILURE_REASON = "adareg.failure_reason"
TAG_ATTEMPTS = "adareg.attempts"
TAG_TOTAL_EPOCHS = "adareg.total_epochs"
MAX_METRICS_PER_BATCH = 1000
REACH_TIMEOUT_S = 10


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for other stores)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _check_reachable(uri: str, create: bool) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S) as r:
                r.read(64)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"tracking server {uri} is unreachable: {reason}") from None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    elif (path := sqlite_path(uri)) is not None:
        parent = path.absolute().parent
        if not parent.is_dir():
            raise UserError(f"tracking store {uri}: folder {parent} does not exist")
        if not create and not path.exists():
            raise UserError(f"no MLflow store at {uri}: nothing has been run there yet (adareg sweep run FILE)")


def connect(uri: str | None = None, create: bool = True):
    """An ``MlflowClient`` on a reachable store (UserError naming the URI otherwise). With
    ``create=False`` a missing sqlite store is an error instead of a new empty file (for readers)."""
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # store migrations log at INFO on stderr: keep the CLI's output clean
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    _check_reachable(uri, create)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str) -> str:
    """The experiment's id, creating it if needed. Call from ONE process before workers start: a new
    sqlite store migrates its schema on first use and concurrent first uses crash."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"experiment {name!r} is deleted in {client.tracking_uri}: restore it or use another name")
        return exp.experiment_id
    except MlflowException as e:
        raise UserError(f"tracking store {client.tracking_uri}: {str(e).splitlines()[0]}") from None


def find_runs(client, experiment_name: str, run_keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``{run_key: Run}`` for the experiment's runs (all, or those keys), in bulk. Should a key have
    several runs (never made by adareg), the FINISHED one, else the newest, wins."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return {}
    wanted = set(run_keys) if run_keys is not None else None
    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="", max_results=1000, page_token=token)
        for run in page:
            key = run.data.tags.get(TAG_RUN_KEY)
            if key is None or (wanted is not None and key not in wanted):
                continue
            old = found.get(key)
            if old is None or _rank(run) > _rank(old):
                found[key] = run
        token = page.token
        if not token:
            return found


def _rank(run) -> tuple[int, int]:
    return (run.info.status == "FINISHED", run.info.start_time or 0)


def find_run(client, experiment_id: str, key: str):
    """The run with ``adareg.run_key == key`` (FINISHED preferred), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}'", max_results=50)
    return max(runs, key=_rank) if runs else None


def config_params(config: RunConfig) -> dict[str, str]:
    """Every config field as an MLflow param (lists as compact JSON)."""
    out = {}
    for k, v in config.to_dict().items():
        out[k] = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)
    return out


def _metric_rows(epochs: Sequence[tuple[int, dict[str, float]]]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, int(epoch)) for epoch, metrics in epochs for k, v in metrics.items()]


def log_epochs(client, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Log whole epochs with ``log_batch``, never splitting an epoch across two calls."""
    per_call = max(1, MAX_METRICS_PER_BATCH // len(METRICS))
    for i in range(0, len(epochs), per_call):
        client.log_batch(run_id, metrics=_metric_rows(epochs[i:i + per_call]), synchronous=True)


def logged_steps(client, run_id: str) -> dict[str, set[int]]:
    """``{metric: steps}`` that MLflow holds for a run."""
    return {m: {h.step for h in client.get_metric_history(run_id, m)} for m in METRICS}


class RunLogger(Callback):
    """Training callback that mirrors a run into MLflow, creating or re-attaching the run on start."""

    def __init__(self, client, experiment_id: str, sweep: str | None = None, existing_run=None,
                 tags: dict[str, str] | None = None):
        self.client = client
        self.tags = dict(tags or {})
        self.experiment_id = experiment_id
        self.sweep = sweep
        self.run = existing_run
        self.run_id: str | None = existing_run.info.run_id if existing_run is not None else None

    def on_start(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        if self.run is None:
            tags = {
                **self.tags, TAG_RUN_KEY: run_key(config), TAG_GROUP_KEY: group_key(config),
                TAG_TOTAL_EPOCHS: str(len(plan)), TAG_ATTEMPTS: "1",
            }
            if self.sweep:
                tags[TAG_SWEEP] = self.sweep
            name = f"{config.scheme}-{config.arch}-{config.dataset}-s{config.seed}"
            self.run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
            self.run_id = self.run.info.run_id

            self._log_params(config)
            self.have: dict[str, set[int]] = {m: set() for m in METRICS}
        else:
            if not self.run.data.params:  # killed between creating the run and logging its params
                self._log_params(config)
            attempts = int(self.run.data.tags.get(TAG_ATTEMPTS, "0")) + 1
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, TAG_ATTEMPTS, str(attempts))
            self.client.set_tag(self.run_id, TAG_FAILURE, "")
            self.have = logged_steps(self.client, self.run_id)
        self._log([(int(entry["epoch"]), history_metrics(entry)) for entry in history])

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._log([(epoch, metrics)])

    def _log_params(self, config: RunConfig) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in config_params(config).items()]
        self.client.log_batch(self.run_id, params=params, synchronous=True)

    def _log(self, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
        """Log what MLflow lacks of these epochs: a step is never logged twice."""
        missing = []
        for epoch, metrics in epochs:
            new = {k: v for k, v in metrics.items() if epoch not in self.have[k]}
            if new:
                missing.append((epoch, new))
        if missing:
            log_epochs(self.client, self.run_id, missing)
            for epoch, new in missing:
                for k in new:
                    self.have[k].add(epoch)

    def finish(self, status: str, failure: str | None = None, reason: str | None = None) -> None:
        """Terminate the run (no-op if it was never created)."""
        if self.run_id is None:
            return
        if failure:
            self.client.set_tag(self.run_id, TAG_FAILURE, failure)
            self.client.set_tag(self.run_id, TAG_FAILURE_REASON, (reason or "")[:4000])
        elif status == "FINISHED":
            self.client.set_tag(self.run_id, TAG_FAILURE, "")
        self.client.set_terminated(self.run_id, status=status)

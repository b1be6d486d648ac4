"""Runs in the store: the experiment, finding a key's active run, its params, logging and reading its epochs.

A run is found by its tag ``adareg.run_key`` (superseded runs excluded, see ``orchestrator.store.claims``);
it carries ``adareg.group_key`` and ``adareg.sweep``, a param for every config field, and per-epoch
metrics (step = epoch, from 1) written with ``log_batch``, never an epoch split across two calls.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator.errors import UserError, one_line
from orchestrator.store import claims
from orchestrator.store.client import is_transient, refusal
from orchestrator.store.tags import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, TAG_NOTE, TAG_RUN_KEY
from orchestrator.store.uri import sqlite_path
from training.config import RunConfig

MAX_METRICS_PER_BATCH = 1000


def ensure_experiment(client, name: str, description: str | None = None) -> str:
    """The experiment's id, creating it if needed, with the tags that make the MLflow UI open on its
    training runs (``mlflow.experimentKind``) and its description (``mlflow.note.content``)."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
            if description:
                tags[TAG_NOTE] = description
            try:
                return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                                tags=tags)
            except MlflowException as e:  # created meanwhile by another process
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise e from None
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"experiment {name!r} is deleted in {client.tracking_uri}: restore it or use another name")
        if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        if description and not exp.tags.get(TAG_NOTE):
            client.set_experiment_tag(exp.experiment_id, TAG_NOTE, description)
        return exp.experiment_id
    except MlflowException as e:
        if is_transient(e):
            raise
        raise refusal(e, client.tracking_uri, f"opening experiment {name!r}") \
            or UserError(f"tracking store {client.tracking_uri}: {one_line(e)}") from None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database file
    (``mlartifacts/<experiment>``), not in MLflow's default ``./mlruns`` of whatever directory the process
    creating it happened to run in. None (the store's default) for other stores."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (path.resolve().parent / "mlartifacts" / safe).as_uri()


def check_writable(client, experiment_id: str, name: str) -> None:
    """Refused at once (``StoreRefused``) where the tracking server would refuse this user's runs in the
    experiment (a user with READ permission only): one write that changes nothing, before any run starts."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    except MlflowException as e:
        if (refused := refusal(e, client.tracking_uri, f"writing to experiment {name!r}")) is not None:
            raise refused from None
        raise


def _active(run) -> bool:
    return not claims.is_superseded(run)


def find_runs(client, experiment_name: str, run_keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``{run_key: Run}`` for the experiment's active runs (all keys, or those), in bulk. Superseded and
    deleted runs are left out; should a key still have several, the FINISHED one, else the earliest, wins."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return {}
    wanted = set(run_keys) if run_keys is not None else None
    return {key: runs[0] for key, runs in _active_by_key(client, exp.experiment_id).items()
            if wanted is None or key in wanted}


def _active_by_key(client, experiment_id: str) -> dict[str, list]:
    """``{run_key: [active runs, best first]}`` for the whole experiment, read in pages of 1000."""
    by_key: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="", max_results=1000, page_token=token)
        for run in page:
            key = run.data.tags.get(TAG_RUN_KEY)
            if key is not None and _active(run):
                by_key.setdefault(key, []).append(run)
        token = page.token
        if not token:
            return {key: sorted(runs, key=_rank) for key, runs in by_key.items()}


def end_strays(client, experiment_id: str, lease_s: float = claims.DEFAULT_LEASE_S) -> list[str]:
    """Supersede the runs a creator left behind when it was killed while losing a creation race (between
    creating its run and deleting it): a key's second active run, not FINISHED, that no live process
    holds. Empty ones are deleted, as their creator would have done. Returns their run ids."""
    ended = []
    for runs in _active_by_key(client, experiment_id).values():
        first = runs[0]
        for run in runs[1:]:
            h = claims.holder(run.data.tags, lease_s=lease_s)
            if run.info.status == "FINISHED" or (h is not None and h.live):
                continue
            claims.supersede(client, run, f"a second run of its key, left by a process killed while it lost "
                                          f"the creation race to run {first.info.run_id}", by=first.info.run_id)
            if not run.data.metrics:
                client.delete_run(run.info.run_id)
            ended.append(run.info.run_id)
    return ended


def _rank(run) -> tuple:
    """Sort key of a key's runs, best first: FINISHED, then the creation race's winner."""
    return (run.info.status != "FINISHED", *claims.creation_order(run))


def active_runs(client, experiment_id: str, key: str) -> list:
    """The key's runs that are not superseded (nor deleted), best first."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}'", max_results=100)
    return sorted((r for r in runs if _active(r)), key=_rank)


def find_run(client, experiment_id: str, key: str):
    """The active run with ``adareg.run_key == key`` (FINISHED preferred), or None."""
    runs = active_runs(client, experiment_id, key)
    return runs[0] if runs else None


PARAM_LENGTH = 5000
"""Longest param value logged as it is (MLflow refuses values over 6000 characters); a longer one (the
per-epoch values of a taper on a long cosine schedule) is logged shortened, with its length and digest."""


def config_params(config: RunConfig) -> dict[str, str]:
    """Every config field as an MLflow param a researcher can filter on: a grid (phases x steps) or list
    whose values are all equal as that one number, one whose phases are equal as its per-step list, else
    compact JSON; unset fields (None, empty) left out. Values over ``PARAM_LENGTH`` characters are shortened,
    the run key being what identifies the run."""
    out = {}
    for k, v in config.to_dict().items():
        if v is None or (isinstance(v, (list, tuple, dict, str)) and not v):
            continue
        text = _param_text(v)
        if len(text) > PARAM_LENGTH:
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            text = f"{text[:PARAM_LENGTH - 80]}... ({len(text)} characters, sha256 {digest})"
        out[k] = text
    return out


def _param_text(value: Any) -> str:
    if not isinstance(value, (list, tuple, dict)):
        return str(value)
    if isinstance(value, (list, tuple)):
        rows = [tuple(r) if isinstance(r, (list, tuple)) else r for r in value]
        flat = [x for r in rows for x in (r if isinstance(r, tuple) else (r,))]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
            if len(set(flat)) == 1:
                return str(flat[0])
            if all(isinstance(r, tuple) for r in rows) and len(set(rows)) == 1:
                value = list(rows[0])
    return json.dumps(value, separators=(",", ":"))


def _metric_rows(epochs: Sequence[tuple[int, dict[str, float]]]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, int(epoch)) for epoch, metrics in epochs for k, v in metrics.items()]


def log_epochs(client, run_id: str, epochs: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Log whole epochs with ``log_batch``, never splitting an epoch across two calls."""
    width = max((len(m) for _, m in epochs), default=1)
    per_call = max(1, MAX_METRICS_PER_BATCH // width)
    for i in range(0, len(epochs), per_call):
        client.log_batch(run_id, metrics=_metric_rows(epochs[i:i + per_call]), synchronous=True)


def logged_history(client, run) -> dict[str, dict[int, list[float]]]:
    """``{metric: {step: [values]}}`` that MLflow holds for a run (several values: a step logged twice)."""
    out: dict[str, dict[int, list[float]]] = {}
    for name in run.data.metrics:
        steps: dict[int, list[float]] = {}
        for m in client.get_metric_history(run.info.run_id, name):
            steps.setdefault(int(m.step), []).append(float(m.value))
        out[name] = steps
    return out


def produced_by(logged: dict[str, dict[int, list[float]]], history: Sequence[dict[str, float]]) -> str | None:
    """None if every value MLflow holds is the checkpoint history's value of that metric and epoch (the
    checkpoint's training produced it: resuming continues one curve); else why not. Timing metrics differ
    between any two trainings, so this tells trainings apart even where the losses are bit-identical."""
    by_epoch = {int(h["epoch"]): h for h in history}
    for name, steps in logged.items():
        for step, values in steps.items():
            entry = by_epoch.get(step)
            if entry is None:
                return f"MLflow holds epoch {step} of {name}, the checkpoint only {len(history)} epochs"
            if len(values) > 1 or name not in entry or float(entry[name]) != values[0]:
                return f"MLflow's {name} at epoch {step} is not the checkpoint's"
    return None


"""MLflow: the source of truth for what is done. The one module of the run's life that talks to it.

A run is found by its tag ``adareg.run_key`` (superseded runs excluded, see ``orchestrator.store.claims``); it
carries ``adareg.group_key`` and ``adareg.sweep``, a param for every config field, and per-epoch metrics
(step = epoch, from 1) written with ``log_batch``. ``RunLogger`` creates or claims the MLflow run only once
training really starts (data loaded, checkpoint restored), so bad input never leaves a run behind.

Infrastructure trouble (server unreachable, HTTP 5xx, connection resets, "database is locked", a
database restart) is *transient*: ``Store.call`` retries it with backoff for up to an outage budget, and
``RunLogger`` keeps training while the store is down, buffering epochs (the checkpoint holds them anyway)
and flushing them on recovery. Only bad input is final.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.store import claims
from orchestrator.errors import UserError, one_line
from orchestrator.identity import TAG_GROUP_KEY, TAG_RUN_KEY, TAG_SWEEP, group_key, run_key
from training.callbacks import Callback, history_metrics
from training.config import RunConfig
from training.schedules import EpochPlan

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_FAILURE = "adareg.failure"  # "diverged" | "error" | "killed" | "pruned" | ...
TAG_FAILURE_REASON = "adareg.failure_reason"
TAG_ATTEMPTS = "adareg.attempts"
TAG_TOTAL_EPOCHS = "adareg.total_epochs"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TAG_NOTE = "mlflow.note.content"
EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI then opens on the runs table
MAX_METRICS_PER_BATCH = 1000
REACH_TIMEOUT_S = 10
DEFAULT_STORE_TIMEOUT_S = 900.0
T = TypeVar("T")


class StoreDown(Exception):
    """The tracking store stayed unreachable for the whole outage budget."""


# ------------------------------------------------------------------------------------------- URIs


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's default ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI, parsed as SQLAlchemy parses it (query arguments such as
    ``?timeout=60`` and ``%20`` escapes understood); None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (query arguments kept), so that workers started in
    other folders find the same store."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).set(database=str(path.resolve())).render_as_string(hide_password=False)


def store_exists(uri: str) -> bool:
    """False only for a sqlite store whose file does not exist yet (nothing has been run there)."""
    path = sqlite_path(uri)
    return path is None or path.exists()


# ----------------------------------------------------------------------------------- transient errors


_TRANSIENT_WORDS = ("failed with exception", "failed with timeout", "database is locked", "connection refused",
                    "connection reset", "could not connect", "server closed the connection", "connection aborted",
                    "max retries exceeded", "temporarily unavailable", "operationalerror", "terminating connection",
                    "remote end closed", "bad gateway", "service unavailable", "gateway timeout")
_TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "ABORTED", "ENDPOINT_NOT_FOUND")


def is_transient(e: BaseException) -> bool:
    """Infrastructure trouble worth retrying (store unreachable, 5xx, a locked or restarting database), as
    opposed to a request that is wrong and would fail again."""
    if isinstance(e, (ConnectionError, TimeoutError, urllib.error.URLError)):
        return True
    try:
        import requests

        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.ChunkedEncodingError)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    try:
        import sqlalchemy.exc

        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        text = str(e).lower()
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
        if e.error_code in _TRANSIENT_CODES:
            return True
        with contextlib.suppress(Exception):
            return e.get_http_status_code() >= 500
    cause = e.__cause__ or e.__context__
    return cause is not None and cause is not e and is_transient(cause)


class Store:
    """An MlflowClient whose calls retry transient errors with backoff, for up to ``budget_s`` seconds of
    outage (counted from the first failure of a call) before raising ``StoreDown``."""

    def __init__(self, uri: str | None, budget_s: float = DEFAULT_STORE_TIMEOUT_S,
                 on_wait: Callable[[str], None] | None = None, max_delay_s: float = 30.0):
        self.uri = resolve_tracking_uri(uri)
        self.budget_s, self.on_wait, self.max_delay_s = budget_s, on_wait, max_delay_s
        self._client = None

    @property
    def client(self):
        """The MlflowClient (connecting on first use: an unreachable store raises a transient error, which
        the enclosing ``call`` retries)."""
        if self._client is None:
            self._client = connect(self.uri, transient_errors=True)
        return self._client

    def call(self, fn: Callable[[], T], what: str = "", budget_s: float | None = None) -> T:
        """``fn()``, retrying transient errors for up to ``budget_s`` (default: the store's budget)."""
        budget = self.budget_s if budget_s is None else min(budget_s, self.budget_s)
        first, delay = None, 1.0
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - sorted into transient and final below
                if not is_transient(e):
                    raise
                now = time.monotonic()
                first = first if first is not None else now
                if now - first >= budget:
                    raise StoreDown(f"tracking store {self.uri} unreachable for {now - first:.0f}s: "
                                    f"{one_line(e)}") from None
                if self.on_wait:
                    self.on_wait(f"tracking store unreachable ({one_line(e)}); retrying in {delay:.0f}s"
                                 + (f" [{what}]" if what else ""))
                time.sleep(min(delay, max(0.0, budget - (now - first))))
                delay = min(delay * 2, self.max_delay_s)


# ----------------------------------------------------------------------------------------- connect


def _check_reachable(uri: str, create: bool, transient_errors: bool = False) -> None:
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S) as r:
                r.read(64)
        except (urllib.error.URLError, OSError, ValueError) as e:
            if transient_errors and not isinstance(e, ValueError):
                raise ConnectionError(f"tracking server {uri} is unreachable: {getattr(e, 'reason', e)}") from None
            raise StoreUnreachable(f"tracking server {uri} is unreachable: {getattr(e, 'reason', e)}") from None
    elif (path := sqlite_path(uri)) is not None:
        parent = path.absolute().parent
        if not parent.is_dir():
            raise UserError(f"tracking store {uri}: folder {parent} does not exist")
        if not create and not path.exists():
            raise UserError(f"no MLflow store at {uri}: nothing has been run there yet (adareg sweep run FILE)")


class StoreUnreachable(UserError):
    """The tracking store cannot be reached now (try again later): exit 75, not bad input."""

    exit_code = 75


def connect(uri: str | None = None, create: bool = True, transient_errors: bool = False):
    """An ``MlflowClient`` on a reachable, initialised store (StoreUnreachable naming the URI otherwise;
    with ``transient_errors`` a ConnectionError that ``Store`` retries). With ``create=False`` a missing
    sqlite store is an error instead of a new empty file (for readers).

    A new store migrates its schema on first use and concurrent first uses crash, so the first use happens
    under a lock: an OS file lock beside a sqlite store, a PostgreSQL advisory lock in a PostgreSQL one (an
    ``mlflow server`` initialises its own). Any number of processes may open a fresh store at once. A new
    sqlite store is built under another name and linked into place complete (``_create_sqlite``): a process
    killed while migrating leaves no half-migrated store behind (PostgreSQL's DDL is transactional).
    """
    from mlflow import MlflowClient

    for name in ("mlflow", "alembic"):  # store migrations log at INFO on stderr: keep the CLI's output clean
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    _check_reachable(uri, create, transient_errors)
    path = sqlite_path(uri)
    if path is None and not uri.startswith("postgresql"):
        return MlflowClient(tracking_uri=uri)
    try:
        with _first_use_lock(uri, path):
            if path is not None and not path.exists():
                _create_sqlite(uri, path)
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
            return client
    except Exception as e:
        if path is not None or not is_transient(e):
            raise
        from sqlalchemy.engine import make_url

        why = f"tracking store {make_url(uri).render_as_string(hide_password=True)} is unreachable: {one_line(e)}"
        raise (ConnectionError if transient_errors else StoreUnreachable)(why) from None


INIT_LOCK_KEY = 0x6164617265670001  # PostgreSQL advisory lock of a store's first use ("adareg" + 1)


@contextlib.contextmanager
def _first_use_lock(uri: str, path: Path | None):
    if path is not None:
        fd = os.open(path.absolute().with_name(path.name + ".adareg-init.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
        return
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as conn:  # the lock ends with the session
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": INIT_LOCK_KEY})
            yield
    finally:
        engine.dispose()


def _create_sqlite(uri: str, path: Path) -> None:
    """A new sqlite store at ``path``, all or nothing: MLflow creates and migrates its schema (dozens of
    migrations, seconds, not one transaction) in ``<name>.adareg-new``, which is then linked to ``path``.
    The caller holds the store's init lock, so a leftover ``.adareg-new`` is a killed creator's: rebuilt."""
    from mlflow import MlflowClient
    from sqlalchemy.engine import make_url

    new = path.absolute().with_name(path.name + ".adareg-new")
    for leftover in (new, new.with_name(new.name + "-journal")):
        leftover.unlink(missing_ok=True)
    new_uri = make_url(uri).set(database=str(new)).render_as_string(hide_password=False)
    MlflowClient(tracking_uri=new_uri).search_experiments(max_results=1)
    try:
        os.link(new, path)  # never replaces a store that another program created meanwhile
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not path.exists():
            os.rename(new, path)
    new.unlink(missing_ok=True)


def ui_url(base: str, experiment_id: str | None = None) -> str:
    """A link into the MLflow UI that opens on the training runs: MLflow 3.17's UI starts in its GenAI
    mode (traces overview) whatever the experiment's kind; ``workflowType=machine_learning`` switches it
    to "Model training", and the UI remembers the choice."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"


def probe(uri: str) -> bool:
    """Whether the store answers now, its database included: an ``mlflow server`` answers ``/health``
    while the PostgreSQL behind it restarts. Never raises; a server's database outage takes the client's
    few HTTP retries (seconds) to report."""
    try:
        connect(uri).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not now"
        return False


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
                return client.create_experiment(name, tags=tags)
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
        raise UserError(f"tracking store {client.tracking_uri}: {one_line(e)}") from None


# ------------------------------------------------------------------------------------------- finding


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


def _rank(run) -> tuple[int, int, str]:
    """Sort key of a key's runs, best first: FINISHED, then the earliest created (the race winner)."""
    return (run.info.status != "FINISHED", run.info.start_time or 0, run.info.run_id)


def active_runs(client, experiment_id: str, key: str) -> list:
    """The key's runs that are not superseded (nor deleted), best first."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{key}'", max_results=100)
    return sorted((r for r in runs if _active(r)), key=_rank)


def find_run(client, experiment_id: str, key: str):
    """The active run with ``adareg.run_key == key`` (FINISHED preferred), or None."""
    runs = active_runs(client, experiment_id, key)
    return runs[0] if runs else None


def config_params(config: RunConfig) -> dict[str, str]:
    """Every config field as an MLflow param (lists as compact JSON)."""
    import json

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


# ------------------------------------------------------------------------------------------ logging


class AlreadyFinished(Exception):
    """The key's run was finished (by another process) before this one could claim it."""

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} is already finished")
        self.run_id = run_id


class RunLogger(Callback):
    """Training callback that mirrors a run into MLflow under a claim.

    On start it finds the key's active run and claims it (Busy if a live process holds it), or creates it
    (Busy if a concurrent creator wins). A run whose logged history the checkpoint did not produce (no
    checkpoint, another training's, an older one) is superseded and a fresh run is started: a logged curve
    is always one training. Then it logs the epochs the checkpoint holds and MLflow lacks, and every new
    epoch once; a heartbeat thread keeps the claim alive. While the store is down, epochs are buffered and
    training goes on; after ``store.budget_s`` of outage ``StoreDown`` ends the run (resumable).
    """

    def __init__(self, store: Store, experiment_id: str, sweep: str | None = None, tags: dict[str, str] | None = None,
                 *, owner: claims.Owner, lease_s: float = claims.DEFAULT_LEASE_S,
                 note: Callable[[str], None] | None = None):
        self.store, self.experiment_id, self.sweep = store, experiment_id, sweep
        self.tags = dict(tags or {})
        self.owner, self.lease_s = owner, lease_s
        self.note = note or (lambda message: None)
        self.run_id: str | None = None
        self.candidate = None  # the key's run as the worker found it, before claiming (see ``finish``)
        self.superseded: str | None = None  # why an earlier run of the key was superseded
        self.have: dict[str, set[int]] = {}
        self.pending: list[tuple[int, dict[str, float]]] = []
        self._stale_have = False
        self._down_since: float | None = None
        self._next_try = 0.0
        self._delay = 1.0
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    # -- start: claim or create, never splice
    def attach(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        """Claim or create the key's run now (Busy, AlreadyFinished otherwise); ``on_start`` does it when
        this was not done before (a pack claims every member before it starts)."""
        self.store.call(lambda: self._attach(config, plan, history), "claiming the run")

    def on_start(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        if self.run_id is None:
            self.attach(config, plan, history)
        self.pending = [(int(entry["epoch"]), history_metrics(entry)) for entry in history]
        self._flush(blocking=True)
        self._beat = threading.Thread(target=self._heartbeat, name="adareg-heartbeat", daemon=True)
        self._beat.start()

    def _attach(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        client, key = self.store.client, run_key(config)
        run = find_run(client, self.experiment_id, key)
        if run is not None and run.info.status == "FINISHED":
            raise AlreadyFinished(run.info.run_id)
        if run is not None:
            run = claims.claim(client, run, self.owner, lease_s=self.lease_s)
            logged = logged_history(client, run)
            why = produced_by(logged, history) if any(logged.values()) else None
            if why is not None:
                self.superseded = (f"run {run.info.run_id} superseded: {why}; "
                                   + ("resuming the checkpoint in a new run" if history else "restarting from epoch 1"))
                claims.supersede(client, run, why)
                self.note(self.superseded)
                old, run = run, None
        if run is None:
            tags = {**self.tags, TAG_RUN_KEY: key, TAG_GROUP_KEY: group_key(config),
                    TAG_TOTAL_EPOCHS: str(len(plan)), TAG_ATTEMPTS: "1"}
            if self.sweep:
                tags[TAG_SWEEP] = self.sweep
            name = f"{config.scheme}-{config.arch}-{config.dataset}-s{config.seed}"
            run = claims.create_claimed(client, self.experiment_id, tags, name, self.owner,
                                        lambda: active_runs(client, self.experiment_id, key))
            self.run_id = run.info.run_id
            if self.superseded:
                client.set_tag(old.info.run_id, claims.TAG_SUPERSEDED_BY, self.run_id)
            self.have = {}
        else:
            self.run_id = run.info.run_id
            attempts = int(run.data.tags.get(TAG_ATTEMPTS, "0") or 0) + 1
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, TAG_ATTEMPTS, str(attempts))
            client.set_tag(self.run_id, TAG_FAILURE, "")
            self.have = {name: set(steps) for name, steps in logged_history(client, run).items()}
        if not run.data.params:  # new, or killed between creating the run and logging its params
            self._log_params(config)

    def _log_params(self, config: RunConfig) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in config_params(config).items()]
        self.store.client.log_batch(self.run_id, params=params, synchronous=True)

    # -- every epoch
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.pending.append((epoch, dict(metrics)))
        self._flush(blocking=False)

    def _flush(self, blocking: bool) -> None:
        """Log what MLflow lacks of the pending epochs (a step is never logged twice). Non-blocking while
        the store is down: the epochs wait for the next try; past the outage budget, StoreDown."""
        while self.pending:
            now = time.monotonic()
            if self._down_since is not None and now < self._next_try:
                if now - self._down_since >= self.store.budget_s:
                    raise StoreDown(f"tracking store {self.store.uri} unreachable for {now - self._down_since:.0f}s; "
                                    f"{len(self.pending)} epochs kept in the checkpoint")
                if not blocking:
                    return
                time.sleep(min(self._next_try - now, 1.0))
                continue
            try:
                self._log_pending()
            except Exception as e:  # noqa: BLE001 - transient ones are retried, the rest raised
                if not is_transient(e):
                    raise
                self._stale_have = True  # the failed call may have been stored: look before logging again
                if self._down_since is None:
                    self._down_since = now
                    self.note(f"tracking store unreachable ({one_line(e)}); training goes on, epochs are buffered")
                self._next_try, self._delay = now + self._delay, min(self._delay * 2, 30.0)
                continue
            if self._down_since is not None:
                self.note(f"tracking store back after {now - self._down_since:.0f}s; buffered epochs logged")
            self._down_since, self._delay = None, 1.0

    def _log_pending(self) -> None:
        client = self.store.client
        if self._stale_have:
            if not claims.still_mine(client, self.run_id, self.owner):
                raise claims.Busy(f"run {self.run_id} was taken over by another process while the store was down")
            run = client.get_run(self.run_id)
            self.have = {name: set(steps) for name, steps in logged_history(client, run).items()}
            self._stale_have = False
        missing = []
        for epoch, metrics in self.pending:
            new = {k: v for k, v in metrics.items() if epoch not in self.have.get(k, ())}
            if new:
                missing.append((epoch, new))
        if missing:
            if not claims.still_mine(client, self.run_id, self.owner):
                raise claims.Busy(f"run {self.run_id} was taken over by another process")
            log_epochs(client, self.run_id, missing)
            for epoch, new in missing:
                for k in new:
                    self.have.setdefault(k, set()).add(epoch)
        self.pending = []

    def _heartbeat(self) -> None:
        every = max(0.5, min(30.0, self.lease_s / 5))
        while not self._stop_beat.wait(every):
            with contextlib.suppress(Exception):  # a missed beat is retried; the lease is several beats long
                claims.beat(self.store.client, self.run_id)

    # -- the end
    def _end_orphan(self, run_id: str) -> None:
        """Stopped before claiming the key's run: a run left RUNNING by a dead worker is marked KILLED
        (resumable) unless a live process holds it now."""
        client = self.store.client
        run = client.get_run(run_id)
        h = claims.holder(run.data.tags, lease_s=self.lease_s, my_run_dir=self.owner.run_dir)
        if run.info.status == "RUNNING" and (h is None or not h.live or h.owner.id == self.owner.id):
            client.set_terminated(run_id, status="KILLED")

    def abandon(self) -> None:
        """Stop heartbeating without touching the run: it is not, or no longer, this process's."""
        self._stop_beat.set()

    def finish(self, status: str, failure: str | None = None, reason: str | None = None,
               blocking: bool = True) -> None:
        """Log what is pending (waiting for the store up to its budget when ``blocking``), then end the run
        with ``status`` and give up the claim. No-op if the run was never created."""
        self._stop_beat.set()
        if self.run_id is None:
            if self.candidate is not None and status != "FINISHED":
                with contextlib.suppress(Exception):
                    self._end_orphan(self.candidate.info.run_id)
            return
        if blocking:
            self._flush(blocking=True)
        else:
            with contextlib.suppress(Exception):
                self._flush(blocking=False)

        def end() -> None:
            client = self.store.client
            if failure:
                client.set_tag(self.run_id, TAG_FAILURE, failure)
                client.set_tag(self.run_id, TAG_FAILURE_REASON, (reason or "")[:4000])
            elif status == "FINISHED":
                client.set_tag(self.run_id, TAG_FAILURE, "")
            client.set_terminated(self.run_id, status=status)
            claims.release(client, self.run_id)

        if blocking:
            self.store.call(end, "ending the run")
        else:
            with contextlib.suppress(Exception):
                end()

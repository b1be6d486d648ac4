"""The MLflow client: connecting (a new store initialised exactly once), and retrying infrastructure trouble.

Infrastructure trouble (server unreachable, HTTP 5xx, connection resets, "database is locked", a
database restart) is *transient*: ``Store.call`` retries it with backoff for up to an outage budget
before raising ``StoreDown``. Only bad input is final.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from orchestrator.errors import UserError, one_line
from orchestrator.store.uri import resolve_tracking_uri, sqlite_path

REACH_TIMEOUT_S = 10
DEFAULT_STORE_TIMEOUT_S = 900.0
T = TypeVar("T")


class StoreDown(Exception):
    """The tracking store stayed unreachable for the whole outage budget."""


_TRANSIENT_WORDS = ("failed with exception", "failed with timeout", "database is locked", "connection refused",
                    "connection reset", "could not connect", "server closed the connection", "connection aborted",
                    "max retries exceeded", "temporarily unavailable", "operationalerror", "terminating connection",
                    "remote end closed", "bad gateway", "service unavailable", "gateway timeout")


_TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "ABORTED", "ENDPOINT_NOT_FOUND")


def is_transient(e: BaseException) -> bool:
    """Infrastructure trouble worth retrying (store unreachable, 5xx, a locked or restarting database), as
    opposed to a request that is wrong and would fail again. A ``UserError`` is never transient, whatever it
    was raised from (``StoreUnreachable`` is the at-once answer of a command that is told to fail fast)."""
    if isinstance(e, UserError):
        return False
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


class StoreRefused(UserError):
    """The tracking server refused this user (HTTP 401: not authenticated; 403: no permission): bad input,
    never retried, nothing counted against a run (exit 2)."""


def refusal(e: BaseException, uri: str, what: str) -> StoreRefused | None:
    """``e`` as the one line a user needs when it is a tracking server's 401 or 403 (None otherwise): the
    server, the user (``MLFLOW_TRACKING_USERNAME``) and ``what`` was refused."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return None
    code = e.error_code
    with contextlib.suppress(Exception):
        code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(e.get_http_status_code(), code)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    who = f"user {user!r}" if user else "a request without credentials (MLFLOW_TRACKING_USERNAME is not set)"
    if code == "UNAUTHENTICATED":
        return StoreRefused(f"tracking server {uri} refused {who} {what} (HTTP 401: not authenticated): set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server")
    if code == "PERMISSION_DENIED":
        return StoreRefused(f"tracking server {uri} refused {who} {what} (HTTP 403: permission denied): the user "
                            "needs EDIT permission on the experiment (from its owner or an admin) to train there")
    return None


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
                    if (refused := refusal(e, self.uri, what or "a request")) is not None:
                        raise refused from None
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


def probe(uri: str) -> bool:
    """Whether the store answers now, its database included: an ``mlflow server`` answers ``/health``
    while the PostgreSQL behind it restarts. Never raises; a server's database outage takes the client's
    few HTTP retries (seconds) to report."""
    try:
        connect(uri).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not now"
        return False


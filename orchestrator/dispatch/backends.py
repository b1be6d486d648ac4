"""Where worker processes run: here (``LocalBackend``) or in Ray tasks (``RayBackend``).

Both start the same command, ``python -P -m orchestrator.run.worker RUN_DIR/spec.json``, one process per
run, in its run folder (nothing in the caller's folder can shadow adareg or its dependencies: ``-P`` and
``PYTHONSAFEPATH`` keep the working directory off ``sys.path``), its stdout and stderr appended to
``RUN_DIR/worker.log``, and hand back a job shaped like a ``concurrent.futures.Future``: ``done()``,
``result()`` (the worker's exit code; how the run ended is in its ``result.json``), plus
``terminate()`` (SIGTERM: the worker marks its run KILLED) and ``kill()`` (SIGKILL).

Processes are spawned (never forked) from the thread that runs the scheduler, which lives as long as
the orchestrator: the worker's PR_SET_PDEATHSIG fires when that thread ends, so workers die with it.

Ray is optional and imported only by ``RayBackend``. A remote Ray cluster runs workers on other
machines, so it must reach the same MLflow store and the same run folders: ``check_shared`` refuses a
local sqlite/file store, and a run folder the user has not vouched for with ``--shared-runs-dir``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

from orchestrator.dispatch.slots import Slot
from orchestrator.errors import BadValue, arg
from orchestrator.run.ending import EXIT_FAILED, EXIT_SIGTERM
from orchestrator.run.spec import PARENT_PID_ENV

SHARED_STORES = ("http://", "https://", "postgresql", "mysql", "mssql", "databricks")


class Job(Protocol):
    def done(self) -> bool: ...
    def result(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class Backend(Protocol):
    def submit(self, spec_path: Path, log_path: Path, slot: Slot) -> Job: ...
    def close(self) -> None: ...


def worker_command(spec_path: str | os.PathLike) -> list[str]:
    return [sys.executable, "-P", "-m", "orchestrator.run.worker", str(spec_path)]


def slot_env(slot: Slot) -> dict[str, str]:
    """Environment a worker needs on top of the orchestrator's: its GPU and its thread count."""
    env = {"OMP_NUM_THREADS": str(slot.threads), "MKL_NUM_THREADS": str(slot.threads), "PYTHONUNBUFFERED": "1"}
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    elif slot.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def spawn_worker(spec_path: str | os.PathLike, log_path: str | os.PathLike, env: dict[str, str]) -> subprocess.Popen:
    """Start one worker process; its output is appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} worker start: {spec_path}\n".encode())
        log.flush()
        env = {**os.environ, **env, "PYTHONSAFEPATH": "1", PARENT_PID_ENV: str(os.getpid())}
        return subprocess.Popen(worker_command(spec_path), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=Path(spec_path).parent,
                                start_new_session=False)


class LocalJob:
    """A worker process on this machine."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def _signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


class LocalBackend:
    """One subprocess per run, on this machine, with the slot's CUDA_VISIBLE_DEVICES and threads."""

    def submit(self, spec_path: Path, log_path: Path, slot: Slot) -> LocalJob:
        return LocalJob(spawn_worker(spec_path, log_path, slot_env(slot)))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- Ray


def run_worker_task(spec_path: str, log_path: str, env: dict[str, str]) -> int:
    """Body of a Ray task: the worker command, its exit code. ``ray.cancel`` (KeyboardInterrupt here)
    becomes SIGTERM to the worker, which marks its run KILLED."""
    proc = spawn_worker(spec_path, log_path, env)
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)  # a timed wait lets the cancellation in
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


class RayJob:
    """A Ray task running one worker."""

    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def done(self) -> bool:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self, timeout: float | None = None) -> int:
        try:
            return int(self.ray.get(self.ref, timeout=timeout))
        except self.ray.exceptions.TaskCancelledError:
            return EXIT_SIGTERM
        except self.ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"task {self.ref} still running") from None
        except self.ray.exceptions.RayError:  # a node or a Ray worker died: retryable
            return EXIT_FAILED

    def terminate(self) -> None:
        self.ray.cancel(self.ref)

    def kill(self) -> None:
        self.ray.cancel(self.ref, force=True)


def is_local_address(address: str | None) -> bool:
    """A Ray address that can only mean this machine (None/'local' start a private instance)."""
    if address in (None, "", "local"):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def check_shared(address: str | None, tracking_uri: str, runs_dir: Path, shared_runs_dir: bool) -> None:
    """Refuse a remote Ray cluster with a store or run folder its other nodes cannot reach.

    The rule: a remote address (anything but none, 'local', localhost or 127.*; 'auto' counts as
    remote) needs an http(s)/SQL-server tracking URI, and a run folder on storage every node mounts
    at the same path, which only the user can vouch for (``--shared-runs-dir``).
    """
    if is_local_address(address):
        return
    if not tracking_uri.startswith(SHARED_STORES):
        raise BadValue(f"{arg('ray_address')} {address} is a remote cluster, but tracking URI {tracking_uri} is "
                       "local to this machine: use an http(s):// MLflow server or a postgresql:// store")
    if not shared_runs_dir:
        raise BadValue(f"{arg('ray_address')} {address} is a remote cluster, but run folder {runs_dir} may be local to "
                       f"this machine: put {arg('runs_dir')} on storage every node mounts at the same path and pass "
                       f"{arg('shared_runs_dir')}")


def _signal_handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[int, object]) -> None:
    for signum, handler in handlers.items():
        if handler is not None:
            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread
                pass


class RayBackend:
    """Each run in a Ray task (``num_gpus`` = the slot's GPU share) that runs the worker command.

    Without an address it starts a private local Ray instance (its files in ``temp_dir``, removed on
    close); with one it joins that cluster.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                 temp_dir: str | None = None):
        try:
            import ray
        except ImportError:
            raise BadValue(f"{arg('backend')} ray needs Ray: pip install 'adareg[ray]'") from None
        self.ray = ray
        self._own_temp = None
        kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address in (None, "", "local"):
            if temp_dir is None:
                temp_dir = self._own_temp = tempfile.mkdtemp(prefix="ray")  # short: socket paths are limited
            kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=str(temp_dir))
        else:
            kwargs["address"] = address
        self._handlers = _signal_handlers()  # ray.init installs its own; close() puts ours back
        try:
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line naming the address
            raise BadValue(f"{arg('ray_address')} {address or 'local'}: cannot start or join Ray: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self._task = ray.remote(max_retries=0)(run_worker_task)

    def resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()

    def submit(self, spec_path: Path, log_path: Path, slot: Slot) -> RayJob:
        ref = self._task.options(num_cpus=slot.threads, num_gpus=slot.gpu_fraction).remote(
            str(spec_path), str(log_path), slot_env(slot))
        return RayJob(self.ray, ref)

    def close(self) -> None:
        self.ray.shutdown()
        _restore_signal_handlers(self._handlers)
        if self._own_temp:
            shutil.rmtree(self._own_temp, ignore_errors=True)

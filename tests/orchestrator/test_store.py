"""Opening a new MLflow store (sqlite, or PostgreSQL without a server in front): MLflow creates its schema in
dozens of migrations on first use, which neither tolerate two processes at once nor (on sqlite) a kill half-way:
a half-migrated store fails every later open with ``table _alembic_tmp_experiments already exists``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.store.client import StoreUnreachable, connect
from orchestrator.store.runs import ensure_experiment

ROOT = Path(__file__).resolve().parents[2]


def opener(uri: str) -> subprocess.Popen:
    code = f"from orchestrator.store.client import connect; connect({uri!r}).search_experiments()"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def migrating(folder: Path) -> bool:
    """Whether a database file in ``folder`` has content (sqlite's journal comes and goes meanwhile)."""
    for path in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if "lock" not in path.name and path.stat().st_size:
                return True
    return False


def assert_usable(uri: str) -> None:
    client = connect(uri)
    run = client.create_run(ensure_experiment(client, "usable"))
    client.log_metric(run.info.run_id, "test_loss", 1.5, step=1)
    assert client.get_metric_history(run.info.run_id, "test_loss")[0].value == 1.5


def test_processes_killed_while_creating_a_new_store_leave_no_half_store(tmp_path):
    """Creators of three new stores SIGKILLed 0.2, 0.5 and 0.8 s into the migration (on this machine the
    last two left MLflow's own half-migrated store: ``table evaluation_datasets already exists``, ``table
    _alembic_tmp_experiments already exists``): no store file appears, and the next open makes one that works."""
    killed = []
    for delay in (0.2, 0.5, 0.8):
        folder = tmp_path / str(delay)
        folder.mkdir()
        uri = f"sqlite:///{folder}/mlflow.db?timeout=30"
        proc = opener(uri)
        deadline = time.time() + 60
        while not migrating(folder):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.005)
        time.sleep(delay)
        proc.kill()
        if proc.wait() == -9:  # killed: half-way (no store), or after it linked the complete store into place
            killed.append((delay, (folder / "mlflow.db").exists()))
        assert_usable(uri)  # a half-migrated store would fail here ("table ... already exists")
        assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db", "mlflow.db.adareg-init.lock"]
    assert killed[:1] == [(0.2, False)]  # the first kill always lands mid-migration, and leaves nothing


def test_processes_opening_a_new_store_at_once_all_get_one_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [opener(uri) for _ in range(3)]
    assert [(p.wait(timeout=120), p.stderr.read()) for p in procs] == [(0, "")] * 3
    assert_usable(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.adareg-init.lock"]


def test_processes_opening_a_new_postgresql_store_at_once_all_get_it(postgres_uri):
    """Without the advisory lock all but one fail: ``duplicate key value violates unique constraint
    "pg_type_typname_nsp_index"`` while creating ``alembic_version``."""
    procs = [opener(postgres_uri) for _ in range(3)]
    assert [(p.wait(timeout=120), p.stderr.read()[-500:]) for p in procs] == [(0, "")] * 3
    assert_usable(postgres_uri)


def test_an_unreachable_postgresql_store_is_one_line_without_its_password():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(StoreUnreachable) as e:
        connect(f"postgresql://adareg:s3cret@127.0.0.1:{port}/runs")
    assert e.value.exit_code == 75
    message = str(e.value)
    assert message.startswith(f"tracking store postgresql://adareg:***@127.0.0.1:{port}/runs is unreachable: ")
    assert "\n" not in message and "s3cret" not in message
    with pytest.raises(ConnectionError):  # what Store retries
        connect(f"postgresql://adareg:s3cret@127.0.0.1:{port}/runs", transient_errors=True)


def test_a_launch_waits_for_a_locked_sqlite_store_instead_of_failing(tmp_path):
    """Another process holds the store's write lock for longer than sqlite's busy timeout (a worker held by
    SIGSTOP mid-transaction, a long migration): a sweep's start waits for it, saying so, like any other
    store trouble (it crashed with ``unexpected OperationalError: database is locked``)."""
    from orchestrator.dispatch.launch import Launch, LaunchOptions
    from orchestrator.sweep.file import load_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert opener(uri).wait(timeout=120) == 0  # made by another process: this one opens it afresh, as a CLI does
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(tmp_path / 'mlflow.db')!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(12)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        heard: list[str] = []
        launch = Launch.open(load_sweep(ROOT / "sweeps" / "demo.yaml"), LaunchOptions(gpus="none"),
                             tracking_uri=uri, runs_dir=tmp_path / "runs", note=heard.append)
    finally:
        holder.kill()
    assert launch.experiment_id and launch.client.get_experiment(launch.experiment_id).name == launch.sweep.experiment
    assert heard and all("database is locked" in m and "[opening the experiment]" in m for m in heard), heard


def test_a_sqlite_store_keeps_artifacts_beside_its_database_not_in_the_working_directory(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "store").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path}/store/mlflow.db")
    experiment = ensure_experiment(client, "adareg-demo x")
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "{}", "config.json")
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert len(list((tmp_path / "store" / "mlartifacts" / "adareg-demo_x").rglob("config.json"))) == 1

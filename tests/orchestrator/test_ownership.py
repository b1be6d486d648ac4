"""One owner per run, whatever shares the store (issue: several orchestrators, machines and tuners on one
MLflow server backed by PostgreSQL, and a real Ray cluster). Real orchestrators SIGKILLed at random, real
servers; every logged curve is compared with an uninterrupted reference training of the same run key."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from e2e import (
    FOUR_RUNS_EPOCHS,
    Store,
    assert_one_training_per_key,
    epochs_done,
    four_runs,
    killed_at_random,
    pause_at_epoch,
    run_bg,
    sweep_cmd,
    wait_until,
)
from servers import MlflowServer, RayCluster

pytestmark = pytest.mark.slow


def test_two_orchestrators_on_one_sqlite_store_killed_at_random(tmp_path, reference):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    history = killed_at_random(tmp_path, four_runs(tmp_path / "s.yaml"), uri, seed=int(time.time()) % 10_000,
                               extra=("--claim-lease", "60"))
    try:
        assert_one_training_per_key(Store(uri), reference, FOUR_RUNS_EPOCHS)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{history}") from None


def test_two_orchestrators_on_an_mlflow_server_on_postgresql_killed_at_random(tmp_path, postgres_uri, reference):
    with MlflowServer(postgres_uri, workdir=tmp_path / "server") as server:
        history = killed_at_random(tmp_path, four_runs(tmp_path / "s.yaml"), server.uri,
                                   seed=int(time.time()) % 10_000 + 1, extra=("--claim-lease", "60"))
    try:
        assert_one_training_per_key(Store(postgres_uri), reference, FOUR_RUNS_EPOCHS)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{history}") from None


def test_a_lost_run_folder_restarts_in_a_fresh_run_and_supersedes_the_old(tmp_path, reference):
    """The run folder is deleted (a cleaned scratch disk, a new machine) after the run was killed at epoch
    >= 3: the re-run trains from epoch 1 in a fresh MLflow run; the old one is kept, tagged superseded."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = four_runs(tmp_path / "s.yaml")
    runs = tmp_path / "runs"
    proc = run_bg(sweep_cmd(sweep, uri, runs, "--only", "seed=0"), tmp_path / "sweep.log")
    pause_at_epoch(runs, 2, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(uri)
    killed = {r["key"]: r["run_id"] for r in store.runs()}
    shutil.rmtree(runs)
    done = subprocess.run(sweep_cmd(sweep, uri, runs, "--only", "seed=0"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    active = store.active()
    for key, old_id in killed.items():
        assert active[key]["run_id"] != old_id and active[key]["status"] == "FINISHED"
        store.assert_once_per_epoch(active[key]["run_id"], FOUR_RUNS_EPOCHS)
        assert store.history(active[key]["run_id"]) == reference[key]
        (old,) = [r for r in store.runs() if r["run_id"] == old_id]
        assert old["superseded"].startswith("MLflow holds epoch 1 of "), old
        assert old["status"] == "KILLED"
        assert store.query("SELECT value FROM tags WHERE run_uuid = :r AND key = 'adareg.superseded_by'",
                           r=old_id) == [(active[key]["run_id"],)]
    # plan and report see the fresh runs only
    plan = subprocess.run(sweep_cmd(sweep, uri, runs, "--only", "seed=0")[:1] + ["sweep", "plan", str(sweep),
                          "--only", "seed=0", "--tracking-uri", uri, "--runs-dir", str(runs), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    import json

    assert {(r["run_id"], r["state"]) for r in json.loads(plan.stdout)} == {
        (active[k]["run_id"], "done") for k in killed}


def test_a_ray_worker_node_lost_mid_sweep(tmp_path):
    """A head (no CPUs) and two one-CPU worker nodes on loopback, a shared runs folder: the node running one
    of the two runs in flight is removed; that run is retried on the remaining node and the sweep finishes."""
    pytest.importorskip("ray")
    cluster = RayCluster(workers=2, num_cpus=1, head_cpus=0)
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        sweep = four_runs(tmp_path / "s.yaml")
        runs = tmp_path / "runs"
        cmd = sweep_cmd(sweep, uri, runs, "--only", "scheme=wd-1e-4", "--backend", "ray", "--ray-address",
                        cluster.address)
        proc = run_bg(cmd, tmp_path / "sweep.log", env={**os.environ, **cluster.env})
        wait_until(lambda: sum(1 for p in runs.glob("*/progress.json")) >= 2 and epochs_done(runs) >= 3, 300,
                   "two runs in flight")
        cluster.remove_worker("w2")
        code = proc.wait(timeout=600)
        out = (tmp_path / "sweep.log").read_text()
        assert code == 0, out
    finally:
        cluster.shutdown()
    store = Store(uri)
    active = store.active()
    assert len(active) == 2 and {r["status"] for r in active.values()} == {"FINISHED"}
    for run in active.values():
        store.assert_once_per_epoch(run["run_id"], FOUR_RUNS_EPOCHS)
    assert "retry 1 of 2" in out, out  # the lost node's run

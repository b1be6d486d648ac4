"""Reconcile: a run's state from its MLflow run (faked here) and its run folder."""

import fcntl
import json
import os
from types import SimpleNamespace

import pytest

from orchestrator.identity import plan, run_key
from orchestrator.run.folder import Attempt, RunFolder
from orchestrator.store import claims
from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER
from orchestrator.store.uri import absolute_tracking_uri, sqlite_path
from orchestrator.sweep.reconcile import RunDir, classify, counts, reconcile
from training.config import RunConfig

ELSEWHERE = claims.Owner("abc", "gpu-box-7", 4242, "/scratch/runs/k", 1_700_000_000.0)


def mlflow_run(status, run_id="r1", failure="", reason="", attempts=1, metrics=(), owner=None, beat=None):
    tags = {"adareg.failure": failure, "adareg.failure_reason": reason, "adareg.attempts": str(attempts)}
    if owner is not None:
        tags.update({TAG_OWNER: owner.tag(), TAG_HEARTBEAT: str(beat)})
    objs = [SimpleNamespace(key=k, value=v, step=step) for k, v, step in metrics]
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id),
                           data=SimpleNamespace(tags=tags, _metric_objs=objs))


@pytest.mark.parametrize("run, run_dir, expected", [
    (mlflow_run("FINISHED"), RunDir(), ("done", "")),
    (mlflow_run("FINISHED"), RunDir(locked_by=77), ("done", "")),
    (mlflow_run("RUNNING"), RunDir(locked_by=77), ("running", "held by a live worker here (pid 77)")),
    (None, RunDir(locked_by=0), ("running", "held by a live worker here")),  # starting: no MLflow run yet
    (mlflow_run("RUNNING"), RunDir(checkpoint=True), ("resumable", "running")),  # its worker died
    (mlflow_run("KILLED", failure="killed"), RunDir(), ("resumable", "killed")),
    (mlflow_run("FAILED", failure="diverged", reason="diverged at epoch 2: train loss is nan"), RunDir(),
     ("failed", "diverged at epoch 2: train loss is nan")),
    (mlflow_run("FAILED", failure="error", reason="OSError: disk full", attempts=2), RunDir(),
     ("resumable", "failed: OSError: disk full")),
    (mlflow_run("FAILED", failure="error", reason="OSError: disk full", attempts=3), RunDir(),
     ("failed", "OSError: disk full (after 3 attempts)")),
    (None, RunDir(checkpoint=True), ("resumable", "checkpoint without an MLflow run")),
    (None, RunDir(), ("pending", "")),
    # attempts that failed before the first epoch (no MLflow run yet) count too
    (None, RunDir(attempt=Attempt("error", "OSError: boom", failures=2)), ("pending", "")),
    (None, RunDir(attempt=Attempt("error", "OSError: boom", failures=3)),
     ("failed", "OSError: boom (after 3 failed attempts)")),
    (mlflow_run("KILLED", attempts=1), RunDir(attempt=Attempt("error", "OSError: boom", failures=3)),
     ("failed", "OSError: boom (after 3 failed attempts)")),
])
def test_classify(run, run_dir, expected):
    assert classify(run, run_dir, retries=2) == expected


def test_a_live_claim_elsewhere_is_running_and_a_stale_one_resumable(monkeypatch):
    """Elsewhere, the owner's clock is not ours: its claim is stale once its heartbeat was seen unchanged
    for the lease by this process's clock, however old the heartbeat looks."""
    clock = [0.0]
    monkeypatch.setattr(claims, "_SEEN", claims.Sightings(clock=lambda: clock[0]))
    now = __import__("time").time()
    live = mlflow_run("RUNNING", owner=ELSEWHERE, beat=now - 10)
    state, reason = classify(live, RunDir(checkpoint=True), retries=2)
    assert state == "running" and reason.startswith("running elsewhere: gpu-box-7 pid 4242 since ")
    old = mlflow_run("RUNNING", owner=ELSEWHERE, beat=now - 4000)
    assert classify(old, RunDir(), retries=2)[0] == "running"
    clock[0] += 301
    assert classify(old, RunDir(), retries=2) == ("resumable", "running")
    clock[0] += 4
    assert classify(live, RunDir(), retries=2, lease_s=5)[0] == "running"  # it beat meanwhile
    clock[0] += 6
    assert classify(live, RunDir(), retries=2, lease_s=5) == ("resumable", "running")


def test_retries_set_when_errors_are_final():
    run = mlflow_run("FAILED", failure="error", attempts=3)
    assert classify(run, RunDir(), retries=3)[0] == "resumable"
    assert classify(run, RunDir(), retries=0)[0] == "failed"


def test_lock_holder_sees_a_live_flock_and_its_pid(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.lock_holder() is None  # no lock file
    (tmp_path / "lock").write_text("123")
    assert folder.lock_holder() is None  # a file nobody holds (its holder died)
    fd = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert folder.lock_holder() == 123
        assert folder.lock_holder() == 123  # probing leaves the holder's lock alone
    finally:
        os.close(fd)
    assert folder.lock_holder() is None


def test_run_dir_inspect(tmp_path):
    assert RunDir.inspect(tmp_path / "missing") == RunDir()
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "progress.json").write_text(json.dumps({"epoch": 4, "total": 15}))
    assert RunDir.inspect(tmp_path) == RunDir(checkpoint=True, locked_by=None, progress={"epoch": 4, "total": 15})
    RunFolder(tmp_path).write_attempt(Attempt("error", "boom", failures=1))
    assert RunDir.inspect(tmp_path).attempt.failures == 1


def test_reconcile_merges_mlflow_and_progress():
    configs = [RunConfig(seed=s, epochs_scale=0.02, scheme="01") for s in range(3)]
    keys = [run_key(c) for c in configs]
    runs = {
        keys[0]: mlflow_run("FINISHED", "fin", metrics=[("test_error", 0.25, 15), ("images_per_second", 900.0, 15)]),
        keys[1]: mlflow_run("RUNNING", "run", metrics=[("test_error", 0.5, 3)]),
    }
    dirs = {keys[1]: RunDir(checkpoint=True, locked_by=9,
                            progress={"epoch": 5, "run_id": "run", "test_error": 0.4, "images_per_second": 1e3})}
    states = reconcile([plan(c) for c in configs], runs, dirs)
    assert [(s.state, s.epoch, s.test_error, s.run_id) for s in states] == [
        ("done", 15, 0.25, "fin"), ("running", 5, 0.4, "run"), ("pending", 0, None, None)]
    assert {s.total_epochs for s in states} == {15}
    assert counts(states) == {"done": 1, "running": 1, "resumable": 0, "pending": 1, "failed": 0}
    row = states[0].as_json()
    assert (row["run_key"], row["scheme"], row["seed"], row["state"]) == (keys[0], "01", 0, "done")
    assert row["params"] == configs[0].to_dict()


def test_stale_progress_of_another_run_is_ignored():
    config = RunConfig(epochs_scale=0.02)
    run = mlflow_run("KILLED", "new", metrics=[("test_error", 0.3, 2)])
    dirs = {run_key(config): RunDir(progress={"epoch": 9, "run_id": "old", "test_error": 0.9})}
    (state,) = reconcile([plan(config)], {run_key(config): run}, dirs)
    assert (state.state, state.epoch, state.test_error) == ("resumable", 2, 0.3)


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://host:5000") == "http://host:5000"
    assert absolute_tracking_uri("sqlite:///mlflow.db?timeout=60") == f"sqlite:///{tmp_path}/mlflow.db?timeout=60"


@pytest.mark.parametrize("uri, path", [
    ("sqlite:///mlflow.db", "mlflow.db"),
    ("sqlite:///mlflow.db?timeout=60", "mlflow.db"),
    ("sqlite:////abs/dir/m.db?timeout=5&uri=false", "/abs/dir/m.db"),
    ("sqlite:////abs/a%20b/m.db", "/abs/a b/m.db"),
    ("sqlite://", None),
    ("postgresql://u@127.0.0.1/db", None),
    ("http://127.0.0.1:5000", None),
])
def test_sqlite_uris_parse_as_sqlalchemy_does(uri, path):
    got = sqlite_path(uri)
    assert (str(got) if got is not None else None) == path


"""Sweeps where researchers really run them (issue: containers, busy folders, restarting servers, stalled
and broken runs). Real orchestrators, real workers, a real ``mlflow server``; tiny digits runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from e2e import ADAREG, Store, epochs_done, pause_at_epoch, run_bg, sweep_cmd, wait_until, write_sweep
from servers import MlflowServer, pid1_unavailable, run_as_pid1


@pytest.mark.skipif(pid1_unavailable() is not None, reason=str(pid1_unavailable()))
def test_orchestrator_as_pid1_started_from_a_folder_that_shadows_adareg(tmp_path):
    """The documented container runner (adareg is PID 1, no init) started from a user's project folder
    holding its own ``training/``, ``orchestrator/`` and ``yaml.py``: every run finishes."""
    caller = tmp_path / "project"
    for package in ("training", "orchestrator"):
        (caller / package).mkdir(parents=True)
        (caller / package / "__init__.py").write_text(f"raise ImportError('the caller\\'s own {package}')\n")
    (caller / "yaml.py").write_text("raise ImportError('the caller\\'s own yaml')\n")
    sweep = write_sweep(tmp_path / "s.yaml", "wd-1e-4: {weight_decay: 0.0001}\n", seeds="[0, 1]")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_as_pid1(sweep_cmd(sweep, uri, tmp_path / "runs"), cwd=caller, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(uri)
    active = store.active()
    assert len(active) == 2 and {r["status"] for r in active.values()} == {"FINISHED"}
    for run in active.values():
        store.assert_once_per_epoch(run["run_id"], 4)


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["server", "database"])
def test_the_tracking_store_going_down_mid_sweep_loses_nothing(tmp_path, outage, request):
    """While runs train, either ``mlflow server`` is killed for 60 s and restarted on the same port, or the
    PostgreSQL behind it is stopped for 30 s (the server's ``/health`` still answers; its API fails): the same
    sweep invocation waits, says so, ends with exit 0, every run FINISHED, each metric once per epoch, none
    left RUNNING."""
    postgres = request.getfixturevalue("postgres") if outage == "database" else None
    backend = postgres.create_database() if postgres else f"sqlite:///{tmp_path}/server.db"
    down_s = 30 if postgres else 60
    server = MlflowServer(backend, workdir=tmp_path / "server").start()
    try:
        sweep = write_sweep(tmp_path / "s.yaml", "wd-1e-4: {weight_decay: 0.0001}\n", seeds="[0, 1, 2]", epochs=4)
        proc = run_bg(sweep_cmd(sweep, server.uri, tmp_path / "runs"), tmp_path / "sweep.log")
        wait_until(lambda: epochs_done(tmp_path / "runs") >= 2, 120, "two epochs")
        (postgres.stop if postgres else lambda: server.stop(kill=True))()
        down_at = time.monotonic()
        try:
            time.sleep(down_s)
            during = (tmp_path / "sweep.log").read_text()
            assert proc.poll() is None, during  # waited; nothing failed
            assert "tracking store unreachable since" in during and "answers again" not in during, during
        finally:
            (postgres.start if postgres else server.start)()
        code = proc.wait(timeout=300)
        out = (tmp_path / "sweep.log").read_text()
        assert code == 0, out
        assert time.monotonic() - down_at >= down_s
        assert "tracking store answers again" in out, out
        store = Store(backend)
        active = store.active()
        assert len(active) == 3 and {r["status"] for r in active.values()} == {"FINISHED"}, active
        assert all(r["status"] != "RUNNING" for r in store.runs())
        for run in active.values():
            store.assert_once_per_epoch(run["run_id"], 8)
    finally:
        server.close()


@pytest.mark.slow
def test_a_stopped_worker_is_killed_after_the_stall_timeout_and_retried(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", "wd-1e-4: {weight_decay: 0.0001}\n", epochs=5)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_bg(sweep_cmd(sweep, uri, tmp_path / "runs", "--stall-timeout", "20"), tmp_path / "sweep.log")
    (run_dir,) = pause_at_epoch(tmp_path / "runs", 1, 2)  # SIGSTOP, as a wedged GPU or an NFS stall would
    stopped_at = time.monotonic()
    code = proc.wait(timeout=300)
    out = (tmp_path / "sweep.log").read_text()
    assert code == 0, out
    assert time.monotonic() - stopped_at >= 20
    log = (run_dir / "worker.log").read_text()
    assert "stalled: no new epoch for" in log and "killed by the orchestrator (SIGKILL) and retried" in log
    assert "stalled" in out and "attempt 2" in out
    store = Store(uri)
    (run,) = store.active().values()
    assert run["status"] == "FINISHED"
    store.assert_once_per_epoch(run["run_id"], 10)


def test_broken_checkpoints_restart_cleanly_and_uri_query_arguments_change_nothing(tmp_path, capsys):
    """A truncated and a zero-byte checkpoint (say, a full disk) under runs that MLflow already holds epochs
    of: each run finishes as one training, its log names the file and what was wrong, the bad file is kept.
    Then ``sqlite:///...?timeout=60`` gives the same plan, status and report as the plain URI."""
    sweep = write_sweep(tmp_path / "s.yaml", "wd-1e-4: {weight_decay: 0.0001}\n", seeds="[0, 1]", epochs=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = tmp_path / "runs"
    proc = run_bg(sweep_cmd(sweep, uri, runs), tmp_path / "sweep.log")
    dirs = pause_at_epoch(runs, 2, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(uri)
    first = {r["key"]: r["run_id"] for r in store.runs()}
    truncated, empty = (d / "checkpoint.pt" for d in dirs)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")

    done = subprocess.run(sweep_cmd(sweep, uri, runs), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for run_dir, what, size in ((dirs[0], "truncated or not a checkpoint", len(data) // 2),
                                (dirs[1], "empty file (0 bytes)", 0)):
        log = (run_dir / "worker.log").read_text()
        assert f"checkpoint {run_dir / 'checkpoint.pt'} cannot be resumed ({what}" in log, log
        assert (run_dir / "checkpoint.pt.broken").stat().st_size == size  # kept beside it
        assert f"{run_dir.name}: checkpoint {run_dir / 'checkpoint.pt'} cannot be resumed" in done.stdout
    active = store.active()
    assert {r["status"] for r in active.values()} == {"FINISHED"} and len(active) == 2
    tags = store.experiment_tags("tiny")  # the MLflow UI opens on the runs table, with a description
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("adareg sweep 'tiny'")
    for key, run in active.items():
        store.assert_once_per_epoch(run["run_id"], 8)
        if first.get(key) != run["run_id"]:  # the first training's epochs live on only in a superseded run
            old = next(r for r in store.runs() if r["run_id"] == first[key])
            assert old["superseded"].startswith("MLflow holds epoch"), old

    views = {}
    for u in (uri, uri + "?timeout=60"):
        where = ["--tracking-uri", u, "--runs-dir", str(runs)]
        plan = subprocess.run([ADAREG, "sweep", "plan", str(sweep), "--format", "json", *where],
                              capture_output=True, text=True, timeout=120)
        status = subprocess.run([ADAREG, "sweep", "status", str(sweep), *where], capture_output=True, text=True,
                                timeout=120)
        out = tmp_path / f"report-{len(views)}"
        report = subprocess.run([ADAREG, "report", str(sweep), "--out", str(out), "--tracking-uri", u],
                                capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stderr
        store_line, status_rest = status.stdout.split("\n", 1)
        assert store_line == f"store {u}, runs folder {runs}", store_line  # the one line naming the URI
        views[u] = (json.loads(plan.stdout), status_rest, (out / "phase_summary.csv").read_text())
    plain, with_query = views.values()
    assert plain == with_query
    assert {r["state"] for r in plain[0]} == {"done"}

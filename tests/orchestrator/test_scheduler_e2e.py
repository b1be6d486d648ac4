"""``adareg sweep run`` end to end with real workers on tiny runs (digits, ResNet-8, 100 images).

The heart: an orchestrator SIGKILLed (alone or with its process group) at random moments, then
interrupted with Ctrl-C, then run again, leaves exactly one MLflow run per key with every metric
logged once per epoch.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import e2e
import pytest
from e2e import N_METRICS, leftover_processes, wait_until, write_sweep

from orchestrator.store.client import connect
from orchestrator.store.runs import ensure_experiment

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store: a new store takes seconds to create, a copy none."""

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    connect(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, store_template) -> str:
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def sweep_cmd(tmp_path: Path, sweep: Path, *extra: str) -> list[str]:
    return e2e.sweep_cmd(sweep, f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "runs", *extra)


def query(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        return db.execute(sql).fetchall()


def run_status(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """``{run_key: (status, adareg.failure)}`` of every MLflow run."""
    rows = query(tmp_path, """
        SELECT k.value, r.status, COALESCE(f.value, '') FROM runs r
        JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'adareg.run_key'
        LEFT JOIN tags f ON f.run_uuid = r.run_uuid AND f.key = 'adareg.failure'""")
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)), f"a run key has several MLflow runs: {rows}"
    return {key: (status, failure) for key, status, failure in rows}


def assert_each_metric_once_per_epoch(tmp_path: Path, epochs: int, runs: int) -> None:
    dup = query(tmp_path, "SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step "
                          "HAVING COUNT(*) > 1")
    assert dup == [], f"metrics logged twice: {dup[:5]}"
    steps = query(tmp_path, "SELECT run_uuid, key, MIN(step), MAX(step), COUNT(*) FROM metrics GROUP BY run_uuid, key")
    assert len(steps) == runs * N_METRICS
    assert {row[2:] for row in steps} == {(1, epochs, epochs)}


def test_run_then_rerun_finished_and_diverged(tmp_path, store, capsys):
    """Two runs: one finishes, one diverges (FAILED with its reason, exit 1). Plan and status show it.
    Run again: nothing new, in seconds. (The orchestrator runs in-process here; its workers do not.)"""
    sweep = write_sweep(tmp_path / "s.yaml", """\
        ok: {weight_decay: 0.0001}
        boom: {weight_decay: 0.0001, lr: [1.0e+6, 1.0e+6]}
        """)
    code, out, err = cli(capsys, *sweep_cmd(tmp_path, sweep)[1:])
    assert code == 1, out + err
    assert err == "error: 1 of 2 runs failed\n"
    status = run_status(tmp_path)
    assert sorted(status.values()) == [("FAILED", "diverged"), ("FINISHED", "")]
    (reason,) = query(tmp_path, "SELECT value FROM tags WHERE key = 'adareg.failure_reason'")
    assert reason[0].startswith("diverged at epoch ")
    summary = [line for line in out.splitlines() if " boom " in line and "failed" in line]
    assert summary and "diverged at epoch" in summary[-1], out
    # the UI link opens the experiment's runs table (MLflow 3.17's UI starts in GenAI mode otherwise)
    assert re.search(r"then open http://127\.0\.0\.1:5000/#/experiments/\d+\?workflowType=machine_learning", out)
    assert_each_metric_once_per_epoch_of_finished(tmp_path)

    where = ["--tracking-uri", store, "--runs-dir", str(tmp_path / "runs")]
    code, out, _ = cli(capsys, "sweep", "plan", str(sweep), "--format", "json", *where)
    rows = {(r["scheme"], r["state"], r["epoch"]) for r in json.loads(out)}
    assert rows == {("ok", "done", 4), ("boom", "failed", 0)}  # epoch 1 evaluates to nan: diverged at once
    code, picture, _ = cli(capsys, "sweep", "status", str(sweep), *where)
    assert "1/2 done · 0 running · 1 failed" in picture and "diverged at epoch 1: test loss is nan" in picture

    t0 = time.monotonic()
    code, out, _ = cli(capsys, *sweep_cmd(tmp_path, sweep)[1:])
    assert code == 1 and "nothing to run" in out and time.monotonic() - t0 < 5
    assert run_status(tmp_path) == status  # no run created, none changed


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``adareg ARGV`` in this process: (exit code, stdout, stderr)."""
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def assert_each_metric_once_per_epoch_of_finished(tmp_path):
    rows = query(tmp_path, """
        SELECT m.key, COUNT(*), COUNT(DISTINCT m.step), MIN(m.step), MAX(m.step) FROM metrics m
        JOIN runs r ON r.run_uuid = m.run_uuid WHERE r.status = 'FINISHED' GROUP BY m.key""")
    assert len(rows) == N_METRICS and {row[1:] for row in rows} == {(4, 4, 1, 4)}


def test_sigkill_at_random_moments_then_ctrl_c_then_rerun(tmp_path, store, capsys):
    """SIGKILL the orchestrator alone (its workers die with it) or with its group, 4 times at random
    moments (two in start-up, two while training), then Ctrl-C it (``sweep status`` from another
    terminal first), then run it to the end."""
    seed = int(os.environ.get("ADAREG_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    sweep = write_sweep(tmp_path / "s.yaml", """\
        a: {weight_decay: 0.0001}
        b: {weight_decay: 0.001}
        """, lr="[0.1, 0.05, 0.01, 0.005, 0.001]")  # 10 epochs per run: some are left for the Ctrl-C
    cmd = sweep_cmd(tmp_path, sweep)
    history: list[tuple[str, int]] = []

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def at_an_epoch(proc: subprocess.Popen) -> None:
        before = e2e.epochs_done(tmp_path / "runs")
        wait_until(lambda: e2e.epochs_done(tmp_path / "runs") > before or proc.poll() is not None, 90, "an epoch")
        time.sleep(rng.uniform(0.0, 1.5))

    log = open(tmp_path / "orchestrators.log", "ab")
    try:
        for i in range(4):
            proc = start()
            if i % 2 == 0:  # anywhere in start-up: imports, MLflow set-up, workers being spawned or importing
                time.sleep(rng.uniform(0.5, 6.0))
            else:
                at_an_epoch(proc)
            alone = i < 2
            with contextlib.suppress(ProcessLookupError):  # unless it had finished everything already
                (os.kill if alone else os.killpg)(proc.pid, signal.SIGKILL)
            history.append(("SIGKILL alone" if alone else "SIGKILL group", proc.wait(timeout=30)))
        proc = start()
        at_an_epoch(proc)
        _, picture, _ = cli(capsys, "sweep", "status", str(sweep), "--tracking-uri", store, "--runs-dir",
                            str(tmp_path / "runs"))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole foreground group
        history.append(("SIGINT group", proc.wait(timeout=60)))
        states = {s for s, _ in run_status(tmp_path).values()}
        if "KILLED" in states:  # it interrupted training (rarely, everything had finished already)
            assert history[-1][1] == 130 and states <= {"KILLED", "FINISHED"}, f"seed {seed}: {history} {states}"
            assert re.search(r"tiny: [01]/2 done · [12] running · 0 failed", picture), picture
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert final.returncode == 0, f"seed {seed} {history}\n{final.stdout}\n{final.stderr}"
        wait_until(lambda: not leftover_processes(tmp_path), 30, "workers to end")
    finally:
        log.close()
        for pid in leftover_processes(tmp_path):
            os.kill(pid, signal.SIGKILL)
    status = run_status(tmp_path)
    assert list(status.values()) == [("FINISHED", "")] * 2, f"seed {seed}: {status}"
    assert_each_metric_once_per_epoch(tmp_path, epochs=10, runs=2)
    attempts = query(tmp_path, "SELECT value FROM tags WHERE key = 'adareg.attempts'")
    assert max(int(a) for (a,) in attempts) >= 2, f"seed {seed}: no run was ever resumed {history}"


def test_eight_processes_log_to_one_sqlite_store_at_once(tmp_path, store):
    """The store and experiment made once; then 8 processes log 15 epochs each through the worker's
    RunLogger at the same moment (forked from one parent that imported everything): no lock error."""

    uri = store
    ensure_experiment(connect(uri), "concurrent")
    writers = textwrap.dedent(f"""
        import os, sys, time, traceback
        from orchestrator.store import claims
        from orchestrator.store.client import Store
        from orchestrator.store.logger import RunLogger
        from orchestrator.store.runs import ensure_experiment
        from training.config import RunConfig
        from training.callbacks import METRICS
        from training.schedules import plan_for
        start_at = time.time() + 1.0
        children = []
        for i in range(8):
            pid = os.fork()
            if pid:
                children.append(pid)
                continue
            code = 0
            try:
                store = Store({uri!r})
                experiment_id = ensure_experiment(store.client, "concurrent")
                logger = RunLogger(store, experiment_id, "c", owner=claims.Owner.me(f"/runs/{{i}}"))
                config = RunConfig(seed=i, epochs_scale=0.02)
                plan = plan_for(config)
                while time.time() < start_at:
                    time.sleep(0.005)
                logger.on_start(config, plan, [])
                for e in plan:
                    logger.on_epoch_end(e.epoch, {{k: float(i + e.epoch) for k in METRICS}})
                logger.finish("FINISHED")
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        sys.exit(sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children))
        """)
    done = subprocess.run([sys.executable, "-c", writers], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "locked" not in done.stdout + done.stderr
    assert query(tmp_path, "SELECT COUNT(*), COUNT(DISTINCT run_uuid) FROM metrics") == [(8 * 15 * N_METRICS, 8)]
    assert query(tmp_path, "SELECT status, COUNT(*) FROM runs GROUP BY status") == [("FINISHED", 8)]
    assert_each_metric_once_per_epoch(tmp_path, epochs=15, runs=8)

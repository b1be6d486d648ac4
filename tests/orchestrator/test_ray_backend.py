"""``adareg sweep run --backend ray`` on a private local Ray instance: two tiny runs, self-contained
(Ray's session files in a temp folder the backend removes; token auth off for this instance only)."""

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ADAREG = str(Path(sys.executable).parent / "adareg")


def test_ray_backend_runs_a_sweep(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(textwrap.dedent("""\
        name: ray-tiny
        experiment: ray-tiny
        datasets: [digits]
        archs: [resnet8]
        seeds: [0, 1]
        schedule: {lr: [0.1, 0.01], epochs_per_step: [1]}
        train: {train_subset: 100}
        schemes: {a: {weight_decay: 0.0001}}
        """))
    # Ray's unix sockets live under its temp dir and their paths are limited to 107 bytes: keep it short.
    ray_tmp = tempfile.mkdtemp(prefix="adareg-ray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            [ADAREG, "sweep", "run", str(sweep), "--backend", "ray", "--gpus", "none", "--max-parallel", "2",
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--runs-dir", str(tmp_path / "runs")],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        leftovers = [name for name in os.listdir(ray_tmp) if name.startswith("ray")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert leftovers == []  # the backend removed its Ray session files
    assert done.stdout.count(" on ray-cpu") == 2  # both runs went through Ray slots
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall() == [("FINISHED", 2)]
        per_series = db.execute("SELECT COUNT(*), COUNT(DISTINCT step) FROM metrics GROUP BY run_uuid, key").fetchall()
    from training.callbacks import METRICS

    assert len(per_series) == 2 * len(METRICS) and set(per_series) == {(2, 2)}  # 2 runs x every metric, 2 epochs
    for run_dir in (tmp_path / "runs").iterdir():
        assert "finished" in (run_dir / "worker.log").read_text()

"""A full or read-only runs folder is not the runs' fault (end to end: real orchestrators, real workers).

The runs folder sits on a tmpfs the test mounts (skipped where it cannot mount: it needs root). The sweep
stops with exit 75, naming the folder; no run is FAILED and no attempt is counted; once there is room
(or the folder is writable again) the same command finishes every run, each metric once per epoch, every
curve equal to an uninterrupted training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e import (
    FOUR_RUNS_EPOCHS,
    Store,
    assert_one_training_per_key,
    epochs_done,
    four_runs,
    run_bg,
    sweep_cmd,
    wait_until,
)
from smallfs import read_only, remount, small_filesystem

pytestmark = pytest.mark.slow


def assert_nothing_failed_or_counted(store: Store, runs: Path) -> None:
    assert all(r["status"] != "FAILED" for r in store.runs()), store.runs()
    for result in runs.glob("*/result.json"):
        assert json.loads(result.read_text())["failures"] == 0, result.read_text()


def test_a_full_runs_folder_stops_the_sweep_resumable_and_a_rerun_finishes_it(tmp_path, reference):
    """A 1.6 MB file system: two ResNet-8 checkpoints (~630 KB each) fit, a third copy (the temp file of the
    next epoch's) does not, so both first runs hit ENOSPC at their second checkpoint."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = four_runs(tmp_path / "s.yaml")
    with small_filesystem(tmp_path / "disk", "1600k") as disk:
        runs = disk / "runs"
        cmd = sweep_cmd(sweep, uri, runs, "--disk-timeout", "6")
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        out = first.stdout + first.stderr
        assert first.returncode == 75, out
        assert f"runs folder {runs} cannot take writes" in out and " free of 1.6 MB" in out, out
        assert "error: the runs folder stayed full or read-only (" in first.stderr, out
        assert "make room and run the same command again" in first.stderr
        assert "inline_container" not in out
        store = Store(uri)
        assert_nothing_failed_or_counted(store, runs)
        assert any("no space left on device" in (runs / key / "result.json").read_text()
                   for key in store.active() if (runs / key / "result.json").exists()), out
        assert not list(runs.glob("*/.*.tmp")), "a failed write left its temp file"
        status = subprocess.run([*cmd[:2], "status", *cmd[3:4], "--tracking-uri", uri, "--runs-dir", str(runs)],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"runs folder {runs} cannot take a run's writes: {runs}: " in status.stdout, status.stdout
        assert "less than a run needs" in status.stdout

        remount(disk, "size=200m")
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        assert_one_training_per_key(store, reference, FOUR_RUNS_EPOCHS)
        assert_nothing_failed_or_counted(store, runs)


def test_a_runs_folder_made_read_only_mid_sweep_stops_it_resumable(tmp_path, reference):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = four_runs(tmp_path / "s.yaml")
    with small_filesystem(tmp_path / "disk", "200m") as disk:
        runs = disk / "runs"
        cmd = sweep_cmd(sweep, uri, runs, "--disk-timeout", "6")
        log = tmp_path / "orchestrator.log"
        proc = run_bg(cmd, log)
        try:
            wait_until(lambda: epochs_done(runs) >= 4, 300, "4 epochs done")
            with read_only(runs):
                assert proc.wait(timeout=300) == 75, log.read_text()
                out = log.read_text()
                assert f"runs folder {runs} cannot take writes" in out and "read-only file system" in out, out
                store = Store(uri)
                assert_nothing_failed_or_counted(store, runs)
                assert len(store.active()) < 4 or any(r["status"] != "FINISHED" for r in store.active().values())
        finally:
            if proc.poll() is None:
                proc.kill()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        assert_one_training_per_key(store, reference, FOUR_RUNS_EPOCHS)
        assert_nothing_failed_or_counted(store, runs)

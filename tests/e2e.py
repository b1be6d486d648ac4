"""Helpers of the end-to-end tests: tiny sweep files, the ``adareg`` command, and looks into the store.

The store is read with SQL (sqlite or PostgreSQL alike, through SQLAlchemy) rather than through MLflow,
so the tests see exactly what MLflow stored: every row of every metric, deleted and superseded runs too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from training.callbacks import METRICS

ADAREG = str(Path(sys.executable).parent / "adareg")
N_METRICS = len(METRICS)
TIMING = ("epoch_seconds", "images_per_second")  # differ between any two trainings


def write_sweep(path: Path, schemes: str, lr: str = "[0.1, 0.01]", name: str = "tiny", epochs: int = 2,
                subset: int = 100, seeds: str = "[0]", arch: str = "resnet8") -> Path:
    """A sweep file of tiny digits runs: ``len(lr) x epochs`` epochs each, ``subset`` training images."""
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        experiment: {name}
        datasets: [digits]
        archs: [{arch}]
        seeds: {seeds}
        schedule:
          lr: {lr}
          epochs_per_step: [{epochs}]
        train:
          train_subset: {subset}
        schemes:
        """) + textwrap.indent(textwrap.dedent(schemes), "  "))
    return path


def sweep_cmd(sweep: Path, uri: str, runs_dir: Path, *extra: str) -> list[str]:
    return [ADAREG, "sweep", "run", str(sweep), "--gpus", "none", "--max-parallel", "2", "--tracking-uri", uri,
            "--runs-dir", str(runs_dir), *extra]


def wait_until(condition, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def epochs_done(runs_dir: Path) -> int:
    """Epochs the run folders' progress files report, summed."""
    total = 0
    for progress in runs_dir.glob("*/progress.json"):
        try:
            total += json.loads(progress.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            pass
    return total


def pause_at_epoch(runs_dir: Path, runs: int, epoch: int, timeout: float = 300) -> list[Path]:
    """Wait until ``runs`` run folders report ``epoch`` or more, SIGSTOPping each one's worker as it gets there,
    so that no run finishes while another catches up (tiny runs take a few seconds; their workers start
    seconds apart): a kill that follows lands mid-run in every one. Returns the run folders, sorted."""
    paused: set[Path] = set()
    deadline = time.monotonic() + timeout
    while len(paused) < runs:
        for progress in runs_dir.glob("*/progress.json"):
            if progress.parent in paused:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                state = json.loads(progress.read_text())
                if state["epoch"] >= epoch:
                    os.kill(state["pid"], signal.SIGSTOP)
                    paused.add(progress.parent)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {runs} runs at epoch {epoch}")
        time.sleep(0.02)
    return sorted(paused)


def leftover_processes(marker: Path) -> list[int]:
    """Live processes whose command line mentions ``marker`` (workers, orchestrators)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(marker).encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


def run_bg(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output appended to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


class Store:
    """The rows of an MLflow backend store (``sqlite:///...`` or ``postgresql://...``)."""

    def __init__(self, db_uri: str):
        import sqlalchemy as sa

        self.engine = sa.create_engine(db_uri.replace("postgresql://", "postgresql+psycopg://", 1))

    def query(self, sql: str, **params) -> list[tuple]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql), params)]

    def experiment_tags(self, name: str) -> dict[str, str]:
        return dict(self.query("SELECT t.key, t.value FROM experiment_tags t JOIN experiments e "
                               "ON e.experiment_id = t.experiment_id WHERE e.name = :n", n=name))

    def runs(self) -> list[dict]:
        """Every MLflow run with its key, status, lifecycle and adareg tags."""
        rows = self.query("""
            SELECT r.run_uuid, r.status, r.lifecycle_stage, k.value, COALESCE(s.value, ''), COALESCE(f.value, '')
            FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'adareg.run_key'
            LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'adareg.superseded'
            LEFT JOIN tags f ON f.run_uuid = r.run_uuid AND f.key = 'adareg.failure'""")
        return [dict(zip(("run_id", "status", "lifecycle", "key", "superseded", "failure"), r)) for r in rows]

    def active(self) -> dict[str, dict]:
        """``{run_key: run}`` of the active runs (not deleted, not superseded); fails if a key has several."""
        active = [r for r in self.runs() if r["lifecycle"] == "active" and not r["superseded"]]
        twice = [k for k, n in Counter(r["key"] for r in active).items() if n > 1]
        assert not twice, f"keys with several active MLflow runs: {twice}: {active}"
        return {r["key"]: r for r in active}

    def history(self, run_id: str, timing: bool = False) -> dict[tuple[str, int], list[float]]:
        """``{(metric, step): [values]}`` of a run (several values: a step logged twice)."""
        out: dict[tuple[str, int], list[float]] = {}
        for key, step, value in self.query("SELECT key, step, value FROM metrics WHERE run_uuid = :r", r=run_id):
            if timing or key not in TIMING:
                out.setdefault((key, int(step)), []).append(float(value))
        return out

    def assert_once_per_epoch(self, run_id: str, epochs: int) -> None:
        rows = self.history(run_id, timing=True)
        twice = {k: v for k, v in rows.items() if len(v) > 1}
        assert not twice, f"run {run_id}: steps logged twice: {list(twice)[:5]}"
        assert sorted(rows) == sorted((m, e) for m in METRICS for e in range(1, epochs + 1)), (
            f"run {run_id}: epochs logged {sorted({s for _, s in rows})}, expected 1..{epochs}")


def killed_at_random(tmp_path: Path, sweep: Path, uri: str, seed: int, names: str = "AB", extra: tuple = (),
                     kills: int = 5) -> list:
    """One ``adareg sweep run`` per name in ``names`` (two: several orchestrators on one store, each with
    its own run folder), started 0-10 s apart, SIGKILLed (alone or with their workers) at random moments
    ``kills`` times in all, restarted each time, then left to finish and run once more each (which must
    find nothing left). Returns what happened, for failure messages."""
    rng = random.Random(seed)
    cmds = {name: sweep_cmd(sweep, uri, tmp_path / f"runs-{name}", *extra) for name in names}
    procs: dict[str, subprocess.Popen] = {}
    history: list = [("seed", seed)]

    def start(name: str) -> None:
        procs[name] = run_bg(cmds[name], tmp_path / f"orchestrator-{name}.log")

    for i, name in enumerate(names):
        if i:
            time.sleep(rng.uniform(0.0, 10.0))
        start(name)
    for _ in range(kills):
        time.sleep(rng.uniform(1.0, 8.0))
        name = rng.choice([n for n, p in procs.items() if p.poll() is None] or [names[0]])
        proc = procs[name]
        alone = rng.random() < 0.5
        with contextlib.suppress(ProcessLookupError):
            (os.kill if alone else os.killpg)(proc.pid, signal.SIGKILL)
        history.append((name, "SIGKILL alone" if alone else "SIGKILL group", proc.wait(timeout=30)))
        time.sleep(rng.uniform(0.0, 2.0))
        start(name)
    for name, proc in procs.items():
        history.append((name, "ended", proc.wait(timeout=600)))
    for name, cmd in cmds.items():  # re-run until done: once more must find nothing left
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        history.append((name, "re-run", done.returncode))
        assert done.returncode == 0, (history, done.stdout + done.stderr)
    return history


def assert_one_training_per_key(store: Store, reference: dict[str, dict], epochs: int) -> None:
    """Exactly one active MLflow run per key, FINISHED, each metric once per epoch, equal to the reference
    (``{run key: history}`` of an uninterrupted training); no run at all left RUNNING."""
    active = store.active()
    assert sorted(active) == sorted(reference)
    for key, run in active.items():
        assert run["status"] == "FINISHED", run
        store.assert_once_per_epoch(run["run_id"], epochs)
        assert store.history(run["run_id"]) == reference[key], f"run {key} is not one uninterrupted training"
    for run in store.runs():
        assert run["status"] != "RUNNING", run


def assert_trained_once(store: Store, reference: dict[str, dict], epochs: int, runs_dirs: list[Path]) -> None:
    """Several orchestrators (hosts, containers) shared the store, none killed: besides one training per key
    (see :func:`assert_one_training_per_key`), no run was trained twice (the run folders' epochs add up to
    one training of each run), and none was superseded or taken over."""
    assert_one_training_per_key(store, reference, epochs)
    superseded = [r for r in store.runs() if r["superseded"]]
    assert not superseded, f"runs superseded: {superseded}"
    trained = {str(d): epochs_done(d) for d in runs_dirs}
    assert sum(trained.values()) == epochs * len(reference), f"epochs trained per runs folder: {trained}"


FOUR_RUNS_EPOCHS = 10  # the session's reference (the ``reference`` fixture, tests/conftest.py): two steps of five
FOUR_RUNS = "wd-1e-4: {weight_decay: 0.0001}\n'01': {weight_decay: [0.0001, 0.0008]}\n"  # x seeds 0, 1


def four_runs(path: Path, epochs: int = FOUR_RUNS_EPOCHS) -> Path:
    """A sweep file of four tiny digits runs (two schemes, two seeds) of ``epochs`` epochs in two steps."""
    return write_sweep(path, FOUR_RUNS, seeds="[0, 1]", epochs=epochs // 2)


def reference_histories(tmp: Path, sweep: Path) -> dict[str, dict]:
    """``{run_key: history without timing}`` of ``sweep`` trained once, uninterrupted, by one orchestrator."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    done = subprocess.run(sweep_cmd(sweep, uri, tmp / "runs"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    store = Store(uri)
    return {key: store.history(run["run_id"]) for key, run in store.active().items()}

"""adareg tune: tapers from the search space, pruning, a tiny study end to end, export."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.sweepfile import load_sweep
from orchestrator.tune import Reporter, best_sweep, export_sweep, run_tune, space_of, taper, trial_scheme
from orchestrator.worker import StopRun

TUNE = str(Path(__file__).resolve().parents[2] / "sweeps" / "tune.yaml")


def test_taper_has_table1_shape():
    t = taper(1e-4, 1.6e-3, 0.5, phases=3)
    assert t["weight_decay"] == [1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3]  # scheme 01 exactly
    assert t["grad_sparsity"] == [[0, 0, 0.5, 0.5, 0.5], [0.0] * 5, [0.0] * 5]  # scheme 21 exactly


def test_fixed_values_are_not_sampled():
    sweep = load_sweep(TUNE, ["tune.grad_sparsity=0.3", "tune.weight_decay_base=2e-4"])
    scheme = trial_scheme(sweep, {"weight_decay_peak": 4e-3})
    assert scheme["weight_decay"] == [2e-4, 2e-4, 2e-3, 4e-3, 4e-3]
    assert scheme["grad_sparsity"][0] == [0, 0, 0.3, 0.3, 0.3]


def test_space_errors_name_the_problem(tmp_path):
    table1 = str(Path(TUNE).with_name("table1.yaml"))
    with pytest.raises(UserError, match="no 'tune' section"):
        space_of(load_sweep(table1))
    with pytest.raises(UserError, match="tune.weight_decay_peak.high: must be greater than low"):
        load_sweep(TUNE, ["tune.weight_decay_peak={low: 1.0e-2, high: 1.0e-3}"])


class FakeTrial:
    def __init__(self, prune_at):
        self.prune_at, self.reports = prune_at, []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return len(self.reports) >= self.prune_at


def test_reporter_reports_every_epoch_and_prunes():
    trial = FakeTrial(prune_at=3)
    reporter = Reporter(trial, "test_error")
    reporter.on_start(None, [], [{"epoch": 1.0, "test_error": 0.9}])  # resumed history: reported, never pruned
    reporter.on_epoch_end(2, {"test_error": 0.5})
    with pytest.raises(StopRun, match="pruned by Optuna at epoch 3"):
        reporter.on_epoch_end(3, {"test_error": 0.4})
    assert trial.reports == [(1, 0.9), (2, 0.5), (3, 0.4)]


def test_tiny_study_end_to_end_and_export(isolated):
    sweep = load_sweep(TUNE, ["archs=[resnet8]", "tune.pruner=none"], epochs_scale=0.01, train_subset=60)
    study = run_tune(sweep, 2, storage=str(isolated / "s.journal"), tracking_uri=None, runs_dir=isolated / "runs",
                     device="cpu", threads=1)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    with sqlite3.connect(isolated / "mlflow.db") as con:
        tags = con.execute("SELECT value FROM tags WHERE key = 'adareg.trial' ORDER BY value").fetchall()
        statuses = con.execute("SELECT status FROM runs").fetchall()
        steps = con.execute("SELECT COUNT(*) FROM metrics WHERE key = 'test_error'").fetchone()[0]
    assert tags == [("0",), ("1",)] and statuses == [("FINISHED",), ("FINISHED",)] and steps == 2 * 15
    for t in study.trials:  # the objective is the run's last test error
        assert t.value == t.intermediate_values[15]

    summary, doc = best_sweep(sweep, study)
    export_sweep(doc, isolated / "best.yaml")
    exported = load_sweep(isolated / "best.yaml")
    assert list(exported.schemes) == ["tuned", "wd-1e-4", "01"]
    tuned = exported.run_config("tuned", "resnet8", "digits", 0)
    best = study.best_trial.params
    assert tuned.weight_decay[0][0] == best["weight_decay_base"] and tuned.weight_decay[2][4] == best[
        "weight_decay_peak"]
    assert tuned.grad_sparsity[0][2] == best["grad_sparsity"] and tuned.grad_sparsity[1] == (0.0,) * 5
    assert exported.tune is None and summary["completed"] == 2

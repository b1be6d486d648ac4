"""The sweep file's schedule language (issue 15): learning-rate families and tapers of the learning rate,
their run identity, ``adareg schedule``'s extra columns, and one-line errors for bad schedule input."""

import csv
import io
import math
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.identity import run_key
from orchestrator.sweep.expand import expand
from orchestrator.sweep.file import load_sweep
from training.schedules import phase_bounds, plan_for

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
TABLE1_TEXT = (SWEEPS / "table1.yaml").read_text()

EXTRA = """
  pow0:
    weight_decay: {taper: power, ref: 0.0001, alpha: 0}
  table01:
    weight_decay: {taper: table, values: {0.1: 0.0001, 0.01: 0.0001, 0.001: 0.0008, 0.0001: 0.0016, 0.00001: 0.0016}}
  dropout-up:
    weight_decay: 0.0001
    dropout: {taper: power, ref: 0.05, alpha: 0.25, max: 0.5}
    label_smoothing: [0.0, 0.0, 0.1, 0.1, 0.1]
    batch_size: {taper: table, values: {0.1: 128, 0.001: 64, 0.00001: 32}}
"""


@pytest.fixture
def sweep_file(tmp_path):
    """table1.yaml with extra schemes (and optionally other edits)."""
    def write(extra: str = EXTRA, old: str = "", new: str = "") -> Path:
        text = TABLE1_TEXT.replace(old, new, 1) if old else TABLE1_TEXT
        path = tmp_path / "x.yaml"
        path.write_text(text.rstrip("\n") + extra)  # schemes: is the file's last section
        return path
    return write


def test_power_law_alpha_0_is_the_constant_schemes_run(sweep_file):
    sweep = load_sweep(sweep_file())
    for arch in sweep.archs:
        for dataset in sweep.datasets:
            for seed in sweep.seeds:
                assert run_key(sweep.run_config("pow0", arch, dataset, seed)) == run_key(
                    sweep.run_config("wd-1e-4", arch, dataset, seed))
    with pytest.raises(UserError, match="schemes 'wd-1e-4' and 'pow0' give identical runs"):
        expand(sweep)


@pytest.mark.parametrize("scale", [None, 0.04])
def test_a_table_taper_equal_to_scheme_01s_grid_gives_scheme_01s_values_epoch_by_epoch(sweep_file, scale):
    sweep = load_sweep(sweep_file(), epochs_scale=scale)
    ours = plan_for(sweep.run_config("table01", "resnet14", "cifar10", 0))
    theirs = plan_for(sweep.run_config("01", "resnet14", "cifar10", 0))
    assert len(ours) == (450 if scale is None else 20)
    assert ours == theirs
    assert run_key(sweep.run_config("table01", "resnet14", "cifar10", 0)) == run_key(
        sweep.run_config("01", "resnet14", "cifar10", 0))


COSINE = """name: cosine
experiment: adareg-cosine
datasets: [digits]
archs: [resnet8]
seeds: [0]
schedule:
  lr: {family: cosine, max: 0.1, min: 0.0001}
  epochs_per_step: [50, 20, 20]     # cosine: epochs per cycle
schemes:
  wd-1e-3: {weight_decay: 0.001}
  wd-up: {weight_decay: {taper: power, ref: 0.0001, alpha: 0.5}, weight_decay_mode: decoupled}
"""


def test_cosine_restarts_in_a_sweep_file_are_sgdr_per_cycle(tmp_path):
    path = tmp_path / "cosine.yaml"
    path.write_text(COSINE)
    sweep = load_sweep(path)
    plan = plan_for(sweep.run_config("wd-1e-3", "resnet8", "digits", 0))
    assert phase_bounds(plan) == {1: (1, 50), 2: (51, 70), 3: (71, 90)}  # one cycle per phase
    for first, last in phase_bounds(plan).values():
        cycle = last - first + 1
        assert plan[first - 1].lr == 0.1
        assert math.isclose(plan[first - 1 + cycle // 2].lr, (0.1 + 0.0001) / 2, rel_tol=1e-12)
        textbook_last = 0.0001 + 0.5 * (0.1 - 0.0001) * (1 + math.cos(math.pi * (cycle - 1) / cycle))
        assert math.isclose(plan[last - 1].lr, textbook_last, rel_tol=1e-12)
    up = sweep.run_config("wd-up", "resnet8", "digits", 0)
    assert up.weight_decay_mode == "decoupled"
    assert [e.weight_decay for e in plan_for(up)] == pytest.approx([1e-4 * (e.lr / 0.1) ** -0.5 for e in plan],
                                                                   rel=1e-11)
    assert len(expand(sweep)) == 2


def schedule_csv(path, scheme, *more, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["schedule", scheme, "--sweep", str(path), "--format", "csv", *more])
    assert exit_.value.code == 0
    return list(csv.reader(io.StringIO(capsys.readouterr().out)))


def test_schedule_prints_every_other_regularizer_a_scheme_uses(sweep_file, capsys):
    path = sweep_file()
    rows = schedule_csv(path, "dropout-up", capsys=capsys)
    assert rows[0] == ["epoch", "phase", "lr", "weight_decay", "grad_sparsity", "dropout", "label_smoothing",
                       "batch_size"]
    by_epoch = {int(r[0]): r for r in rows[1:]}
    assert len(by_epoch) == 450
    # dropout 0.05 x (lr / 0.1) ^ -0.25, clipped at 0.5
    assert [by_epoch[e][5] for e in (1, 51, 101, 151, 201, 251)] == [
        "0.05", "0.088914", "0.158114", "0.281171", "0.5", "0.05"]
    assert [by_epoch[e][6] for e in (1, 51, 101, 151, 201)] == ["0", "0", "0.1", "0.1", "0.1"]
    # a table value holds from its rate down to the next listed one
    assert [by_epoch[e][7] for e in (1, 51, 101, 151, 201, 251)] == ["128", "128", "64", "64", "32", "128"]
    assert schedule_csv(path, "01", capsys=capsys)[0] == ["epoch", "phase", "lr", "weight_decay", "grad_sparsity"]


@pytest.mark.parametrize("extra, old, new, says", [
    ("", "  lr: [0.1, 0.01, 0.001, 0.0001, 0.00001]   # per step, restarted in each phase",
     "  lr: {family: cosine, max: 0.1, min: -0.001}", "schedule.lr.min: must be >= 0, got -0.001"),
    ("", "  lr: [0.1, 0.01, 0.001, 0.0001, 0.00001]   # per step, restarted in each phase",
     "  lr: {family: linear, values: [0.1]}", "schedule.lr.family: unknown family 'linear' (expected one of step, "
                                              "cosine)"),
    ("\n  bad:\n    weight_decay: 0.0001\n    dropout: -0.1\n", "", "",
     "schemes.bad.dropout: must be in [0, 1), got -0.1"),
    ("\n  bad:\n    weight_decay: 0.0001\n    batch_size: [50, 50, 12.5, 25, 25]\n", "", "",
     "schemes.bad.batch_size[2]: must be a whole number >= 1, got 12.5"),
    ("\n  bad:\n    weight_decay: 0.0001\n    batch_size: [50, 25]\n", "", "",
     "schemes.bad.batch_size: has 2 values, the schedule has 5 steps per phase"),
    ("\n  bad:\n    weight_decay: {taper: table, values: {0.01: 0.0001, 0.001: 0.001}}\n", "", "",
     "schemes.bad.weight_decay.values: no value for lr 0.1, which is in force at epoch 1: the table's largest lr "
     "is 0.01"),
    ("\n  bad:\n    weight_decay: {taper: cubic, ref: 0.0001}\n", "", "",
     "schemes.bad.weight_decay.taper: unknown taper 'cubic' (expected one of power, table)"),
])
def test_bad_schedule_input_is_one_error_line_exit_2_nothing_written(sweep_file, isolated, capsys, extra, old, new,
                                                                      says):
    path = sweep_file(extra, old, new)
    before = sorted(p.name for p in isolated.rglob("*"))
    for args in (["sweep", "plan", str(path)], ["schedule", "bad" if extra else "01", "--sweep", str(path)]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == ""
        assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err
        assert says in err, err
    assert sorted(p.name for p in isolated.rglob("*")) == before


def test_per_epoch_values_of_a_long_run_fit_in_mlflow_params():
    from orchestrator.store.runs import PARAM_LENGTH, config_params
    from training.config import RunConfig

    config = RunConfig(lr={"family": "cosine", "max": 0.1, "min": 0.0}, epochs_per_step=[250, 100, 100],
                       grad_sparsity=0.0, weight_decay={"taper": "power", "ref": 1e-4, "alpha": 0.7},
                       dropout={"taper": "power", "ref": 0.01, "alpha": 0.3, "max": 0.5})
    assert len(dict(config.per_epoch)["weight_decay"]) == 450
    params = config_params(config)
    assert max(len(v) for v in params.values()) <= PARAM_LENGTH
    assert "characters, sha256 " in params["per_epoch"]
    assert params["lr_family"] == "cosine"


def test_the_open_questions_sweep_plans_what_its_comments_say():
    """sweeps/beyond.yaml: 11 schemes x 3 seeds of 25 epochs; alpha 0 is the constant run; the cosine cycles
    are as long as the grid's phases; each taper is in force where it says."""
    sweep = load_sweep(SWEEPS / "beyond.yaml")
    planned = expand(sweep)
    assert len(planned) == 33 and len({p.key for p in planned}) == 33
    configs = {name: sweep.run_config(name, "resnet8", "digits", 0) for name in sweep.schemes}
    constant = configs["step-a0"].replace(scheme="x", weight_decay=((1e-4,) * 5,) * 3)
    assert run_key(configs["step-a0"]) == run_key(constant)
    plans = {name: plan_for(c) for name, c in configs.items()}
    assert {len(p) for p in plans.values()} == {25}
    assert phase_bounds(plans["cos-a0.4"]) == phase_bounds(plans["step-a0"]) == {1: (1, 15), 2: (16, 20),
                                                                                 3: (21, 25)}
    assert plans["cos-a0"][0].lr == 0.1 and plans["cos-a0"][14].lr < 2e-3  # the cycle's last epoch: t = 14 of 15
    assert math.isclose(plans["step-a0.4"][-1].weight_decay, 1e-4 * 1e4 ** 0.4, rel_tol=1e-9)
    assert plans["step-a1"][-1].weight_decay == 0.01  # 1e-4 x 1e4, clipped
    assert configs["decoupled-a0"].weight_decay_mode == "decoupled"
    assert [plans["dropout-up"][e].dropout for e in (0, 14)] == [0.05, 0.5]
    assert [plans["batch-down"][e].batch_size for e in (0, 14)] == [50, 10]
    assert [plans["early-only"][e].weight_decay for e in (0, 3, 6, 14)] == [1.6e-3, 1.6e-3, 1e-4, 1e-4]

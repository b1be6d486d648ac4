"""Table 1 of the paper, epoch by epoch, against the plans of sweeps/table1.yaml's schemes."""

import itertools
from pathlib import Path

import pytest

from orchestrator.sweep.file import load_sweep
from training.schedules import phase_bounds, plan_for, scaled_epochs

TABLE1_YAML = Path(__file__).resolve().parents[2] / "sweeps" / "table1.yaml"

# Copied from the paper's Table 1, independently of sweeps/table1.yaml:
# (first_epoch, last_epoch, lr, wd sch. 01, wd sch. 02, sparsity sch. 21, sch. 22, sch. 23)
TABLE1 = [
    (1, 50, 0.1, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (51, 100, 0.01, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (101, 150, 0.001, 0.0008, 0.0004, 0.5, 0.8, 0.3),
    (151, 200, 0.0001, 0.0016, 0.0008, 0.5, 0.8, 0.3),
    (201, 250, 0.00001, 0.0016, 0.0008, 0.5, 0.8, 0.3),
    (251, 270, 0.1, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (271, 290, 0.01, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (291, 310, 0.001, 0.0008, 0.0004, 0.0, 0.0, 0.0),
    (311, 330, 0.0001, 0.0016, 0.0008, 0.0, 0.0, 0.0),
    (331, 350, 0.00001, 0.0016, 0.0008, 0.0, 0.0, 0.0),
    (351, 370, 0.1, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (371, 390, 0.01, 0.0001, 0.0001, 0.0, 0.0, 0.0),
    (391, 410, 0.001, 0.0008, 0.0004, 0.0, 0.0, 0.0),
    (411, 430, 0.0001, 0.0016, 0.0008, 0.0, 0.0, 0.0),
    (431, 450, 0.00001, 0.0016, 0.0008, 0.0, 0.0, 0.0),
]
CONSTANT_WD = {"wd-1e-4": 1e-4, "wd-1e-3": 1e-3, "wd-2e-3": 2e-3, "wd-4e-3": 4e-3, "wd-8e-3": 8e-3}


def expected(scheme: str, row: tuple) -> tuple[float, float, float]:
    """(lr, weight_decay, grad_sparsity) of a Table 1 row under a scheme."""
    _, _, lr, wd01, wd02, sp21, sp22, sp23 = row
    by_scheme = {"01": (wd01, 0.0), "02": (wd02, 0.0), "21": (1e-4, sp21), "22": (1e-4, sp22),
                 "23": (1e-4, sp23), **{name: (wd, 0.0) for name, wd in CONSTANT_WD.items()}}
    return (lr, *by_scheme[scheme])


def table1_plan(scheme: str, **scale):
    sweep = load_sweep(TABLE1_YAML, **scale)
    return plan_for(sweep.run_config(scheme, "resnet14", "cifar10", 0))


def test_table1_rows_tile_450_epochs():
    assert TABLE1[0][0] == 1 and TABLE1[-1][1] == 450
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(TABLE1))


@pytest.mark.parametrize("scheme", ["01", "02", "21", "22", "23", *CONSTANT_WD])
def test_every_epoch_matches_table1(scheme):
    plan = table1_plan(scheme)
    assert len(plan) == 450
    assert [e.epoch for e in plan] == list(range(1, 451))
    for row in TABLE1:
        for epoch in range(row[0], row[1] + 1):
            e = plan[epoch - 1]
            assert (e.lr, e.weight_decay, e.grad_sparsity) == pytest.approx(expected(scheme, row), rel=1e-12), epoch


@pytest.mark.parametrize("epoch, lr, wd01, sp22, phase, step", [
    (50, 0.1, 1e-4, 0.0, 1, 1), (51, 0.01, 1e-4, 0.0, 1, 2),
    (100, 0.01, 1e-4, 0.0, 1, 2), (101, 0.001, 8e-4, 0.8, 1, 3),
    (250, 1e-5, 1.6e-3, 0.8, 1, 5), (251, 0.1, 1e-4, 0.0, 2, 1),
    (270, 0.1, 1e-4, 0.0, 2, 1), (271, 0.01, 1e-4, 0.0, 2, 2),
    (350, 1e-5, 1.6e-3, 0.0, 2, 5), (351, 0.1, 1e-4, 0.0, 3, 1),
    (450, 1e-5, 1.6e-3, 0.0, 3, 5),
])
def test_boundaries(epoch, lr, wd01, sp22, phase, step):
    e01, e22 = table1_plan("01")[epoch - 1], table1_plan("22")[epoch - 1]
    assert (e01.epoch, e01.phase, e01.step) == (epoch, phase, step)
    assert (e01.lr, e01.weight_decay, e22.grad_sparsity, e22.weight_decay) == pytest.approx((lr, wd01, sp22, 1e-4))


def test_phases():
    plan = table1_plan("01")
    assert phase_bounds(plan) == {1: (1, 250), 2: (251, 350), 3: (351, 450)}


@pytest.mark.parametrize("scale, epochs, bounds", [
    (0.1, 45, {1: (1, 25), 2: (26, 35), 3: (36, 45)}),
    (0.04, 20, {1: (1, 10), 2: (11, 15), 3: (16, 20)}),
    (0.02, 15, {1: (1, 5), 2: (6, 10), 3: (11, 15)}),
])
def test_scaled_plans_keep_the_shape(scale, epochs, bounds):
    plan = table1_plan("22", epochs_scale=scale)
    assert len(plan) == epochs
    assert phase_bounds(plan) == bounds
    # every step keeps Table 1's values, in order
    steps = [(e.phase, e.step, e.lr, e.grad_sparsity) for e in plan]
    assert list(dict.fromkeys(steps)) == [
        (p, s, lr, sp if p == 1 else 0.0)
        for p in (1, 2, 3) for s, (lr, sp) in enumerate(zip([0.1, 0.01, 0.001, 0.0001, 0.00001],
                                                            [0, 0, 0.8, 0.8, 0.8]), start=1)]


@pytest.mark.parametrize("n, scale, epochs", [
    (1, 0.5, 1), (5, 0.5, 3), (3, 0.5, 2), (7, 0.5, 4), (45, 0.1, 5),  # half rounds up
    (50, 0.04, 2), (20, 0.04, 1), (20, 0.1, 2), (50, 0.1, 5),
    (20, 0.02, 1), (50, 0.01, 1), (1, 0.1, 1), (1, 0.001, 1),  # never below 1
    (50, 1.0, 50), (20, 2.0, 40), (4, 0.6, 2),
])
def test_scaled_epochs(n, scale, epochs):
    assert scaled_epochs(n, scale) == epochs

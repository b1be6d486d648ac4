"""Report statistics, families and figures on hand-built frames (no MLflow)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from orchestrator.report import figures
from orchestrator.report.stats import SUMMARY_COLUMNS, phase_summary, welch
from training.config import RunConfig
from training.schedules import plan_for


def test_welch_matches_the_textbook_formula_and_scipy():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0, 10.0])
    diff, lo, hi, p = welch(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5  # 5/12 and 2
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert diff == -3.5
    assert df == pytest.approx(5.5208, abs=1e-4)
    assert (lo, hi) == pytest.approx((-3.5 - half, -3.5 + half), rel=1e-12)
    assert (lo, hi, p) == pytest.approx((-7.3854, 0.3854, 0.06913), abs=1e-4)
    assert p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)


@pytest.mark.parametrize("a, b", [([1.0], [2.0, 3.0]), ([1.0, 2.0], [3.0]), ([2.0, 2.0], [3.0, 3.0])])
def test_welch_without_spread_on_a_side_leaves_ci_and_p_empty(a, b):
    diff, lo, hi, p = welch(np.array(a), np.array(b))
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert math.isnan(lo) and math.isnan(hi) and math.isnan(p)


def frame_of(values: dict[tuple[str, int], list[float]], phases: list[int]) -> pd.DataFrame:
    """A long frame of one metric (test_error) for schemes x seeds over len(phases) epochs."""
    rows = []
    for (scheme, seed), series in values.items():
        for epoch, (v, ph) in enumerate(zip(series, phases), start=1):
            rows.append(dict(run_key=f"{scheme}-{seed}", group_key=f"g-{scheme}", dataset="digits", arch="resnet14",
                             scheme=scheme, seed=seed, epoch=epoch, phase=ph, metric="test_error", value=v))
    return pd.DataFrame(rows)


def test_phase_summary_equals_pandas_by_hand():
    # 2 phases: epochs 1-3 and 4-5; seed 2 of 'taper' stopped at epoch 4 (counts in phase 1 only).
    phases = [1, 1, 1, 2, 2]
    values = {
        ("base", 0): [0.5, 0.3, 0.40, 0.35, 0.30],
        ("base", 1): [0.6, 0.2, 0.30, 0.25, 0.20],
        ("base", 2): [0.7, 0.4, 0.45, 0.30, 0.28],
        ("taper", 0): [0.5, 0.25, 0.20, 0.22, 0.15],
        ("taper", 1): [0.4, 0.35, 0.30, 0.12, 0.10],
        ("taper", 2): [0.6, 0.15, 0.25, 0.2],
    }
    frame = frame_of(values, phases)
    bounds = pd.DataFrame([(g, 1, 1, 3) for g in ("g-base", "g-taper")] + [(g, 2, 4, 5) for g in ("g-base", "g-taper")],
                          columns=["group_key", "phase", "first", "last"])
    out = phase_summary(frame, bounds, baseline="base", metrics=("test_error",), scheme_order=["base", "taper"])
    assert list(out.columns) == SUMMARY_COLUMNS
    assert list(zip(out["scheme"], out["phase"])) == [("base", 1), ("base", 2), ("taper", 1), ("taper", 2)]

    def end(scheme, seeds, epoch):
        return pd.Series([values[(scheme, s)][epoch - 1] for s in seeds])

    for (scheme, phase, seeds, first, last) in [("base", 1, [0, 1, 2], 1, 3), ("base", 2, [0, 1, 2], 4, 5),
                                                 ("taper", 1, [0, 1, 2], 1, 3), ("taper", 2, [0, 1], 4, 5)]:
        row = out[(out["scheme"] == scheme) & (out["phase"] == phase)].iloc[0]
        v = end(scheme, seeds, last)
        mins = pd.Series([min(values[(scheme, s)][first - 1:last]) for s in seeds])
        assert (row["epoch"], row["n"]) == (last, len(seeds))
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(v.std(), rel=1e-12)
        assert (row["best"], row["worst"]) == (v.min(), v.max())
        assert row["phase_min_mean"] == pytest.approx(mins.mean(), rel=1e-12)
        assert row["phase_min_best"] == mins.min()
        if scheme == "base":
            assert row[["baseline", "diff", "ci_low", "ci_high", "p_value"]].isna().all()
        else:
            b = end("base", [0, 1, 2], last)
            assert row["baseline"] == "base"
            assert row["diff"] == pytest.approx(v.mean() - b.mean(), rel=1e-12)
            assert row["p_value"] == pytest.approx(sps.ttest_ind(v, b, equal_var=False).pvalue, rel=1e-12)


def test_phase_summary_with_one_seed_leaves_spread_and_test_empty():
    frame = frame_of({("base", 0): [0.5, 0.4], ("x", 0): [0.3, 0.2], ("x", 1): [0.35, 0.25]}, [1, 1])
    bounds = pd.DataFrame([("g-base", 1, 1, 2), ("g-x", 1, 1, 2)], columns=["group_key", "phase", "first", "last"])
    out = phase_summary(frame, bounds, baseline="base", metrics=("test_error",)).set_index("scheme")
    assert out.loc["base", "n"] == 1 and math.isnan(out.loc["base", "std"])
    assert out.loc["x", "diff"] == pytest.approx(0.225 - 0.4)
    assert math.isnan(out.loc["x", "ci_low"]) and math.isnan(out.loc["x", "p_value"])


@pytest.mark.parametrize("schemes, expected", [
    (["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"],
     {"weight-decay": ("01", "02", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"),
      "sparsity": ("21", "22", "23", "wd-1e-4")}),
    (["wd-1e-4", "01", "22", "tuned"],
     {"weight-decay": ("01",), "sparsity": ("wd-1e-4", "22"), "other": ("wd-1e-4", "tuned")}),
    (["wd-1e-4"], {"other": ("wd-1e-4",)}),
    (["22", "tuned"], {"sparsity": ("22",), "other": ("tuned",)}),  # no baseline run: nothing to add
])
def test_family_members(schemes, expected):
    assert figures.family_members(schemes, "wd-1e-4") == expected


def test_family_references_stay_with_their_family_whatever_the_baseline():
    assert figures.family_members(["wd-1e-4", "22"], "22") == {"sparsity": ("wd-1e-4", "22")}
    assert figures.family_members(["wd-1e-4", "01", "tuned"], "01") == {
        "weight-decay": ("01",), "other": ("wd-1e-4", "01", "tuned")}


def test_figure_specs_name_the_papers_six_figures_and_draw_the_rest():
    schemes = ["01", "21", "wd-1e-4"]
    combos = [(d, a, s) for d in ("cifar10", "cifar100") for a in ("resnet14", "resnet32") for s in schemes]
    present = pd.DataFrame(combos, columns=["dataset", "arch", "scheme"])
    specs = figures.figure_specs(present, schemes, "wd-1e-4")
    assert [(s.paper, s.dataset, s.arch, s.family) for s in specs] == [
        (1, "cifar10", "resnet14", "weight-decay"), (2, "cifar10", "resnet32", "weight-decay"),
        (3, "cifar100", "resnet14", "weight-decay"), (4, "cifar100", "resnet32", "weight-decay"),
        (5, "cifar10", "resnet32", "sparsity"), (6, "cifar100", "resnet14", "sparsity"),
        (None, "cifar10", "resnet14", "sparsity"), (None, "cifar100", "resnet32", "sparsity")]
    assert specs[0].stem == "fig1-cifar10-resnet14-weight-decay"
    assert specs[0].title == "Fig 1 of the paper: Shallow Resnet (resnet14), CIFAR-10, weight decay"
    assert specs[6].stem == "cifar10-resnet14-sparsity"
    assert specs[6].title.endswith("(not in the paper)")


def test_scheme_colours_follow_the_sweep_not_the_figure():
    palette = figures.scheme_palette(["01", "02", "wd-1e-4", "22"])
    assert len(set(palette.values())) == 4
    assert palette == figures.scheme_palette(["01", "02", "wd-1e-4", "22"])
    assert figures.scheme_palette(["01", "02", "wd-1e-4", "22", "x"])["wd-1e-4"] == palette["wd-1e-4"]


def test_describe_and_short_labels():
    taper = RunConfig(weight_decay=[1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3])
    sparse = RunConfig(grad_sparsity=[[0, 0, 0.8, 0.8, 0.8], [0] * 5, [0] * 5])
    assert figures.describe(taper) == "wd 1e-4→8e-4→1.6e-3"
    assert figures.describe(sparse) == "wd 1e-4, sparsity 0%→80% in phase 1"
    assert figures.lr_steps(plan_for(RunConfig(epochs_scale=0.04)))[:6] == [
        (1, 0.1), (3, 0.01), (5, 0.001), (7, 0.0001), (9, 1e-05), (11, 0.1)]

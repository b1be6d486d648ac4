"""Report statistics, families and figures on hand-built frames (no MLflow)."""

from __future__ import annotations

import colorsys
import math

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from orchestrator.report import comparison_plan, figures, is_tuned
from orchestrator.report.stats import (
    SIGNFLIP_MAX_PAIRS,
    SUMMARY_COLUMNS,
    holm,
    paired_t,
    phase_summary,
    sign_flip,
    welch,
)
from training.config import RunConfig
from training.schedules import phase_bounds, plan_for


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


def test_paired_t_matches_scipy_and_the_textbook_formula():
    a, b = np.array([0.30, 0.25, 0.40, 0.35]), np.array([0.33, 0.30, 0.41, 0.36])
    diff, lo, hi, p = paired_t(a, b)
    d = a - b
    half = sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert diff == pytest.approx(d.mean(), rel=1e-12)
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
    assert p == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert math.isnan(paired_t(a[:1], b[:1])[1]) and math.isnan(paired_t(a * 4, a * 4 + 0.5)[3])


def test_sign_flip_is_exact():
    assert sign_flip(np.array([1.0, 2.0, 3.0])) == 2 / 8  # only +++ and --- reach |sum| = 6
    assert sign_flip(np.array([1.0, -1.0, 2.0, 0.0])) == 12 / 16  # |sum| >= 2 in 12 of the 16 patterns
    assert sign_flip(np.array([0.1] * 5)) == 2 / 32  # the smallest p five seeds can give
    assert math.isnan(sign_flip(np.array([1.0]))) and math.isnan(sign_flip(np.ones(SIGNFLIP_MAX_PAIRS + 1)))
    d = np.array([0.3, -0.1, 0.25, 0.4, -0.05, 0.2])
    exact = sps.permutation_test((d,), np.sum, permutation_type="samples", n_resamples=np.inf).pvalue
    assert sign_flip(d) == pytest.approx(exact, rel=1e-12)


def test_holm_by_hand():
    # m = 4 (NaN is no test): 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    out = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert out[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12) and math.isnan(out[4])
    assert holm([0.5, 0.4]).tolist() == [0.8, 0.8] and holm([0.9, 0.6]).tolist() == [1.0, 1.0]
    assert holm([]).size == 0 and math.isnan(holm([math.nan])[0])


PHASES = [1, 1, 1, 2, 2]
BOUNDS = pd.DataFrame([(g, 1, 1, 3) for g in ("g-base", "g-taper", "g-x")] + [(g, 2, 4, 5) for g in
                      ("g-base", "g-taper", "g-x")], columns=["group_key", "phase", "first", "last"])
VALUES = {  # 2 phases: epochs 1-3 and 4-5; seed 2 of 'taper' stopped at epoch 4 (counts in phase 1 only)
    ("base", 0): [0.5, 0.3, 0.40, 0.35, 0.30],
    ("base", 1): [0.6, 0.2, 0.30, 0.25, 0.20],
    ("base", 2): [0.7, 0.4, 0.45, 0.30, 0.28],
    ("base", 3): [0.6, 0.3, 0.35, 0.32, 0.26],
    ("taper", 0): [0.5, 0.25, 0.20, 0.22, 0.15],
    ("taper", 1): [0.4, 0.35, 0.30, 0.12, 0.10],
    ("taper", 2): [0.6, 0.15, 0.25, 0.2],
    ("taper", 3): [0.6, 0.25, 0.34, 0.2, 0.21],
    ("x", 0): [0.5, 0.4, 0.41, 0.3, 0.29],
    ("x", 1): [0.5, 0.4, 0.28, 0.3, 0.22],
    ("x", 3): [0.5, 0.4, 0.36, 0.3, 0.27],  # no seed 2: 3 pairs with base
}


def end(scheme, seeds, epoch):
    return np.array([VALUES[(scheme, s)][epoch - 1] for s in seeds])


def test_phase_summary_is_paired_by_seed_as_scipy_computes_it_with_holm_by_hand():
    """The acceptance check on a hand-built frame: diff, CI and p of scipy's ttest_rel on the seeds
    both schemes reached, Holm by hand over each (metric, baseline) table, the sign-flip p."""
    frame = frame_of(VALUES, PHASES)
    out = phase_summary(frame, BOUNDS, baselines=["base"], metrics=("test_error",), scheme_order=["base", "taper", "x"])
    assert list(out.columns) == SUMMARY_COLUMNS
    assert list(zip(out["scheme"], out["phase"], out["baseline"].fillna(""))) == [
        ("base", 1, ""), ("base", 2, ""), ("taper", 1, "base"), ("taper", 2, "base"), ("x", 1, "base"),
        ("x", 2, "base")]
    raw = {}
    for scheme, phase, seeds, last in [("taper", 1, [0, 1, 2, 3], 3), ("taper", 2, [0, 1, 3], 5),
                                       ("x", 1, [0, 1, 3], 3), ("x", 2, [0, 1, 3], 5)]:
        row = out[(out["scheme"] == scheme) & (out["phase"] == phase)].iloc[0]
        a, b = end(scheme, seeds, last), end("base", seeds, last)
        t = sps.ttest_rel(a, b)
        ci = t.confidence_interval(0.95)
        assert (row["test"], row["n_pairs"]) == ("paired t-test", len(seeds))
        assert row["diff"] == pytest.approx((a - b).mean(), rel=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
        assert row["p_raw"] == pytest.approx(t.pvalue, rel=1e-12)
        assert row["p_signflip"] == pytest.approx(sps.permutation_test(
            (a - b,), np.sum, permutation_type="samples", n_resamples=np.inf).pvalue, rel=1e-12)
        raw[(scheme, phase)] = row["p_raw"]
    # Holm over the table's 4 tests: the i-th smallest times (5 - i), then the running maximum
    ordered = sorted(raw, key=raw.get)
    running = 0.0
    for i, key in enumerate(ordered, start=1):
        running = max(running, min(1.0, (5 - i) * raw[key]))
        row = out[(out["scheme"] == key[0]) & (out["phase"] == key[1])].iloc[0]
        assert row["p_holm"] == pytest.approx(running, rel=1e-12)
    base = out[out["scheme"] == "base"]
    assert base[["baseline", "test", "n_pairs", "diff", "p_raw", "p_holm"]].isna().all().all()


def test_phase_summary_spread_columns_equal_pandas_by_hand():
    frame = frame_of(VALUES, PHASES)
    out = phase_summary(frame, BOUNDS, baselines=["base"], metrics=("test_error",), scheme_order=["base", "taper", "x"])
    for scheme, phase, seeds, first, last in [("base", 1, [0, 1, 2, 3], 1, 3), ("base", 2, [0, 1, 2, 3], 4, 5),
                                              ("taper", 1, [0, 1, 2, 3], 1, 3), ("taper", 2, [0, 1, 3], 4, 5)]:
        row = out[(out["scheme"] == scheme) & (out["phase"] == phase)].iloc[0]
        v = pd.Series(end(scheme, seeds, last), index=seeds)
        mins = pd.Series([min(VALUES[(scheme, s)][first - 1:last]) for s in seeds])
        assert (row["epoch"], row["n"]) == (last, len(seeds))
        assert row["mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(v.std(), rel=1e-12)
        assert (row["best"], row["worst"]) == (v.min(), v.max())
        assert (row["best_seed"], row["worst_seed"]) == (v.idxmin(), v.idxmax())
        assert row["phase_min_mean"] == pytest.approx(mins.mean(), rel=1e-12)
        assert row["phase_min_best"] == mins.min()


def test_phase_summary_unpaired_is_welch_on_every_run_and_baselines_repeat():
    frame = frame_of(VALUES, PHASES)
    out = phase_summary(frame, BOUNDS, baselines=["base", "x"], metrics=("test_error",), paired=False)
    assert len(out) == 2 * (1 + 2 + 1)  # per phase: base against x, taper against both, x against base
    row = out[(out["scheme"] == "taper") & (out["phase"] == 2) & (out["baseline"] == "x")].iloc[0]
    a, b = end("taper", [0, 1, 3], 5), end("x", [0, 1, 3], 5)
    assert row["test"] == "Welch t-test" and pd.isna(row["n_pairs"]) and math.isnan(row["p_signflip"])
    assert row["p_raw"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    row = out[(out["scheme"] == "taper") & (out["phase"] == 1) & (out["baseline"] == "base")].iloc[0]
    assert row["p_raw"] == pytest.approx(sps.ttest_ind(end("taper", [0, 1, 2, 3], 3), end("base", [0, 1, 2, 3], 3),
                                                       equal_var=False).pvalue, rel=1e-12)
    table = out[out["baseline"] == "x"].sort_values("p_raw")  # base and taper, 2 phases: a family of 4
    assert table["p_holm"].iloc[0] == pytest.approx(min(1, 4 * table["p_raw"].iloc[0]), rel=1e-12)


def test_phase_summary_with_one_seed_leaves_spread_and_test_empty():
    frame = frame_of({("base", 0): [0.5, 0.4], ("x", 0): [0.3, 0.2], ("x", 1): [0.35, 0.25]}, [1, 1])
    bounds = pd.DataFrame([("g-base", 1, 1, 2), ("g-x", 1, 1, 2)], columns=["group_key", "phase", "first", "last"])
    out = phase_summary(frame, bounds, baselines=["base"], metrics=("test_error",)).set_index("scheme")
    assert out.loc["base", "n"] == 1 and math.isnan(out.loc["base", "std"])
    assert out.loc["x", "n_pairs"] == 1 and out.loc["x", "diff"] == pytest.approx(0.2 - 0.4)
    assert math.isnan(out.loc["x", "ci_low"]) and math.isnan(out.loc["x", "p_raw"])


def test_tuned_schemes_are_marked_selected_on_validation():
    frame = frame_of({("tuned", 0): [0.5, 0.4], ("tuned-2", 0): [0.3, 0.2], ("wd-1e-4", 0): [0.3, 0.25]}, [1, 1])
    bounds = pd.DataFrame([(f"g-{s}", 1, 1, 2) for s in ("tuned", "tuned-2", "wd-1e-4")],
                          columns=["group_key", "phase", "first", "last"])
    out = phase_summary(frame, bounds, metrics=("test_error",)).set_index("scheme")
    assert out["selected_on_validation"].to_dict() == {"tuned": True, "tuned-2": True, "wd-1e-4": False}
    assert is_tuned("tuned") and is_tuned("tuned-wd") and not is_tuned("01") and not is_tuned("my-tuned")


@pytest.mark.parametrize("schemes, baselines, expected", [
    (["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"], None,
     {"01": ("wd-1e-3", "wd-8e-3"), "02": ("wd-1e-3", "wd-8e-3"), "21": ("wd-1e-4",), "22": ("wd-1e-4",),
      "23": ("wd-1e-4",), "wd-1e-4": ("wd-1e-3", "wd-8e-3"), "wd-1e-3": ("wd-8e-3",),
      "wd-2e-3": ("wd-1e-3", "wd-8e-3"), "wd-4e-3": ("wd-1e-3", "wd-8e-3"), "wd-8e-3": ("wd-1e-3",)}),
    # the demo (no wd-1e-3): wd-8e-3 falls back to the other default baseline with runs
    (["01", "02", "wd-1e-4", "wd-8e-3", "22"], None,
     {"01": ("wd-8e-3",), "02": ("wd-8e-3",), "wd-1e-4": ("wd-8e-3",), "wd-8e-3": ("wd-1e-4",), "22": ("wd-1e-4",)}),
    (["wd-1e-4", "01", "tuned"], None, {"wd-1e-4": (), "01": ("wd-1e-4",), "tuned": ("wd-1e-4",)}),
    (["01", "22"], None, {"01": (), "22": ()}),
    (["01", "22", "wd-1e-4"], ["22", "wd-9", "22"], {"01": ("22",), "22": (), "wd-1e-4": ("22",)}),
])
def test_comparison_plan(schemes, baselines, expected):
    assert comparison_plan(schemes, baselines) == expected


@pytest.mark.parametrize("schemes, references, expected", [
    (["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"], None,
     {"weight-decay": ("01", "02", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"),
      "sparsity": ("21", "22", "23", "wd-1e-4")}),
    (["wd-1e-4", "01", "22", "tuned"], "wd-1e-4",
     {"weight-decay": ("wd-1e-4", "01"), "sparsity": ("wd-1e-4", "22"), "other": ("wd-1e-4", "tuned")}),
    (["wd-1e-4"], None, {"other": ("wd-1e-4",)}),
    (["22", "tuned"], ["wd-1e-4"], {"sparsity": ("22",), "other": ("tuned",)}),  # no baseline run: nothing to add
    (["wd-1e-4", "01", "tuned", "22"], {"01": ("wd-1e-4",), "tuned": ("01",), "22": ("wd-1e-4",)},
     {"weight-decay": ("wd-1e-4", "01"), "sparsity": ("wd-1e-4", "22"), "other": ("01", "tuned")}),
])
def test_family_members(schemes, references, expected):
    assert figures.family_members(schemes, references) == expected


def test_family_references_stay_with_their_family_whatever_the_baseline():
    assert figures.family_members(["wd-1e-4", "22"], "22") == {"sparsity": ("wd-1e-4", "22")}
    assert figures.family_members(["wd-1e-4", "01", "tuned"], "01") == {
        "weight-decay": ("01",), "other": ("wd-1e-4", "01", "tuned")}


def test_figure_specs_name_the_papers_six_figures_and_draw_the_rest():
    schemes = ["01", "21", "wd-1e-4"]
    combos = [(d, a, s) for d in ("cifar10", "cifar100") for a in ("resnet14", "resnet32") for s in schemes]
    present = pd.DataFrame(combos, columns=["dataset", "arch", "scheme"])
    specs = figures.figure_specs(present, schemes, comparison_plan(schemes))
    assert [(s.paper, s.dataset, s.arch, s.family) for s in specs] == [
        (1, "cifar10", "resnet14", "weight-decay"), (2, "cifar10", "resnet32", "weight-decay"),
        (3, "cifar100", "resnet14", "weight-decay"), (4, "cifar100", "resnet32", "weight-decay"),
        (5, "cifar10", "resnet32", "sparsity"), (6, "cifar100", "resnet14", "sparsity"),
        (None, "cifar10", "resnet14", "sparsity"), (None, "cifar100", "resnet32", "sparsity")]
    assert specs[0].schemes == ("01", "wd-1e-4")  # 01 is compared with wd-1e-4 (no wd-1e-3, wd-8e-3 here)
    assert specs[0].stem == "fig1-cifar10-resnet14-weight-decay"
    assert specs[0].title == "Fig 1 of the paper: Shallow Resnet (resnet14), CIFAR-10, weight decay"
    assert specs[6].stem == "cifar10-resnet14-sparsity"
    assert specs[6].title.endswith("(not in the paper)")


def hue(colour) -> float:
    """Hue in degrees of a matplotlib colour."""
    return 360 * colorsys.rgb_to_hsv(*mcolors.to_rgb(colour))[0]


def test_scheme_colours_are_the_papers_and_stable():
    table1 = ["01", "02", "21", "22", "23", "wd-1e-4", "wd-1e-3", "wd-2e-3", "wd-4e-3", "wd-8e-3"]
    palette = figures.scheme_palette(table1)
    assert {s: palette[s] for s in ("wd-1e-3", "wd-8e-3", "01", "02")} == {
        "wd-1e-3": "#e41a1c", "wd-8e-3": "#d916d9", "01": "#e0a30b", "02": "#10b5d6"}
    assert min(hue(palette["wd-1e-3"]), 360 - hue(palette["wd-1e-3"])) < 5  # red
    assert 295 < hue(palette["wd-8e-3"]) < 305  # magenta
    assert 40 < hue(palette["01"]) < 50 and 185 < hue(palette["02"]) < 195  # gold yellow, cyan
    assert len(set(palette.values())) == 10
    for c in figures.OTHER_COLOURS:  # none is red, magenta, yellow or cyan (or near them)
        h, sat, _ = colorsys.rgb_to_hsv(*mcolors.to_rgb(c))
        assert sat < 0.1 or not (h * 360 < 12 or h * 360 > 280 or 38 < h * 360 < 65 or 175 < h * 360 < 200), c
    assert set(palette.values()) - set(figures.PAPER_COLOURS.values()) <= set(figures.OTHER_COLOURS)
    # the same colour whatever the sweep holds, in every figure; distinct within a sweep
    assert figures.scheme_palette(["tuned", "01"])["tuned"] == figures.scheme_palette(["tuned"])["tuned"]
    assert figures.scheme_palette(table1 + ["tuned"])["22"] == palette["22"]
    k = len(figures.OTHER_COLOURS)
    many = figures.scheme_palette([f"s{i}" for i in range(k)])
    assert len(set(many.values())) == k and set(many.values()) == set(figures.OTHER_COLOURS)


TWENTY = plan_for(RunConfig(epochs_scale=0.04))  # 20 epochs in phases 1-10, 11-15, 16-20


def test_a_figure_draws_the_papers_colours_mean_best_and_worst_run_labelled():
    """Four paper schemes x 3 seeds on a hand-built frame: every axis holds, per scheme, the mean
    (colour of the paper) and the best and worst run's whole curves, picked by test error at the
    phase's last epoch and labelled with their seeds."""
    rng = np.random.default_rng(0)
    schemes = ["wd-1e-3", "wd-8e-3", "01", "02"]
    values = {(s, seed): list(rng.uniform(0.05, 0.5, 20)) for s in schemes for seed in (0, 1, 2)}
    frame = pd.concat([frame_of(values, [e.phase for e in TWENTY]),
                       frame_of(values, [e.phase for e in TWENTY]).assign(metric="test_loss")])
    bounds = pd.DataFrame([(f"g-{s}", ph, first, last) for s in schemes
                           for ph, (first, last) in phase_bounds(TWENTY).items()],
                          columns=["group_key", "phase", "first", "last"])
    picks = figures.pick_runs(frame, bounds, "test_error")
    curves = figures.picked_curves(frame, picks, figures.FIGURE_METRICS)
    bands = figures.seed_bands(frame, figures.FIGURE_METRICS)
    palette = figures.scheme_palette(["wd-1e-4"] + schemes)
    spec = figures.FigureSpec("digits", "resnet14", "weight-decay", tuple(schemes))
    fig = figures.draw(spec, bands, {s: TWENTY for s in schemes}, {s: s for s in schemes}, palette,
                       figures.FIGURE_METRICS, picks, curves)
    expected_hex = {"wd-1e-3": "#e41a1c", "wd-8e-3": "#d916d9", "01": "#e0a30b", "02": "#10b5d6"}
    for i, ax in enumerate(fig.axes):
        phase = i % 3 + 1
        first, last = phase_bounds(TWENTY)[phase]
        lines = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
        assert len(lines) == 12
        for s in schemes:
            ends = {seed: values[(s, seed)][last - 1] for seed in (0, 1, 2)}
            best, worst = min(ends, key=ends.get), max(ends, key=ends.get)
            mean = lines[f"{s}: mean of 3 seeds"]
            assert mcolors.to_hex(mean.get_color()) == expected_hex[s] and mean.get_linestyle() == "-"
            assert list(mean.get_ydata()) == pytest.approx(
                [np.mean([values[(s, k)][e - 1] for k in (0, 1, 2)]) for e in range(first, last + 1)])
            for role, seed, style in (("best", best, "--"), ("worst", worst, "-.")):
                run = lines[f"{s}: {role} run (seed {seed})"]
                assert mcolors.to_hex(run.get_color()) == expected_hex[s] and run.get_linestyle() == style
                assert list(run.get_xdata()) == list(range(first, last + 1))
                assert list(run.get_ydata()) == values[(s, seed)][first - 1:last]
        assert len(ax.collections) == 0  # no envelope unless asked
    key, legend = fig.legends
    assert [t.get_text() for t in key.get_texts()] == [
        "mean of 3 seeds", "best run (lowest test error at the phase's last epoch)",
        "worst run (highest test error there)"]
    texts = [t.get_text() for t in legend.get_texts()]
    seeds = picks.set_index(["scheme", "phase"])

    def by_phase(role: str) -> str:
        return "/".join(str(seeds.loc[("wd-1e-3", p), f"{role}_seed"]) for p in (1, 2, 3))

    assert texts[0] == f"wd-1e-3; best run seed {by_phase('best')}, worst run seed {by_phase('worst')}"
    fig = figures.draw(spec, bands, {s: TWENTY for s in schemes}, {s: s for s in schemes}, palette,
                       figures.FIGURE_METRICS, picks, curves, envelope=True)
    assert all(len(ax.collections) == 4 for ax in fig.axes)


def test_pick_runs_ranks_by_the_phase_end_nan_is_worst_and_falls_back_to_the_latest_epoch():
    values = {("a", 0): [0.3, 0.2, 0.5], ("a", 1): [0.1, float("nan"), 0.4], ("a", 2): [0.3, 0.25],
              ("a", 3): [0.2, 0.15, 0.4]}
    frame = frame_of(values, [1, 1, 2])
    bounds = pd.DataFrame([("g-a", 1, 1, 2), ("g-a", 2, 3, 4)], columns=["group_key", "phase", "first", "last"])
    picks = figures.pick_runs(frame, bounds).set_index("phase")
    assert picks.loc[1, ["epoch", "n", "best_seed", "worst_seed"]].tolist() == [2, 4, 3, 1]  # NaN is the worst
    # nobody reached epoch 4: ranked at epoch 3, ties to the lowest seed (0.4 at seeds 1 and 3)
    assert picks.loc[2, ["epoch", "n", "best_seed", "worst_seed"]].tolist() == [3, 3, 1, 0]


def test_describe_and_short_labels():
    taper = RunConfig(weight_decay=[1e-4, 1e-4, 8e-4, 1.6e-3, 1.6e-3])
    sparse = RunConfig(grad_sparsity=[[0, 0, 0.8, 0.8, 0.8], [0] * 5, [0] * 5])
    assert figures.describe(taper) == "wd 1e-4→8e-4→1.6e-3"
    assert figures.describe(sparse) == "wd 1e-4, sparsity 0%→80% in phase 1"
    assert figures.lr_steps(plan_for(RunConfig(epochs_scale=0.04)))[:6] == [
        (1, 0.1), (3, 0.01), (5, 0.001), (7, 0.0001), (9, 1e-05), (11, 0.1)]

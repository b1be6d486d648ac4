"""Seed statistics the paper lacks. Per phase, at the phase's last epoch: the spread over seeds,
and the difference to each baseline scheme, paired by seed (the schemes of a sweep share seeds:
the same initialisation, data order and crops) with a paired t-test, an exact sign-flip test and a
95 % confidence interval; p-values Holm-adjusted within each table (dataset, arch, metric, baseline).
Welch's unpaired test stays available for selections whose seeds differ."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats

from orchestrator.report import comparison_plan, is_tuned

SUMMARY_METRICS = ("test_loss", "test_error")
KEYS = ["dataset", "arch", "scheme", "phase", "metric"]
FAMILY = ["dataset", "arch", "metric", "baseline"]
"""One Holm family: the comparisons of one table (every scheme and phase against one baseline)."""
TEST_COLUMNS = ["baseline", "test", "n_pairs", "diff", "ci_low", "ci_high", "p_raw", "p_holm", "p_signflip",
                "p_signflip_holm"]
SUMMARY_COLUMNS = KEYS + ["epoch", "n", "mean", "std", "best", "worst", "best_seed", "worst_seed", "phase_min_mean",
                          "phase_min_best"] + TEST_COLUMNS + ["selected_on_validation"]
PAIRED_TEST = "paired t-test"
WELCH_TEST = "Welch t-test"
SIGNFLIP_MAX_PAIRS = 16
"""The exact sign-flip test enumerates 2^n sign patterns: up to 65,536."""


def method_line(paired: bool = True, pairs: int | None = None) -> str:
    """The one line a report states its test and correction in (``pairs``: the most seeds a test pairs)."""
    if paired:
        floor = f"{2 / 2 ** pairs:.3g} with {pairs} pairs" if pairs and pairs >= 2 else "0.0625 with 5 pairs"
        return ("Tests: paired t-test by seed on the values at each phase's last epoch (95 % CI of the paired "
                f"difference), with an exact sign-flip permutation p beside it (it cannot fall below 2/2^n: {floor}); "
                "p-values Holm-adjusted within each table (one dataset, arch, metric and baseline: every scheme "
                "and phase).")
    return ("Tests: Welch's unpaired t-test on the values at each phase's last epoch (95 % Welch CI); "
            "p-values Holm-adjusted within each table (one dataset, arch, metric and baseline: every scheme "
            "and phase).")


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean(a) - mean(b), CI low, CI high, two-sided p) of Welch's t-test; NaN where n < 2 on a side
    or neither side varies.

    The interval uses the Welch–Satterthwaite degrees of freedom.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        return (math.nan,) * 4
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # no spread on either side: no test (scipy's p would be NaN too)
        return diff, math.nan, math.nan, math.nan
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(special.stdtrit(df, 0.5 + level / 2)) * se  # Student's t quantile (stats.t.ppf, 100x faster)
    with warnings.catch_warnings():  # nearly equal samples: scipy warns about precision, p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return diff, diff - half, diff + half, p


def paired_t(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean of a - b, CI low, CI high, two-sided p) of the paired t-test on aligned ``a`` and ``b``;
    NaN where fewer than 2 pairs or the differences do not vary."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return (math.nan,) * 4
    diff = float(d.mean())
    if len(d) < 2:
        return diff, math.nan, math.nan, math.nan
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if se == 0:
        return diff, math.nan, math.nan, math.nan
    half = float(special.stdtrit(len(d) - 1, 0.5 + level / 2)) * se
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_rel(a, b).pvalue)
    return diff, diff - half, diff + half, p


@functools.lru_cache(maxsize=SIGNFLIP_MAX_PAIRS + 1)
def _signs(n: int) -> np.ndarray:
    """Every n-vector of +-1 (2^n rows)."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
    return 1.0 - 2.0 * bits


def sign_flip(d: np.ndarray) -> float:
    """Exact two-sided p of the sign-flip permutation test of mean(d) == 0: the share of the 2^n
    sign patterns whose |sum| reaches the observed one. NaN for n < 2 or n > SIGNFLIP_MAX_PAIRS."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 2 or n > SIGNFLIP_MAX_PAIRS or not np.isfinite(d).all():
        return math.nan
    observed = abs(d.sum())
    sums = np.abs(_signs(n) @ d)
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # equal sums up to rounding count as reaching it
    return float(np.count_nonzero(sums >= observed - tol)) / len(sums)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of the p-values ``p`` (NaNs are left out of the family and stay NaN):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def phase_ends(frame: pd.DataFrame, bounds: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per run, phase and metric of the runs that reached the phase's last epoch: dataset,
    arch, scheme, seed, run_key, phase, metric, epoch (the phase's last), value there and phase_min
    (the run's minimum within the phase). NaN values (a diverged run) are left out."""
    f = frame[frame["metric"].isin(metrics) & frame["value"].notna()]
    cols = ["run_key", "group_key", "dataset", "arch", "scheme", "phase", "metric"]
    f = f.astype({c: str for c in cols if c != "phase"}).merge(bounds, on=["group_key", "phase"])
    at_end = f[f["epoch"] == f["last"]][cols + ["seed", "epoch", "value"]]
    in_phase = f.merge(at_end[["run_key", "phase", "metric"]], on=["run_key", "phase", "metric"])
    mins = in_phase.groupby(["run_key", "phase", "metric"], as_index=False)["value"].min()
    return at_end.merge(mins.rename(columns={"value": "phase_min"}), on=["run_key", "phase", "metric"])


def phase_summary(frame: pd.DataFrame, bounds: pd.DataFrame, baselines: Sequence[str] | None = None,
                  metrics: Sequence[str] = SUMMARY_METRICS, scheme_order: Sequence[str] | None = None,
                  paired: bool = True) -> pd.DataFrame:
    """One row per dataset, arch, scheme, phase, metric and baseline (SUMMARY_COLUMNS).

    ``frame`` is the long frame of collect; ``bounds`` its phase bounds (group_key, phase, first,
    last). Statistics are over the runs that reached the phase's last epoch: n, mean, std (ddof 1),
    best (lowest) and worst (highest) at that epoch with their seeds (the lowest seed on a tie);
    phase_min_mean and phase_min_best are the mean and the lowest of each such run's minimum within
    the phase. A scheme gets one row per baseline of ``comparison_plan(schemes, baselines)`` (one
    row with an empty baseline when it has none): ``paired`` pairs it with the baseline by seed
    (n_pairs seeds in both; diff = mean of the differences, its 95 % CI, the paired t-test's p_raw
    and the exact sign-flip p_signflip); otherwise Welch's test on all runs (n_pairs empty).
    p_holm and p_signflip_holm are Holm-adjusted within each FAMILY. NaN values are left out.
    """
    ends = phase_ends(frame, bounds, metrics)
    if ends.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    ends = ends.sort_values(KEYS + ["seed"], kind="stable")
    g = ends.groupby(KEYS, sort=False)
    out = g.agg(epoch=("epoch", "max"), n=("value", "size"), mean=("value", "mean"), std=("value", "std"),
                best=("value", "min"), worst=("value", "max"), phase_min_mean=("phase_min", "mean"),
                phase_min_best=("phase_min", "min")).reset_index()
    out["best_seed"] = ends.loc[g["value"].idxmin(), "seed"].to_numpy()
    out["worst_seed"] = ends.loc[g["value"].idxmax(), "seed"].to_numpy()
    by_seed = {k: v.set_index("seed")["value"] for k, v in g}
    plans = {da: comparison_plan(list(pd.unique(d["scheme"])), baselines)
             for da, d in out.groupby(["dataset", "arch"], sort=False)}
    rows = []
    for row in out.to_dict("records"):
        against = plans[(row["dataset"], row["arch"])].get(row["scheme"], ())
        if not against:
            rows.append({**row, **dict.fromkeys(TEST_COLUMNS, math.nan), "baseline": None, "test": None})
        for base in against:
            mine = by_seed[(row["dataset"], row["arch"], row["scheme"], row["phase"], row["metric"])]
            theirs = by_seed.get((row["dataset"], row["arch"], base, row["phase"], row["metric"]))
            rows.append({**row, **compare(mine, theirs, paired), "baseline": base})
    out = pd.DataFrame(rows)
    for col in ("p_holm", "p_signflip_holm"):
        raw = out["p_raw" if col == "p_holm" else "p_signflip"]
        out[col] = raw.groupby([out[c] for c in FAMILY], sort=False, dropna=True).transform(lambda s: holm(s.values))
    out["n_pairs"] = out["n_pairs"].astype("Int64")
    out["selected_on_validation"] = out["scheme"].map(is_tuned)
    order = {b: i for i, b in enumerate(baselines or [])}
    out = sort_rows(out, scheme_order, metrics, order)
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def compare(mine: pd.Series, theirs: pd.Series | None, paired: bool) -> dict:
    """TEST_COLUMNS (but baseline and the Holm columns) of one scheme's values (seed -> value) against
    a baseline's."""
    if theirs is None:
        theirs = pd.Series(dtype=float)
    if paired:
        both = mine.index.intersection(theirs.index)
        a, b = mine.loc[both].to_numpy(), theirs.loc[both].to_numpy()
        diff, lo, hi, p = paired_t(a, b)
        return dict(test=PAIRED_TEST, n_pairs=len(both), diff=diff, ci_low=lo, ci_high=hi, p_raw=p,
                    p_signflip=sign_flip(a - b))
    diff, lo, hi, p = welch(mine.to_numpy(), theirs.to_numpy())
    return dict(test=WELCH_TEST, n_pairs=math.nan, diff=diff, ci_low=lo, ci_high=hi, p_raw=p, p_signflip=math.nan)


def sort_rows(df: pd.DataFrame, scheme_order: Sequence[str] | None = None,
              metrics: Sequence[str] = SUMMARY_METRICS, baseline_order: dict | None = None) -> pd.DataFrame:
    """Datasets and archs in first-seen order (the frame's: the sweep's), schemes in sweep order,
    then phase, metric and baseline (given order, else sweep order)."""
    order = {c: {v: i for i, v in enumerate(pd.unique(df[c]))} for c in ("dataset", "arch")}
    order["scheme"] = {s: i for i, s in enumerate(scheme_order or pd.unique(df["scheme"]))}
    order["metric"] = {m: i for i, m in enumerate(metrics)}
    keys = KEYS
    if "baseline" in df.columns:
        order["baseline"] = baseline_order or order["scheme"]
        keys = KEYS + ["baseline"]
    return df.sort_values(keys, key=lambda s: s.map(order[s.name]) if s.name in order else s, kind="stable")

"""Seed statistics the paper lacks: per phase, the spread over seeds at the phase's last epoch and
the difference to a baseline scheme with a Welch confidence interval and p-value."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats

SUMMARY_METRICS = ("test_loss", "test_error")
KEYS = ["dataset", "arch", "scheme", "phase", "metric"]
SUMMARY_COLUMNS = KEYS + ["epoch", "n", "mean", "std", "best", "worst", "phase_min_mean", "phase_min_best",
                          "baseline", "diff", "ci_low", "ci_high", "p_value"]


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


def phase_summary(frame: pd.DataFrame, bounds: pd.DataFrame, baseline: str | None = "wd-1e-4",
                  metrics: Sequence[str] = SUMMARY_METRICS, scheme_order: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per dataset, arch, scheme, phase and metric (SUMMARY_COLUMNS).

    ``frame`` is the long frame of collect; ``bounds`` its phase bounds (group_key, phase, first,
    last). Statistics are over the runs that reached the phase's last epoch: n, mean, std (ddof 1),
    best (lowest) and worst (highest) at that epoch; phase_min_mean and phase_min_best are the mean
    and the lowest of each such run's minimum within the phase. diff, ci_low, ci_high and p_value
    compare the scheme's values at that epoch with ``baseline``'s (Welch), empty for the baseline.
    NaN values (a diverged run) are left out.
    """
    f = frame[frame["metric"].isin(metrics) & frame["value"].notna()]
    cols = ["run_key", "group_key", "dataset", "arch", "scheme", "phase", "metric"]
    f = f.astype({c: str for c in cols if c != "phase"}).merge(bounds, on=["group_key", "phase"])
    at_end = f[f["epoch"] == f["last"]][cols + ["epoch", "value"]]
    in_phase = f.merge(at_end[["run_key", "phase", "metric"]], on=["run_key", "phase", "metric"])
    mins = in_phase.groupby(["run_key", "phase", "metric"], as_index=False)["value"].min()
    at_end = at_end.merge(mins.rename(columns={"value": "phase_min"}), on=["run_key", "phase", "metric"])
    if at_end.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    g = at_end.groupby(KEYS, sort=False)
    out = g.agg(epoch=("epoch", "max"), n=("value", "size"), mean=("value", "mean"), std=("value", "std"),
                best=("value", "min"), worst=("value", "max"), phase_min_mean=("phase_min", "mean"),
                phase_min_best=("phase_min", "min")).reset_index()
    values = {k: v["value"].to_numpy() for k, v in g}
    tests = []
    for row in out.itertuples(index=False):
        base_key = (row.dataset, row.arch, baseline, row.phase, row.metric)
        if baseline is None or row.scheme == baseline or base_key not in values:
            tests.append((None, math.nan, math.nan, math.nan, math.nan))
            continue
        key = (row.dataset, row.arch, row.scheme, row.phase, row.metric)
        tests.append((baseline, *welch(values[key], values[base_key])))
    out[["baseline", "diff", "ci_low", "ci_high", "p_value"]] = pd.DataFrame(tests, index=out.index)
    return sort_rows(out, scheme_order, metrics)[SUMMARY_COLUMNS].reset_index(drop=True)


def sort_rows(df: pd.DataFrame, scheme_order: Sequence[str] | None = None,
              metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Datasets and archs in first-seen order (the frame's: the sweep's), schemes in sweep order,
    then phase and metric."""
    order = {c: {v: i for i, v in enumerate(pd.unique(df[c]))} for c in ("dataset", "arch")}
    order["scheme"] = {s: i for i, s in enumerate(scheme_order or pd.unique(df["scheme"]))}
    order["metric"] = {m: i for i, m in enumerate(metrics)}
    return df.sort_values(KEYS, key=lambda s: s.map(order[s.name]) if s.name in order else s, kind="stable")

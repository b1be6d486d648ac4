"""Write a report directory: figures (PNG + PDF), phase_summary.csv / .md, runs.csv and a
report.md that links all of them; optionally store it as artifacts of a ``report`` MLflow run."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from orchestrator.errors import BadValue, arg
from orchestrator.report import DEFAULT_BASELINES, SELECTED_ON_VALIDATION, comparison_plan, figures, is_tuned, mechanism
from orchestrator.report.collect import Collection
from orchestrator.report.jobs import FigureJob, start_rendering
from orchestrator.report.stats import SUMMARY_METRICS, method_line, phase_summary
from orchestrator.store.tags import TAG_SWEEP

TAG_KIND = "adareg.kind"


@dataclass
class Report:
    """What write_report wrote (paths relative to ``out``)."""

    out: Path
    summary: pd.DataFrame
    figures: list[figures.FigureSpec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    paired: bool = True
    baselines: tuple[str, ...] | None = None
    """The baselines asked for (None: the paper's comparisons)."""
    plan: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Scheme -> the baselines it was compared with."""
    picks: pd.DataFrame | None = None
    """figures.pick_runs' frame: the best and worst run drawn per dataset, arch, scheme and phase."""
    rank_by: str = "test_error"
    mechanism: list[figures.FigureSpec] = field(default_factory=list)
    """The figures that also have a mechanism figure (runs that logged the diagnostics)."""


def write_report(col: Collection, out: str | os.PathLike, baselines: Sequence[str] | None = None,
                 train_loss: bool = False, workers: int | None = None, paired: bool = True,
                 envelope: bool = False, rank_by: str = "test_error") -> Report:
    """Figures for every dataset x arch x family present, the phase tables and report.md in ``out``.

    ``baselines``: the schemes every scheme is compared with (None: the paper's comparisons, see
    comparison_plan); ``paired``: paired by seed (else Welch); ``envelope``: also shade the
    per-epoch min-max over seeds; ``rank_by``: the metric whose value at a phase's last epoch picks
    the best and the worst run drawn. Figures are drawn by ``workers`` processes (default: one per
    CPU, at most 4).
    """
    check_options(baselines, rank_by, col.sweep, col.schemes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = col.phase_bounds()
    present = col.frame[["dataset", "arch", "scheme"]].drop_duplicates().astype(str)
    plan = comparison_plan(list(dict.fromkeys(present["scheme"])), baselines)
    metrics = figures.FIGURE_METRICS + (("train_loss",) if train_loss else ())
    bands = figures.seed_bands(col.frame, metrics)
    picks = figures.pick_runs(col.frame, bounds, rank_by)
    curves = figures.picked_curves(col.frame, picks, metrics)
    palette = figures.scheme_palette(col.schemes)
    specs = figures.figure_specs(present, col.schemes, plan)
    jobs = []
    for spec in specs:
        labels = {s: scheme_label(s, col.scheme_config(spec.dataset, spec.arch, s)) for s in spec.schemes}
        plans = {s: col.scheme_plan(spec.dataset, spec.arch, s) for s in spec.schemes}
        b, p, c = (of_spec(df, spec) for df in (bands, picks, curves))
        jobs.append(FigureJob(spec, b, plans, labels, palette, metrics, p, c, rank_by, envelope))
    drawn = start_rendering(jobs, out / "figures", workers)  # drawn while the rest is computed
    mechanism_bands = figures.seed_bands(col.frame, mechanism.DRAWN)
    more = [FigureJob(job.spec, of_spec(mechanism_bands, job.spec), job.plans, job.labels, palette, mechanism.DRAWN,
                      job.picks.iloc[:0], job.curves.iloc[:0], mechanism=True)
            for job in jobs if mechanism.has_mechanism(of_spec(col.frame, job.spec))]
    drawn_more = start_rendering(more, out / "figures", workers)
    rep = Report(out, phase_summary(col.frame, bounds, baselines, scheme_order=col.schemes, paired=paired))
    rep.paired = paired
    rep.baselines = None if baselines is None else tuple(baselines)
    rep.plan = plan
    rep.warnings = col.warnings() + baseline_warnings(present["scheme"], baselines, rep.plan)
    try:
        paths = drawn()
    finally:
        paths_more = drawn_more()
    for job, mine in zip(jobs, paths, strict=True):  # each figure, then its mechanism figure
        rep.files += [p.relative_to(out) for p in mine]
        rep.files += [p.relative_to(out) for m, theirs in zip(more, paths_more, strict=True) if m.spec == job.spec
                      for p in theirs]
    jobs = jobs + more
    rep.figures = [job.spec for job in jobs if not job.mechanism]
    rep.mechanism = [job.spec for job in jobs if job.mechanism]
    rep.picks = picks
    rep.rank_by = rank_by
    write_text(out / "phase_summary.csv", rep.summary.to_csv(index=False))
    write_text(out / "phase_summary.md", summary_markdown(rep.summary, col, paired))
    runs = col.runs[["dataset", "arch", "scheme", "seed", "run_key", "group_key", "run_id", "status",
                     "last_epoch", "epochs", "adareg_version", "git_commit"]]
    write_text(out / "runs.csv", runs.to_csv(index=False))
    write_text(out / "report.md", report_markdown(rep, col))
    rep.files += [Path(n) for n in ("phase_summary.csv", "phase_summary.md", "runs.csv", "report.md")]
    return rep


def of_spec(df: pd.DataFrame, spec: figures.FigureSpec) -> pd.DataFrame:
    """The rows of ``df`` drawn in the figure ``spec``."""
    return df[(df["dataset"] == spec.dataset) & (df["arch"] == spec.arch) & df["scheme"].isin(spec.schemes)]


def scheme_label(scheme: str, cfg) -> str:
    """A scheme's legend text: its name, its steps, and 'selected on validation' for a tuned one."""
    return f"{scheme}: {figures.describe(cfg)}" + (f" ({SELECTED_ON_VALIDATION})" if is_tuned(scheme) else "")


def scheme_cell(scheme: str) -> str:
    return f"`{scheme}`" + (f" ({SELECTED_ON_VALIDATION})" if is_tuned(scheme) else "")


def baseline_warnings(schemes: Sequence[str], baselines: Sequence[str] | None,
                      plan: dict[str, tuple[str, ...]]) -> list[str]:
    """A line per explicit baseline without runs; with the default baselines, one when none has runs."""
    have = set(schemes)
    if baselines is not None:
        return [f"baseline '{b}' has no runs in this selection: no differences to it"
                for b in dict.fromkeys(baselines) if b not in have]
    if not any(plan.values()) and len(have) > 1:
        defaults = ", ".join(b for fam in DEFAULT_BASELINES.values() for b in fam)
        return [f"none of the default baselines ({defaults}) has runs in this selection: no differences "
                "(choose one with --baseline)"]
    return []


def check_options(baselines: Sequence[str] | None, rank_by: str, sweep: str, schemes: Sequence[str]) -> None:
    """BadValue unless every one of ``baselines`` is one of the sweep's schemes and ``rank_by`` is a metric
    the figures can rank by (checked before anything is read or written)."""
    if rank_by not in figures.RANK_METRICS:
        raise BadValue(f"{arg('rank_by')}: {rank_by!r} is not one of {', '.join(figures.RANK_METRICS)}")
    for baseline in baselines or ():
        if baseline not in schemes:
            raise BadValue(f"{arg('baseline')}: scheme {baseline!r} is not in sweep '{sweep}' "
                            f"(its schemes: {', '.join(schemes)})")


def log_report(client, col: Collection, rep: Report) -> str:
    """Store the files of ``rep`` (nothing else of its folder) as the artifacts of a new run named
    ``report`` in the sweep's experiment; return the run's id."""

    exp = client.get_experiment_by_name(col.experiment)
    run = client.create_run(exp.experiment_id, run_name="report", tags={TAG_SWEEP: col.sweep, TAG_KIND: "report"})
    try:
        for rel in rep.files:
            folder = rel.parent.as_posix() if rel.parent.parts else None
            client.log_artifact(run.info.run_id, str(rep.out / rel), folder)
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def write_text(path: Path, text: str) -> None:
    """Write atomically: a temp file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# markdown


def num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}g}"


def interval(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) else f"[{num(lo, 3)}, {num(hi, 3)}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    buf.write("| " + " | ".join(header) + " |\n")
    buf.write("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|\n")
    for r in rows:
        buf.write("| " + " | ".join(r) + " |\n")
    return buf.getvalue()


def summary_markdown(summary: pd.DataFrame, col: Collection, paired: bool = True) -> str:
    """phase_summary.csv as Markdown: a section per dataset and arch; per metric a table of the seeds'
    spread and a table per baseline of the differences to it (the Holm family)."""
    lines = [f"# Phase summary: sweep `{col.sweep}`\n",
             "Values at each phase's last epoch over the seeds that reached it (best = lowest, with its seed); "
             "phase min = each seed's minimum within the phase (mean over seeds, and the lowest). "
             "Errors are fractions.\n", method_line(paired, max_pairs(summary)) + "\n"]
    spread = ["scheme", "phase", "epoch", "n", "mean", "std", "best (seed)", "worst (seed)", "phase min (mean)",
              "phase min (best)"]
    diffs = ["scheme", "phase", "pairs" if paired else "n", "Δ = scheme − baseline", "95 % CI", "p", "p Holm"]
    if paired:
        diffs += ["p sign-flip", "p sign-flip Holm"]
    for (dataset, arch), g in summary.groupby(["dataset", "arch"], sort=False):
        lines.append(f"## {dataset} / {arch}\n")
        for metric in SUMMARY_METRICS:
            m = g[g["metric"] == metric]
            if m.empty:
                continue
            one = m.drop_duplicates(["scheme", "phase"])
            rows = [[scheme_cell(r.scheme), str(r.phase), str(r.epoch), str(r.n), num(r.mean), num(r.std),
                     f"{num(r.best)} ({r.best_seed})", f"{num(r.worst)} ({r.worst_seed})", num(r.phase_min_mean),
                     num(r.phase_min_best)] for r in one.itertuples()]
            lines.append(f"### {figures.METRIC_LABELS[metric]}\n\n" + table(spread, rows))
            for base, b in m[m["baseline"].notna()].groupby("baseline", sort=False):
                rows = []
                for r in b.itertuples():
                    row = [scheme_cell(r.scheme), str(r.phase), str(r.n_pairs if paired else r.n), num(r.diff, 3),
                           interval(r.ci_low, r.ci_high), num(r.p_raw, 3), num(r.p_holm, 3)]
                    rows.append(row + ([num(r.p_signflip, 3), num(r.p_signflip_holm, 3)] if paired else []))
                lines.append(f"#### {figures.METRIC_LABELS[metric]}: against `{base}` ({b['test'].iloc[0]})\n\n"
                             + table(diffs, rows))
    return "\n".join(lines)


def report_markdown(rep: Report, col: Collection) -> str:
    found = int(col.runs["run_id"].notna().sum())
    finished = found - len(col.incomplete)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rank = figures.METRIC_LABELS.get(rep.rank_by, rep.rank_by)
    out = [f"# Report: sweep `{col.sweep}`\n",
           f"Experiment `{col.experiment}` at `{col.uri}`, {stamp}. "
           f"{found} of {len(col.runs)} runs in MLflow, {finished} finished (deleted and superseded runs "
           "are not part of the report).\n",
           "## Coverage\n"]
    out += ([f"- {w}" for w in rep.warnings] if rep.warnings
            else ["Every run of the selection is in MLflow and finished."])
    out += ["", "## Comparisons\n", method_line(rep.paired, max_pairs(rep.summary)), ""]
    compared = {s: b for s, b in rep.plan.items() if b}
    if rep.baselines is None:
        out.append("Baselines (the paper's comparisons): the weight-decay schemes against constant weight decay "
                   "`wd-1e-3` and `wd-8e-3`, the sparsity schemes 21-23 against `wd-1e-4` (their own weight decay); "
                   "a scheme whose baselines have no runs is compared with the other default baselines that do.\n")
    out += [f"- {scheme_cell(s)} against " + ", ".join(f"`{x}`" for x in b) for s, b in compared.items()]
    tuned = [s for s in rep.plan if is_tuned(s)]
    if tuned:
        out += ["", ", ".join(f"`{s}`" for s in tuned) + f": {SELECTED_ON_VALIDATION} by `adareg tune` (its taper "
                "was chosen on a validation split of the training data, never on the test set)."]
    out += ["", "## Figures\n",
            f"Solid: mean over seeds; dashed: the best run and dash-dot: the worst run, whole curves of two runs "
            f"chosen in each phase by the lowest and highest {rank} at the phase's last epoch (their seeds in the "
            "legend and below); dotted lines: learning-rate steps (their rate on top); loss on a log axis. "
            "Each column is one warm-restart phase.\n"]
    for spec in rep.figures:
        out += [f"### {spec.title}\n", f"![{spec.stem}](figures/{spec.stem}.png)\n",
                f"[PNG](figures/{spec.stem}.png) · [PDF](figures/{spec.stem}.pdf)\n"]
        out += picks_table(rep.picks, spec)
        if spec in rep.mechanism:
            stem = mechanism.mechanism_stem(spec)
            out += [f"Does the taper act? {MECHANISM_TEXT}\n", f"![{stem}](figures/{stem}.png)\n",
                    f"[PNG](figures/{stem}.png) · [PDF](figures/{stem}.pdf)\n"]
    out += ["## Tables\n",
            "- [phase_summary.csv](phase_summary.csv) and [phase_summary.md](phase_summary.md): per dataset, arch, "
            "scheme, phase, metric and baseline, the seed statistics at the phase's last epoch and the difference "
            "to the baseline",
            "- [runs.csv](runs.csv): every run of the selection, its MLflow run id, status and last epoch, and the "
            "adareg version and git commit that trained it", ""]
    out += headline(rep.summary, rep.paired)
    return "\n".join(out) + "\n"


MECHANISM_TEXT = (
    "Beside test loss and error, the mean over seeds of what weight decay does: the weight norm ‖w‖ of each stage's "
    "convolutions (BatchNorm follows each, so decay acts only through this norm), their effective step "
    "lr/‖w‖² (mean over the stage's convolutions) and the decay timescale (1 − momentum) / (lr · wd · steps per "
    "epoch), the epochs decay alone takes to shrink the weights by e. A taper whose timescale is far longer "
    "than its step barely moves the norm: it cannot act there. Without decay the timescale is infinite (not drawn).")


def max_pairs(summary: pd.DataFrame) -> int | None:
    """The most seeds any test of ``summary`` paired (None when none did)."""
    n = summary["n_pairs"].max() if len(summary) else None
    return None if n is None or pd.isna(n) else int(n)


def picks_table(picks: pd.DataFrame | None, spec: figures.FigureSpec) -> list[str]:
    """Best / worst run seed per scheme and phase of one figure."""
    if picks is None or picks.empty:
        return []
    p = picks[(picks["dataset"] == spec.dataset) & (picks["arch"] == spec.arch) & picks["scheme"].isin(spec.schemes)]
    if p.empty or p["n"].max() < 2:
        return []
    phases = sorted(p["phase"].unique())
    cells = {(r.scheme, r.phase): f"{r.best_seed} / {r.worst_seed}" for r in p.itertuples()}
    rows = [[scheme_cell(s)] + [cells.get((s, ph), "") for ph in phases] for s in spec.schemes]
    return [table(["best / worst run (seed)"] + [f"phase {ph}" for ph in phases], rows)]


def headline(summary: pd.DataFrame, paired: bool = True) -> list[str]:
    """Test error at the end of the last phase, per dataset and arch: the spread, and per baseline
    the difference with its CI and Holm-adjusted p (the same numbers as phase_summary)."""
    s = summary[summary["metric"] == "test_error"]
    if s.empty:
        return []
    out = ["## Test error at the end of training\n",
           "Last epoch of the last phase. Δ = scheme − baseline "
           f"({'paired by seed' if paired else 'Welch'}; 95 % CI; p Holm-adjusted within the baseline's table "
           "in phase_summary.md). Errors in %.\n"]
    for (dataset, arch), g in s.groupby(["dataset", "arch"], sort=False):
        g = g[g["phase"] == g["phase"].max()]
        bases = list(pd.unique(g["baseline"].dropna()))
        header = ["scheme", "n", "mean ± std", "best", "worst"]
        for b in bases:
            header += [f"Δ vs `{b}` [95 % CI]", "p Holm"]
        rows = []
        for scheme, r in g.groupby("scheme", sort=False):
            f = r.iloc[0]
            row = [scheme_cell(scheme), str(f["n"]), pct(f["mean"]) + ("" if math.isnan(f["std"]) else
                                                                       f" ± {pct(f['std'])}"),
                   pct(f["best"]), pct(f["worst"])]
            for b in bases:
                x = r[r["baseline"] == b]
                if x.empty:
                    row += ["", ""]
                    continue
                x = x.iloc[0]
                ci = "" if math.isnan(x["ci_low"]) else f" [{pct(x['ci_low'])}, {pct(x['ci_high'])}]"
                row += [pct(x["diff"]) + ci, num(x["p_holm"], 3)]
            rows.append(row)
        out += [f"### {dataset} / {arch} (phase {g['phase'].max()}, epoch {g['epoch'].max()})\n", table(header, rows)]
    return out


def pct(v: float) -> str:
    return "" if v is None or math.isnan(v) else f"{100 * v:.2f}"

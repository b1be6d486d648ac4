"""Write a report directory: figures (PNG + PDF), phase_summary.csv / .md, runs.csv and a
report.md that links all of them; optionally store it as artifacts of a ``report`` MLflow run."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from orchestrator.errors import UserError
from orchestrator.report import DEFAULT_BASELINE, figures
from orchestrator.report.collect import Collection
from orchestrator.report.stats import SUMMARY_METRICS, phase_summary

TAG_KIND = "adareg.kind"


@dataclass
class Report:
    """What write_report wrote (paths relative to ``out``)."""

    out: Path
    summary: pd.DataFrame
    figures: list[figures.FigureSpec] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_report(col: Collection, out: str | os.PathLike, baseline: str | None = DEFAULT_BASELINE,
                 train_loss: bool = False, workers: int | None = None) -> Report:
    """Figures for every dataset x arch x family present, the phase tables and report.md in ``out``.

    Figures are drawn by ``workers`` processes (default: one per CPU, at most 4).
    """
    check_baseline(baseline, col.sweep, col.schemes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out, phase_summary(col.frame, col.phase_bounds(), baseline, scheme_order=col.schemes))
    rep.warnings = col.warnings()
    if baseline is not None and not (col.frame["scheme"] == baseline).any():
        rep.warnings.append(f"baseline '{baseline}' has no runs in this selection: no differences to it")
    metrics = figures.FIGURE_METRICS + (("train_loss",) if train_loss else ())
    bands = figures.seed_bands(col.frame, metrics)
    present = col.frame[["dataset", "arch", "scheme"]].drop_duplicates().astype(str)
    palette = figures.scheme_palette(col.schemes)
    jobs = []
    for spec in figures.figure_specs(present, col.schemes, baseline):
        labels = {s: f"{s}: {figures.describe(col.scheme_config(spec.dataset, spec.arch, s))}" for s in spec.schemes}
        plans = {s: col.scheme_plan(spec.dataset, spec.arch, s) for s in spec.schemes}
        mine = bands[(bands["dataset"] == spec.dataset) & (bands["arch"] == spec.arch)
                     & bands["scheme"].isin(spec.schemes)]
        jobs.append(figures.FigureJob(spec, mine, plans, labels, palette, metrics, baseline))
    for paths in figures.render_all(jobs, out / "figures", workers):
        rep.files += [p.relative_to(out) for p in paths]
    rep.figures = [job.spec for job in jobs]
    write_text(out / "phase_summary.csv", rep.summary.to_csv(index=False))
    write_text(out / "phase_summary.md", summary_markdown(rep.summary, col, baseline))
    runs = col.runs[["dataset", "arch", "scheme", "seed", "run_key", "group_key", "run_id", "status",
                     "last_epoch", "epochs"]]
    write_text(out / "runs.csv", runs.to_csv(index=False))
    write_text(out / "report.md", report_markdown(rep, col, baseline))
    rep.files += [Path(n) for n in ("phase_summary.csv", "phase_summary.md", "runs.csv", "report.md")]
    return rep


def check_baseline(baseline: str | None, sweep: str, schemes: Sequence[str]) -> None:
    """UserError unless ``baseline`` is one of the sweep's schemes."""
    if baseline is not None and baseline not in schemes:
        raise UserError(f"--baseline: scheme {baseline!r} is not in sweep '{sweep}' "
                        f"(its schemes: {', '.join(schemes)})")


def log_report(client, col: Collection, rep: Report) -> str:
    """Store the files of ``rep`` (nothing else of its folder) as the artifacts of a new run named
    ``report`` in the sweep's experiment; return the run's id."""
    from orchestrator.identity import TAG_SWEEP

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


def summary_markdown(summary: pd.DataFrame, col: Collection, baseline: str | None) -> str:
    """phase_summary.csv as Markdown: a section per dataset and arch, a table per metric."""
    lines = [f"# Phase summary: sweep `{col.sweep}`\n",
             "Values at each phase's last epoch over the seeds that reached it (best = lowest); "
             "phase min = each seed's minimum within the phase (mean over seeds, and the lowest). "
             f"Δ = mean − mean of `{baseline}`, with a 95 % Welch confidence interval and p-value. "
             "Errors are fractions.\n"]
    header = ["scheme", "phase", "epoch", "n", "mean", "std", "best", "worst", "phase min (mean)",
              "phase min (best)", "Δ vs baseline", "95 % CI", "p"]
    for (dataset, arch), g in summary.groupby(["dataset", "arch"], sort=False):
        lines.append(f"## {dataset} / {arch}\n")
        for metric in SUMMARY_METRICS:
            m = g[g["metric"] == metric]
            if m.empty:
                continue
            rows = [[f"`{r.scheme}`", str(r.phase), str(r.epoch), str(r.n), num(r.mean), num(r.std), num(r.best),
                     num(r.worst), num(r.phase_min_mean), num(r.phase_min_best), num(r.diff, 3),
                     interval(r.ci_low, r.ci_high), num(r.p_value, 3)] for r in m.itertuples()]
            lines.append(f"### {figures.METRIC_LABELS[metric]}\n\n" + table(header, rows))
    return "\n".join(lines)


def report_markdown(rep: Report, col: Collection, baseline: str | None) -> str:
    found = int(col.runs["run_id"].notna().sum())
    finished = found - len(col.incomplete)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Report: sweep `{col.sweep}`\n",
           f"Experiment `{col.experiment}` at `{col.uri}`, {stamp}. "
           f"{found} of {len(col.runs)} runs in MLflow, {finished} finished.\n",
           "## Coverage\n"]
    out += ([f"- {w}" for w in rep.warnings] if rep.warnings
            else ["Every run of the selection is in MLflow and finished."])
    out += ["", "## Figures\n",
            "Line: mean over seeds; band: best to worst seed; dotted lines: learning-rate steps (their rate on "
            "top); loss on a log axis. Each column is one warm-restart phase.\n"]
    for spec in rep.figures:
        out += [f"### {spec.title}\n", f"![{spec.stem}](figures/{spec.stem}.png)\n",
                f"[PNG](figures/{spec.stem}.png) · [PDF](figures/{spec.stem}.pdf)\n"]
    out += ["## Tables\n",
            "- [phase_summary.csv](phase_summary.csv) and [phase_summary.md](phase_summary.md): per dataset, arch, "
            "scheme, phase and metric, the seed statistics at the phase's last epoch and the difference to "
            f"`{baseline}`",
            "- [runs.csv](runs.csv): every run of the selection, its MLflow run id, status and last epoch", ""]
    out += headline(rep.summary, baseline)
    return "\n".join(out) + "\n"


def headline(summary: pd.DataFrame, baseline: str | None) -> list[str]:
    """Test error at the end of the last phase, per dataset and arch."""
    s = summary[summary["metric"] == "test_error"]
    if s.empty:
        return []
    out = ["## Test error at the end of training\n",
           f"Last epoch of the last phase; Δ against `{baseline}` (95 % Welch CI, p). Errors in %.\n"]
    for (dataset, arch), g in s.groupby(["dataset", "arch"], sort=False):
        g = g[g["phase"] == g["phase"].max()]
        rows = [[f"`{r.scheme}`", str(r.n), pct(r.mean) + ("" if math.isnan(r.std) else f" ± {pct(r.std)}"),
                 pct(r.best), pct(r.worst), pct(r.diff), "" if math.isnan(r.ci_low) else
                 f"[{pct(r.ci_low)}, {pct(r.ci_high)}]", num(r.p_value, 3)] for r in g.itertuples()]
        out += [f"### {dataset} / {arch} (phase {g['phase'].max()}, epoch {g['epoch'].max()})\n",
                table(["scheme", "n", "mean ± std", "best", "worst", "Δ", "95 % CI", "p"], rows)]
    return out


def pct(v: float) -> str:
    return "" if math.isnan(v) else f"{100 * v:.2f}"

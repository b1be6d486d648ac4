"""``adareg report FILE``: figures and tables of a sweep's runs in MLflow."""

from __future__ import annotations

import click

from orchestrator.cli_common import (
    load_selection,
    selection_options,
    sweep_file_argument,
    tracking_uri_option,
)
from orchestrator.report import DEFAULT_BASELINE


@click.command("report")
@sweep_file_argument
@selection_options
@tracking_uri_option
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder for the figures and tables [default: report-<sweep name>].")
@click.option("--baseline", default=DEFAULT_BASELINE, show_default=True, metavar="SCHEME",
              help="Scheme every other scheme is compared with (difference, 95% CI, Welch p-value).")
@click.option("--train-loss", is_flag=True, help="Add a train-loss row to every figure.")
@click.option("--log-to-mlflow", is_flag=True,
              help="Also store the report's files as artifacts of a new run named 'report' in the sweep's experiment.")
def report(sweep_file, set_, only, epochs_scale, train_subset, tracking_uri, out, baseline, train_loss,
           log_to_mlflow) -> None:
    """Draw the paper's figures (mean line, best-worst seed band, per warm-restart phase) and write
    per-phase seed statistics with differences to a baseline, for the runs of sweep FILE."""
    from orchestrator.report.collect import REPORT_METRICS, collect
    from orchestrator.report.render import check_baseline, log_report, write_report
    from orchestrator.tracking import connect, resolve_tracking_uri

    sweep, configs = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    check_baseline(baseline, sweep.name, list(sweep.schemes))
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri, create=False)
    metrics = REPORT_METRICS + (("train_loss",) if train_loss else ())
    col = collect(client, uri, sweep, configs, metrics, sweep_file=sweep_file)
    rep = write_report(col, out or f"report-{sweep.name}", baseline=baseline, train_loss=train_loss)
    for line in rep.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"{len(rep.figures)} figures (PNG + PDF) and {len(rep.summary)} summary rows in {rep.out}; "
               f"open {rep.out / 'report.md'}")
    if log_to_mlflow:
        run_id = log_report(client, col, rep)
        click.echo(f"logged to MLflow: run 'report' {run_id} in experiment '{sweep.experiment}'")


COMMANDS = [report]

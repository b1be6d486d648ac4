"""``adareg report FILE``: figures and tables of a sweep's runs in MLflow."""

from __future__ import annotations

import click

from orchestrator.cli.common import (
    load_selection,
    selection_options,
    sweep_file_argument,
    tracking_uri_option,
)
from orchestrator.errors import UserError
from orchestrator.store.client import connect
from orchestrator.store.runs import find_runs
from orchestrator.store.uri import absolute_tracking_uri, resolve_tracking_uri, store_exists
from orchestrator.sweep.elsewhere import other_settings, store_line
from orchestrator.sweep.expand import parse_only


@click.command("report")
@sweep_file_argument
@selection_options
@tracking_uri_option
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder for the figures and tables [default: report-<sweep name>].")
@click.option("--baseline", "baselines", multiple=True, metavar="SCHEME",
              help="Compare every scheme with SCHEME (repeatable). Default: the paper's comparisons, the "
                   "weight-decay schemes against wd-1e-3 and wd-8e-3, the sparsity schemes 21-23 against wd-1e-4.")
@click.option("--unpaired", is_flag=True,
              help="Welch's unpaired t-test instead of pairing by seed (for selections whose seeds differ).")
@click.option("--envelope", is_flag=True, help="Also shade the per-epoch min-max over seeds.")
@click.option("--rank-by", default="test_error", show_default=True, metavar="test_error|test_loss",
              help="Metric whose value at a phase's last epoch picks the best and worst run drawn.")
@click.option("--train-loss", is_flag=True, help="Add a train-loss row to every figure.")
@click.option("--no-mechanism", is_flag=True,
              help="Skip the mechanism figures (weight norms, effective steps, decay timescale): the diagnostics "
                   "are not read, which makes a large report several times faster.")
@click.option("--log-to-mlflow", is_flag=True,
              help="Also store the report's files as artifacts of a new run named 'report' in the sweep's experiment.")
def report(sweep_file, set_, only, epochs_scale, train_subset, tracking_uri, out, baselines, unpaired, envelope,
           rank_by, train_loss, no_mechanism, log_to_mlflow) -> None:
    """Draw the paper's figures (per warm-restart phase: the mean over seeds and the best and worst
    run) and write per-phase seed statistics with paired differences to baselines (95% CI,
    Holm-adjusted p), for the runs of sweep FILE. Deleted and superseded runs are left out."""
    from orchestrator.report.collect import MECHANISM_METRICS, REPORT_METRICS, collect
    from orchestrator.report.render import check_options, log_report, write_report

    sweep, planned = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    check_options(baselines or None, rank_by, sweep.name, list(sweep.schemes))
    uri = resolve_tracking_uri(tracking_uri)
    click.echo(store_line(absolute_tracking_uri(uri)))
    if not store_exists(uri):
        raise UserError(f"no MLflow store at {uri}: nothing has been run there yet (adareg sweep run {sweep_file})")
    client = connect(uri, create=False)
    runs = find_runs(client, sweep.experiment)
    elsewhere = other_settings(sweep.name, planned, runs, parse_only(only))
    if elsewhere and not any(p.key in runs for p in planned):
        raise UserError(f"no runs of sweep '{sweep.name}' at these settings in experiment '{sweep.experiment}'; "
                        f"{elsewhere.line().replace(', not counted here', '')}")
    if elsewhere:
        click.echo(f"note: {elsewhere.line()}", err=True)
    metrics = REPORT_METRICS + (() if no_mechanism else MECHANISM_METRICS) + (("train_loss",) if train_loss else ())
    col = collect(client, uri, sweep, planned, metrics, sweep_file=sweep_file, found=runs)
    rep = write_report(col, out or f"report-{sweep.name}", baselines=baselines or None, train_loss=train_loss,
                       paired=not unpaired, envelope=envelope, rank_by=rank_by)
    for line in rep.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"{len(rep.figures)} figures (PNG + PDF) and {len(rep.summary)} summary rows in {rep.out}; "
               f"open {rep.out / 'report.md'}")
    if log_to_mlflow:
        run_id = log_report(client, col, rep)
        click.echo(f"logged to MLflow: run 'report' {run_id} in experiment '{sweep.experiment}'")


COMMANDS = [report]

"""``adareg sweep plan|run|status`` and ``adareg ui``: parse, call the library, print."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from orchestrator.cli.common import (
    launch_options,
    load_selection,
    runs_dir_option,
    selection_options,
    sweep_file_argument,
    tracking_uri_option,
)
from orchestrator.errors import UserError
from orchestrator.run.ending import End, State
from orchestrator.run.spec import default_runs_dir
from orchestrator.store.uri import absolute_tracking_uri, resolve_tracking_uri, ui_url
from orchestrator.sweep.elsewhere import other_settings, store_line
from orchestrator.sweep.expand import parse_only
from orchestrator.sweep.reconcile import fetch_runs, inspect_sweep


def _runs_dir(runs_dir: str | None) -> Path:
    return Path(runs_dir) if runs_dir else default_runs_dir()


def _tracking_uri(uri: str | None) -> str:
    return absolute_tracking_uri(resolve_tracking_uri(uri))


def _states(sweep_file, set_, only, epochs_scale, train_subset, runs_dir, tracking_uri):
    """The sweep, its runs' states, and a line on the sweep's runs at other settings (or None)."""
    sweep, planned = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    uri = _tracking_uri(tracking_uri)
    runs = fetch_runs(uri, sweep.experiment)
    states = inspect_sweep(planned, sweep.experiment, uri, _runs_dir(runs_dir), runs=runs)
    elsewhere = other_settings(sweep.name, planned, runs, parse_only(only))
    return sweep, states, (elsewhere.line() if elsewhere else None)


def _store_line(tracking_uri, runs_dir) -> str:
    return store_line(_tracking_uri(tracking_uri), _runs_dir(runs_dir))


@click.group("sweep")
def sweep() -> None:
    """Plan, run and watch a sweep file's runs (safe to re-run: finished runs are skipped)."""


@sweep.command("plan")
@sweep_file_argument
@selection_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@runs_dir_option
@tracking_uri_option
def plan_command(sweep_file, set_, only, epochs_scale, train_subset, fmt, runs_dir, tracking_uri):
    """The expanded runs and how many are done / resumable / pending / failed (nothing is run)."""
    sweep_, states, elsewhere = _states(sweep_file, set_, only, epochs_scale, train_subset, runs_dir, tracking_uri)
    if fmt == "json":  # stdout stays JSON; what was read is said on stderr
        click.echo(_store_line(tracking_uri, runs_dir), err=True)
        if elsewhere:
            click.echo(f"note: {elsewhere}", err=True)
        click.echo(json.dumps([s.as_json() for s in states], indent=1))
        return
    from orchestrator.dispatch.progress import plan_table, wide_console

    console = wide_console()
    console.print(_store_line(tracking_uri, runs_dir), highlight=False, soft_wrap=True)
    console.print(plan_table(states, f"sweep {sweep_.name} (experiment {sweep_.experiment})"))
    if elsewhere:
        console.print(f"note: {elsewhere}", highlight=False, soft_wrap=True)


@sweep.command("show")
@sweep_file_argument
@selection_options
def show_command(sweep_file, set_, only, epochs_scale, train_subset):
    """The sweep file as its runs are planned from it: overrides applied, defaults filled in, then each
    scheme's values per phase and step and its run and epoch counts (nothing is read from the store)."""
    from orchestrator.sweep.file import locate, resolved_yaml, scheme_summary

    sweep_, planned = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    click.echo(f"# {locate(sweep_file)}, resolved" + "".join(f" {flag}" for flag in _given(set_, only, epochs_scale,
                                                                                       train_subset)))
    click.echo(resolved_yaml(sweep_).rstrip("\n"))
    click.echo(f"# {len(planned)} run{'s' if len(planned) != 1 else ''}, "
               f"{sum(p.total_epochs for p in planned)} epochs in all")
    for line in scheme_summary(planned):
        click.echo(f"#   {line}")


def _given(set_, only, epochs_scale, train_subset) -> list[str]:
    import shlex

    return ([f"--set {shlex.quote(s)}" for s in set_] + [f"--only {shlex.quote(o)}" for o in only]
            + ([f"--epochs-scale {epochs_scale:g}"] if epochs_scale is not None else [])
            + ([f"--train-subset {train_subset}"] if train_subset is not None else []))


@sweep.command("run")
@sweep_file_argument
@selection_options
@launch_options
@click.option("--retries", type=int, default=2, show_default=True, metavar="N",
              help="Retry a failed run N times from its last checkpoint (a diverged run is never retried).")
@click.option("--retry-failed", is_flag=True, help="Also retry runs that failed in earlier sweeps (not diverged).")
@click.option("--backend", default="local", show_default=True, metavar="local|ray",
              help="local: a subprocess per run on this machine; ray: the same in Ray tasks (needs adareg[ray]).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Ray cluster to join (default: a private local Ray instance). A remote cluster needs an "
                   "http(s)/postgresql tracking URI and --shared-runs-dir.")
@click.option("--shared-runs-dir", is_flag=True,
              help="Vouch that --runs-dir is on storage every Ray node mounts at the same path.")
@runs_dir_option
@tracking_uri_option
@click.pass_context
def run_command(ctx, sweep_file, set_, only, epochs_scale, train_subset, launch, retries, retry_failed, backend,
                ray_address, shared_runs_dir, runs_dir, tracking_uri):
    """Run every run of the sweep that is not finished: resume interrupted ones, retry failures.

    Ctrl-C (or SIGTERM) stops the workers, whose runs stay resumable; a second Ctrl-C stops at once.
    Several orchestrators (or machines) may run the same sweep on one tracking store at once: each run is
    claimed in the store by whoever trains it. Exit codes: 0 all done, 1 some run failed, 2 bad input (the
    tracking server refusing this user included: nothing counted against a run), 75 the tracking
    store stayed unreachable or the runs folder full or read-only (everything resumable: run the command
    again), 130/143 interrupted.
    """
    from orchestrator.dispatch.launch import LaunchOptions, run_sweep
    from orchestrator.dispatch.progress import make_view, summary_table, wide_console

    options = LaunchOptions(**launch, retries=retries, backend=backend, ray_address=ray_address,
                            shared_runs_dir=shared_runs_dir)
    sweep_, planned = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    console = wide_console()
    result = run_sweep(sweep_, planned, options, tracking_uri=tracking_uri, runs_dir=_runs_dir(runs_dir),
                       retry_failed=retry_failed, note=lambda message: click.echo(message, err=True),
                       view_factory=lambda states, tasks: make_view(states, tasks, sweep_.name, console))
    if result.aborted:
        click.echo("error: stopped at once; interrupted runs stay resumable", err=True)
        ctx.exit(result.exit_code)
    if not result.tasks:
        console.print(f"sweep {sweep_.name}: nothing to run", highlight=False)
    console.print(summary_table(result, f"sweep {sweep_.name}", short_ids=console.width < 130))
    failed = sum(result.final(s)[0] is State.FAILED for s in result.states)
    if result.stopped_by is not None:
        click.echo("interrupted: run the same command again to resume", err=True)
    elif result.refused:  # no run failed for it: each stays resumable, none counted
        click.echo(f"error: {result.refused}; nothing was counted against a run: once the user may write there, "
                   "run the same command again", err=True)
    elif result.store_down and not failed:
        click.echo("error: the tracking store stayed unreachable; every unfinished run is resumable: run the same "
                   "command again once it answers", err=True)
    elif result.disk_full and not failed:
        click.echo(f"error: the runs folder stayed full or read-only ({result.disk_full}); every unfinished run is "
                   "resumable: make room and run the same command again", err=True)
    elif failed:
        click.echo(f"error: {failed} of {len(result.states)} runs failed{_retry_hint(result)}", err=True)
    uri = f" --tracking-uri {tracking_uri}" if tracking_uri else ""
    server = _tracking_uri(tracking_uri)
    if server.startswith(("http://", "https://")):
        where = f"open {ui_url(server, result.experiment_id)}"
    else:
        where = f"adareg ui{uri}, then open {ui_url('http://127.0.0.1:5000', result.experiment_id)}"
    click.echo(f"browse the runs: {where}\nfigures and tables: adareg report {sweep_file}{uri}")
    ctx.exit(result.exit_code)


def _retry_hint(result) -> str:
    """How to try again the failed runs that could succeed (not diverged ones: they would diverge again)."""
    again = [s for s in result.states if result.final(s)[0] is State.FAILED and s.failure != "diverged"
             and getattr(result.tasks.get(s.run_key), "end", None) is not End.DIVERGED]
    if not again:
        return ""
    which = "it" if len(again) == 1 else f"{len(again)} of them"
    return f"; to try {which} again (from the last checkpoint), run the same command with --retry-failed"


@sweep.command("status")
@sweep_file_argument
@selection_options
@click.option("--watch", type=float, default=None, metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
@runs_dir_option
@tracking_uri_option
def status_command(sweep_file, set_, only, epochs_scale, train_subset, watch, runs_dir, tracking_uri):
    """Progress of a sweep from MLflow (and the run folders), e.g. from another terminal while it runs."""
    from orchestrator.dispatch.progress import status_view, wide_console

    args = (sweep_file, set_, only, epochs_scale, train_subset, runs_dir, tracking_uri)
    if watch and watch <= 0:
        raise UserError(f"--watch {watch}: must be > 0 seconds")
    sweep_, states, elsewhere = _states(*args)
    title = f"sweep {sweep_.name}"
    console = wide_console()
    console.print(_store_line(tracking_uri, runs_dir), highlight=False, soft_wrap=True)

    def view(states, elsewhere):
        notes = _disk_notes(_runs_dir(runs_dir)) + ([f"note: {elsewhere}"] if elsewhere else [])
        return status_view(states, title, notes)

    if not watch:
        console.print(view(states, elsewhere))
        return
    from rich.live import Live

    with Live(view(states, elsewhere), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(view(*_states(*args)[1:]), refresh=True)
        except KeyboardInterrupt:
            pass


def _disk_notes(runs_dir: Path) -> list[str]:
    """A line for ``sweep status`` when the runs folder is read-only or has too little room for a run to start."""
    from orchestrator.diskfault import DiskWatch

    folder = runs_dir.resolve()
    fault = DiskWatch(folder).refuse()
    return [] if fault is None else [
        f"runs folder {folder} cannot take a run's writes: {fault.describe()}; runs wait (resumable) until it can"]


@click.command("ui")
@click.option("--port", type=int, default=5000, show_default=True)
@tracking_uri_option
def ui_command(port, tracking_uri):
    """The MLflow UI on the same store, at http://127.0.0.1:PORT (this machine only).

    From another machine (a laptop, say), forward the port over SSH instead of opening the server to the
    network: ssh -N -L PORT:127.0.0.1:PORT USER@THIS_HOST, then open http://127.0.0.1:PORT there."""
    uri = _tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        click.echo(f"the tracking server {uri} serves the MLflow UI itself: open {ui_url(uri)}")
        return
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be in 1-65535")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port)]
    click.echo(f"MLflow UI on {uri}: {ui_url(f'http://127.0.0.1:{port}')} (Ctrl-C to stop)\n"
               f"from another machine: ssh -N -L {port}:127.0.0.1:{port} {_login()}, then open the same address "
               "there")
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _login() -> str:
    """``user@host`` of this machine, for an SSH tunnel's command line."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "USER"
    return f"{user}@{socket.getfqdn()}"


COMMANDS = [sweep, ui_command]

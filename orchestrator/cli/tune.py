"""``adareg tune run FILE`` (alias ``adareg tune FILE``), ``tune best FILE [--export]``, ``tune dashboard FILE``."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import click

from orchestrator.cli.common import (
    launch_options,
    override_options,
    runs_dir_option,
    set_option,
    sweep_file_argument,
    tracking_uri_option,
)
from orchestrator.sweep.file import load_sweep
from orchestrator.tune.study import DEFAULT_TRIAL_LEASE_S

storage_option = click.option("--storage", default=None, metavar="URI",
                              help="Optuna storage: a journal file path or an RDB URL "
                                   "[default: adareg_tune/<sweep name>.journal].")


class DefaultToRun(click.Group):
    """``adareg tune FILE`` runs trials; ``adareg tune best FILE`` reports. A first word that is not
    a subcommand is the FILE of ``run``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("tune", cls=DefaultToRun)
def tune() -> None:
    """Optuna search over Table 1-shaped taper schedules (the sweep file's ``tune`` section), scored on a
    validation split held out from the training set (the test split is never read during a trial).

    \b
    adareg tune run sweeps/tune.yaml --trials 20     # trials through the scheduler: every slot busy
    adareg tune best sweeps/tune.yaml --export best.yaml
    adareg sweep run best.yaml                       # the tuned taper on the full training set, all seeds
    adareg tune dashboard sweeps/tune.yaml           # optuna-dashboard on http://127.0.0.1:8080
    """


class TuneView:
    """One line per trial event and per run start/end (the scheduler's view)."""

    def _say(self, text: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {text}")

    def started(self, task, slot) -> None:
        self._say(f"start {task.config.scheme} seed {task.config.seed} ({task.key}) on {slot.name}")

    def ended(self, task, slot) -> None:
        self._say(f"end   {task.config.scheme} seed {task.config.seed} ({task.key}): {task.end}"
                  + (f" ({task.message})" if task.message and task.end not in ("finished", "stopped") else ""))

    def note(self, message: str) -> None:
        self._say(message)

    def update(self, active) -> None:
        pass


@tune.command("run")
@sweep_file_argument
@click.option("--trials", type=click.IntRange(min=1), default=10, show_default=True, help="Trials to run now.")
@launch_options
@click.option("--trial-lease", type=float, default=DEFAULT_TRIAL_LEASE_S, show_default=True, metavar="SECONDS",
              help="A running trial whose tuner has not heartbeaten for this long is failed and enqueued again.")
@storage_option
@override_options
@runs_dir_option
@tracking_uri_option
@click.pass_context
def run_command(ctx, sweep_file, trials, launch, trial_lease, storage, set_, epochs_scale, train_subset,
                runs_dir, tracking_uri):
    """Run TRIALS more trials; each trains the sweep's first dataset and arch over ``tune.seeds`` seeds with a
    sampled taper, scored by the mean validation metric. Several of these commands (or machines) may share
    one study: each proposes its own tapers, and the trials of a tuner that died are run again."""
    from orchestrator.dispatch.launch import LaunchOptions
    from orchestrator.run.spec import default_runs_dir
    from orchestrator.tune.export import best_sweep
    from orchestrator.tune.tuner import run_tune

    options = LaunchOptions(**launch)
    sweep = load_sweep(sweep_file, set_, epochs_scale=epochs_scale, train_subset=train_subset)
    result = run_tune(sweep, trials, options, storage=storage, tracking_uri=tracking_uri,
                      runs_dir=Path(runs_dir) if runs_dir else default_runs_dir(), trial_lease=trial_lease,
                      view=TuneView())
    study = result.study
    states = Counter(t.state.name.lower() for t in study.trials)
    mine = Counter(result.told.values())
    click.echo(f"study {sweep.name}: this run {sum(mine.values())} trials ({_counts(mine)}); "
               f"study {len(study.trials)} trials ({_counts(states)})")
    if states.get("complete"):
        summary, _ = best_sweep(sweep, study)
        click.echo(f"best: trial {summary['trial']} {summary['objective']} {summary['value']:.4f} "
                   f"{json.dumps(summary['params'])}")
    if result.errors:
        click.echo(f"error: {result.errors[0][:500]} (no further trial started)", err=True)
    elif result.exit_code:
        click.echo("interrupted: its trials are enqueued again; run the command again to go on", err=True)
    ctx.exit(result.exit_code)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counter.items())) or "none"


@tune.command("best")
@sweep_file_argument
@storage_option
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write a sweep file that trains the best taper (scheme 'tuned') on the full training set over "
                   "all the file's seeds, beside the baselines wd-1e-4, wd-1e-3, wd-8e-3 and the file's schemes.")
@override_options
def best_command(sweep_file, storage, export_path, set_, epochs_scale, train_subset):
    """The best trial so far: its value (mean validation metric), parameters and taper."""
    from orchestrator.tune.export import best_sweep, export_sweep
    from orchestrator.tune.study import open_study

    sweep = load_sweep(sweep_file, set_, epochs_scale=epochs_scale, train_subset=train_subset)
    summary, doc = best_sweep(sweep, open_study(sweep, storage, create=False))
    scheme = summary.pop("scheme")
    click.echo(json.dumps(summary, indent=1))
    for field, value in scheme.items():  # the best trial's scheme, as the exported sweep writes it
        click.echo(f"{field}: {json.dumps(value)}")
    if export_path:
        export_sweep(doc, export_path, summary)
        click.echo(f"wrote {export_path}: adareg sweep run {export_path}")


@tune.command("dashboard")
@sweep_file_argument
@storage_option
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@set_option
def dashboard_command(sweep_file, storage, port, set_):
    """optuna-dashboard on the study's storage, at http://127.0.0.1:PORT (this machine only)."""
    from orchestrator.tune.study import dashboard

    sweep = load_sweep(sweep_file, set_)
    click.echo(f"optuna-dashboard for study {sweep.name}: http://127.0.0.1:{port} (Ctrl-C to stop)")
    dashboard(sweep, storage, port)


COMMANDS = [tune]

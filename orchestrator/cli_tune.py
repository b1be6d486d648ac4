"""``adareg tune FILE`` (run trials) and ``adareg tune best FILE`` (the best taper, exportable)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from orchestrator.cli_common import load_selection, selection_options, sweep_file_argument, tracking_uri_option

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
    """Optuna search over Table 1-shaped taper schedules (the sweep file's ``tune`` section).

    \b
    adareg tune sweeps/tune.yaml --trials 20        # run 20 more trials (run it in several terminals
                                                    # to run trials in parallel on one study)
    adareg tune best sweeps/tune.yaml --export best.yaml
    """


@tune.command("run")
@sweep_file_argument
@click.option("--trials", type=click.IntRange(min=1), default=10, show_default=True, help="Trials to run now.")
@storage_option
@selection_options
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default=None, envvar="ADAREG_RUNS_DIR",
              help="Where run folders live [default: ./adareg_runs].")
@tracking_uri_option
def run_command(sweep_file, trials, storage, set_, only, epochs_scale, train_subset, device, threads, runs_dir,
                tracking_uri):
    """Run TRIALS trials: each trains the sweep's first dataset, arch and seed with a sampled taper."""
    from orchestrator.cli_train import resolve_device
    from orchestrator.tune import best_sweep, run_tune
    from orchestrator.worker import default_runs_dir

    sweep, _ = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    study = run_tune(sweep, trials, storage=storage, tracking_uri=tracking_uri,
                     runs_dir=Path(runs_dir) if runs_dir else default_runs_dir(), device=resolve_device(device),
                     threads=threads)
    states = Counter(t.state.name.lower() for t in study.trials)
    click.echo(f"study {sweep.name}: {len(study.trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())})")
    if states.get("complete"):
        summary, _ = best_sweep(sweep, study)
        click.echo(f"best: trial {summary['trial']} {sweep.tune.objective} {summary['value']:.4f} "
                   f"{json.dumps(summary['params'])}")


@tune.command("best")
@sweep_file_argument
@storage_option
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write a sweep file that trains the best taper (scheme 'tuned') beside the file's schemes.")
@selection_options
def best_command(sweep_file, storage, export_path, set_, only, epochs_scale, train_subset):
    """The best trial so far: its value, parameters and taper."""
    from orchestrator.tune import best_sweep, export_sweep, open_study

    sweep, _ = load_selection(sweep_file, set_, only, epochs_scale, train_subset)
    summary, doc = best_sweep(sweep, open_study(sweep, storage, create=False))
    scheme = summary.pop("scheme")
    click.echo(json.dumps(summary, indent=1))
    click.echo(f"weight_decay: {json.dumps(scheme['weight_decay'])}")
    click.echo(f"grad_sparsity: {json.dumps(scheme['grad_sparsity'])}")
    if export_path:
        export_sweep(doc, export_path)
        click.echo(f"wrote {export_path}: adareg sweep run {export_path}")


COMMANDS = [tune]

"""``adareg train`` (one tracked run) and ``adareg schedule`` (a scheme's per-epoch values)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import click

from orchestrator.cli.common import epochs_scale_option, override_options, set_option, tracking_uri_option
from orchestrator.errors import UserError
from orchestrator.store.client import StoreRefused, StoreUnreachable
from training.callbacks import Callback

TABLE1 = "sweeps/table1.yaml"  # the working directory's, else the one installed with adareg (sweep.file.locate)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


sweep_option = click.option("--sweep", "sweep_file", default=None, metavar="FILE",
                            help="Sweep file whose schemes and settings to use; a missing sweeps/NAME.yaml or a "
                                 "bare NAME is the one installed with adareg [default: sweeps/table1.yaml].")


@click.command("train")
@click.option("--arch", required=True, help="resnet14, resnet32 or any resnet{6n+2}.")
@click.option("--dataset", required=True, help="cifar10, cifar100 or digits.")
@click.option("--scheme", required=True, help="A scheme of the sweep file (01, 22, wd-1e-4, ...).")
@click.option("--seed", type=int, default=0, show_default=True)
@sweep_option
@override_options
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where CIFAR archives live [default: the sweep's train.data_dir, else ~/.cache/adareg/data].")
@click.option("--allow-unofficial-data", is_flag=True,
              help="Load CIFAR archives whose md5 is not the official one (they are unpickled: trust them first).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if present).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
              help="Where run folders (checkpoints) live [default: $ADAREG_RUNS_DIR or ./adareg_runs].")
@tracking_uri_option
def train_command(arch, dataset, scheme, seed, sweep_file, set_, epochs_scale, train_subset, data_dir,
                  allow_unofficial_data, device, threads, runs_dir, tracking_uri):
    """Train one run, logged to MLflow. Re-running the same command resumes it, or says it is finished."""
    from orchestrator.diskfault import DiskFull
    from orchestrator.dispatch.launch import Launch, LaunchOptions
    from orchestrator.dispatch.slots import Slot
    from orchestrator.identity import plan
    from orchestrator.run.ending import End
    from orchestrator.run.spec import default_runs_dir
    from orchestrator.run.worker import execute
    from orchestrator.sweep.file import load_sweep

    sweep = load_sweep(sweep_file or TABLE1, set_, epochs_scale=epochs_scale, train_subset=train_subset)
    config = sweep.run_config(scheme, arch, dataset, seed)
    sweep = sweep.for_run(arch, dataset, seed)  # off the sweep's grid: the experiment adareg-train
    if data_dir:
        config = config.replace(data_dir=data_dir)  # a path: not part of the run's identity
    if allow_unofficial_data:
        config = config.replace(allow_unofficial_data=True)  # not part of the run's identity either
    # The one launch path (an unreachable store fails here, in one line, before anything loads); the run then
    # trains in this process, one attempt, its epochs echoed.
    slot = Slot("train", resolve_device(device), None, threads or 0)
    launch = Launch.open(sweep, LaunchOptions(), tracking_uri=tracking_uri,
                         runs_dir=Path(runs_dir) if runs_dir else default_runs_dir(), slots=[slot])
    task = launch.task(plan(config))
    spec = launch.spec(task, slot)
    click.echo(f"run {task.key}: {config.scheme} {config.arch} {config.dataset} seed {config.seed} on {spec.device}")
    attempt, code = execute(spec, callbacks=[EpochEcho()])
    if attempt.status is End.BUSY:
        raise UserError(attempt.message)
    if attempt.status is End.REFUSED:  # the tracking server refused this user: exit 2, nothing counted
        raise StoreRefused(attempt.message)
    if attempt.status is End.STORE_DOWN:
        raise StoreUnreachable(f"{attempt.message}; the run is resumable: run the same command again")
    if attempt.status is End.DISK_FULL:  # exit 75, the run resumable from its checkpoint
        raise DiskFull(f"{attempt.message}; the run is resumable: make room and run the same command again")
    click.echo(f"{attempt.status}: MLflow run {attempt.run_id}" + (f" ({attempt.message})" if attempt.message else ""))
    click.echo(f"store {launch.uri}, experiment '{sweep.experiment}', run folder {task.run_dir}\n"
               f"view it: {view_hint(launch.uri, launch.experiment_id, tracking_uri)}")
    if code:
        sys.exit(code)


def view_hint(uri: str, experiment_id: str | None, given: str | None) -> str:
    """How to look at a store's runs in the MLflow UI."""
    from orchestrator.store.uri import ui_url

    if uri.startswith(("http://", "https://")):
        return f"open {ui_url(uri, experiment_id)}"
    flag = f" --tracking-uri {given}" if given else ""
    return f"adareg ui{flag}, then open {ui_url('http://127.0.0.1:5000', experiment_id)}"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochEcho(Callback):
    """Prints one line per epoch: its phase, metrics, the time since this process started training and an
    estimate of the time left (from this process's epochs so far)."""

    def on_start(self, config, plan, history):
        import time

        self.plan, self.total, self.first = plan, len(plan), len(history)
        self.started = time.monotonic()
        if history:
            click.echo(f"resuming after epoch {len(history)} of {self.total}")

    def on_epoch_end(self, epoch, m):
        import time

        elapsed = time.monotonic() - self.started
        eta = elapsed / max(1, epoch - self.first) * (self.total - epoch)
        split = "val" if "val_loss" in m else "test"
        click.echo(f"epoch {epoch:>3}/{self.total} phase {self.plan[epoch - 1].phase} lr {m['lr']:g} "
                   f"wd {m['weight_decay']:g} sparsity {m['grad_sparsity']:g} | train loss {m['train_loss']:.4f} "
                   f"err {m['train_error']:.4f} | {split} loss {m[f'{split}_loss']:.4f} err {m[f'{split}_error']:.4f} "
                   f"| {m['images_per_second']:.0f} img/s | {duration(elapsed)} elapsed, ETA {duration(eta)}")


@click.command("schedule")
@click.argument("scheme")
@sweep_option
@set_option
@epochs_scale_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
def schedule_command(scheme, sweep_file, set_, epochs_scale, fmt):
    """Every epoch's phase, learning rate, weight decay and gradient sparsity for SCHEME (and its dropout,
    label smoothing and batch size where it tapers them)."""
    from orchestrator.sweep.file import load_sweep
    from training.callbacks import taper_metrics
    from training.schedules import plan_for

    sweep = load_sweep(sweep_file or TABLE1, set_, epochs_scale=epochs_scale)
    config = sweep.run_config(scheme, sweep.archs[0], sweep.datasets[0], sweep.seeds[0])
    extra = taper_metrics(config)
    header = ["epoch", "phase", "lr", "weight_decay", "grad_sparsity", *extra]
    rows = [[str(e.epoch), str(e.phase), f"{e.lr:g}", f"{e.weight_decay:g}", f"{e.grad_sparsity:g}",
             *(f"{getattr(e, name):g}" for name in extra)]
            for e in plan_for(config)]
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=f"scheme {scheme} ({len(rows)} epochs)")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


COMMANDS = [train_command, schedule_command]

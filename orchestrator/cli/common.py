"""Click pieces shared by the sweep, report and tune commands: they parse, ``load_selection`` calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from orchestrator.identity import Planned
from orchestrator.sweep.expand import expand
from orchestrator.sweep.file import load_sweep
from orchestrator.sweep.schema import Sweep

F = TypeVar("F", bound=Callable)

tracking_uri_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, show_envvar=True, metavar="URI",
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else MLflow's sqlite:///mlflow.db].")

# Existence is not checked here: load_sweep's one-line error names the file.
sweep_file_argument = click.argument("sweep_file", metavar="FILE", type=click.Path())

set_option = click.option(
    "--set", "set_", multiple=True, metavar="KEY=VALUE",
    help="Override a sweep-file field: dotted KEY (one that exists; +KEY=VALUE adds one), VALUE as YAML, e.g. "
         "--set 'datasets=[digits]' --set schemes.01.lr=0.05. Repeatable.")
only_option = click.option(
    "--only", multiple=True, metavar="FIELD=V1,V2",
    help="Keep the runs whose FIELD (arch, dataset, scheme, seed, ...) is one of the values, "
         "e.g. --only scheme=01,22. Repeatable; different fields must all match.")
epochs_scale_option = click.option(
    "--epochs-scale", type=float, default=None, metavar="F",
    help="Scale every learning-rate step's epochs (0.1: 450 epochs -> 45); overrides train.epochs_scale.")
train_subset_option = click.option(
    "--train-subset", type=int, default=None, metavar="N",
    help="Train on N examples (0 = all); overrides train.train_subset.")

_SELECTION = (set_option, only_option, epochs_scale_option, train_subset_option)
_OVERRIDES = (set_option, epochs_scale_option, train_subset_option)


runs_dir_option = click.option(
    "--runs-dir", type=click.Path(file_okay=False), default=None, envvar="ADAREG_RUNS_DIR", show_envvar=True,
    help="Where run folders (spec, lock, checkpoint, progress, result, log) live [default: ./adareg_runs].")

pack_option = click.option(
    "--pack", default=None, metavar="N|auto|off",
    help="Train runs of one shape together as one fused model, N per process [default: the sweep file's "
         "pack:, else auto: on GPUs the size a short calibration picks, on the CPU one run per process].")

_DEVICES = (
    click.option("--gpus", default=None, metavar="LIST|all|none",
                 help="GPUs to use: indices such as 0,1, all, or none for the CPU [default: all visible GPUs, "
                      "else the CPU]."),
    click.option("--jobs-per-gpu", type=int, default=1, show_default=True, metavar="K", help="Runs sharing one GPU."),
    click.option("--max-parallel", type=int, default=None, metavar="N",
                 help="At most N runs at once [default: GPUs x K; on the CPU half the cores]."),
)


_WATCH = (
    click.option("--stall-timeout", type=float, default=None, metavar="SECONDS",
                 help="Kill and retry a worker that finishes no epoch for this long "
                      "[default: max(20 min, 5 x its slowest epoch)]."),
    click.option("--store-timeout", type=float, default=900, show_default=True, metavar="SECONDS",
                 help="How long the tracking store may be unreachable before runs end (resumable) and the "
                      "command stops with exit 75; meanwhile workers train on and no new run starts."),
    click.option("--claim-lease", type=float, default=300, show_default=True, metavar="SECONDS",
                 help="The lease this command's workers keep on their runs in the store (they beat every fifth "
                      "of it, at most every 30 s), and the least time another process's heartbeat must stand "
                      "still before its run is taken over (its own lease, when longer, wins). A live process "
                      "of this machine is never taken over."),
    click.option("--disk-timeout", type=float, default=None, metavar="SECONDS",
                 help="How long the runs folder may stay full or read-only before the command stops with exit 75 "
                      "(every run resumable); meanwhile no new run starts [default: --store-timeout]."),
)


def watch_options(func: F) -> F:
    """Add ``--stall-timeout``, ``--store-timeout``, ``--claim-lease`` and ``--disk-timeout`` (how workers and
    what they need are watched)."""
    for option in reversed(_WATCH):
        func = option(func)
    return func


def device_options(func: F) -> F:
    """Add ``--gpus``, ``--jobs-per-gpu`` and ``--max-parallel`` (the scheduler's device slots) to a command."""
    for option in reversed(_DEVICES):
        func = option(func)
    return func


LAUNCH_FIELDS = ("gpus", "jobs_per_gpu", "max_parallel", "stall_timeout", "store_timeout", "claim_lease",
                 "disk_timeout", "pack")
"""The options ``launch_options`` adds: fields of ``orchestrator.dispatch.launch.LaunchOptions``."""


def launch_options(func: F) -> F:
    """Add what every command that launches runs takes (``--gpus``, ``--jobs-per-gpu``, ``--max-parallel``,
    the watch options, ``--pack``); the command receives them as one keyword, ``launch``: a dict of
    ``LaunchOptions`` fields (``LaunchOptions(**launch, ...)``), so an option added here reaches every launch."""
    @functools.wraps(func)
    def command(*args, **kwargs):
        kwargs["launch"] = {name: kwargs.pop(name) for name in LAUNCH_FIELDS}
        return func(*args, **kwargs)

    return device_options(watch_options(pack_option(command)))


def selection_options(func: F) -> F:
    """Add ``--set``, ``--only``, ``--epochs-scale`` and ``--train-subset`` to a command (one that reads the
    sweep's runs)."""
    for option in reversed(_SELECTION):
        func = option(func)
    return func


def override_options(func: F) -> F:
    """Add ``--set``, ``--epochs-scale`` and ``--train-subset`` to a command that reads a sweep file but picks
    no runs of it (``--only`` would mean nothing there)."""
    for option in reversed(_OVERRIDES):
        func = option(func)
    return func


def load_selection(sweep_file: str, set_: Sequence[str], only: Sequence[str], epochs_scale: float | None,
                   train_subset: int | None) -> tuple[Sweep, list[Planned]]:
    """The sweep with its overrides applied, and the planned runs ``--only`` keeps."""
    sweep = load_sweep(sweep_file, set_, epochs_scale=epochs_scale, train_subset=train_subset)
    return sweep, expand(sweep, only)

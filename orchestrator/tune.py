"""``adareg tune``: Optuna search over Table 1-shaped taper schedules.

ask → a taper (``TuneSpace`` of the sweep file) → a RunConfig → the same worker as every run (lock,
checkpoint, MLflow run tagged with the study and trial) → per-epoch report / prune → tell.

A trial trains the sweep's first dataset, arch and seed; validate the best taper over all seeds with
the sweep that ``tune best --export`` writes. Storage: an Optuna journal file (safe for several
``adareg tune`` processes on the same study at once, which is how trials run in parallel) or any
Optuna RDB URL. Optuna's MLflowCallback is deprecated; trials are logged by adareg's own run logger.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError
from orchestrator.identity import run_key
from orchestrator.sweepfile import Range, Sweep, TuneSpace
from training.atomic import atomic_write
from training.callbacks import Callback

TAG_STUDY = "adareg.study"
TAG_TRIAL = "adareg.trial"
STEPS = 5


def default_storage(sweep: Sweep) -> str:
    return str(Path("adareg_tune") / f"{sweep.name}.journal")


def open_study(sweep: Sweep, storage: str | None, create: bool = True):
    """The sweep's study (named after the sweep) in a journal file or an RDB URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = space_of(sweep)
    storage = storage or default_storage(sweep)
    if "://" in storage:
        backend: Any = storage
    else:
        path = Path(storage)
        if not create and not path.exists():
            raise UserError(f"{storage}: no such study journal (run 'adareg tune FILE' first)")
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalStorage(JournalFileBackend(str(path)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if space.pruner == "median"
              else optuna.pruners.NopPruner())
    try:
        if create:
            return optuna.create_study(storage=backend, study_name=sweep.name, direction="minimize",
                                       load_if_exists=True, pruner=pruner,
                                       sampler=optuna.samplers.TPESampler(seed=space.sampler_seed))
        return optuna.load_study(storage=backend, study_name=sweep.name, pruner=pruner)
    except KeyError:
        raise UserError(f"{storage}: no study named {sweep.name!r}") from None


def space_of(sweep: Sweep) -> TuneSpace:
    if sweep.tune is None:
        raise UserError(f"sweep {sweep.name!r} has no 'tune' section: add one (see sweeps/tune.yaml)")
    lr = sweep.schedule.lr
    steps = len(lr[0]) if lr and isinstance(lr[0], (list, tuple)) else (len(lr) if isinstance(lr, list) else STEPS)
    if steps != STEPS:
        raise UserError(f"sweep {sweep.name!r}: tune needs {STEPS} learning-rate steps per phase, the schedule has "
                        f"{steps}")
    return sweep.tune


def _suggest(trial, name: str, value: Range | float) -> float:
    if isinstance(value, Range):
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    return float(value)


def taper(base: float, peak: float, sparsity: float, phases: int) -> dict[str, Any]:
    """Scheme values of a trial: weight decay [b, b, p/2, p, p] in every phase, sparsity in phase 1."""
    sparse = [[0.0, 0.0, sparsity, sparsity, sparsity]] + [[0.0] * STEPS for _ in range(phases - 1)]
    return {"weight_decay": [base, base, peak / 2, peak, peak], "grad_sparsity": sparse}


def trial_scheme(sweep: Sweep, params: dict[str, float]) -> dict[str, Any]:
    space = space_of(sweep)
    value = lambda name: params.get(name, getattr(space, name))  # noqa: E731 (fixed values are not params)
    return taper(float(value("weight_decay_base")), float(value("weight_decay_peak")),
                 float(value("grad_sparsity")), len(sweep.schedule.epochs_per_step))


class Reporter(Callback):
    """Reports the objective to the trial every epoch and stops the run when Optuna prunes it."""

    def __init__(self, trial, objective: str):
        self.trial, self.objective, self.last = trial, objective, math.nan

    def on_start(self, config, plan, history) -> None:
        for entry in history:  # a resumed trial re-reports what it had
            self.on_epoch_end(int(entry["epoch"]), entry, prune=False)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], prune: bool = True) -> None:
        from orchestrator.worker import StopRun

        self.last = float(metrics[self.objective])
        self.trial.report(self.last, epoch)
        if prune and self.trial.should_prune():
            raise StopRun("pruned", f"pruned by Optuna at epoch {epoch} ({self.objective} {self.last:.4f})")


def run_tune(sweep: Sweep, trials: int, *, storage: str | None, tracking_uri: str | None, runs_dir: Path,
             device: str = "cpu", threads: int | None = None) -> Any:
    """Run ``trials`` more trials of the sweep's study; returns the study."""
    import optuna

    from orchestrator import tracking
    from orchestrator.worker import WorkerSpec, execute
    from training.config import RunConfig

    space = space_of(sweep)
    client = tracking.connect(tracking_uri)
    tracking.ensure_experiment(client, sweep.experiment)  # one process initialises the store
    study = open_study(sweep, storage)
    base = sweep.run_config(next(iter(sweep.schemes)), sweep.archs[0], sweep.datasets[0], sweep.seeds[0])

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, getattr(space, name))
                  for name in ("weight_decay_base", "weight_decay_peak", "grad_sparsity")}
        config = RunConfig.from_dict({**base.to_dict(), **trial_scheme(sweep, params),
                                      "scheme": f"trial-{trial.number}"})
        reporter = Reporter(trial, space.objective)
        spec = WorkerSpec(config=config.to_dict(), experiment=sweep.experiment,
                          run_dir=str(runs_dir / run_key(config)), tracking_uri=tracking_uri, sweep=sweep.name,
                          device=device, threads=threads,
                          tags={TAG_STUDY: sweep.name, TAG_TRIAL: str(trial.number)})
        outcome = execute(spec, callbacks=[reporter])
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        if outcome.status == "pruned":
            raise optuna.TrialPruned(outcome.message)
        if outcome.status == "already_finished":  # the sampler proposed a taper that was already trained
            return float(client.get_run(outcome.run_id).data.metrics[space.objective])
        if outcome.status != "finished":
            raise UserError(f"trial {trial.number}: {outcome.status}: {outcome.message}")
        return reporter.last

    study.optimize(objective, n_trials=trials, catch=())
    return study


def best_sweep(sweep: Sweep, study) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best trial summary, a sweep document that trains the best taper beside the file's schemes)."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise UserError(f"study {sweep.name!r} has no completed trial yet")
    best = study.best_trial
    scheme = trial_scheme(sweep, best.params)
    doc = sweep.model_dump(mode="json", exclude={"tune"}, exclude_none=True)
    doc["name"] = f"{sweep.name}-best"
    doc["schemes"] = {"tuned": scheme, **doc["schemes"]}
    summary = {"trial": best.number, "value": best.value, "params": best.params, "trials": len(study.trials),
               "completed": len(done), "scheme": scheme}
    return summary, doc


def export_sweep(doc: dict[str, Any], path: str | Path) -> None:
    text = ("# Written by 'adareg tune best --export': the best taper found, as scheme 'tuned',\n"
            "# beside the tuning file's own schemes. Run it over all seeds with 'adareg sweep run'.\n"
            + yaml.safe_dump(doc, sort_keys=False)).encode()
    atomic_write(path, lambda f: f.write(text))

"""The tuning space: a trial's parameters -> a Table 1-shaped taper -> the RunConfigs of its tuning seeds."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import UserError
from orchestrator.sweep.schema import Range, Sweep, TuneSpace

STEPS = 5


def space_of(sweep: Sweep) -> TuneSpace:
    if sweep.tune is None:
        raise UserError(f"sweep {sweep.name!r} has no 'tune' section: add one (see sweeps/tune.yaml)")
    lr = sweep.schedule.lr
    steps = len(lr[0]) if lr and isinstance(lr[0], (list, tuple)) else (len(lr) if isinstance(lr, list) else STEPS)
    if steps != STEPS:
        raise UserError(f"sweep {sweep.name!r}: tune needs {STEPS} learning-rate steps per phase, the schedule has "
                        f"{steps}")
    if sweep.tune.seeds > len(sweep.seeds):
        raise UserError(f"tune.seeds: {sweep.tune.seeds} tuning seeds, but the sweep lists {len(sweep.seeds)} "
                        f"seed{'s' if len(sweep.seeds) != 1 else ''}")
    return sweep.tune


def suggest(trial, name: str, value: Range | float) -> float:
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


def variant_of(study_name: str, number: int) -> str:
    return f"{study_name}/trial-{number}"


def trial_configs(sweep: Sweep, params: dict[str, float], variant: str, number: int) -> list:
    """The RunConfigs of one trial: the sweep's first dataset and arch, its first ``tune.seeds`` seeds, the
    trial's taper, a validation hold-out and the trial's variant."""
    from training.config import RunConfig

    space = space_of(sweep)
    scheme = next(iter(sweep.schemes))
    out = []
    for seed in sweep.seeds[:space.seeds]:
        base = sweep.run_config(scheme, sweep.archs[0], sweep.datasets[0], seed)
        out.append(RunConfig.from_dict({**base.to_dict(), **trial_scheme(sweep, params), "scheme": f"trial-{number}",
                                        "validation": space.validation, "variant": variant}))
    return out


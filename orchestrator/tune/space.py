"""The tuning space: a trial's parameters -> its scheme -> the RunConfigs of its tuning seeds.

A ``tune`` section with ``space`` varies dotted fields of a scheme (``tune.scheme``, default the first);
without it, the Table 1 shape (``taper``): weight decay ``[b, b, p/2, p, p]`` and sparsity in phase 1."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import UserError
from orchestrator.sweep.file import TRIAL_SCHEME, scheme_with, sweep_of_scheme
from orchestrator.sweep.schema import LEGACY_SPACE, Range, Sweep, TuneSpace

STEPS = 5


def space_of(sweep: Sweep) -> TuneSpace:
    if sweep.tune is None:
        raise UserError(f"sweep {sweep.name!r} has no 'tune' section: add one (see sweeps/tune.yaml)")
    if sweep.tune.seeds > len(sweep.seeds):
        raise UserError(f"tune.seeds: {sweep.tune.seeds} tuning seeds, but the sweep lists {len(sweep.seeds)} "
                        f"seed{'s' if len(sweep.seeds) != 1 else ''}")
    if sweep.tune.space is not None:
        return sweep.tune
    lr = sweep.schedule.lr
    steps = len(lr[0]) if lr and isinstance(lr[0], (list, tuple)) else (len(lr) if isinstance(lr, list) else STEPS)
    if steps != STEPS:
        raise UserError(f"sweep {sweep.name!r}: tune's Table 1 shape needs {STEPS} learning-rate steps per phase, "
                        f"the schedule has {steps} (or declare tune.space over the scheme's fields)")
    return sweep.tune


def parameters(space: TuneSpace) -> dict[str, Range | float]:
    """What a trial samples (a Range) or fixes (a number), by Optuna parameter name."""
    if space.space is not None:
        return dict(space.space)
    return {name: getattr(space, name) for name in LEGACY_SPACE}


def suggest(trial, name: str, value: Range | float) -> float:
    if isinstance(value, Range):
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    return float(value)


def taper(base: float, peak: float, sparsity: float, phases: int) -> dict[str, Any]:
    """Scheme values of a trial: weight decay [b, b, p/2, p, p] in every phase, sparsity in phase 1."""
    sparse = [[0.0, 0.0, sparsity, sparsity, sparsity]] + [[0.0] * STEPS for _ in range(phases - 1)]
    return {"weight_decay": [base, base, peak / 2, peak, peak], "grad_sparsity": sparse}


def trial_scheme(sweep: Sweep, params: dict[str, float]) -> dict[str, Any]:
    """A trial's scheme, as a sweep file writes it."""
    space = space_of(sweep)
    fixed = parameters(space)
    value = lambda name: params.get(name, fixed[name])  # noqa: E731 (fixed values are not params)
    if space.space is not None:
        return scheme_with(sweep, {path: value(path) for path in space.space})
    return taper(float(value("weight_decay_base")), float(value("weight_decay_peak")),
                 float(value("grad_sparsity")), len(sweep.schedule.epochs_per_step))


def variant_of(study_name: str, number: int) -> str:
    return f"{study_name}/trial-{number}"


def trial_configs(sweep: Sweep, params: dict[str, float], variant: str, number: int) -> list:
    """The RunConfigs of one trial: the sweep's first dataset and arch, its first ``tune.seeds`` seeds, the
    trial's taper, a validation hold-out and the trial's variant."""
    from training.config import RunConfig

    space = space_of(sweep)
    out = []
    if space.space is not None:
        trial = sweep_of_scheme(sweep, TRIAL_SCHEME, trial_scheme(sweep, params))
        for seed in sweep.seeds[:space.seeds]:
            base = trial.run_config(TRIAL_SCHEME, sweep.archs[0], sweep.datasets[0], seed)
            out.append(RunConfig.from_dict({**base.to_dict(), "scheme": f"trial-{number}",
                                            "validation": space.validation, "variant": variant}))
        return out
    scheme = next(iter(sweep.schemes))
    for seed in sweep.seeds[:space.seeds]:
        base = sweep.run_config(scheme, sweep.archs[0], sweep.datasets[0], seed)
        out.append(RunConfig.from_dict({**base.to_dict(), **trial_scheme(sweep, params), "scheme": f"trial-{number}",
                                        "validation": space.validation, "variant": variant}))
    return out


"""Expansion (pure): a sweep's datasets x archs x schemes x seeds as planned runs, ``--only`` keeping a subset."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import BadValue, UserError, arg
from orchestrator.identity import Planned, plan
from orchestrator.sweep.schema import Sweep, did_you_mean
from training.config import RunConfig

_ONLY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if not isinstance(f.default, tuple))


# ------------------------------------------------------------------------------------- expansion


def _parse_only_items(items: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    parsed = []
    for item in items:
        field, sep, text = item.partition("=")
        field = field.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not field or not values:
            raise BadValue(f"{arg('only')} {item!r}: expected FIELD=V1,V2 (e.g. scheme=01,22)")
        if field not in _ONLY_FIELDS:
            raise BadValue(f"{arg('only')} {item!r}: unknown field {field!r}{did_you_mean(field, _ONLY_FIELDS)} "
                            f"(expected one of {', '.join(_ONLY_FIELDS)})")
        parsed.append((item, field, values))
    return parsed


def parse_only(items: Sequence[str]) -> dict[str, set[str]]:
    """``['scheme=01,22', 'seed=0']`` -> ``{'scheme': {'01', '22'}, 'seed': {'0'}}`` (same field: union)."""
    wanted: dict[str, set[str]] = {}
    for _, field, values in _parse_only_items(items):
        wanted.setdefault(field, set()).update(values)
    return wanted


def _matches(actual: Any, wanted: str) -> bool:
    if str(actual) == wanted or (isinstance(actual, bool) and str(actual).lower() == wanted.lower()):
        return True
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(wanted) == actual
        except ValueError:
            return False
    return False


def _select(runs: list[Planned], only: Sequence[str]) -> list[Planned]:
    for item, field, values in _parse_only_items(only):
        for value in values:
            if not any(_matches(getattr(r.config, field), value) for r in runs):
                known = list(dict.fromkeys(str(getattr(r.config, field)) for r in runs))
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise BadValue(f"{arg('only')} {item!r}: no run has {field} {value}{did_you_mean(value, known)} "
                                f"(the sweep has {shown})")
    wanted = parse_only(only)
    kept = [r for r in runs
            if all(any(_matches(getattr(r.config, f), v) for v in values) for f, values in wanted.items())]
    if not kept:
        raise BadValue(" ".join(f"{arg('only')} {item!r}" for item in only) + ": together they select no run")
    return kept


def expand(sweep: Sweep, only: Sequence[str] = ()) -> list[Planned]:
    """Every run of the sweep, planned (``orchestrator.identity.plan``), ordered dataset, arch, scheme (file
    order), seed; ``only`` keeps a subset."""
    runs = [plan(sweep.run_config(scheme, arch, dataset, seed))
            for dataset in sweep.datasets for arch in sweep.archs
            for scheme in sweep.schemes for seed in sweep.seeds]
    seen: dict[str, Planned] = {}
    for run in runs:
        other = seen.setdefault(run.key, run)
        if other is not run:
            raise UserError(f"schemes {other.config.scheme!r} and {run.config.scheme!r} give identical runs "
                            f"(run key {run.key}): change or remove one")
    return _select(runs, only)

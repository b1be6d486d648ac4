"""``tune best --export``: the best trial's taper as a sweep file, beside the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError
from orchestrator.sweep.schema import Sweep
from orchestrator.tune.space import space_of, trial_scheme
from training.atomic import atomic_write

BASELINES = {"wd-1e-4": {"weight_decay": 1e-4}, "wd-1e-3": {"weight_decay": 1e-3}, "wd-8e-3": {"weight_decay": 8e-3}}


def best_sweep(sweep: Sweep, study) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best trial summary, a sweep document that trains the best taper, as scheme ``tuned``, on the full
    training set over all the file's seeds, beside the baselines wd-1e-4, wd-1e-3, wd-8e-3 and the file's
    own schemes)."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise UserError(f"study {sweep.name!r} has no completed trial yet")
    best = study.best_trial
    scheme = trial_scheme(sweep, best.params)
    doc = sweep.model_dump(mode="json", exclude={"tune"}, exclude_none=True)
    doc["name"] = f"{sweep.name}-best"
    doc.setdefault("train", {}).pop("validation", None)  # the full training set; the test split scores it
    doc["train"].pop("variant", None)
    own = doc["schemes"]
    doc["schemes"] = {"tuned": scheme, **{k: v for k, v in BASELINES.items() if k not in own}, **own}
    summary = {"trial": best.number, "value": best.value, "objective": space_of(sweep).objective,
               "params": best.params, "trials": len(study.trials), "completed": len(done), "scheme": scheme}
    return summary, doc


def export_sweep(doc: dict[str, Any], path: str | Path, summary: dict[str, Any] | None = None) -> None:
    where = (f"# Best trial {summary['trial']}: mean {summary['objective']} {summary['value']:.4f} on the validation "
             "split.\n") if summary else ""
    text = ("# Written by 'adareg tune best --export': the best taper found, as scheme 'tuned' (selected on\n"
            "# validation, trained here on the full training set and scored on the test split), beside the\n"
            "# baselines. Run it over all seeds with 'adareg sweep run'.\n" + where
            + yaml.safe_dump(doc, sort_keys=False)).encode()
    atomic_write(path, lambda f: f.write(text))


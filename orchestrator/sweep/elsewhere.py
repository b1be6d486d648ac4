"""What the sweep's readers (``sweep plan``, ``sweep status``, ``report``) say before anything else: the store
and runs folder they read, whether that store exists, and the runs of the same sweep that the settings given
do not select (another ``--epochs-scale``, ``--train-subset`` or ``--set``), with the flags that select them.

A run's identity is its whole config, so a run trained at ``--epochs-scale 0.02`` is not one of the sweep's
runs at scale 1; it is still in the store, and the readers say so rather than report ``0 done``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.identity import Planned
from orchestrator.store.tags import TAG_STUDY, TAG_SWEEP
from orchestrator.store.uri import sqlite_path, store_exists
from training.config import RunConfig

_LABELS = {"dataset": "datasets", "arch": "archs", "seed": "seeds"}
_FLAGS = {"epochs_scale": "--epochs-scale", "train_subset": "--train-subset"}
_IGNORED = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("identity") is False} | {"variant"}


def store_line(uri: str, runs_dir: Path | None = None) -> str:
    """``store URI (runs folder DIR)``, and plainly that the store does not exist when its file is missing."""
    folder = f", runs folder {runs_dir.resolve()}" if runs_dir is not None else ""
    if store_exists(uri):
        return f"store {uri}{folder}"
    return f"store {uri}{folder}: no such store ({sqlite_path(uri)} does not exist): nothing has been run here yet"


@dataclass(frozen=True)
class Elsewhere:
    """Runs of the sweep in the store that the settings given do not select."""

    sweep: str
    runs: int
    finished: int
    selections: tuple[tuple[str, int], ...]
    """(the flags that select them, how many runs), most runs first."""

    def line(self) -> str:
        which = "; ".join(f"{n} with {flags}" for flags, n in self.selections)
        runs = f"{self.runs} run{'s' if self.runs != 1 else ''}"
        return (f"the store also holds {runs} of sweep '{self.sweep}' ({self.finished} finished) at other settings, "
                f"not counted here: {which}")


def other_settings(sweep_name: str, planned: Sequence[Planned], runs: Mapping[str, Any],
                   only: Mapping[str, set[str]] | None = None) -> Elsewhere | None:
    """The runs of ``runs`` (``{run_key: Run}``, the experiment's active runs) tagged as sweep ``sweep_name``
    that are not ``planned`` and match ``only`` (``parse_only``'s fields), grouped by the flags that select
    them; None when there are none. A tuning study's trials are not the sweep's runs."""
    keys = {p.key for p in planned}
    others = [r for key, r in runs.items() if key not in keys and r.data.tags.get(TAG_SWEEP) == sweep_name
              and not r.data.tags.get(TAG_STUDY) and _selected(r.data.params, only or {})]
    if not others or not planned:
        return None
    by_labels = {_labels(p.config): p.config for p in planned}
    flags = Counter(_flags(r.data.params, planned, by_labels) for r in others)
    finished = sum(r.info.status == "FINISHED" for r in others)
    return Elsewhere(sweep_name, len(others), finished, tuple(flags.most_common()))


def _selected(params: Mapping[str, str], only: Mapping[str, set[str]]) -> bool:
    from orchestrator.sweep.expand import _matches

    return all(field not in params or any(_matches(params[field], v) for v in values)
               for field, values in only.items())


def _labels(config: RunConfig) -> tuple[str, ...]:
    return (config.dataset, config.arch, config.scheme, str(config.seed))


def _flags(params: Mapping[str, str], planned: Sequence[Planned], by_labels: Mapping[tuple, RunConfig]) -> str:
    """The flags that make a run with ``params`` one of a selection's runs, as a user would type them."""
    from orchestrator.store.runs import config_params

    out = []
    for field, key in _LABELS.items():
        values = {str(getattr(p.config, field)) for p in planned}
        if field in params and params[field] not in values:
            out.append(f"--set '{key}=[{params[field]}]'")
    scheme = params.get("scheme")
    schemes = {p.config.scheme for p in planned}
    if scheme is not None and scheme not in schemes:
        out.append(f"a scheme '{scheme}' (--set schemes.{scheme}...)")
    ref = by_labels.get((params.get("dataset"), params.get("arch"), scheme, params.get("seed")))
    ref = ref or next((p.config for p in planned if p.config.scheme == scheme), planned[0].config)
    expected = config_params(ref)
    differ = [f for f, text in params.items()
              if f in expected and f not in _IGNORED and f not in _LABELS and f != "scheme" and text != expected[f]]
    out += [f"{_FLAGS[f]} {params[f]}" for f in differ if f in _FLAGS]
    rest = [f for f in differ if f not in _FLAGS]
    if rest:
        out.append(f"--set giving other {', '.join(rest)}")
    return " ".join(out) or "other settings"

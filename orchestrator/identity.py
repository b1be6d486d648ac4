"""Run identity: short hashes of everything that changes a run's result, and nothing else.

A run is *planned* once (``plan``: a sweep's expansion, a tuning trial, ``adareg train``): its ``Planned``
carries the config with its key, its seed group's key and its total epochs, which everything after reads.
The run key hashes the canonical JSON of ``RunConfig.identity_dict()`` (labels, paths and the
evaluation batch size are already left out); the group key hashes the same without the seed and is
the unit of seed aggregation. Both are stable across machines and across YAML key orders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from training.config import RunConfig
from training.schedules import total_epochs

KEY_LENGTH = 12


def _digest(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def run_key(config: RunConfig) -> str:
    """12 hex digits naming one run: equal configs (up to labels and paths) give equal keys."""
    return _digest(config.identity_dict())


def group_key(config: RunConfig) -> str:
    """12 hex digits naming the run's seed group: the run key's hash without ``seed``."""
    identity = config.identity_dict()
    del identity["seed"]
    return _digest(identity)


@dataclass(frozen=True)
class Planned:
    """A run as first planned, with what derives from its config computed once."""

    config: RunConfig
    key: str  # run_key(config)
    group: str  # group_key(config)
    total_epochs: int


def plan(config: RunConfig) -> Planned:
    """The one place a planned run's key, group and total epochs are computed."""
    return Planned(config, run_key(config), group_key(config), total_epochs(config))

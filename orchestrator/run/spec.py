"""What crosses the process boundary into a worker: plain JSON specs, written atomically.

``WorkerSpec`` (``RUN_DIR/spec.json``) is one run; ``PackSpec`` (``<runs dir>/packs/<id>/spec.json``) names
the spec files of a pack's members. How the worker's attempt ended comes back in ``RUN_DIR/result.json``
(``orchestrator.run.folder.Attempt``, its words in ``orchestrator.run.ending``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.store.claims import DEFAULT_LEASE_S
from orchestrator.store.client import DEFAULT_STORE_TIMEOUT_S
from training.atomic import atomic_write

PARENT_PID_ENV = "ADAREG_PARENT_PID"  # the spawner's pid, handed down to the worker (see worker.die_with_parent)


def default_runs_dir() -> Path:
    """Where run folders live: ``$ADAREG_RUNS_DIR``, else ``./adareg_runs``."""
    return Path(os.environ.get("ADAREG_RUNS_DIR") or "adareg_runs")


def _write(spec: Any, path: str | os.PathLike) -> None:
    data = json.dumps(dataclasses.asdict(spec), indent=2).encode()
    atomic_write(path, lambda f: f.write(data))


@dataclass
class WorkerSpec:
    """One run: its config, where it lives and logs, and the options every launch passes down."""

    config: dict[str, Any]
    experiment: str
    run_dir: str
    tracking_uri: str | None = None
    sweep: str | None = None
    device: str = "cpu"
    threads: int | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    store_timeout: float = DEFAULT_STORE_TIMEOUT_S
    claim_lease: float = DEFAULT_LEASE_S
    sweep_yaml: str | None = None  # the resolved sweep file (overrides applied), logged as the run's sweep.yaml

    def write(self, path: str | os.PathLike) -> None:
        _write(self, path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class PackSpec:
    """A pack: the spec files of its members (each in its own run folder), trained as one fused model or,
    with ``mode`` ``streams``, as solo models on CUDA streams in one process."""

    pack_id: str
    members: list[str]  # the members still to train (a re-run leaves out those already finished)
    size: int = 0  # the pack's size as the sweep formed it (0: len(members))
    mode: str = "fused"  # one fused model (training.packed) or solo models on CUDA streams (training.streams)

    def write(self, path: str | os.PathLike) -> None:
        _write(self, path)

"""What the scheduler works on and whom it tells: ``Task`` (one run or pack it owes), the ``View`` it reports
to, and the ``TaskSource`` it asks for more (a tuner's trials)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.dispatch.slots import Slot
from orchestrator.run.ending import End, State
from orchestrator.run.folder import RunFolder
from training.config import RunConfig


@dataclass
class Task:
    """One run the scheduler owes: its attempts and how it ended in this sweep."""

    key: str
    config: RunConfig
    run_dir: Path
    total_epochs: int = 0
    failures: int = 0  # attempts in this scheduler that counted against the run
    starts: int = 0
    not_before: float = 0.0
    end: End | None = None  # how its last attempt ended
    state: State | None = None  # where it leaves its run once it ended for good here; None: not yet
    message: str = ""
    started_at: float = 0.0
    dispatched_at: float = 0.0  # wall clock: a result.json older than this is an earlier attempt's
    waiting_for: int | None = None  # pid holding the run's lock
    busy: str = ""  # why the last attempt found the run held elsewhere
    progress_epoch: int = -1
    progress_at: float = 0.0
    slowest_epoch: float = 0.0
    stalled: str = ""
    notes_seen: int = 0
    members: list[Task] = field(default_factory=list)  # a pack: its runs (``run_dir`` is the pack's folder)
    pack_size: int = 0  # a pack: its size as formed from the whole sweep (members: those still to train)
    pack_mode: str = "fused"  # a pack: one fused model (training.packed) or solo models on streams (training.streams)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def runs(self) -> list[Task]:
        """The runs this job trains: the pack's members, or the run itself."""
        return self.members or [self]


class View(Protocol):
    """What the scheduler tells the user (see orchestrator.dispatch.progress)."""

    def started(self, task: Task, slot: Slot) -> None: ...
    def ended(self, task: Task, slot: Slot) -> None: ...
    def note(self, message: str) -> None: ...
    def update(self, active: Sequence[tuple[Task, Slot]]) -> None: ...


class TaskSource(Protocol):
    """Where more tasks come from once the queue is empty (ask-and-tell: a tuner hands out trials)."""

    def more(self) -> list[Task]:
        """Tasks to queue now that a slot is free and the queue is empty; [] when there are none (yet)."""
        ...

    def running(self) -> bool:
        """Whether the source may still hand out tasks (the scheduler ends once it is False and idle)."""
        ...

    def progress(self, task: Task, progress: dict) -> None:
        """Each poll, a running task's progress.json (this attempt's)."""
        ...

    def ended(self, task: Task) -> None:
        """A task ended for good in this scheduler (``task.state`` and ``task.end`` say how); not called for
        requeued ones."""
        ...


class QuietView:
    def started(self, task, slot): pass
    def ended(self, task, slot): pass
    def note(self, message): pass
    def update(self, active): pass

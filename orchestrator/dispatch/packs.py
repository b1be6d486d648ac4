"""Packs: runs of one shape (``training.config.shape_of``) trained by one worker as one fused model.

How many runs a pack holds is decided once per shape (``pack_sizes``: N as given, or ``auto``'s
calibration, ``orchestrator.dispatch.autopack``); ``form_packs`` lays them out over the whole sweep, so a
re-run forms the same packs whatever has finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.dispatch.slots import Slot
from orchestrator.dispatch.task import Task
from orchestrator.errors import BadValue, arg
from orchestrator.run.spec import PackSpec, WorkerSpec
from training.config import RunConfig

PACKS = "packs"  # <runs dir>/packs/<pack id>/: a pack's spec and log (its members keep their own folders)


def write_job_spec(task: Task, spec_for: Callable[[Task], WorkerSpec]) -> Path:
    """Write every run's worker spec (``spec_for(run)``) and a pack's own spec; the spec the worker gets."""
    for run in task.runs:
        spec_for(run).write(run.folder.spec)
    if task.members:
        PackSpec(task.key, [str(r.folder.spec) for r in task.members], task.pack_size,
                 task.pack_mode).write(task.folder.spec)
    return task.folder.spec


class Jobs:
    """``jobs(tasks, everything=None)``: the tasks as the scheduler's jobs, in packs per ``pack`` (sizes and
    modes are decided once per shape: ``pack_plan``; layout: ``form_packs``). ``size(config)``: the pack
    size of a config's shape (how many runs one job of that shape trains)."""

    def __init__(self, pack: int | str, slots: Sequence[Slot], packs_dir: Path, *, calibrate: bool = True,
                 note: Callable[[str], None] = lambda message: None):
        self.pack, self.slots, self.packs_dir, self.calibrate, self.note = pack, slots, packs_dir, calibrate, note
        self.plan: dict[tuple, tuple[int, str]] = {}

    def _decide(self, configs: Sequence[RunConfig]) -> None:
        from training.config import shape_of

        if not {shape_of(c) for c in configs} <= self.plan.keys():
            self.plan.update(pack_plan(self.pack, configs, self.slots, self.packs_dir, calibrate=self.calibrate,
                                       note=self.note))

    def size(self, config: RunConfig) -> int:
        from training.config import shape_of

        self._decide([config])
        return self.plan[shape_of(config)][0]

    def __call__(self, tasks: Sequence[Task], everything: dict[str, RunConfig] | None = None) -> list[Task]:
        self._decide(list(everything.values()) if everything is not None else [t.config for t in tasks])
        sizes = {shape: size for shape, (size, _) in self.plan.items()}
        modes = {shape: mode for shape, (_, mode) in self.plan.items()}
        if max(sizes.values(), default=1) <= 1:
            return list(tasks)
        return form_packs(tasks, sizes, self.packs_dir, everything, modes)


def checked_pack(pack: int | str) -> int | str:
    """``--pack`` / ``pack:`` as a size N >= 1 or ``auto`` (``off`` is 1); UserError otherwise."""
    from orchestrator.sweep.schema import parse_pack

    try:
        pack = parse_pack(pack)
    except ValueError:
        raise BadValue(f"{arg('pack')} {pack!r}: expected a pack size >= 1, auto or off") from None
    return 1 if pack == "off" else pack


def pack_sizes(pack: int | str, configs: Sequence[RunConfig], slots: Sequence[Slot], packs_dir: Path, *,
               calibrate: bool = True, note: Callable[[str], None] = lambda message: None) -> dict[tuple, int]:
    """Runs per worker process for each pack shape (``training.config.shape_of``) among the sweep's
    ``configs``: N as given, or for ``auto`` 1 on the CPU and on GPUs what a short calibration chooses
    (``autopack``; without ``calibrate``, e.g. on a Ray cluster, ``autopack.FALLBACK``)."""
    plan = pack_plan(pack, configs, slots, packs_dir, calibrate=calibrate, note=note)
    return {shape: size for shape, (size, _) in plan.items()}


def pack_plan(pack: int | str, configs: Sequence[RunConfig], slots: Sequence[Slot], packs_dir: Path, *,
              calibrate: bool = True,
              note: Callable[[str], None] = lambda message: None) -> dict[tuple, tuple[int, str]]:
    """``{pack shape: (size, mode)}``: ``pack_sizes``'s sizes, and how each shape's packs train: ``fused``
    (one fused model, ``training.packed``) unless ``auto``'s calibration measured solo models on CUDA
    streams faster (``streams``, ``training.streams``)."""
    from orchestrator.dispatch import autopack
    from training.config import shape_of

    by_shape: dict[tuple, list] = {}
    for config in configs:
        by_shape.setdefault(shape_of(config), []).append(config)
    if pack != "auto":
        return {shape: (int(pack), "fused") for shape in by_shape}
    if not calibrate:
        size = autopack.FALLBACK if any(s.device == "cuda" for s in slots) else 1
        return {shape: (size, "fused") for shape in by_shape}
    plan, notes = autopack.auto_plan(by_shape, slots, packs_dir)
    for message in notes:
        note(message)
    return plan


def form_packs(tasks: Sequence[Task], sizes: dict[tuple, int], packs_dir: Path,
               everything: dict[str, RunConfig] | None = None, modes: dict[tuple, str] | None = None) -> list[Task]:
    """Jobs for the scheduler. The packs are laid out over ``everything`` (the whole sweep, ``{run key:
    config}``; default: the tasks): runs of one shape (``training.config.shape_of``), sorted by run key,
    in packs of ``sizes[shape]``, so a re-run forms the same packs whatever has finished. Each pack's job
    trains its members among ``tasks``, even a lone one (it trains as it does in its pack: see
    ``training.packed``); a run laid out alone is a job of its own. ``modes[shape]`` is how its packs train
    (``fused``, the default, or ``streams``)."""
    from training.config import shape_of

    todo = {t.key: t for t in tasks}
    layout = everything if everything is not None else {t.key: t.config for t in tasks}
    by_shape: dict[tuple, list[str]] = {}
    for key, config in layout.items():
        by_shape.setdefault(shape_of(config), []).append(key)
    jobs: list[Task] = []
    for shape, keys in by_shape.items():
        keys, size = sorted(keys), sizes.get(shape, 1)
        for i in range(0, len(keys), size):
            chunk = keys[i:i + size]
            members = [todo[k] for k in chunk if k in todo]
            if not members:
                continue
            if len(chunk) == 1:
                jobs.extend(members)
                continue
            pack_id = "pack-" + hashlib.sha256(" ".join(chunk).encode()).hexdigest()[:10]
            label = members[0].config.replace(scheme=f"pack of {len(members)}")
            jobs.append(Task(pack_id, label, packs_dir / pack_id, max(t.total_epochs for t in members),
                             members=members, pack_size=len(chunk), pack_mode=(modes or {}).get(shape, "fused")))
    order = {t.key: i for i, t in enumerate(tasks)}  # the tasks' order (resumable runs first)
    return sorted(jobs, key=lambda job: min(order[r.key] for r in job.runs))


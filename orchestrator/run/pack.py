"""A pack's worker: its members (each a run like any other, ``orchestrator.run.member``) trained as one
fused model (``training.packed.train_packed``) or, with the pack spec's ``mode`` ``streams``, as solo runs
on CUDA streams in this process (``training.streams.train_streams``: a member that ends stops training).

Each member keeps its folder lock, its claim, its MLflow run (tagged ``adareg.pack``), its checkpoint in
the solo format and its ``result.json``. Members found finished, held elsewhere or with a checkpoint of
another epoch are left out or trained in a pack of their own epoch. What would end a solo run (a stop
request, its claim lost, the store down past its budget, an error in its logger) ends that member only;
the others train on.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.diskfault import disk_fault
from orchestrator.run.ending import End
from orchestrator.run.folder import Attempt
from orchestrator.run.member import Member, Terminated, connect, ignore_signals, lock, prepare, unlock
from orchestrator.run.spec import PackSpec, WorkerSpec
from orchestrator.store import claims
from orchestrator.store.client import StoreDown, StoreRefused
from orchestrator.store.logger import AlreadyFinished
from orchestrator.store.tags import TAG_PACK
from training.callbacks import Callback


class _PackDone(Exception):
    """Every member of the pack has ended: stop training it."""


class _Guard(Callback):
    """One member's callbacks inside a pack: their trouble ends this member only."""

    def __init__(self, member: Member, group: Sequence[Member]):
        self.member, self.group = member, group
        self.inner = member.callbacks()

    def _call(self, fn) -> None:
        m = self.member
        if m.ended is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - this member's trouble, not the pack's
            if not m.ended_early(e):
                m.failed(e)  # never raises: its MLflow run is ended without waiting for the store
        if all(x.ended is not None for x in self.group):
            raise _PackDone()

    def on_start(self, config, plan, history) -> None:
        def start() -> None:
            for cb in self.inner:
                cb.on_start(config, plan, history)

        self._call(start)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        def end() -> None:
            for cb in self.inner:
                cb.on_epoch_end(epoch, metrics)

        self._call(end)

    def on_diverged(self, epoch: int, message: str) -> None:
        if self.member.ended is None:
            self.member.end(End.DIVERGED, message)


class _EndedStops(Callback):
    """After a member's callbacks on streams: a member that has ended (its stop request, claim lost, ...)
    stops training (``training.streams.MemberStopped``); a fused pack trains it on, unheard."""

    def __init__(self, member: Member):
        self.member = member

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        from training.streams import MemberStopped

        if self.member.ended is not None:
            raise MemberStopped()


def execute_pack(pack: PackSpec) -> list[tuple[Attempt, int]]:
    """Train the members of a pack as one fused model: each member's attempt and exit code."""
    members = [lock(WorkerSpec.read(path)) for path in pack.members]
    ready = [m for m in members if m.attempt is not None]
    raised: BaseException | None = None
    attempts: dict[int, Attempt] = {}
    try:
        if ready:
            _execute_pack(pack, ready)
    except BaseException as e:
        raised = e
        raise
    finally:
        for m in ready:
            attempts[id(m)] = unlock(m, raised)
    return [(attempts.get(id(m)) or m.result(), m.exit_code()) for m in members]


def _execute_pack(pack: PackSpec, members: list[Member]) -> None:
    from training.checkpoint import load_checkpoint
    from training.packed import group_by_epoch
    from training.schedules import plan_for

    lead = members[0].spec
    try:
        store, experiment_id = connect(lead, members[0].progress.note)
        for m in members:
            prepare(m, store, experiment_id, {TAG_PACK: f"{pack.pack_id}/{pack.size or len(pack.members)}"})
    except (StoreDown, StoreRefused) as e:
        for m in members:
            m.record(End.STORE_DOWN if isinstance(e, StoreDown) else End.REFUSED, str(e))
        return
    for m in members:  # claim every member before the pack starts: one held elsewhere is left out
        if m.ended is None:
            payload = load_checkpoint(m.folder.checkpoint)
            try:
                m.logger.attach(m.config, plan_for(m.config), list(payload["history"]) if payload else [])
            except (AlreadyFinished, claims.Busy, StoreDown, StoreRefused) as e:
                m.ended_early(e)
    todo = [m for m in members if m.ended is None]
    for indices in group_by_epoch([m.folder.checkpoint for m in todo]).values():
        _train_group([todo[i] for i in indices], lead, pack.mode)


def _train_group(group: list[Member], lead: WorkerSpec, mode: str = "fused") -> None:
    from training.packed import train_packed
    from training.streams import train_streams

    try:
        if mode == "streams":
            train_streams([m.config for m in group], [[_Guard(m, group), _EndedStops(m)] for m in group],
                          device=lead.device, checkpoint_paths=[m.folder.checkpoint for m in group],
                          threads=lead.threads)
        else:
            train_packed([m.config for m in group], [[_Guard(m, group)] for m in group], device=lead.device,
                         checkpoint_paths=[m.folder.checkpoint for m in group], threads=lead.threads)
    except _PackDone:
        return
    except (KeyboardInterrupt, Terminated) as e:
        ignore_signals()
        for m in group:
            if m.ended is None:
                m.interrupted(e)
        raise
    except Exception as e:  # noqa: BLE001 - the pack itself failed: every member still in it
        for m in group:
            if m.ended is None and not (disk_fault(e) and m.ended_early(e)):  # a full disk: resumable
                m.failed(e)
        return
    for m in group:
        if m.ended is None:
            m.end(End.FINISHED)

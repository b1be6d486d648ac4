"""Ownership of a run in the tracking store: whoever trains a run claims it there.

The run folder's lock (``orchestrator.run.folder``) only keeps two processes sharing a folder apart; two
orchestrators on different machines, or a tuner beside a sweep, share nothing but the store. So the
MLflow run of a key carries its owner:

- tag ``adareg.owner``: ``{"id", "host", "pid", "run_dir", "since", "identity", "lock"}`` of the process
  training it, and
- tag ``adareg.heartbeat``: the owner's clock (unix seconds), renewed while it trains.

"This host" is the owner's ``identity`` (:func:`identity`: the kernel's boot id and the PID namespace), not
its hostname, which is only shown to people: two containers with host networking, two PID namespaces, two
cloned machines share a hostname but not a process table. Only an owner of the caller's identity shares
its process table and its clock; its claim is stale when its heartbeat is older than the lease, at once
when its process is gone, or when it names the run folder whose lock the caller now holds (the kernel
dropped the lock: its holder died). The last holds too for an owner in another PID namespace of the same
boot (a container restarted on the same volume) that names the very lock file the caller holds (``lock``:
its device and inode; one kernel, one lock table). Any other owner's clock is never compared with the
caller's: its claim is stale once the caller has seen its heartbeat *unchanged* for a lease of the caller's
own monotonic time (:class:`Sightings`), as lease protocols do, so clocks may disagree by any amount. Claims
written without an identity (by older versions) are judged so too.

Races resolve to one winner by writing, waiting ``settle_s`` and reading back: a taken-over claim belongs
to whoever's owner tag is there after the wait (the other backs off); of two runs created at once for one
key, the earlier ``(start_time, run_id)`` wins and the loser deletes its own run before logging anything.
A run that holds a history its trainer cannot continue is *superseded* (tag ``adareg.superseded`` with the
reason, ``adareg.superseded_by`` with the new run's id): kept for inspection, invisible to plan, status and
report, so a logged curve is always one training.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER, TAG_SUPERSEDED, TAG_SUPERSEDED_BY

DEFAULT_LEASE_S = 300.0
SETTLE_S = float(os.environ.get("ADAREG_CLAIM_SETTLE_S", "1.0"))


class Busy(Exception):
    """Another live process holds the run (or won the race for it)."""


def hostname() -> str:
    """The name people know this machine by (shown in claims; never used to judge them)."""
    return socket.gethostname()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """The kernel's id of this boot (random per boot, so per machine), "" where there is none."""
    return _read("/proc/sys/kernel/random/boot_id")


@functools.cache
def identity() -> str:
    """What separates process tables: ``<boot id>/<PID namespace>``. A pid names the same process only for
    owners of the same identity (two containers on one kernel differ in the namespace, two machines in the
    boot id, whatever their hostnames). Without /proc (not Linux): the hostname."""
    try:
        ns = os.readlink("/proc/self/ns/pid")  # pid:[4026531836]
    except OSError:
        ns = ""
    boot = boot_id()
    return f"{boot}/{ns}" if boot or ns else f"host:{hostname()}"


@dataclass(frozen=True)
class Owner:
    """Who trains a run."""

    id: str
    host: str
    pid: int
    run_dir: str
    since: float
    identity: str = ""  # see identity(); "" in claims of older versions: judged by their heartbeat alone
    lock: str = ""  # the run folder lock it holds, "<device>:<inode>" on its kernel ("": none, or older versions)

    @classmethod
    def me(cls, run_dir: str, lock: str = "") -> Owner:
        """This process, training the run of ``run_dir`` while holding its lock (``lock``: the lock file's
        ``RunFolder.lock_id``)."""
        return cls(uuid.uuid4().hex[:12], hostname(), os.getpid(), str(run_dir), time.time(), identity(), lock)

    def tag(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_tag(cls, value: str | None) -> Owner | None:
        if not value:
            return None
        try:
            data = json.loads(value)
            known = {f.name for f in fields(cls)}  # fields of newer versions are ignored, not fatal
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, AttributeError):
            return None

    def same_host(self) -> bool:
        """Shares this process's process table and clock (same boot, same PID namespace)."""
        return bool(self.identity) and self.identity == identity()

    def same_boot(self) -> bool:
        """Runs on this kernel (in any PID namespace): its file locks are this kernel's."""
        boot = boot_id()
        return bool(boot) and self.identity.split("/")[0] == boot

    def held_lock_of(self, mine: Owner | None) -> bool:
        """``mine`` (the caller, holding its run folder's lock) now holds the lock this owner held while it
        trained: so this owner's worker is gone (the kernel dropped its lock)."""
        if mine is None or mine.id == self.id:
            return False
        if self.same_host() and self.run_dir == mine.run_dir:
            return True
        return bool(self.lock) and self.lock == mine.lock and self.same_boot()

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


@dataclass(frozen=True)
class Holder:
    """The claim on a run as the store shows it."""

    owner: Owner
    heartbeat: float
    live: bool
    why: str  # why it is live or stale, for the user
    quiet_s: float = 0.0  # how long the heartbeat has not changed, by the reader's clock (as far as it knows)

    def describe(self) -> str:
        return f"{self.owner.describe()}, heartbeat {self.quiet_s:.0f}s ago"


class Sightings:
    """When the reader first saw a claim's current heartbeat, by its own monotonic clock: the lease of an
    owner on another host runs on the reader's time, never on the owner's clock. Kept in a small JSON file
    (the reader's run folder, so that the next worker of the run goes on counting; a sighting from another
    boot is void, a monotonic clock counts from boot) or, without one, in memory for the process."""

    def __init__(self, path: str | Path | None = None, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self._memory: dict[str, tuple[str, float]] = {}

    def unchanged_for(self, owner_id: str, beat: str) -> float:
        """Seconds of the reader's time for which ``owner_id``'s heartbeat has been ``beat`` (0: new)."""
        now = self.clock()
        last = self._load(owner_id)
        if last is not None and last[0] == beat:
            return max(0.0, now - last[1])
        self._store(owner_id, beat, now)
        return 0.0

    def _load(self, owner_id: str) -> tuple[str, float] | None:
        if self.path is None:
            return self._memory.get(owner_id)
        try:
            seen = json.loads(self.path.read_text())
            if seen["owner"] == owner_id and seen["boot"] == boot_id():
                return str(seen["beat"]), float(seen["at"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return self._memory.get(owner_id)  # where the file could not be written

    def _store(self, owner_id: str, beat: str, at: float) -> None:
        if self.path is None:
            self._memory[owner_id] = (beat, at)
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:  # a sighting lost to a crash only restarts the count: no fsync
            tmp.write_text(json.dumps({"owner": owner_id, "beat": beat, "boot": boot_id(), "at": at}))
            os.replace(tmp, self.path)
        except OSError:
            self._memory[owner_id] = (beat, at)


_SEEN = Sightings()  # this process's sightings where the caller keeps none


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(tags: dict[str, str], *, lease_s: float = DEFAULT_LEASE_S, now: float | None = None,
           mine: Owner | None = None, seen: Sightings | None = None) -> Holder | None:
    """The claim in a run's tags (None: unclaimed). ``mine``: the caller, which holds its run folder's lock;
    ``seen``: the caller's sightings of other hosts' claims (a worker keeps them in its run folder; default:
    this process's memory);
    ``now``: this host's clock, compared only with heartbeats written on this host."""
    owner = Owner.from_tag(tags.get(TAG_OWNER))
    if owner is None:
        return None
    raw = tags.get(TAG_HEARTBEAT) or ""
    try:
        beat = float(raw or owner.since)
    except ValueError:
        beat = owner.since
    if owner.held_lock_of(mine):
        return Holder(owner, beat, False, "its worker died (this process holds its run folder's lock)")
    if owner.same_host():  # one process table, one clock
        age = max(0.0, (time.time() if now is None else now) - beat)
        if age > lease_s:
            return Holder(owner, beat, False, f"no heartbeat for {age:.0f}s (lease {lease_s:.0f}s)", age)
        if owner.pid != os.getpid() and not _pid_alive(owner.pid):
            return Holder(owner, beat, False, f"process {owner.pid} on this host is gone", age)
        return Holder(owner, beat, True, "heartbeat within the lease", age)
    quiet = (seen or _SEEN).unchanged_for(owner.id, raw or repr(owner.since))
    if quiet > lease_s:
        return Holder(owner, beat, False, f"heartbeat unchanged for {quiet:.0f}s of this host's time "
                                          f"(lease {lease_s:.0f}s)", quiet)
    return Holder(owner, beat, True, "heartbeat not yet unchanged for a lease", quiet)


def live_holder(tags: dict[str, str], lease_s: float = DEFAULT_LEASE_S, seen: Sightings | None = None
                ) -> Holder | None:
    """The claim if it is live (someone is training the run now), else None."""
    h = holder(tags, lease_s=lease_s, seen=seen)
    return h if h is not None and h.live else None


def claim(client, run, me: Owner, *, lease_s: float = DEFAULT_LEASE_S, settle_s: float | None = None,
          seen: Sightings | None = None):
    """Take ``run`` for ``me`` (free or stale claims only); the run as read back. Busy otherwise."""
    h = holder(run.data.tags, lease_s=lease_s, mine=me, seen=seen)
    if h is not None and h.live and h.owner.id != me.id:
        raise Busy(f"running elsewhere: {h.describe()}")
    client.set_tag(run.info.run_id, TAG_OWNER, me.tag())
    client.set_tag(run.info.run_id, TAG_HEARTBEAT, f"{time.time():.3f}")
    time.sleep(SETTLE_S if settle_s is None else settle_s)
    back = client.get_run(run.info.run_id)
    winner = Owner.from_tag(back.data.tags.get(TAG_OWNER))
    if winner is None or winner.id != me.id:
        raise Busy(f"taken over meanwhile by {winner.describe() if winner else 'another process'}")
    return back


def create_claimed(client, experiment_id: str, tags: dict[str, str], run_name: str, me: Owner, find_active,
                   *, settle_s: float | None = None):
    """Create the run of a key, claimed by ``me``, unless a concurrent creator wins; ``find_active()`` lists
    the key's active runs. The loser deletes its own run and raises Busy."""
    tags = {**tags, TAG_OWNER: me.tag(), TAG_HEARTBEAT: f"{time.time():.3f}"}
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    time.sleep(SETTLE_S if settle_s is None else settle_s)
    rivals = [r for r in find_active() if r.info.run_id != run.info.run_id]
    if rivals:
        first = created_first([run, *rivals])
        if first.info.run_id != run.info.run_id:  # ended before it is deleted: no deleted run stays RUNNING
            supersede(client, run, f"lost the creation race to run {first.info.run_id}", by=first.info.run_id)
            client.delete_run(run.info.run_id)
            winner = Owner.from_tag(first.data.tags.get(TAG_OWNER))
            if winner is not None and winner.id == me.id:  # our own earlier create, whose answer was lost
                return first
            raise Busy(f"created concurrently as run {first.info.run_id}")
    return run


def creation_order(run) -> tuple[int, str]:
    """The creation race's rule, the one place it is written: the earliest (start time, run id) wins."""
    return (run.info.start_time or 0, run.info.run_id)


def created_first(runs: list) -> Any:
    """The winner of a creation race among ``runs``."""
    return min(runs, key=creation_order)


def still_mine(client, run_id: str, me: Owner) -> bool:
    owner = Owner.from_tag(client.get_run(run_id).data.tags.get(TAG_OWNER))
    return owner is not None and owner.id == me.id


def beat(client, run_id: str) -> None:
    client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.3f}")


def release(client, run_id: str) -> None:
    """Give up the claim: the owner tag is deleted (an empty tag is noise in the MLflow UI)."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_tag(run_id, TAG_OWNER)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # released already
            raise


def supersede(client, run, reason: str, by: str = "") -> None:
    """Hide ``run`` from plan, status and report (kept for inspection), ending it if it still runs."""
    run_id = run.info.run_id
    if run.info.status == "RUNNING":  # first: killed in between, the run is still found and superseded again
        client.set_terminated(run_id, status="KILLED")
    client.set_tag(run_id, TAG_SUPERSEDED, reason[:4000])
    if by:
        client.set_tag(run_id, TAG_SUPERSEDED_BY, by)
    release(client, run_id)


def is_superseded(run: Any) -> bool:
    return bool(run.data.tags.get(TAG_SUPERSEDED))

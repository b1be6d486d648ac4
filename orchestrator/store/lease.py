"""Whether a claim on a run is live: the lease judgement alone, no MLflow, no waiting.

A claim (``orchestrator.store.claims``) names its :class:`Owner` and carries the owner's heartbeat. The
reader (:class:`Here`: its identity, its process table, its clocks) judges it by these rules, in order:

=====================================================  =================================  ========================
owner of the claim                                     live while                          stale
=====================================================  =================================  ========================
the caller holds the run folder lock the owner held    never                              at once (its worker died)
(same identity and run folder; or same boot and the
same lock file, ``Owner.lock``)
same identity, process start time known               its process is alive: that pid,    at once when the pid is
(``Owner.started``)                                   with that start time, whatever     gone or names another
                                                      its heartbeat's timestamp says     process
same identity, no start time (older versions)         heartbeat age on the wall clock    age > term, or its pid
                                                      <= term and its pid alive          is gone
any other owner (another boot or PID namespace; no    heartbeat seen unchanged on the    unchanged for > term
identity: older versions)                             reader's monotonic clock <= term   (:class:`Sightings`)
=====================================================  =================================  ========================

The *term* is the longer of the reader's lease and the lease the owner keeps (``Owner.lease``, written into
its claim: it beats several times per lease): a reader may be stricter about taking a run over, never
quicker than its owner promised to beat. Claims without a lease (older versions) are judged by the reader's
lease alone. "Identity" is :func:`identity`: the kernel's boot id and the PID namespace, the only things
that make a pid name one process (never the hostname, which is only shown to people). No wall clock decides
that a live process is gone: a clock step (NTP, a VM resumed) moves only the last-but-one row, which only
claims of older versions reach.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DEFAULT_LEASE_S = 300.0


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


def process_start(pid: int) -> str | None:
    """When process ``pid`` of this PID namespace started (clock ticks since boot, as /proc says: no clock
    step moves it), "" where /proc cannot tell, None where there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return "" if _pid_alive(pid) else None
    after = stat.rsplit(")", 1)[-1].split()  # field 3 of proc(5) on
    if after[:1] in (["Z"], ["X"]):  # ended, not yet reaped: its claim is stale
        return None
    return after[19] if len(after) > 19 else ""  # field 22: starttime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    lease: float = 0.0  # the lease it keeps (it beats several times per lease); 0: older versions
    started: str = ""  # its process's start time (process_start); "": older versions, or unknown

    @classmethod
    def me(cls, run_dir: str, lock: str = "", lease: float = DEFAULT_LEASE_S) -> Owner:
        """This process, training the run of ``run_dir`` while holding its lock (``lock``: the lock file's
        ``RunFolder.lock_id``) and beating often enough for ``lease``."""
        return cls(uuid.uuid4().hex[:12], hostname(), os.getpid(), str(run_dir), time.time(), identity(), lock,
                   float(lease), process_start(os.getpid()) or "")

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
        return Here.this_process().holds_lock_of(self, mine)

    def term(self, lease_s: float) -> float:
        """How long the reader with ``lease_s`` lets this owner's heartbeat stand still: never less than
        the lease it keeps."""
        try:
            kept = float(self.lease or 0.0)
        except (TypeError, ValueError):
            kept = 0.0
        return max(lease_s, kept)

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


@dataclass(frozen=True)
class Here:
    """The reader: its identity, its boot, its own pid, and a look into its process table
    (``started(pid)``: :func:`process_start`). Tests build one with a process table of their own."""

    identity: str
    boot: str
    pid: int
    started: Callable[[int], str | None] = field(default=process_start, compare=False)

    @classmethod
    def this_process(cls) -> Here:
        return cls(identity(), boot_id(), os.getpid())

    def same_host(self, owner: Owner) -> bool:
        return bool(owner.identity) and owner.identity == self.identity

    def holds_lock_of(self, owner: Owner, mine: Owner | None) -> bool:
        """``mine`` (the reader, holding its run folder's lock) holds the lock ``owner`` held."""
        if mine is None or mine.id == owner.id:
            return False
        if self.same_host(owner) and owner.run_dir == mine.run_dir:
            return True
        return bool(owner.lock) and owner.lock == mine.lock and bool(self.boot) \
            and owner.identity.split("/")[0] == self.boot


def judge(owner: Owner, raw_beat: str, *, lease_s: float, now: float, seen: Sightings,
          mine: Owner | None = None, here: Here | None = None) -> Holder:
    """The claim of ``owner`` whose heartbeat tag reads ``raw_beat``, judged by the table in this module's
    docstring. ``lease_s``: the reader's lease; ``now``: the reader's wall clock (only for claims of older
    versions on its own host); ``seen``: the reader's sightings; ``mine``: the reader's own claim, when it
    holds its run folder's lock."""
    here = here or Here.this_process()
    try:
        beat = float(raw_beat or owner.since)
    except (TypeError, ValueError):
        beat = owner.since
    term = owner.term(lease_s)
    if here.holds_lock_of(owner, mine):
        return Holder(owner, beat, False, "its worker died (this process holds its run folder's lock)")
    if here.same_host(owner):  # one process table
        started = here.started(owner.pid)
        if owner.started:  # the process itself says whether it trains: no clock is read
            if started is None or (started and started != owner.started):
                return Holder(owner, beat, False, f"process {owner.pid} on this host is gone")
            return Holder(owner, beat, True, f"process {owner.pid} on this host is alive", max(0.0, now - beat))
        age = max(0.0, now - beat)  # an older version's claim: its heartbeat on this host's clock
        if age > term:
            return Holder(owner, beat, False, f"no heartbeat for {age:.0f}s (lease {term:.0f}s)", age)
        if started is None:
            return Holder(owner, beat, False, f"process {owner.pid} on this host is gone", age)
        return Holder(owner, beat, True, "heartbeat within the lease", age)
    quiet = seen.unchanged_for(owner.id, raw_beat or repr(owner.since))
    if quiet > term:
        return Holder(owner, beat, False, f"heartbeat unchanged for {quiet:.0f}s of this host's time "
                                          f"(lease {term:.0f}s)", quiet)
    return Holder(owner, beat, True, "heartbeat not yet unchanged for a lease", quiet)

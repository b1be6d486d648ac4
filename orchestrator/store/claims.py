"""Ownership of a run in the tracking store: whoever trains a run claims it there.

The run folder's lock (``orchestrator.run.folder``) only keeps two processes sharing a folder apart; two
orchestrators on different machines, or a tuner beside a sweep, share nothing but the store. So the
MLflow run of a key carries its owner:

- tag ``adareg.owner``: ``{"id", "host", "pid", "run_dir", "since"}`` of the process training it, and
- tag ``adareg.heartbeat``: the owner's clock (unix seconds), renewed while it trains.

A claim is *live* while its heartbeat is younger than the lease; a stale claim may be taken over. On the
owner's own host a claim is stale at once when its process is gone, or when it names the run folder whose
lock the caller now holds (the kernel dropped the lock: its holder died).

Races resolve to one winner by writing, waiting ``settle_s`` and reading back: a taken-over claim belongs
to whoever's owner tag is there after the wait (the other backs off); of two runs created at once for one
key, the earlier ``(start_time, run_id)`` wins and the loser deletes its own run before logging anything.
A run that holds a history its trainer cannot continue is *superseded* (tag ``adareg.superseded`` with the
reason, ``adareg.superseded_by`` with the new run's id): kept for inspection, invisible to plan, status and
report, so a logged curve is always one training.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER, TAG_SUPERSEDED, TAG_SUPERSEDED_BY

DEFAULT_LEASE_S = 300.0
SETTLE_S = float(os.environ.get("ADAREG_CLAIM_SETTLE_S", "1.0"))


class Busy(Exception):
    """Another live process holds the run (or won the race for it)."""


def hostname() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """Who trains a run."""

    id: str
    host: str
    pid: int
    run_dir: str
    since: float

    @classmethod
    def me(cls, run_dir: str) -> Owner:
        return cls(uuid.uuid4().hex[:12], hostname(), os.getpid(), str(run_dir), time.time())

    def tag(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_tag(cls, value: str | None) -> Owner | None:
        if not value:
            return None
        try:
            return cls(**json.loads(value))
        except (TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


@dataclass(frozen=True)
class Holder:
    """The claim on a run as the store shows it."""

    owner: Owner
    heartbeat: float
    live: bool
    why: str  # why it is live or stale, for the user

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.heartbeat)
        return f"{self.owner.describe()}, heartbeat {age:.0f}s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(tags: dict[str, str], *, lease_s: float = DEFAULT_LEASE_S, now: float | None = None,
           my_run_dir: str | None = None) -> Holder | None:
    """The claim in a run's tags (None: unclaimed). ``my_run_dir``: the folder whose lock the caller holds."""
    owner = Owner.from_tag(tags.get(TAG_OWNER))
    if owner is None:
        return None
    now = time.time() if now is None else now
    try:
        beat = float(tags.get(TAG_HEARTBEAT) or owner.since)
    except ValueError:
        beat = owner.since
    if now - beat > lease_s:
        return Holder(owner, beat, False, f"no heartbeat for {now - beat:.0f}s (lease {lease_s:.0f}s)")
    if owner.host == hostname():
        if my_run_dir is not None and owner.run_dir == str(my_run_dir):
            return Holder(owner, beat, False, "its worker died (this process holds its run folder's lock)")
        if owner.pid != os.getpid() and not _pid_alive(owner.pid):
            return Holder(owner, beat, False, f"process {owner.pid} on this host is gone")
    return Holder(owner, beat, True, "heartbeat within the lease")


def live_holder(tags: dict[str, str], lease_s: float = DEFAULT_LEASE_S) -> Holder | None:
    """The claim if it is live (someone is training the run now), else None."""
    h = holder(tags, lease_s=lease_s)
    return h if h is not None and h.live else None


def claim(client, run, me: Owner, *, lease_s: float = DEFAULT_LEASE_S, settle_s: float | None = None):
    """Take ``run`` for ``me`` (free or stale claims only); the run as read back. Busy otherwise."""
    h = holder(run.data.tags, lease_s=lease_s, my_run_dir=me.run_dir)
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
    client.set_tag(run_id, TAG_OWNER, "")


def supersede(client, run, reason: str, by: str = "") -> None:
    """Hide ``run`` from plan, status and report (kept for inspection), ending it if it still runs."""
    run_id = run.info.run_id
    if run.info.status == "RUNNING":  # first: killed in between, the run is still found and superseded again
        client.set_terminated(run_id, status="KILLED")
    client.set_tag(run_id, TAG_SUPERSEDED, reason[:4000])
    if by:
        client.set_tag(run_id, TAG_SUPERSEDED_BY, by)
    client.set_tag(run_id, TAG_OWNER, "")


def is_superseded(run: Any) -> bool:
    return bool(run.data.tags.get(TAG_SUPERSEDED))

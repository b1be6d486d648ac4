"""Ownership of a run in the tracking store: whoever trains a run claims it there.

The run folder's lock (``orchestrator.run.folder``) only keeps two processes sharing a folder apart; two
orchestrators on different machines, or a tuner beside a sweep, share nothing but the store. So the
MLflow run of a key carries its owner:

- tag ``adareg.owner``: ``{"id", "host", "pid", "run_dir", "since", "identity", "lock", "lease", "started"}``
  of the process training it (:class:`~orchestrator.store.lease.Owner`: where it runs, the lock it holds,
  the lease it keeps, when its process started), and
- tag ``adareg.heartbeat``: the owner's clock (unix seconds), renewed several times per its lease.

Whether a claim is live is judged in ``orchestrator.store.lease`` (no MLflow there; its rules are a table
in its docstring): an owner of the caller's boot and PID namespace by its process (alive, and the same
process, whatever its heartbeat says), any other by its heartbeat seen unchanged for the owner's lease on
the caller's own monotonic clock. This module writes claims.

Races resolve to one winner by writing, waiting ``settle_s`` and reading back: a taken-over claim belongs
to whoever's owner tag is there after the wait (the other backs off); of two runs created at once for one
key, the earlier ``(start_time, run_id)`` wins and the loser deletes its own run before logging anything.
A run that holds a history its trainer cannot continue is *superseded* (tag ``adareg.superseded`` with the
reason, ``adareg.superseded_by`` with the new run's id): kept for inspection, invisible to plan, status and
report, so a logged curve is always one training.
"""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator.store.lease import (  # noqa: F401 - the judgement's names, used through this module too
    DEFAULT_LEASE_S,
    Here,
    Holder,
    Owner,
    Sightings,
    boot_id,
    hostname,
    identity,
    judge,
    process_start,
)
from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER, TAG_SUPERSEDED, TAG_SUPERSEDED_BY

SETTLE_S = float(os.environ.get("ADAREG_CLAIM_SETTLE_S", "1.0"))


class Busy(Exception):
    """Another live process holds the run (or won the race for it)."""


_SEEN = Sightings()  # this process's sightings where the caller keeps none


def holder(tags: dict[str, str], *, lease_s: float = DEFAULT_LEASE_S, now: float | None = None,
           mine: Owner | None = None, seen: Sightings | None = None) -> Holder | None:
    """The claim in a run's tags (None: unclaimed), judged by ``orchestrator.store.lease.judge``. ``mine``: the
    caller, which holds its run folder's lock; ``seen``: the caller's sightings of other hosts' claims (a
    worker keeps them in its run folder; default: this process's memory); ``now``: this host's clock, compared
    only with heartbeats that older versions wrote on this host."""
    owner = Owner.from_tag(tags.get(TAG_OWNER))
    if owner is None:
        return None
    return judge(owner, tags.get(TAG_HEARTBEAT) or "", lease_s=lease_s, now=time.time() if now is None else now,
                 seen=seen or _SEEN, mine=mine)


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

"""The lease judgement alone (``orchestrator.store.lease.judge``): one test per row of its table, on a made-up
reader (identity, process table, clocks), so no process, store or wait is needed."""

from __future__ import annotations

import dataclasses
import os

import pytest

from orchestrator.store.lease import Here, Owner, Sightings, judge, process_start

BOOT = "boot-1"
ME = f"{BOOT}/pid:[1]"
WALL = 1_800_000_000.0  # the reader's wall clock


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def reader(table: dict[int, str]) -> Here:
    """A reader of identity ``ME`` whose process table is ``{pid: start time}``."""
    return Here(ME, BOOT, 1, started=table.get)


def owner(ident: str = ME, pid: int = 42, started: str = "777", lease: float = 0.0, run_dir: str = "/a/k",
          lock: str = "", oid: str = "o1") -> Owner:
    return Owner(oid, "box", pid, run_dir, WALL - 10_000, ident, lock, lease, started)


def verdict(o: Owner, beat: float, *, lease_s: float = 20, here: Here | None = None, seen: Sightings | None = None,
            mine: Owner | None = None, now: float = WALL):
    return judge(o, f"{beat:.3f}", lease_s=lease_s, now=now, seen=seen or Sightings(clock=Clock()), mine=mine,
                 here=here or reader({42: "777"}))


# -- row 1: the reader holds the lock the owner held
def test_an_owner_whose_run_folder_lock_the_reader_holds_is_stale_at_once():
    me = owner(oid="me", pid=1, lock="8:99")
    h = verdict(owner(run_dir="/a/k"), WALL, mine=dataclasses.replace(me, run_dir="/a/k"))
    assert not h.live and "holds its run folder's lock" in h.why
    other_ns = owner(ident=f"{BOOT}/pid:[2]", lock="8:99", run_dir="/elsewhere/k")
    assert not verdict(other_ns, WALL, mine=me).live
    assert verdict(dataclasses.replace(other_ns, identity="boot-2/pid:[2]"), WALL, mine=me).live  # another kernel


# -- row 2: an owner of this identity that recorded its process's start time: its process decides
@pytest.mark.parametrize("beat", [WALL, WALL - 3600, WALL + 3600, WALL - 10**6])
def test_a_live_process_of_this_host_is_live_whatever_its_heartbeat_says(beat):
    """The reader's wall clock an hour ahead (or behind) of the heartbeat: the process is alive, so live."""
    h = verdict(owner(), beat, lease_s=20)
    assert h.live and h.why == "process 42 on this host is alive"


def test_a_gone_or_reused_pid_of_this_host_is_stale_at_once():
    gone = verdict(owner(), WALL, here=reader({}))
    assert not gone.live and gone.why == "process 42 on this host is gone"
    reused = verdict(owner(), WALL, here=reader({42: "778"}))  # another process got pid 42
    assert not reused.live and reused.why == "process 42 on this host is gone"


def test_a_process_whose_start_time_cannot_be_read_is_taken_as_alive():
    assert verdict(owner(), WALL - 3600, here=reader({42: ""})).live


# -- row 3: an older claim of this identity (no start time): the heartbeat on the wall clock, as before
def test_an_older_claim_of_this_host_is_judged_by_its_heartbeats_age_and_its_pid():
    old = owner(started="")
    assert verdict(old, WALL - 19, lease_s=20).live
    stale = verdict(old, WALL - 21, lease_s=20)
    assert not stale.live and stale.why == "no heartbeat for 21s (lease 20s)"
    gone = verdict(old, WALL, here=reader({}))
    assert not gone.live and gone.why == "process 42 on this host is gone"


def test_an_older_claim_of_this_host_keeping_a_longer_lease_is_judged_by_that_lease():
    h = verdict(owner(started="", lease=300), WALL - 200, lease_s=20)
    assert h.live
    assert not verdict(owner(started="", lease=300), WALL - 301, lease_s=20).live


# -- row 4: any other owner: its heartbeat seen unchanged on the reader's monotonic clock, for the term
@pytest.mark.parametrize("ident", ["boot-2/pid:[1]", f"{BOOT}/pid:[2]", ""])  # another machine, namespace; none
def test_another_hosts_claim_goes_stale_after_its_own_longer_lease_of_unchanged_heartbeat(ident):
    clock = Clock()
    seen = Sightings(clock=clock)
    o = owner(ident=ident, lease=300)
    assert verdict(o, WALL - 3600, lease_s=20, seen=seen).live
    clock.t += 299  # the reader's lease (20 s) is long past, the owner's (300 s) is not
    h = verdict(o, WALL - 3600, lease_s=20, seen=seen)
    assert h.live and h.quiet_s == 299
    clock.t += 2
    stale = verdict(o, WALL - 3600, lease_s=20, seen=seen)
    assert not stale.live and stale.why == "heartbeat unchanged for 301s of this host's time (lease 300s)"


def test_a_reader_may_be_stricter_than_the_owner_never_quicker():
    clock = Clock()
    seen = Sightings(clock=clock)
    o = owner(ident="boot-2/pid:[1]", lease=20)
    verdict(o, WALL, lease_s=300, seen=seen)
    clock.t += 100  # past the owner's 20 s, not the reader's 300 s
    assert verdict(o, WALL, lease_s=300, seen=seen).live
    clock.t += 201
    assert not verdict(o, WALL, lease_s=300, seen=seen).live


def test_an_older_claim_elsewhere_without_a_lease_is_judged_by_the_readers_lease():
    clock = Clock()
    seen = Sightings(clock=clock)
    o = owner(ident="boot-2/pid:[1]", lease=0.0, started="")
    verdict(o, WALL, lease_s=20, seen=seen)
    clock.t += 21
    h = verdict(o, WALL, lease_s=20, seen=seen)
    assert not h.live and h.why == "heartbeat unchanged for 21s of this host's time (lease 20s)"


def test_a_heartbeat_that_changes_restarts_the_count_and_no_wall_clock_is_read_elsewhere():
    clock = Clock()
    seen = Sightings(clock=clock)
    o = owner(ident="boot-2/pid:[1]", lease=20)
    verdict(o, WALL, seen=seen)
    clock.t += 15
    assert verdict(o, WALL + 5, seen=seen, now=WALL + 10**6).live  # it beat; the reader's wall clock is moot
    clock.t += 15
    assert verdict(o, WALL + 5, seen=seen).live
    clock.t += 6
    assert not verdict(o, WALL + 5, seen=seen).live


def test_a_lease_written_as_garbage_counts_as_none():
    o = owner(ident="boot-2/pid:[1]", lease="soon")  # type: ignore[arg-type] - a claim from who knows where
    assert o.term(20) == 20


def test_this_process_records_its_start_time_and_its_lease():
    me = Owner.me("/r/k", lease=20)
    assert me.lease == 20 and me.started == process_start(os.getpid()) and me.started
    assert Owner.from_tag(me.tag()) == me
    assert judge(me, "0", lease_s=20, now=WALL, seen=Sightings(), mine=None).live  # heartbeat at 1970: alive

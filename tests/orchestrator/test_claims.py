"""Claims in the tracking store, on a real MLflow sqlite store: who holds a run, races between processes
that create or take over the same run at once, and a logger that never splices two trainings."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from servers import pid1_unavailable, run_as_pid1

from orchestrator.identity import run_key
from orchestrator.run.folder import SIGHTINGS, RunFolder
from orchestrator.store import claims
from orchestrator.store.client import Store, connect
from orchestrator.store.logger import RunLogger
from orchestrator.store.runs import active_runs, end_strays, ensure_experiment, find_runs
from orchestrator.store.tags import TAG_HEARTBEAT, TAG_OWNER, TAG_RUN_KEY, TAG_SUPERSEDED_BY
from training.callbacks import METRICS
from training.config import RunConfig
from training.schedules import plan_for

ME = "/runs/k"
ROOT = Path(__file__).resolve().parents[2]


def owner(host=None, pid=None, run_dir="/elsewhere/k", since=None, oid="x1", ident=None):
    return claims.Owner(oid, host or claims.hostname(), pid or os.getpid(), run_dir, since or time.time(),
                        claims.identity() if ident is None else ident)


def tags(o: claims.Owner, beat: float) -> dict[str, str]:
    return {TAG_OWNER: o.tag(), TAG_HEARTBEAT: str(beat)}


def test_holder_on_this_host_is_live_within_the_lease_and_stale_when_its_process_is_provably_gone():
    now = time.time()
    assert claims.holder({}) is None
    old = claims.holder(tags(owner(), now - 301), lease_s=300, now=now)
    assert not old.live and old.why == "no heartbeat for 301s (lease 300s)"
    dead = subprocess_pid_that_exited()
    gone = claims.holder(tags(owner(pid=dead), now), now=now)
    assert not gone.live and gone.why == f"process {dead} on this host is gone"
    assert claims.holder(tags(owner(), now), now=now).live  # this host, process alive (us)
    mine = claims.holder(tags(owner(run_dir=ME), now), now=now, mine=owner(run_dir=ME, oid="me"))
    assert not mine.live and "holds its run folder's lock" in mine.why


def test_an_owner_of_this_boot_whose_lock_file_the_caller_holds_is_gone_whatever_its_pid_namespace(tmp_path):
    """A container restarted on the same runs volume (another PID namespace, the same kernel): the claim names
    the lock file (device and inode) that the new worker now holds, so its worker is gone: stale at once, not
    after a lease. Another kernel's lock table says nothing here, nor does another file."""
    folder = RunFolder(tmp_path / "k")
    assert folder.lock_id() == "" and folder.acquire()
    lock = folder.lock_id()
    st = (tmp_path / "k" / "lock").stat()
    assert lock == f"{st.st_dev}:{st.st_ino}"
    me = claims.Owner.me(str(folder.path), lock)
    boot = claims.boot_id() or pytest.skip("no boot id on this system")
    hour_ago = time.time() - 3600
    restarted = owner(pid=os.getpid(), run_dir="/work/adareg_runs/k", ident=f"{boot}/pid:[4026532999]")
    seen = claims.Sightings(tmp_path / SIGHTINGS, clock=Clock())
    gone = claims.holder(tags(dataclasses.replace(restarted, lock=lock), hour_ago), mine=me, seen=seen)
    assert not gone.live and "holds its run folder's lock" in gone.why
    for other in (dataclasses.replace(restarted, lock=lock, identity="another-boot/pid:[4026532999]"),
                  dataclasses.replace(restarted, lock="1:2"), restarted):  # another kernel; another file; none
        assert claims.holder(tags(other, hour_ago), mine=me, seen=seen).live, other
    folder.release()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_owner_of_another_identity_is_judged_by_its_heartbeat_changing_never_by_its_pid_or_clock(tmp_path):
    """Same hostname, same pid (ours), but another process table: only a heartbeat seen unchanged for a lease
    of the reader's own clock makes it stale, however far the owner's clock is from ours."""
    clock = Clock()
    seen = claims.Sightings(tmp_path / SIGHTINGS, clock=clock)
    dead = subprocess_pid_that_exited()
    twin = owner(pid=dead, run_dir=ME, ident="another-boot/pid:[4026531836]")  # dead pid here, our run folder
    hour_ago = time.time() - 3600  # its clock an hour behind ours (or its heartbeat an hour old)
    h = claims.holder(tags(twin, hour_ago), lease_s=300, mine=owner(run_dir=ME, oid="me"), seen=seen)
    assert h.live and h.quiet_s == 0.0
    clock.t += 299
    assert claims.holder(tags(twin, hour_ago), lease_s=300, seen=seen).live
    clock.t += 2
    stale = claims.holder(tags(twin, hour_ago), lease_s=300, seen=seen)
    assert not stale.live and stale.why == "heartbeat unchanged for 301s of this host's time (lease 300s)"
    assert claims.holder(tags(twin, hour_ago + 30), lease_s=300, seen=seen).live  # it beat: the count restarts
    clock.t += 200
    assert claims.holder(tags(twin, hour_ago + 30), lease_s=300, seen=seen).live
    # the count survives the reader (the next worker of the run reads the same file) but not a reboot
    again = claims.Sightings(tmp_path / SIGHTINGS, clock=clock)
    clock.t += 101
    assert not claims.holder(tags(twin, hour_ago + 30), lease_s=300, seen=again).live
    saved = json.loads((tmp_path / SIGHTINGS).read_text())
    (tmp_path / SIGHTINGS).write_text(json.dumps({**saved, "boot": "before-the-reboot"}))
    assert claims.holder(tags(twin, hour_ago + 30), lease_s=300, seen=again).live
    ahead = owner(oid="x2", ident="a-third-boot/pid:[1]")
    assert claims.holder(tags(ahead, time.time() + 900), lease_s=300, seen=seen).live  # 15 min ahead: live


def test_the_identity_differs_between_pid_namespaces_and_claims_without_one_still_parse():
    if claims.boot_id():
        assert claims.identity() == f"{claims.boot_id()}/{os.readlink('/proc/self/ns/pid')}"
    me = claims.Owner.me(ME)
    assert me.identity == claims.identity() and me.same_host() and me.host == claims.hostname()
    old = json.dumps({"id": "ab12", "host": claims.hostname(), "pid": os.getpid(), "run_dir": "/r/k",
                      "since": 1700000000.0})
    parsed = claims.Owner.from_tag(old)
    assert parsed == claims.Owner("ab12", claims.hostname(), os.getpid(), "/r/k", 1700000000.0, "")
    assert not parsed.same_host()  # an older claim: its pid is never looked up here
    assert claims.Owner.from_tag(me.tag()[:-1] + ',"later":1}') == me  # fields of later versions are ignored
    assert claims.Owner.from_tag("[1, 2]") is None and claims.Owner.from_tag("{") is None


@pytest.mark.skipif(pid1_unavailable() is not None, reason=str(pid1_unavailable()))
def test_a_pid_namespace_has_an_identity_of_its_own():
    code = "from orchestrator.store import claims; print(claims.identity())"
    inside = run_as_pid1([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() != claims.identity()
    assert inside.stdout.strip().split("/")[0] == claims.identity().split("/")[0]  # one boot


def subprocess_pid_that_exited() -> int:
    p = multiprocessing.get_context("fork").Process(target=lambda: None)
    p.start()
    p.join()
    return p.pid


@pytest.fixture
def store_uri(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_experiment(connect(uri), "claims")
    return uri


def _create(uri: str, key: str, start_at: float, queue) -> None:
    client = connect(uri)
    exp = client.get_experiment_by_name("claims").experiment_id
    me = claims.Owner.me(f"/runs/{os.getpid()}")
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        run = claims.create_claimed(client, exp, {TAG_RUN_KEY: key}, "r", me,
                                    lambda: active_runs(client, exp, key), settle_s=0.5)
        queue.put(("won", run.info.run_id))
    except claims.Busy as e:
        queue.put(("lost", str(e)))


def _claim(uri: str, run_id: str, start_at: float, queue) -> None:
    client = connect(uri)
    me = claims.Owner.me(f"/runs/{os.getpid()}")
    run = client.get_run(run_id)
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        claims.claim(client, run, me, settle_s=0.5)
        queue.put(("won", me.id))
    except claims.Busy as e:
        queue.put(("lost", str(e)))


def race(target, *args, n=4):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 1.5
    procs = [ctx.Process(target=target, args=(*args, start_at, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [queue.get(timeout=5) for _ in procs]


def test_four_processes_creating_one_key_at_once_leave_exactly_one_run(store_uri):
    results = race(_create, store_uri, "k1")
    won = [r for what, r in results if what == "won"]
    assert len(won) == 1, results
    client = connect(store_uri)
    exp = client.get_experiment_by_name("claims").experiment_id
    assert [r.info.run_id for r in active_runs(client, exp, "k1")] == won
    everything = client.search_runs([exp], run_view_type=ViewType.ALL)
    assert sorted((r.info.run_id == won[0], r.info.lifecycle_stage, r.info.status) for r in everything) == \
        [(False, "deleted", "KILLED")] * 3 + [(True, "active", "RUNNING")]  # no deleted run left RUNNING


def test_a_run_left_by_a_creator_killed_during_the_race_is_ended_unless_someone_holds_it(store_uri):
    """The loser of a creation race was killed between creating its run and deleting it: the next sweep
    supersedes that second run (and deletes it, being empty) but leaves a live creator's run alone."""
    client = connect(store_uri)
    exp = client.get_experiment_by_name("claims").experiment_id
    now = time.time()
    first = client.create_run(exp, tags={TAG_RUN_KEY: "k3"}, start_time=int(now * 1000) - 5000)
    killed = client.create_run(exp, tags={TAG_RUN_KEY: "k3", **tags(owner(pid=subprocess_pid_that_exited()), now)},
                               start_time=int(now * 1000) - 4000)
    settling = client.create_run(exp, tags={TAG_RUN_KEY: "k3", **tags(owner(host="gpu-box-7"), now)},
                                 start_time=int(now * 1000) - 3000)
    ended_only = client.create_run(exp, tags={TAG_RUN_KEY: "k3"}, start_time=int(now * 1000) - 2000)
    client.set_terminated(ended_only.info.run_id, status="KILLED")  # killed between ending and deleting it
    assert end_strays(client, exp, lease_s=60) == [killed.info.run_id, ended_only.info.run_id]
    for stray in (killed, ended_only):
        gone = client.get_run(stray.info.run_id)
        assert (gone.info.lifecycle_stage, gone.info.status) == ("deleted", "KILLED")
        assert gone.data.tags[TAG_SUPERSEDED_BY] == first.info.run_id
    assert [r.info.run_id for r in active_runs(client, exp, "k3")] == [first.info.run_id,
                                                                               settling.info.run_id]
    assert end_strays(client, exp, lease_s=60) == []


def test_four_processes_taking_over_one_stale_claim_leave_one_owner(store_uri):
    client = connect(store_uri)
    exp = client.get_experiment_by_name("claims").experiment_id
    dead = owner(host="gone-host", pid=1, since=time.time() - 1000)
    run = client.create_run(exp, tags={TAG_RUN_KEY: "k2", **tags(dead, time.time() - 1000)})
    results = race(_claim, store_uri, run.info.run_id)
    won = [r for what, r in results if what == "won"]
    assert len(won) == 1, results
    assert claims.Owner.from_tag(client.get_run(run.info.run_id).data.tags[TAG_OWNER]).id == won[0]
    assert all(why.startswith(("taken over meanwhile by", "running elsewhere")) for what, why in results
               if what == "lost")


def metrics(config, epoch, scale=1.0):
    return {m: float(epoch * scale + i) for i, m in enumerate(METRICS)}


def logger_for(uri, run_dir=ME):
    store = Store(uri)
    exp = ensure_experiment(store.client, "claims")
    return RunLogger(store, exp, "s", owner=claims.Owner.me(run_dir), lease_s=60)


def test_the_logger_resumes_its_own_history_and_supersedes_anothers(store_uri, monkeypatch):
    monkeypatch.setattr(claims, "SETTLE_S", 0.0)
    config = RunConfig(epochs_scale=0.02)
    plan = plan_for(config)
    first = logger_for(store_uri)
    first.on_start(config, plan, [])
    for e in (1, 2, 3):
        first.on_epoch_end(e, metrics(config, e))
    first.finish("KILLED", "killed", "interrupted")
    history = [{"epoch": float(e), **metrics(config, e)} for e in (1, 2, 3, 4)]

    again = logger_for(store_uri)  # the checkpoint that produced epochs 1-3, one epoch further
    again.on_start(config, plan, history)
    assert again.run_id == first.run_id and again.superseded is None
    again.finish("KILLED", "killed", "interrupted")

    other = [{"epoch": float(e), **metrics(config, e, scale=2.0)} for e in (1, 2)]  # another training's
    fresh = logger_for(store_uri)
    fresh.on_start(config, plan, other)
    assert fresh.run_id != first.run_id
    assert fresh.superseded.startswith(f"run {first.run_id} superseded: MLflow's ")
    client = fresh.store.client
    old = client.get_run(first.run_id)
    assert old.data.tags[TAG_SUPERSEDED_BY] == fresh.run_id and old.info.status == "KILLED"
    assert {m.step for m in client.get_metric_history(fresh.run_id, "train_loss")} == {1, 2}
    fresh.finish("FINISHED")
    exp = client.get_experiment_by_name("claims").experiment_id
    assert find_runs(client, "claims")[run_key(config)].info.run_id == fresh.run_id
    assert [r.info.run_id for r in active_runs(client, exp, run_key(config))] == [fresh.run_id]


def test_a_signal_that_cuts_a_stored_log_call_short_leaves_each_step_once(store_uri, monkeypatch):
    """SIGTERM (here Ctrl-C) lands while the epoch's log call is in flight, after the server stored its rows:
    the run's end must not log them again (MLflow keeps a second row per step, and the resume that follows
    reads the curve as another training's and supersedes the run)."""
    monkeypatch.setattr(claims, "SETTLE_S", 0.0)
    config = RunConfig(epochs_scale=0.02)
    plan = plan_for(config)
    first = logger_for(store_uri)
    first.on_start(config, plan, [])
    first.on_epoch_end(1, metrics(config, 1))
    client = first.store.client
    log_batch = client.log_batch

    def stored_then_interrupted(*args, **kwargs):
        log_batch(*args, **kwargs)
        raise KeyboardInterrupt  # the signal handler's exception, raised as the answer comes back

    monkeypatch.setattr(client, "log_batch", stored_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.on_epoch_end(2, metrics(config, 2))
    monkeypatch.setattr(client, "log_batch", log_batch)
    first.finish("KILLED", "killed", "interrupted; resumable", blocking=False)  # as the interrupted worker does
    for name in METRICS:
        assert sorted(m.step for m in client.get_metric_history(first.run_id, name)) == [1, 2], name
    assert client.get_run(first.run_id).info.status == "KILLED"

    again = logger_for(store_uri)  # the checkpoint of epoch 2 resumed: the same run, one curve
    again.on_start(config, plan, [{"epoch": float(e), **metrics(config, e)} for e in (1, 2)])
    assert again.run_id == first.run_id and again.superseded is None
    again.finish("FINISHED")


def test_a_live_claim_elsewhere_keeps_the_logger_out(store_uri, monkeypatch):
    monkeypatch.setattr(claims, "SETTLE_S", 0.0)
    config = RunConfig(epochs_scale=0.02)
    plan = plan_for(config)
    holder = logger_for(store_uri, run_dir="/machine-a/runs/k")
    holder.on_start(config, plan, [])
    intruder = logger_for(store_uri, run_dir="/machine-b/runs/k")
    intruder.owner = claims.Owner("other", "machine-b", 1, "/machine-b/runs/k", time.time())
    with pytest.raises(claims.Busy, match="running elsewhere"):
        intruder.on_start(config, plan, [])
    holder.finish("FINISHED")

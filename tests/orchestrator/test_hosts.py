"""Several "hosts" on one store that share what a hostname would wrongly make them one host by (issue:
"this host" that separates process tables): orchestrators each PID 1 of its own PID namespace, machines
that share a hostname, machines whose clocks differ by 15 minutes. Nothing is killed: every run is trained
exactly once, by one of them, and each curve equals an uninterrupted reference training."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e import (
    ADAREG,
    FOUR_RUNS_EPOCHS,
    Store,
    assert_one_training_per_key,
    assert_trained_once,
    epochs_done,
    four_runs,
    leftover_processes,
    run_bg,
    sweep_cmd,
    wait_until,
)
from servers import pid1_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.skipif(pid1_unavailable() is not None, reason=str(pid1_unavailable()))]

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime package


def host(name: str | None = None, pids_used: int = 0) -> list[str]:
    """A command prefix: PID 1 of a PID namespace of its own (and, given ``name``, a UTS namespace with
    that hostname), on the same filesystem and loopback: another machine, as far as a process table goes.
    ``pids_used``: processes run (and gone) first, so that its pids and another fresh namespace's do not
    coincide (two machines' rarely do): a pid of the other's, looked up here, then names no process."""
    naming = f"hostname {name} && " if name else ""
    burn = f"for i in $(seq {pids_used}); do /bin/true; done; " if pids_used else ""
    return ["unshare", "-Urpf" + ("u" if name else ""), "--mount-proc", "sh", "-c", f'{naming}{burn}exec "$@"', "sh"]


def training(runs_dir: Path) -> int:
    """How many of a runs folder's runs have trained an epoch and not yet finished."""
    count = 0
    for progress in runs_dir.glob("*/progress.json"):
        try:
            state = json.loads(progress.read_text())
        except (OSError, ValueError):
            continue
        count += 0 < state.get("epoch", 0) < state.get("total", 0)
    return count


def workers_of(runs_dir: Path) -> list[int]:
    """The pids (as this test sees them) of the worker processes training in ``runs_dir``."""
    found = []
    for pid in leftover_processes(runs_dir):
        with contextlib.suppress(OSError):  # ended meanwhile
            if b"spec.json" in Path(f"/proc/{pid}/cmdline").read_bytes():  # a worker's one argument
                found.append(pid)
    return found


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (or gone)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks)
    except OSError:
        return True


def store_free(db: Path) -> bool:
    """No connection holds a lock on the sqlite store ``db`` now."""
    c = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    try:
        c.execute("BEGIN EXCLUSIVE")
        c.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        c.close()


def hold(runs_dir: Path, db: Path) -> list[int]:
    """SIGSTOP the workers training in ``runs_dir`` at a moment when none of them is inside a store transaction
    (a worker stopped holding sqlite's lock would stop everyone); their pids."""
    for _ in range(200):
        pids = workers_of(runs_dir)
        assert pids, f"no worker trains in {runs_dir}"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_until(lambda pids=pids: all(stopped(p) for p in pids), 10, "the workers to stop", every=0.01)
        if store_free(db):
            return pids
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"the workers in {runs_dir} were never outside a store transaction")


def two_hosts(tmp_path: Path, prefixes: dict[str, list[str]], env: dict[str, dict[str, str]] | None = None,
              extra: dict[str, tuple[str, ...]] | None = None, hold_s: float = 0.0,
              while_held: Callable[[], None] | None = None) -> tuple[Store, list[Path]]:
    """One ``adareg sweep run`` per prefix on one sqlite store, each with its own runs folder and left to finish
    (exit 0 each). Each newcomer must judge live claims of the one before: that one's workers are held
    (SIGSTOP: alive, their heartbeats no longer changing) once two runs train there, until the newcomer has
    either found them running elsewhere or taken one over, and ``hold_s`` more (the newcomer looks again every
    15 s). ``extra``: more arguments of a prefix's command; ``while_held()`` runs once the first newcomer has
    judged them. The store and the runs folders."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = four_runs(tmp_path / "s.yaml")
    procs: dict[str, subprocess.Popen] = {}
    for name, prefix in prefixes.items():
        held: list[int] = []
        if procs:
            before = tmp_path / f"runs-{list(procs)[-1]}"
            wait_until(lambda before=before: training(before) >= 2, 300, f"two runs training in {before}")
            held = hold(before, tmp_path / "mlflow.db")
            keys = [p.parent.name for p in before.glob("*/progress.json")]
        extra_env = (env or {}).get(name)
        runs = tmp_path / f"runs-{name}"
        procs[name] = run_bg([*prefix, *sweep_cmd(sweep, uri, runs, *(extra or {}).get(name, ()))],
                             tmp_path / f"orchestrator-{name}.log",
                             env={**os.environ, **extra_env} if extra_env else None)
        if held:
            def judged(runs=runs, keys=keys) -> bool:  # one of its workers found a held run busy, or took it
                for key in keys:
                    with contextlib.suppress(OSError, ValueError):
                        if json.loads((runs / key / "result.json").read_text())["status"] == "busy":
                            return True
                    if (runs / key / "progress.json").exists():
                        return True
                return False

            try:
                wait_until(judged, 300, f"{name} to meet the held runs")
                if while_held is not None:
                    while_held()
                time.sleep(hold_s)
            finally:
                for pid in held:
                    os.kill(pid, signal.SIGCONT)
    for name, proc in procs.items():
        code = proc.wait(timeout=600)
        assert code == 0, (name, (tmp_path / f"orchestrator-{name}.log").read_text()[-3000:])
    return Store(uri), [tmp_path / f"runs-{name}" for name in prefixes]


def test_two_orchestrators_each_pid1_of_its_own_pid_namespace(tmp_path, reference):
    """Same hostname, same boot, two process tables: neither may judge the other's pids."""
    store, runs = two_hosts(tmp_path, {"A": host(), "B": host(pids_used=500)})
    assert_trained_once(store, reference, FOUR_RUNS_EPOCHS, runs)


def test_two_machines_that_share_a_hostname(tmp_path, reference):
    """Cloned machines: a UTS namespace each, both named ``twin``, and a PID namespace each."""
    store, runs = two_hosts(tmp_path, {"A": host("twin"), "B": host("twin", pids_used=500)})
    assert_trained_once(store, reference, FOUR_RUNS_EPOCHS, runs)


@pytest.mark.skipif(not Path(LIBFAKETIME).exists(), reason=f"libfaketime is not installed ({LIBFAKETIME}: "
                                                          "apt-get install faketime; .ci/run does)")
def test_two_machines_whose_clocks_differ_by_15_minutes(tmp_path, reference):
    """``beta``'s clock runs 15 minutes (three default leases) ahead of ``alpha``'s (libfaketime): neither
    may take the other's heartbeats for stale."""
    assert shutil.which("unshare")
    skewed = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": "+15m"}
    store, runs = two_hosts(tmp_path, {"alpha": host("alpha"), "beta": host("beta", pids_used=500)},
                            env={"beta": skewed})
    assert_trained_once(store, reference, FOUR_RUNS_EPOCHS, runs)
    log = (tmp_path / "orchestrator-beta.log").read_text()
    assert log  # it ran (and so did its clock, 15 minutes ahead: checked below)
    ahead = subprocess.run(["date", "+%s"], capture_output=True, text=True, env={**skewed, "PATH": "/usr/bin:/bin"})
    assert abs(int(ahead.stdout) - time.time() - 900) < 60, ahead


def test_a_namespace_killed_mid_run_and_started_again_on_its_runs_folder_resumes_at_once(tmp_path, reference):
    """A container SIGKILLed mid-run (``docker kill``, the OOM killer: no worker marks its run) and started again
    on the same volume: another PID namespace of the same kernel. Its workers' claims name the lock files the new
    workers then hold, so the runs resume at once, from their checkpoints and in their own MLflow runs, instead of
    after a lease (300 s) of unchanged heartbeats."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = four_runs(tmp_path / "s.yaml")
    runs = tmp_path / "runs"
    first = run_bg([*host(), *sweep_cmd(sweep, uri, runs)], tmp_path / "first.log")
    wait_until(lambda: epochs_done(runs) >= 3, 300, "three epochs in the first namespace")
    os.killpg(first.pid, signal.SIGKILL)  # every process of it: the orchestrator (PID 1 there) and its workers
    first.wait(timeout=60)
    store = Store(uri)
    killed = {r["run_id"] for r in store.runs() if r["status"] == "RUNNING"}
    mid_run = [json.loads(p.read_text())["epoch"] for p in runs.glob("*/progress.json")]
    assert killed and any(0 < e < FOUR_RUNS_EPOCHS for e in mid_run), (store.runs(), mid_run)

    started = time.monotonic()
    second = run_bg([*host(pids_used=500), *sweep_cmd(sweep, uri, runs)], tmp_path / "second.log")
    try:
        code = second.wait(timeout=200)  # the lease alone would take over 300 s
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, signal.SIGKILL)
        raise AssertionError(f"the runs of the killed namespace were not resumed at once:\n"
                             f"{(tmp_path / 'second.log').read_text()[-3000:]}") from None
    assert code == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert time.monotonic() - started < 200
    assert_one_training_per_key(store, reference, FOUR_RUNS_EPOCHS)
    assert not [r for r in store.runs() if r["superseded"]], store.runs()
    assert killed <= {r["run_id"] for r in store.active().values()}  # resumed in their own MLflow runs


SEED0 = ("--only", "seed=0")  # two runs, both held by A: B trains nothing meanwhile (2 cores), it only judges


def seed0(reference: dict[str, dict], store: Store) -> dict[str, dict]:
    """The reference of the two seed-0 runs (those the store holds)."""
    runs = {k: v for k, v in reference.items() if k in store.active()}
    assert len(runs) == 2, store.runs()
    return runs


@pytest.mark.parametrize("where", ["one host", "two PID namespaces"])
def test_orchestrators_with_claim_leases_of_300_and_20_s_never_take_over_a_live_run(tmp_path, reference, where):
    """A keeps the default lease (300 s: it beats every 30 s), B passes ``--claim-lease 20``. A's workers are held
    for B's first look and 40 s more (two more looks, past 20 s of A's heartbeat standing still, within A's 300 s):
    B judges A's claims by A's lease, and on one host by A's live processes, never by its own 20 s."""
    prefixes = {"A": [], "B": []} if where == "one host" else {"A": host(), "B": host(pids_used=500)}
    store, runs = two_hosts(tmp_path, prefixes, extra={"A": ("--claim-lease", "300", *SEED0),
                                                       "B": ("--claim-lease", "20", *SEED0)}, hold_s=45)
    assert_trained_once(store, seed0(reference, store), FOUR_RUNS_EPOCHS, runs)
    assert "running elsewhere" in (tmp_path / "orchestrator-B.log").read_text()  # it did meet A's live claims


@pytest.mark.skipif(not Path(LIBFAKETIME).exists(), reason=f"libfaketime is not installed ({LIBFAKETIME}: "
                                                          "apt-get install faketime; .ci/run does)")
def test_a_reader_an_hour_ahead_neither_takes_over_nor_shows_resumable_a_live_run_of_this_host(tmp_path, reference):
    """The view of a process that reads a claim just after an NTP step or a VM resume moved this host's clock an
    hour forward (libfaketime, on the readers only: a faked process's timed waits block, so its own heartbeats
    would stall): A's workers are alive, so their claims are live, however old their heartbeats look. Both
    orchestrators keep a 20 s lease."""
    ahead = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": "+1h"}
    shown: list[dict] = []

    def look() -> None:  # `sweep plan` and `sweep status` from another runs folder, with the clock an hour ahead
        base = [ADAREG, "sweep", "plan", str(tmp_path / "s.yaml"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                "--runs-dir", str(tmp_path / "runs-reader")]
        plan = subprocess.run([*base, "--format", "json"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **ahead})
        assert plan.returncode == 0, plan.stderr
        shown.extend(json.loads(plan.stdout))
        status = subprocess.run([base[0], "sweep", "status", *base[3:]], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **ahead})
        assert status.returncode == 0, status.stderr
        shown.append({"status": status.stdout})

    lease = ("--claim-lease", "20", *SEED0)
    store, runs = two_hosts(tmp_path, {"A": [], "B": []}, env={"B": ahead}, extra={"A": lease, "B": lease},
                            while_held=look)
    states = [r["state"] for r in shown if "state" in r]
    assert states.count("running") >= 2 and "resumable" not in states, shown
    status = shown[-1]["status"]
    assert "running" in status and "resumable" not in status.replace("0 resumable", ""), status
    assert_trained_once(store, seed0(reference, store), FOUR_RUNS_EPOCHS, runs)
    clock = subprocess.run(["date", "+%s"], capture_output=True, text=True, env={**ahead, "PATH": "/usr/bin:/bin"})
    assert abs(int(clock.stdout) - time.time() - 3600) < 60, clock

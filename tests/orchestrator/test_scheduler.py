"""The scheduler on a fake backend (no processes): slots, retries, outcomes, locks, stalls, outages, signals."""

import fcntl
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from orchestrator.dispatch.backends import check_shared, is_local_address, slot_env
from orchestrator.dispatch.launch import to_run
from orchestrator.dispatch.progress import ended_word
from orchestrator.dispatch.scheduler import Scheduler, log_tail
from orchestrator.dispatch.slots import Slot, device_slots, parse_gpus, ray_slots
from orchestrator.dispatch.task import Task
from orchestrator.errors import UserError
from orchestrator.identity import run_key
from orchestrator.run.folder import Attempt, RunFolder
from orchestrator.sweep.reconcile import RunState
from training.config import RunConfig

# ------------------------------------------------------------------------------------------ slots


def test_gpu_slots_spread_over_gpus_first_and_share_the_cores():
    slots = device_slots(["0", "1"], jobs_per_gpu=2, cores=16)
    assert [(s.name, s.gpu, s.device) for s in slots] == [
        ("gpu0.0", "0", "cuda"), ("gpu1.0", "1", "cuda"), ("gpu0.1", "0", "cuda"), ("gpu1.1", "1", "cuda")]
    assert {s.threads for s in slots} == {4} and {s.gpu_fraction for s in slots} == {0.5}


def test_max_parallel_caps_gpu_slots():
    slots = device_slots(["0", "1"], jobs_per_gpu=2, max_parallel=3, cores=12)
    assert [s.name for s in slots] == ["gpu0.0", "gpu1.0", "gpu0.1"]
    assert slots[0].threads == 4


@pytest.mark.parametrize("max_parallel, cores, n, threads", [(None, 8, 4, 2), (2, 8, 2, 4), (None, 1, 1, 1),
                                                               (3, 2, 3, 1)])
def test_cpu_slots(max_parallel, cores, n, threads):
    slots = device_slots([], max_parallel=max_parallel, cores=cores)
    assert len(slots) == n and {s.threads for s in slots} == {threads}
    assert {(s.device, s.gpu) for s in slots} == {("cpu", None)}


def test_slot_env_pins_the_gpu_or_hides_all():
    assert slot_env(Slot("g", "cuda", "3", 2))["CUDA_VISIBLE_DEVICES"] == "3"
    cpu = slot_env(Slot("c", "cpu", None, 5))
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "5"
    assert "CUDA_VISIBLE_DEVICES" not in slot_env(Slot("r", "cuda", None, 1, 0.5))  # Ray assigns it


@pytest.mark.parametrize("gpus, visible, expected", [
    (None, ["0", "1"], ["0", "1"]), ("all", [], []), ("none", ["0"], []),
    ("1", ["4", "7"], ["7"]),  # an index into the orchestrator's own CUDA_VISIBLE_DEVICES
    ("0,1,0", ["0", "1"], ["0", "1"])])
def test_parse_gpus(gpus, visible, expected):
    assert parse_gpus(gpus, visible) == expected


@pytest.mark.parametrize("gpus, message", [("2", "GPU 2 is not visible; this machine has 2 GPUs (0-1)"),
                                           ("x", "expected all, none or GPU indices")])
def test_parse_gpus_errors_name_the_option(gpus, message):
    with pytest.raises(UserError, match="^gpus") as e:
        parse_gpus(gpus, ["0", "1"])
    assert message in str(e.value)


def test_bad_counts_are_user_errors():
    with pytest.raises(UserError, match="^jobs_per_gpu 0"):  # the argument's name; the CLI says --jobs-per-gpu
        device_slots(["0"], jobs_per_gpu=0)
    with pytest.raises(UserError, match="^max_parallel 0"):
        device_slots([], max_parallel=0)


def test_ray_slots_use_fractional_gpus_and_leave_the_gpu_to_ray():
    slots = ray_slots({"CPU": 16.0, "GPU": 2.0}, False, 4, None)
    assert len(slots) == 8
    assert {(s.gpu, s.gpu_fraction, s.device, s.threads) for s in slots} == {(None, 0.25, "cuda", 2)}
    cpu = ray_slots({"CPU": 4.0, "GPU": 2.0}, True, 1, 2)
    assert [(s.device, s.gpu_fraction, s.threads) for s in cpu] == [("cpu", 0.0, 2)] * 2


@pytest.mark.parametrize("address, local", [(None, True), ("local", True), ("127.0.0.1:6379", True),
                                            ("ray://localhost:10001", True), ("auto", False),
                                            ("10.0.0.5:6379", False), ("ray://head:10001", False)])
def test_is_local_address(address, local):
    assert is_local_address(address) is local


def test_remote_ray_refuses_local_stores_and_unvouched_run_folders(tmp_path):
    check_shared(None, "sqlite:////x/m.db", tmp_path, False)  # local: anything goes
    with pytest.raises(UserError, match="tracking URI sqlite:////x/m.db is local"):
        check_shared("10.0.0.5:6379", "sqlite:////x/m.db", tmp_path, True)
    with pytest.raises(UserError, match="pass shared_runs_dir"):
        check_shared("10.0.0.5:6379", "http://mlflow:5000", tmp_path, False)
    check_shared("10.0.0.5:6379", "postgresql://u@db/mlflow", tmp_path, True)


def test_log_tail_is_the_last_meaningful_line(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text("--- start\nepoch 1\nerror: cifar10: no archive\n\n--- start\n")
    assert log_tail(log) == "error: cifar10: no archive"
    assert log_tail(tmp_path / "missing.log") == ""


def test_to_run_resumes_first_and_retries_errors_only_when_asked():
    def state(seed, st, failure=""):
        config = RunConfig(seed=seed)
        return RunState(config, run_key(config), "g", st, 450, failure=failure)

    states = [state(0, "pending"), state(1, "done"), state(2, "resumable"), state(3, "failed", "diverged"),
              state(4, "failed", "error"), state(5, "running")]
    assert [s.config.seed for s in to_run(states)] == [2, 5, 0]
    assert [s.config.seed for s in to_run(states, retry_failed=True)] == [2, 4, 5, 0]


# ---------------------------------------------------------------------------------- fake backend


class FakeJob:
    """Ends after ``seconds`` with ``status`` in its run folder's result.json ("crashed": none written)."""

    def __init__(self, folder: RunFolder, status: str, seconds: float):
        self.folder, self.status, self.end = folder, status, time.monotonic() + seconds
        self.signals: list[str] = []
        self.code = 0
        self.written = False

    def done(self):
        finished = time.monotonic() >= self.end
        if finished and not self.written:
            self.written = True
            if self.status == "locked":  # found the folder locked: writes nothing, exits 4
                self.code = 4
            elif self.status != "crashed":
                self.folder.write_attempt(Attempt(self.status, f"{self.status} (fake)"))
        return finished

    def result(self, timeout=None):
        return self.code

    def terminate(self):
        self.signals.append("TERM")
        self.status, self.end = "killed", min(self.end, time.monotonic() + 0.05)

    def kill(self):
        self.signals.append("KILL")
        self.status, self.code, self.end = "crashed", -9, time.monotonic()


class FakeBackend:
    """Outcomes scripted per run key; records every start and the peak concurrency."""

    def __init__(self, script: dict[str, list[str]], seconds: float = 0.05):
        self.script, self.seconds = script, seconds
        self.starts: list[tuple[str, str, float]] = []
        self.jobs: list[FakeJob] = []
        self.peak = 0

    def submit(self, spec_path, log_path, slot):
        key = Path(spec_path).parent.name
        self.starts.append((key, slot.name, time.monotonic()))
        job = FakeJob(RunFolder(Path(spec_path).parent), self.script[key].pop(0), self.seconds)
        self.jobs.append(job)
        self.peak = max(self.peak, sum(not j.done() for j in self.jobs))
        return job

    def close(self):
        pass


class Notes:
    def __init__(self):
        self.lines: list[str] = []

    def started(self, task, slot):
        pass

    def ended(self, task, slot):
        pass

    def note(self, message):
        self.lines.append(message)

    def update(self, active):
        pass


def told(task: Task) -> str:
    """How the scheduler left a task: the word the progress line uses, or "queued" (never ended for good)."""
    return ended_word(task) if task.state is not None else "queued"


def make_tasks(tmp_path, keys):
    tasks = []
    for key in keys:
        (tmp_path / key).mkdir()
        tasks.append(Task(key, RunConfig(), tmp_path / key, total_epochs=15))
    return tasks


def scheduler(backend, n_slots=2, retries=2, view=None, grace_s=0.1, **kwargs):
    slots = [Slot(f"cpu{i}") for i in range(n_slots)]
    return Scheduler(backend, slots, lambda task, slot: task.run_dir / "spec.json", retries=retries, view=view,
                     poll_s=0.01, grace_s=grace_s, lock_wait_s=0.05, retry_delay_s=0.05, busy_wait_s=0.05, **kwargs)


def test_result_files_decide_retry_fail_or_wait(tmp_path):
    script = {"ok": ["finished"], "flaky": ["error", "finished"], "broken": ["error", "crashed", "error"],
              "diverges": ["diverged"], "bad": ["bad_input"], "elsewhere": ["busy", "busy", "already_finished"],
              "outage": ["store_down", "finished"], "pruned": ["stopped"], "locked": ["locked", "finished"]}
    backend = FakeBackend(script)
    tasks = make_tasks(tmp_path, script)
    assert scheduler(backend, retries=2, store_probe=lambda: True).run(tasks) is None
    result = {t.key: (told(t), t.starts, t.failures) for t in tasks}
    assert result == {
        "ok": ("finished", 1, 0), "flaky": ("finished", 2, 1),
        "broken": ("failed", 3, 3),  # 1 + 2 retries; a crash (no result.json) counts like an error
        "diverges": ("diverged", 1, 0), "bad": ("failed", 1, 0),  # never retried
        "elsewhere": ("finished", 3, 0),  # held elsewhere: looked at again, never counted
        "outage": ("finished", 2, 0),  # store down: resumed when it answers, never counted
        "pruned": ("stopped", 1, 0), "locked": ("finished", 2, 0)}  # a worker that found the folder locked
    assert all(not codes for codes in script.values())
    broken = next(t for t in tasks if t.key == "broken")
    assert broken.message == "error (fake)"


def test_a_result_from_an_earlier_attempt_is_not_this_attempts(tmp_path):
    (task,) = make_tasks(tmp_path, ["old"])
    RunFolder(task.run_dir).write_attempt(Attempt("finished"))  # left by an attempt before this sweep
    time.sleep(1.1)
    backend = FakeBackend({"old": ["crashed", "finished"]})
    scheduler(backend, retries=1).run([task])
    assert (told(task), task.starts, task.failures) == ("finished", 2, 1)


def test_no_dispatch_while_the_store_is_down(tmp_path):
    answers = iter([False, False, True])
    notes = Notes()
    backend = FakeBackend({"a": ["store_down", "finished"], "b": ["finished"]}, seconds=0.05)
    sched = scheduler(backend, n_slots=1, view=notes, store_probe=lambda: next(answers))
    sched.store.every_s = 0.1
    tasks = make_tasks(tmp_path, ["a", "b"])
    sched.run(tasks)
    starts = [(k, t) for k, _, t in backend.starts]
    assert [k for k, _ in starts] == ["a", "a", "b"]  # nothing started until the probe answered
    assert starts[1][1] - starts[0][1] >= 0.2  # two failed probes, 0.1 s apart
    assert any(n.startswith("tracking store unreachable since") for n in notes.lines)
    assert any(n.startswith("tracking store answers again") for n in notes.lines)
    assert [told(t) for t in tasks] == ["finished", "finished"]


def test_the_sweep_ends_resumable_after_the_store_timeout(tmp_path):
    backend = FakeBackend({"a": ["store_down"], "b": ["finished"]}, seconds=0.05)
    sched = scheduler(backend, n_slots=1, store_probe=lambda: False, store_timeout_s=0.3)
    tasks = make_tasks(tmp_path, ["a", "b"])
    t0 = time.monotonic()
    sched.run(tasks)
    assert sched.store_gave_up and time.monotonic() - t0 < 5
    assert [(told(t), t.starts) for t in tasks] == [("interrupted", 1), ("interrupted", 0)]


def test_a_refusal_of_the_store_starts_nothing_more_and_counts_nothing(tmp_path):
    """A worker whose write the tracking server refused (HTTP 401/403, mid-run): every other run would be too, so
    none starts; the one running ends on its own; all stay resumable, no attempt counted."""
    backend = FakeBackend({"a": ["refused"], "b": ["finished"], "c": ["finished"]}, seconds=0.05)
    notes = Notes()
    sched = scheduler(backend, n_slots=2, view=notes, store_probe=lambda: True)
    tasks = make_tasks(tmp_path, ["a", "b", "c"])
    assert sched.run(tasks) is None
    assert sched.refused == "refused (fake)"
    assert [(t.key, told(t), t.starts, t.failures) for t in tasks] == [
        ("a", "refused", 1, 0), ("b", "finished", 1, 0), ("c", "refused", 0, 0)]  # b was running: it finished
    assert [k for k, _, _ in backend.starts] == ["a", "b"]
    assert any("starting nothing more" in n for n in notes.lines)


def test_a_stalled_worker_is_killed_and_retried(tmp_path):
    notes = Notes()
    backend = FakeBackend({"stuck": ["finished", "finished"]}, seconds=30)
    (task,) = make_tasks(tmp_path, ["stuck"])
    sched = scheduler(backend, view=notes, stall_timeout_s=0.3)
    backend.seconds = 30
    real_submit = backend.submit

    def submit(spec_path, log_path, slot):  # the retry finishes at once
        job = real_submit(spec_path, log_path, slot)
        if len(backend.jobs) == 2:
            job.end = time.monotonic()
        return job

    backend.submit = submit
    t0 = time.monotonic()
    sched.run([task])
    assert time.monotonic() - t0 < 10
    assert backend.jobs[0].signals == ["KILL"]
    assert (told(task), task.starts, task.failures) == ("finished", 2, 1)
    log = (task.run_dir / "worker.log").read_text()
    assert "stalled: no new epoch for" in log and "killed by the orchestrator (SIGKILL) and retried" in log
    assert any("stuck: stalled" in n for n in notes.lines)


def test_no_more_runs_at_once_than_slots(tmp_path):
    keys = [f"r{i}" for i in range(7)]
    backend = FakeBackend({k: ["finished"] for k in keys}, seconds=0.05)
    scheduler(backend, n_slots=3).run(make_tasks(tmp_path, keys))
    assert backend.peak == 3 and len(backend.starts) == 7
    assert {slot for _, slot, _ in backend.starts} == {"cpu0", "cpu1", "cpu2"}


def test_a_run_locked_by_a_live_process_waits_for_its_lock(tmp_path):
    tasks = make_tasks(tmp_path, ["held", "free"])
    fd = os.open(tmp_path / "held" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    released = []

    def release():
        released.append(time.monotonic())
        os.close(fd)

    timer = threading.Timer(0.4, release)
    timer.start()
    notes = Notes()
    backend = FakeBackend({"held": ["finished"], "free": ["finished"]})
    scheduler(backend, view=notes).run(tasks)
    timer.join()
    started = {key: t for key, _, t in backend.starts}
    assert started["held"] >= released[0] > started["free"]
    assert any("held: waiting for the live process holding its lock (pid 4242)" in n for n in notes.lines)
    assert [told(t) for t in tasks] == ["finished", "finished"]


def _signal_later(*delays_and_signals):
    def send():
        for delay, signum in delays_and_signals:
            time.sleep(delay)
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_first_signal_stops_dispatch_and_terminates_workers(tmp_path):
    keys = ["a", "b", "c", "d"]
    backend = FakeBackend({k: ["finished"] for k in keys}, seconds=30)
    tasks = make_tasks(tmp_path, keys)
    sender = _signal_later((0.2, signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    stopped_by = scheduler(backend, grace_s=0.1).run(tasks)
    sender.join()
    assert stopped_by == signal.SIGTERM and time.monotonic() - t0 < 5
    assert [told(t) for t in tasks] == ["killed", "killed", "queued", "queued"]
    assert [j.signals for j in backend.jobs] == [["TERM"], ["TERM"]]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_second_signal_kills_workers_at_once(tmp_path):
    backend = FakeBackend({"a": ["finished"], "b": ["finished"]}, seconds=30)
    tasks = make_tasks(tmp_path, ["a", "b"])
    sched = scheduler(backend, grace_s=60)  # the first signal alone would wait a minute before SIGTERM
    sender = _signal_later((0.2, signal.SIGINT), (0.2, signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    t0 = time.monotonic()
    assert sched.run(tasks) == signal.SIGINT
    sender.join()
    assert sched.aborted and time.monotonic() - t0 < 5
    assert [j.signals for j in backend.jobs] == [["KILL"], ["KILL"]]
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------- a full or read-only runs folder


class FakeDisk:
    """``diskfault.check`` scripted: the runs folder is full for the first ``full_checks`` re-checks (those that
    write a probe file), and has room before every start unless ``refuse`` says how many starts to refuse."""

    def __init__(self, full_checks: int = 0, refuse: int = 0):
        self.full_checks, self.refuse, self.calls = full_checks, refuse, []

    def __call__(self, folder, need=0, write=False):
        import errno

        from orchestrator.diskfault import DiskFault

        self.calls.append(write)
        if write and self.full_checks > 0:
            self.full_checks -= 1
            return DiskFault(errno.ENOSPC, str(folder))
        if not write and self.refuse > 0:
            self.refuse -= 1
            return DiskFault(errno.ENOSPC, str(folder), need=need)
        return None


def disk_scheduler(monkeypatch, tmp_path, backend, disk, **kwargs):
    from orchestrator import diskfault

    monkeypatch.setattr(diskfault, "check", disk)
    sched = scheduler(backend, runs_dir=tmp_path, **kwargs)
    sched.disk.every_s = 0.1
    return sched


def test_a_full_disk_is_not_the_runs_fault_and_pauses_dispatch(tmp_path, monkeypatch):
    notes = Notes()
    backend = FakeBackend({"a": ["disk_full", "disk_full", "finished"], "b": ["finished"]}, seconds=0.05)
    sched = disk_scheduler(monkeypatch, tmp_path, backend, FakeDisk(full_checks=2), n_slots=1, view=notes,
                           retries=0)
    tasks = make_tasks(tmp_path, ["a", "b"])
    assert sched.run(tasks) is None
    assert [(told(t), t.starts, t.failures) for t in tasks] == [("finished", 3, 0), ("finished", 1, 0)]
    starts = [(k, t) for k, _, t in backend.starts]
    assert [k for k, _ in starts] == ["a", "a", "a", "b"]  # nothing else started while the folder was full
    assert starts[1][1] - starts[0][1] >= 0.2  # two failed re-checks, 0.1 s apart
    down = [n for n in notes.lines if n.startswith(f"runs folder {tmp_path} cannot take writes")]
    assert len(down) == 2 and f"no space left on device: {tmp_path / 'a'}" in down[0]
    assert "attempts not counted" in down[0]
    assert sum(n.startswith(f"runs folder {tmp_path} takes writes again") for n in notes.lines) == 2
    assert not sched.disk_gave_up


def test_the_sweep_ends_resumable_after_the_disk_timeout(tmp_path, monkeypatch):
    notes = Notes()
    backend = FakeBackend({"a": ["disk_full"], "b": ["finished"]}, seconds=0.05)
    sched = disk_scheduler(monkeypatch, tmp_path, backend, FakeDisk(full_checks=10**6), n_slots=1, view=notes,
                           disk_timeout_s=0.4)
    tasks = make_tasks(tmp_path, ["a", "b"])
    t0 = time.monotonic()
    sched.run(tasks)
    assert sched.disk_gave_up and not sched.store_gave_up and time.monotonic() - t0 < 5
    assert [(told(t), t.starts, t.failures) for t in tasks] == [("interrupted", 1, 0), ("interrupted", 0, 0)]
    message = tasks[0].message  # the folder as last re-checked, with its free space
    assert message.startswith(f"no space left on device: {tmp_path} (") and message.endswith("; resumable")
    assert " free of " in message
    assert any("--disk-timeout 0" in n and "make room and run the same command again" in n for n in notes.lines)


def test_a_worker_that_cannot_write_its_result_says_so_by_its_exit_code(tmp_path, monkeypatch):
    from orchestrator.run.ending import EXIT_DISK

    class NoResult(FakeBackend):
        def submit(self, spec_path, log_path, slot):
            job = super().submit(spec_path, log_path, slot)
            if len(self.starts) == 1:
                job.status, job.code = "crashed", EXIT_DISK  # writes no result.json, exits 74
            return job

    backend = NoResult({"a": ["x", "finished"]}, seconds=0.05)
    sched = disk_scheduler(monkeypatch, tmp_path, backend, FakeDisk(), n_slots=1, retries=0)
    (task,) = make_tasks(tmp_path, ["a"])
    sched.run([task])
    assert (told(task), task.starts, task.failures) == ("finished", 2, 0)


def test_a_spec_or_log_that_cannot_be_written_fails_no_run(tmp_path, monkeypatch):
    import errno

    backend = FakeBackend({"a": ["finished"]}, seconds=0.05)
    full = iter([True])

    def write_spec(task, slot):
        if next(full, False):
            raise OSError(errno.EROFS, "Read-only file system", str(task.run_dir / "spec.json"))
        return task.run_dir / "spec.json"

    from orchestrator import diskfault

    monkeypatch.setattr(diskfault, "check", FakeDisk())
    notes = Notes()
    sched = Scheduler(backend, [Slot("cpu0")], write_spec, view=notes, poll_s=0.01, retry_delay_s=0.05,
                      runs_dir=tmp_path)
    sched.disk.every_s = 0.1
    (task,) = make_tasks(tmp_path, ["a"])
    sched.run([task])
    assert (told(task), task.starts, task.failures) == ("finished", 1, 0)
    assert any(f"(starting a): read-only file system: {tmp_path / 'a' / 'spec.json'}" in n for n in notes.lines)


def test_a_run_is_not_started_without_room_for_its_checkpoints(tmp_path, monkeypatch):
    notes = Notes()
    backend = FakeBackend({"a": ["finished"]}, seconds=0.05)
    sched = disk_scheduler(monkeypatch, tmp_path, backend, FakeDisk(refuse=1), n_slots=1, view=notes)
    (RunFolder(tmp_path / "old").checkpoint).parent.mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"x" * 300_000)  # the sweep's checkpoints are this big
    (task,) = make_tasks(tmp_path, ["a"])
    sched.run([task])
    assert (told(task), task.starts) == ("finished", 1)
    (down,) = [n for n in notes.lines if "cannot take writes (before starting a run)" in n]
    assert f"{tmp_path}: " in down and "less than a run needs (585.9 KB)" in down  # 2 checkpoints of 300,000 bytes

"""The scheduler's task source (what ``adareg tune`` plugs into it): asked when a slot is free and the queue is
empty, shown each running task's progress, told when a task ends for good (not when it is requeued)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestrator.dispatch.progress import ended_word
from orchestrator.dispatch.task import Task
from orchestrator.run.folder import RunFolder
from training.config import RunConfig

_spec = importlib.util.spec_from_file_location("scheduler_fakes", Path(__file__).with_name("test_scheduler.py"))
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)


class Source:
    def __init__(self, tmp_path, batches):
        self.tmp_path, self.batches = tmp_path, list(batches)
        self.asked, self.told, self.seen = 0, [], set()

    def running(self):
        return bool(self.batches)

    def more(self):
        self.asked += 1
        tasks = []
        for key in self.batches.pop(0):
            (self.tmp_path / key).mkdir()
            tasks.append(Task(key, RunConfig(), self.tmp_path / key))
        return tasks

    def progress(self, task, progress):
        self.seen.add((task.key, progress["epoch"]))

    def ended(self, task):
        self.told.append((task.key, ended_word(task)))


class ProgressBackend(fakes.FakeBackend):
    def submit(self, spec_path, log_path, slot):
        RunFolder(Path(spec_path).parent).write_progress(epoch=1)
        return super().submit(spec_path, log_path, slot)


def test_source_is_asked_when_a_slot_is_free_and_the_queue_is_empty_and_told_how_tasks_ended(tmp_path):
    backend = ProgressBackend({"a0": ["finished"], "a1": ["error", "finished"], "b0": ["finished"],
                               "c0": ["diverged"]}, seconds=0.1)
    source = Source(tmp_path, [["a0", "a1"], ["b0"], ["c0"]])
    assert fakes.scheduler(backend, n_slots=2, source=source).run([]) is None
    assert source.asked == 3 and backend.peak == 2
    assert [k for k, _, _ in backend.starts].count("a1") == 2  # its failed attempt was requeued, not told
    assert sorted(source.told) == [("a0", "finished"), ("a1", "finished"), ("b0", "finished"), ("c0", "diverged")]
    assert source.seen == {("a0", 1), ("a1", 1), ("b0", 1), ("c0", 1)}

"""What the user sees: the live view on a terminal, plain lines elsewhere, the summary table."""

import io
import json
import re

from rich.console import Console

from orchestrator.dispatch.launch import SweepResult
from orchestrator.dispatch.progress import LiveView, PlainView, make_view, status_view, summary_table
from orchestrator.dispatch.slots import Slot
from orchestrator.dispatch.task import Task
from orchestrator.identity import run_key
from orchestrator.run.ending import End, State
from orchestrator.sweep.reconcile import RunState
from training.config import RunConfig


def fixture_runs(tmp_path):
    configs = [RunConfig(seed=s, scheme="01", epochs_scale=0.02) for s in range(3)]
    states = [RunState(c, run_key(c), "g", st, 15, epoch=e, run_id=rid, test_error=te, reason=why)
              for c, st, e, rid, te, why in zip(configs, ["done", "pending", "failed"], [15, 0, 3],
                                                 ["run0", None, "run2"], [0.12, None, 0.9],
                                                 ["", "", "diverged at epoch 3: train loss is nan"])]
    task = Task(states[1].run_key, configs[1], tmp_path / states[1].run_key, 15)
    task.run_dir.mkdir()
    (task.run_dir / "progress.json").write_text(json.dumps(
        {"epoch": 7, "total": 15, "test_error": 0.25, "images_per_second": 1234.5}))
    return states, task


def text(console: Console) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())


def test_live_view_draws_the_bar_and_a_line_per_running_run(tmp_path):
    states, task = fixture_runs(tmp_path)
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    view = make_view(states, [task], "demo", console)
    assert isinstance(view, LiveView)
    view.started(task, Slot("cpu0"))
    view.update([(task, Slot("cpu0"))])
    view.live.refresh()
    live = text(console)
    assert "demo: 1/3 done · 1 running · 1 failed" in live
    assert "25/45 epochs" in live  # 15 done + 3 of the failed run + 7 of the running run
    assert re.search(rf"{task.key} +01 +resnet14 +digits +1 +cpu0 +7/15 +0.2500 +1,234", live), live
    task.end, task.state = End.FINISHED, State.DONE
    view.ended(task, Slot("cpu0"))
    view.close()
    assert "2/3 done · 0 running · 1 failed" in text(console) and "33/45 epochs" in text(console)


def test_plain_view_prints_a_line_per_event(tmp_path):
    states, task = fixture_runs(tmp_path)
    console = Console(file=io.StringIO(), width=200)  # not a terminal
    view = make_view(states, [task], "demo", console)
    assert isinstance(view, PlainView)
    view.started(task, Slot("cpu1"))
    task.end, task.state, task.message = End.DIVERGED, State.FAILED, "diverged at epoch 2: train loss is nan"
    view.ended(task, Slot("cpu1"))
    view.close()
    lines = [line.split("] ", 1)[1] for line in console.file.getvalue().splitlines()]
    assert lines[0] == "sweep: 1 to run; 1/3 done, 0 running, 1 failed; epochs 18/45"
    assert lines[1] == f"start {task.key} 01 resnet14 digits seed 1 on cpu1"
    assert re.fullmatch(rf"end   {task.key} 01 resnet14 digits seed 1 after [0-9.]+s: diverged: diverged at "
                        r"epoch 2: train loss is nan", lines[2])
    assert lines[3] == "sweep: 1/3 done, 0 running, 2 failed; epochs 18/45"


def test_summary_and_status_tables(tmp_path):
    states, task = fixture_runs(tmp_path)
    task.end, task.state, task.message = End.ERROR, State.FAILED, "error: cifar10: no archive"
    result = SweepResult(states, {task.key: task})
    console = Console(file=io.StringIO(), width=220)
    console.print(summary_table(result, "demo"))
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip())
                                          for line in console.file.getvalue().splitlines())}
    assert rows[states[0].run_key][5:9] == ["done", "15/15", "0.1200", "run0"]
    assert rows[states[1].run_key][5] == "failed" and rows[states[1].run_key][9] == "error: cifar10: no archive"
    assert rows[states[2].run_key][9] == "diverged at epoch 3: train loss is nan"
    assert "3 runs: 1 done, 0 running, 0 resumable, 0 pending, 2 failed" in console.file.getvalue()

    console = Console(file=io.StringIO(), width=220)
    console.print(status_view(states, "demo"))
    out = console.file.getvalue()
    assert "demo: 1/3 done · 0 running · 1 failed · 0 resumable · 1 pending" in out and "18/45 epochs" in out
    assert "diverged at epoch 3" in out

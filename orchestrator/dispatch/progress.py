"""What the user sees of a sweep: live progress while it runs, tables for plan, status and the end.

On a terminal, ``LiveView`` draws the sweep's bar (runs done / running / failed, epochs, ETA) and a
line per running run (epoch of total, last test error, images/s) from each run's ``progress.json``.
Elsewhere (a log file, a test), ``PlainView`` prints one line per run start and end, and a heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from orchestrator.dispatch.launch import SweepResult
from orchestrator.dispatch.slots import Slot
from orchestrator.dispatch.task import Task
from orchestrator.run.ending import STATES, End, State
from orchestrator.sweep.reconcile import RunState, counts

HEARTBEAT_S = 60.0


def _label(config) -> str:
    return f"{config.scheme} {config.arch} {config.dataset} seed {config.seed}"


def _err(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _ips(value) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else "-"


class _Tally:
    """Runs done / running / failed and epochs done, kept up to date from the scheduler's events."""

    def __init__(self, states: Sequence[RunState], tasks: Sequence[Task]):
        self.total_runs = len(states)
        self.done = sum(s.state is State.DONE for s in states)
        self.failed = sum(s.state is State.FAILED for s in states)
        owed = {t.key for t in tasks}
        self.failed -= sum(s.state is State.FAILED and s.run_key in owed for s in states)  # retried now
        self.epochs = {s.run_key: s.total_epochs if s.state is State.DONE else s.epoch for s in states}
        self.total_epochs = sum(s.total_epochs for s in states)
        self.running = 0

    def read(self, active: Sequence[tuple[Task, Slot]]) -> list[tuple[Task, Slot, dict]]:
        rows = []
        for task, slot in active:
            p = task.folder.read_progress() or {}
            epoch = int(p.get("epoch") or 0)
            self.epochs[task.key] = max(self.epochs.get(task.key, 0), epoch)
            rows.append((task, slot, p))
        return rows

    def started(self) -> None:
        self.running += 1

    def ended(self, task: Task) -> None:
        self.running -= 1
        if task.state is State.DONE:
            self.done += 1
            self.epochs[task.key] = task.total_epochs
        elif task.state is State.FAILED:
            self.failed += 1

    def line(self) -> str:
        return (f"{self.done}/{self.total_runs} done, {self.running} running, {self.failed} failed; "
                f"epochs {sum(self.epochs.values())}/{self.total_epochs}")


def ended_word(task: Task) -> str:
    """How a task that ended for good is told: finished, failed, diverged, or the end that kept it resumable."""
    if task.state is State.DONE:
        return "finished"
    if task.state is State.FAILED:
        return "diverged" if task.end is End.DIVERGED else "failed"
    return {End.STOPPED: "stopped", End.STORE_DOWN: "interrupted", End.DISK_FULL: "interrupted",
            End.REFUSED: "refused"}.get(task.end, "killed")


def _end_line(task: Task) -> str:
    took = time.monotonic() - task.started_at if task.started_at else 0.0
    if task.state is None and task.end is End.BUSY:
        what = f"{task.message}; will look again"
    elif task.state is None and task.end is End.STORE_DOWN:
        what = "tracking store unreachable; will resume when it answers"
    elif task.state is None and task.end is End.DISK_FULL:  # orchestrator.diskfault: not the run's fault
        what = f"{task.message}; resumable, will resume when its folder takes writes again"
    elif task.state is None:
        what = f"attempt ended ({task.end}); will retry"
    else:
        word = ended_word(task)
        what = word + (f": {task.message}" if task.message and word != "finished" else "")
    return f"end   {task.key} {_label(task.config)} after {took:.1f}s: {what}"


class PlainView:
    """One line per event, for logs and pipes."""

    def __init__(self, states: Sequence[RunState], tasks: Sequence[Task], console: Console | None = None):
        self.console = console or Console()
        self.tally = _Tally(states, tasks)
        self._beat = time.monotonic()
        self._say(f"sweep: {len(tasks)} to run; {self.tally.line()}")

    def _say(self, text: str) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", markup=False, highlight=False, soft_wrap=True)

    def started(self, task: Task, slot: Slot) -> None:
        self.tally.started()
        again = f" (attempt {task.starts})" if task.starts > 1 else ""
        self._say(f"start {task.key} {_label(task.config)} on {slot.name}{again}")

    def ended(self, task: Task, slot: Slot) -> None:
        self.tally.ended(task)
        self._say(_end_line(task))

    def note(self, message: str) -> None:
        self._say(message)

    def update(self, active: Sequence[tuple[Task, Slot]]) -> None:
        if time.monotonic() - self._beat >= HEARTBEAT_S:
            self._beat = time.monotonic()
            self.tally.read(active)
            self._say(f"progress: {self.tally.line()}")

    def close(self) -> None:
        self._say(f"sweep: {self.tally.line()}")


class LiveView:
    """A rich bar for the sweep and a table of the running runs, redrawn a few times a second."""

    def __init__(self, states: Sequence[RunState], tasks: Sequence[Task], title: str, console: Console):
        self.console, self.title = console, title
        self.tally = _Tally(states, tasks)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed:.0f}/{task.total:.0f} epochs"),
                                 TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(), console=console)
        self.bar = self.progress.add_task(self._description(), total=self.tally.total_epochs,
                                          completed=sum(self.tally.epochs.values()))
        self.live = Live(self._render([]), console=console, refresh_per_second=4)
        self.live.start()

    def _description(self) -> str:
        t = self.tally
        return (f"{self.title}: [green]{t.done}[/]/{t.total_runs} done · [cyan]{t.running}[/] running · "
                f"[red]{t.failed}[/] failed")

    def _render(self, rows: list[tuple[Task, Slot, dict]]):
        table = Table("run", "scheme", "arch", "dataset", "seed", "slot", "epoch", "test error", "img/s",
                      box=None, header_style="bold")
        for task, slot, p in rows:
            total = p.get("total") or task.total_epochs
            table.add_row(task.key, task.config.scheme, task.config.arch, task.config.dataset, str(task.config.seed),
                          slot.name, f"{int(p.get('epoch') or 0)}/{total}", _err(p.get("test_error")),
                          _ips(p.get("images_per_second")))
        return Group(self.progress, table) if rows else self.progress

    def started(self, task: Task, slot: Slot) -> None:
        self.tally.started()
        again = f" (attempt {task.starts})" if task.starts > 1 else ""
        self.console.print(f"start {task.key} {_label(task.config)} on {slot.name}{again}", markup=False)

    def ended(self, task: Task, slot: Slot) -> None:
        self.tally.ended(task)
        self.console.print(_end_line(task), markup=False, style="red" if task.state is State.FAILED else None)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, style="yellow")

    def update(self, active: Sequence[tuple[Task, Slot]]) -> None:
        rows = self.tally.read(active)
        self.progress.update(self.bar, completed=sum(self.tally.epochs.values()), description=self._description())
        self.live.update(self._render(rows))

    def close(self) -> None:
        self.progress.update(self.bar, completed=sum(self.tally.epochs.values()), description=self._description())
        self.live.update(self.progress)
        self.live.stop()


def make_view(states: Sequence[RunState], tasks: Sequence[Task], title: str, console: Console | None = None):
    """LiveView on a terminal, PlainView otherwise."""
    console = console or Console()
    if console.is_terminal:
        return LiveView(states, tasks, title, console)
    return PlainView(states, tasks, console)


# ------------------------------------------------------------------------------------------ tables


def counts_line(states: Iterable[RunState]) -> str:
    n = counts(states)
    total = sum(n.values())
    return f"{total} run{'s' if total != 1 else ''}: " + ", ".join(f"{n[s]} {s}" for s in STATES)


def _table(title: str, caption: str, *headers: str) -> Table:
    """A compact table whose ids never wrap (other columns give way on a narrow terminal)."""
    columns = [Column(h, no_wrap=h in ("run", "seed", "state", "epochs", "MLflow run")) for h in headers]
    return Table(*columns, title=title, caption=caption, caption_justify="left", box=None, pad_edge=False,
                 header_style="bold underline")


def plan_table(states: Sequence[RunState], title: str) -> Table:
    """Every run of ``sweep plan``; the caption holds the counts."""
    table = _table(title, counts_line(states), "run", "group", "scheme", "arch", "dataset", "seed", "epochs", "state")
    for s in states:
        c = s.config
        table.add_row(s.run_key, s.group_key, c.scheme, c.arch, c.dataset, str(c.seed),
                      f"{s.epoch}/{s.total_epochs}", s.state)
    return table


def status_view(states: Sequence[RunState], title: str, notes: Sequence[str] = ()):
    """``sweep status``: the sweep's bar and a line per running run (from MLflow and progress.json); ``notes``
    (e.g. the runs folder is full) under the bar."""
    from rich.progress import ProgressBar

    n = counts(states)
    done_epochs = sum(s.total_epochs if s.state is State.DONE else s.epoch for s in states)
    total_epochs = sum(s.total_epochs for s in states) or 1
    head = Table.grid(padding=(0, 1))
    head.add_row(f"{title}: {n['done']}/{len(states)} done · {n['running']} running · {n['failed']} failed · "
                 f"{n['resumable']} resumable · {n['pending']} pending",
                 ProgressBar(total=total_epochs, completed=done_epochs, width=30),
                 f"{done_epochs}/{total_epochs} epochs")
    parts: list = [head, *(Text(note) for note in notes)]
    busy = [s for s in states if s.state in (State.RUNNING, State.FAILED)]
    if busy:
        table = Table("run", "scheme", "arch", "dataset", "seed", "state", "epoch", "test error", "img/s", "note",
                      box=None, header_style="bold")
        for s in busy:
            c = s.config
            table.add_row(s.run_key, c.scheme, c.arch, c.dataset, str(c.seed), s.state,
                          f"{s.epoch}/{s.total_epochs}", _err(s.test_error), _ips(s.images_per_second),
                          s.reason if s.state in (State.FAILED, State.RUNNING) else "")
        parts.append(table)
    return Group(*parts)


def summary_table(result: SweepResult, title: str, short_ids: bool = False) -> Table:
    """The end of ``sweep run``: one row per run (a reason column when some run failed). ``short_ids``:
    MLflow run ids cut to 8 characters, for narrow terminals (``sweep plan --format json`` has them whole)."""
    rows = [(s, *result.final(s)) for s in result.states]
    with_reason = any(reason for _, _, reason in rows)
    n = {state: 0 for state in STATES}
    for _, state, _ in rows:
        n[state] += 1
    table = _table(title, f"{len(rows)} runs: " + ", ".join(f"{n[s]} {s}" for s in STATES),
                   "run", "scheme", "arch", "dataset", "seed", "state", "epochs", "test err", "MLflow run",
                   *(["reason"] if with_reason else []))
    for s, state, reason in rows:
        c = s.config
        table.add_row(s.run_key, c.scheme, c.arch, c.dataset, str(c.seed), state, f"{s.epoch}/{s.total_epochs}",
                      _err(s.test_error), (s.run_id or "-")[:8 if short_ids else None],
                      *([reason] if with_reason else []),
                      style={State.FAILED: "red", State.DONE: "green"}.get(state))
    return table


def wide_console() -> Console:
    """A console; off a terminal (logs, pipes) wide enough that tables keep whole run ids."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))

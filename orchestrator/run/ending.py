"""How a run ended: the one vocabulary, and what follows from each word.

Two words, defined here once and read (never translated) by the worker, the scheduler, reconcile, the
progress views, the sweep's summary and exit code, and the tuner:

- ``End``: how one *attempt* ended. The worker writes it to ``result.json`` (``status``); the scheduler
  adds the three it alone can see (``crashed``, ``stalled``, and ``busy`` for a locked folder).
- ``State``: where a *run* of a sweep stands: done, running, resumable, pending or failed. Reconcile
  derives it from MLflow and the run folder; the scheduler derives it from an attempt's ``End``
  (``End.leaves``), so both speak of a run in one word.

What the scheduler does after an attempt (``End.then``) is the retry policy, in one table below, and
``out_of_retries`` is when failed attempts end a run for good. Failed attempts are counted where each
reader can see them: the run folder's ``result.json`` (``failures``: errors the worker caught, across
sweeps, ``End.counted_in_folder``), the MLflow run's ``adareg.attempts`` tag (its starts, for readers on
other machines) and the scheduler's task (every retried end in this sweep, crashes too); all three are
judged by ``out_of_retries``.
"""

from __future__ import annotations

import enum

# Exit codes. The worker's tell a shell (and ``adareg train``) how its attempt ended; the orchestrator reads
# result.json instead. A sweep exits 0 all done, 1 some run failed for good, 75 the store stayed down,
# 130/143 interrupted; bad input is 2 everywhere.
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_DIVERGED, EXIT_BUSY, EXIT_STORE = 0, 1, 2, 3, 4, 75
EXIT_DISK = 74  # a full or read-only disk ended the attempt (sysexits' EX_IOERR); result.json may be unwritten
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
DEFAULT_RETRIES = 2  # failed attempts retried in a sweep (--retries), from the last checkpoint


class State(enum.StrEnum):
    """Where a run of a sweep stands (``sweep plan`` / ``status`` and the summary of ``sweep run``)."""

    DONE = "done"  # its MLflow run is FINISHED
    RUNNING = "running"  # a live process holds it (here, or elsewhere through its claim)
    RESUMABLE = "resumable"  # an MLflow run or a checkpoint exists: the next attempt resumes it
    PENDING = "pending"  # nothing exists yet
    FAILED = "failed"  # for good: diverged, bad input, or out of attempts


STATES = tuple(State)
TODO = (State.RUNNING, State.RESUMABLE, State.PENDING)  # what ``sweep run`` dispatches (running: once free)


class Then(enum.StrEnum):
    """What the scheduler does once an attempt has ended."""

    DONE = "done"  # the run is finished
    FAIL = "fail"  # for good: retrying would repeat it
    RETRY = "retry"  # counted against the run; again from its checkpoint while attempts are left
    WAIT = "wait"  # not the run's fault: again later, uncounted (held elsewhere, the store down, a full disk)
    KEEP = "keep"  # ended on purpose (a stop request, an interrupt): left resumable, not retried now


class End(enum.StrEnum):
    """How one attempt at a run ended (``result.json``'s ``status``)."""

    STARTED = "started"  # not an end: the attempt is under way (or died without a word)
    FINISHED = "finished"
    ALREADY_FINISHED = "already_finished"  # another process had finished it
    DIVERGED = "diverged"  # a non-finite loss or error
    BAD_INPUT = "bad_input"
    ERROR = "error"  # an exception the worker caught
    CRASHED = "crashed"  # the worker died without writing its end (the scheduler's word)
    STALLED = "stalled"  # no new epoch for the stall timeout: killed by the orchestrator (its word)
    KILLED = "killed"  # a signal interrupted it: resumable
    STOPPED = "stopped"  # a stop request (a pruned trial): resumable
    BUSY = "busy"  # a live process holds the run (its folder lock here, or its claim elsewhere)
    STORE_DOWN = "store_down"  # the tracking store stayed unreachable: resumable
    DISK_FULL = "disk_full"  # a full or read-only disk refused a write (orchestrator.diskfault): resumable
    REFUSED = "refused"  # the tracking server refused this user (HTTP 401/403): bad input, resumable, uncounted

    @property
    def then(self) -> Then:
        """The scheduler's policy for this end, outside a sweep that is stopping (then every attempt that
        did not finish or fail for good is simply left resumable)."""
        return _THEN[self]

    def then_while(self, stopping: bool) -> Then:
        then = self.then
        return Then.KEEP if stopping and then in (Then.RETRY, Then.WAIT) else then

    @property
    def counted_in_folder(self) -> bool:
        """Counted in ``result.json``'s ``failures``, across sweeps. A crash (no end written) is retried and
        counted within the sweep only: most often the orchestrator died with it, not the run's fault."""
        return self is End.ERROR

    @property
    def exit_code(self) -> int:
        """The worker's exit code for this end."""
        return _EXIT.get(self, EXIT_OK)

    @property
    def mlflow_status(self) -> str | None:
        """The status the attempt leaves its MLflow run in (None: the run is not this attempt's to end)."""
        return _MLFLOW.get(self)


_THEN = {
    End.FINISHED: Then.DONE, End.ALREADY_FINISHED: Then.DONE,
    End.DIVERGED: Then.FAIL, End.BAD_INPUT: Then.FAIL,
    End.ERROR: Then.RETRY, End.CRASHED: Then.RETRY, End.STALLED: Then.RETRY, End.STARTED: Then.RETRY,
    End.KILLED: Then.RETRY,  # killed from outside while the sweep goes on: it may be killed again
    End.BUSY: Then.WAIT, End.STORE_DOWN: Then.WAIT, End.DISK_FULL: Then.WAIT,
    End.STOPPED: Then.KEEP,
    End.REFUSED: Then.KEEP,  # the scheduler starts nothing more: every run would be refused (see Scheduler)
}
_EXIT = {End.DIVERGED: EXIT_DIVERGED, End.BAD_INPUT: EXIT_USER, End.ERROR: EXIT_FAILED, End.CRASHED: EXIT_FAILED,
         End.STALLED: EXIT_FAILED, End.STARTED: EXIT_FAILED, End.KILLED: EXIT_SIGTERM, End.BUSY: EXIT_BUSY,
         End.STORE_DOWN: EXIT_STORE, End.DISK_FULL: EXIT_DISK, End.REFUSED: EXIT_USER}
_MLFLOW = {End.FINISHED: "FINISHED", End.DIVERGED: "FAILED", End.ERROR: "FAILED", End.BAD_INPUT: "FAILED",
           End.KILLED: "KILLED", End.STOPPED: "KILLED", End.STORE_DOWN: "KILLED", End.DISK_FULL: "KILLED"}
assert set(_THEN) == set(End), "every End needs a policy"


def out_of_retries(failed_attempts: int, retries: int) -> bool:
    """Whether ``failed_attempts`` exhaust a run's ``1 + retries`` tries (``--retries``)."""
    return failed_attempts >= 1 + retries


def leaves(then: Then) -> State:
    """The state a run is left in once the scheduler has settled an attempt with ``then`` for good."""
    return {Then.DONE: State.DONE, Then.FAIL: State.FAILED}.get(then, State.RESUMABLE)

"""One run, start to end: the body of every sweep worker process, of every trial and of ``adareg train``.

    python -P -m orchestrator.run.worker RUN_DIR/spec.json      (or a pack's spec: orchestrator.run.pack)

The spec is plain JSON (``orchestrator.run.spec``). The worker holds its run folder's lock for its whole
life (the local fast path), claims the run in the tracking store (``orchestrator.store.claims``: what
decides between processes that share only the store), trains, and writes how the attempt ended to
``RUN_DIR/result.json`` (an ``End``): that file, not an exit code or a log line, is what the orchestrator
reads. A checkpoint that cannot be read is moved aside (kept) and the run restarts from epoch 1 in a
fresh MLflow run if the old one holds epochs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from orchestrator.diskfault import disk_fault
from orchestrator.errors import UserError
from orchestrator.run.ending import EXIT_DISK, EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER, End
from orchestrator.run.folder import Attempt
from orchestrator.run.member import Member, Terminated, connect, ignore_signals, lock, prepare, say, unlock
from orchestrator.run.spec import PARENT_PID_ENV, PackSpec, WorkerSpec
from orchestrator.store.client import StoreDown, StoreRefused
from training.callbacks import Callback
from training.config import ConfigError, DataError


def execute(spec: WorkerSpec, callbacks: Sequence[Callback] = ()) -> tuple[Attempt, int]:
    """Run (or resume) one configuration under its folder lock and its claim, mirrored into MLflow: the
    attempt (also written to ``result.json``) and the worker's exit code for it. Bad input is raised
    (after being recorded)."""
    member = lock(spec)
    if member.attempt is None:
        return member.result(), member.exit_code()
    raised: BaseException | None = None
    try:
        _execute(member, callbacks)
    except BaseException as e:
        raised = e
        if disk_fault(e) is None:  # a disk fault (raised before training, say) is an end: disk_full
            raise
    finally:
        attempt = unlock(member, raised)
    return attempt, member.exit_code()


def _execute(member: Member, callbacks: Sequence[Callback]) -> None:
    spec = member.spec
    try:
        store, experiment_id = connect(spec, member.progress.note)
        prepare(member, store, experiment_id)
    except StoreDown as e:
        member.record(End.STORE_DOWN, str(e))
    except StoreRefused as e:  # a 401/403: bad input, nothing counted against the run
        member.record(End.REFUSED, str(e))
    if member.ended is not None:
        return
    from training.loop import Diverged, train  # torch loads here, not when the CLI starts

    try:
        train(member.config, member.callbacks(callbacks), device=spec.device,
              checkpoint_path=member.folder.checkpoint, threads=spec.threads)
    except Diverged as e:
        return member.end(End.DIVERGED, str(e))
    except (KeyboardInterrupt, Terminated) as e:
        ignore_signals()
        return member.interrupted(e)
    except StoreRefused as e:
        return member.end(End.REFUSED, str(e))
    except (ConfigError, DataError, UserError):
        member.logger.finish("FAILED", End.ERROR, traceback.format_exc(limit=1), blocking=False)
        raise
    except Exception as e:
        if not member.ended_early(e):
            member.failed(e)
            raise
        return
    member.end(End.FINISHED)


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that spawned it dies.

    The spawner hands down its pid (``ADAREG_PARENT_PID``): "my parent is pid 1" does not mean "my parent
    died" where the orchestrator itself is pid 1 (a container's entrypoint without an init)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):  # it died before prctl took effect
        raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """``python -P -m orchestrator.run.worker SPEC``: a run's or a pack's spec (a pack's lists members)."""
    from orchestrator.run.pack import execute_pack

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.run.worker RUN_DIR/spec.json", file=sys.stderr)
        return EXIT_USER

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    try:
        die_with_parent()
        data = json.loads(Path(argv[0]).read_text())
        ended = execute_pack(PackSpec(**data)) if "members" in data else [execute(WorkerSpec(**data))]
    except Terminated:
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except (UserError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER
    except Exception as e:
        if (fault := disk_fault(e)) is not None:  # before the attempt was recorded (the lock, result.json)
            with contextlib.suppress(OSError):
                say(f"{End.DISK_FULL}: {fault.describe()}")
            return _quiet_exit(EXIT_DISK)
        traceback.print_exc()
        return EXIT_FAILED
    with contextlib.suppress(OSError):
        for attempt, _ in ended:
            say(f"{attempt.status}: {attempt.message}".rstrip(": "))
    return _quiet_exit(max((code for _, code in ended), default=EXIT_OK))


def _quiet_exit(code: int) -> int:
    """``code``, made sure to be the exit status: Python exits 120 when it cannot flush stdout at exit (a log on
    a full disk), so output that cannot be written is dropped now."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.flush()
        except (OSError, ValueError):
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - lives until exit
    return code


def _exit_now(code: int) -> None:
    """Exit with ``code`` without tearing the interpreter down: the attempt is over and recorded (result.json,
    the MLflow run ended, the folder unlocked), and the worker starts no thread that outlives it. Tearing down
    torch and MLflow's modules took 5-10 s here on a busy machine (measured on 2 loaded cores), so a stopped
    worker outlived `docker stop`'s 10 s, and its container was SIGKILLed (exit 137 instead of 143)."""
    _quiet_exit(code)
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())

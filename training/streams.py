"""Streams: several solo runs of one shape in one process, each on its own CUDA stream.

The third way to train a pack, beside one run per process and one fused model (``training.packed``):
every member is a plain solo run (``training.loop.train``: dense convolutions, its own model,
optimizer, data, checkpoint in the solo format, callbacks) on a thread of its own whose current CUDA
stream is the member's, so the GPU overlaps the members' kernels (no MPS needed); with ``RunConfig.graph``
each member replays its own captured step (``training.graphed``: capture errors are thread-local), which
is what keeps one Python thread per member from being bound by launching kernels. On the CPU the same
code runs the members one after another in the calling thread (``parallel=False``), so every member is,
bit for bit, its solo run; ``parallel=True`` runs the threads on the CPU too (the tests check that it
changes nothing either).

Members need not resume from the same epoch. What a pack's members share is only the process:

- a member that diverges is reported as in a fused pack (its callbacks' ``on_diverged(epoch, message)``
  and ``PackResult.diverged``) and the others train on;
- a member whose callbacks raise ``MemberStopped`` ends there, quietly (its epoch's checkpoint and
  callbacks are done); the others train on;
- any other exception from a member (a callback's, a full disk) ends the pack: every other member stops
  at the end of its current epoch (after its checkpoint and callbacks) and the first exception is
  raised, as from ``train_packed``. An exception raised in the calling thread while it waits (a
  signal's: SIGTERM's ``Terminated``) does the same, so no member's write outlives the call.

Process-wide settings (the run's matmul / convolution precision, ``cudnn.benchmark``) are set once around
all members, who share the precision (a pack shape field).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from training.callbacks import Callback
from training.checkpoint import load_checkpoint
from training.config import RunConfig
from training.core import Diverged
from training.graphed import cudnn_benchmark
from training.loop import TrainResult, precision_mode, train
from training.packed import PackResult, pack_arguments


class MemberStopped(Exception):
    """Raised by a member's callback: this member ends here (after its epoch's checkpoint and callbacks)."""


class _Halted(Exception):
    """Another member ended the pack: this one stops at the end of its epoch."""


class _Halt(Callback):
    """Last of a member's callbacks: stops the member once the pack is ending."""

    def __init__(self, halt: threading.Event):
        self.halt = halt

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.halt.is_set():
            raise _Halted()


def train_streams(configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]] | None = None, *,
                  device: str | torch.device = "cpu", checkpoint_paths: Sequence[str | Path | None] | None = None,
                  threads: int | None = None, background_writes: bool | None = None,
                  parallel: bool | None = None) -> PackResult:
    """Train ``configs`` (one shape, see ``SHAPE_FIELDS``) as solo runs in this process, each on its own CUDA
    stream (see the module). ``callbacks`` and ``checkpoint_paths`` as for ``train_packed``; ``parallel``
    (None: on CUDA) runs the members on threads at once, else one after another."""
    configs, callbacks, paths = pack_arguments(configs, callbacks, checkpoint_paths)
    n = len(configs)
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if parallel is None:
        parallel = device.type == "cuda"
    halt = threading.Event()
    results: list[TrainResult | None] = [None] * n
    diverged: dict[int, str] = {}
    errors: list[BaseException] = []

    def member(i: int) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                results[i] = train(configs[i], [*callbacks[i], _Halt(halt)], device=device,
                                   checkpoint_path=paths[i], background_writes=background_writes)
            except Diverged as e:
                diverged[i] = str(e)
                for cb in callbacks[i]:
                    cb.on_diverged(e.epoch, str(e))
            except (MemberStopped, _Halted):
                pass
            except BaseException as e:  # noqa: BLE001 - ends the pack: raised by the caller below
                errors.append(e)
                halt.set()

    with precision_mode(configs[0].precision, device), cudnn_benchmark(configs[0].graph and device.type == "cuda"):
        if not parallel:
            for i in range(n):
                member(i)
                if errors:
                    break
        else:
            workers = [threading.Thread(target=member, args=(i,), name=f"adareg-stream-{i}") for i in range(n)]
            for w in workers:
                w.start()
            interrupted: BaseException | None = None
            for w in workers:
                while w.is_alive():
                    try:
                        w.join()
                    except BaseException as e:  # noqa: BLE001 - a signal: stop every member, then raise it
                        interrupted = interrupted or e
                        halt.set()
            if interrupted is not None:
                raise interrupted
    if errors:
        raise errors[0]
    members = []
    for config, path, result in zip(configs, paths, results):
        if result is None:  # diverged or stopped: what its checkpoint holds
            state = load_checkpoint(path) if path else None
            history = list(state["history"]) if state is not None else []
            result = TrainResult(config=config, history=history, resumed_from=0, model=None)
        members.append(result)
    return PackResult(members=members, diverged=diverged)

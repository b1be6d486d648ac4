"""Bookkeeping off the critical path: one bulk copy of the state per epoch, and the ends of epochs
(checkpoint writes, then callbacks such as MLflow logging) on a background thread, in order.

``host_copy`` brings a list of device tensors to the host in ONE transfer per dtype (the tensors are
flattened and concatenated on the device, copied once, then sliced on the host) instead of one small
device-to-host copy per tensor. ``host_state`` is a solo run's model and optimizer state dicts made of
such fresh host tensors: nothing training does afterwards changes them, so they can be written while
the next epoch trains.

``BackgroundEpochWriter`` runs what ``training.core.RunRecord`` submits (epoch k's checkpoint, then epoch
k's callbacks, then epoch k+1's, ...) on one thread, in the order submitted, so every guarantee of the
synchronous ``training.core.EpochWriter`` holds unchanged: a checkpoint is written atomically and before
its epoch's callbacks hear of the epoch, each epoch is told once. The trainers call ``check()`` once an
epoch is trained, before they evaluate it and submit its end: it waits for the previous epoch's writes
(which ran while this epoch trained) and raises what they raised, before this epoch can raise anything
of its own (a divergence), so the exception a run ends with is the one it ended with in line. After a
submitted function raises, the writer runs nothing more, so:

- a callback that stops the run at epoch k (a stop request, a pruned trial, a store error) leaves the
  same state as with the synchronous writer: epoch k's checkpoint, metrics up to epoch k, nothing of
  epoch k+1. The exception reaches the trainer one epoch later (epoch k+1 is trained, then dropped),
  and propagates from it as before; a resume continues from epoch k as it would have.
- a checkpoint write that fails (a full disk) raises from the trainer the same way; that epoch's callbacks
  never hear of it, as before.

``close()`` waits for everything submitted (also when training ends on an exception: the epochs whose
checkpoints are written are still told), and a signal raising in the waiting thread (SIGTERM's
``Terminated``) is re-raised only once the writer has finished, so no write outlives ``close``.

Which writer a trainer uses (``epoch_writer``): the background one on CUDA, where epochs take seconds
and a synchronous checkpoint and MLflow round trip is a sizeable share of them; the synchronous one on
the CPU, where epochs take minutes and the kill tests (SIGKILL / SIGTERM mid-run) pin today's path.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from training.core import EpochWriter


def host_copy(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``tensors`` copied to the host (CPU, contiguous, same dtypes and values; None stays None), in one
    transfer per dtype. The copies share one host buffer per dtype: clone a part that is kept alone."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault(t.dtype, []).append(i)
    with torch.no_grad():
        for indices in groups.values():
            parts = [tensors[i].detach().reshape(-1) for i in indices]
            flat = torch.cat(parts).to("cpu") if len(parts) > 1 else parts[0].to("cpu", copy=True)
            for i, piece in zip(indices, flat.split([p.numel() for p in parts])):
                out[i] = piece.view(tensors[i].shape)
    return out


def optimizer_state(opt, momentum: Sequence[torch.Tensor | None]) -> dict[str, Any]:
    """A ``SparseSGD.state_dict()`` with ``momentum`` (one per parameter, None where it has none) as its
    buffers, in a structure of its own (nothing in it is shared with ``opt``)."""
    sgd = opt.optimizer
    groups = copy.deepcopy(sgd.state_dict()["param_groups"])
    state = {j: {"momentum_buffer": buf} for j, buf in enumerate(momentum) if buf is not None}
    return {"optimizer": {"state": state, "param_groups": groups}, "weight_decay": opt.weight_decay}


def host_state(model: torch.nn.Module, opt) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A solo run's checkpointed state (model state dict, ``SparseSGD`` state dict) as host tensors of its
    own, in one bulk copy: what ``model.state_dict(), opt.state_dict()`` hold now, kept as it is."""
    model_state = model.state_dict()
    buffers = [opt.optimizer.state.get(p, {}).get("momentum_buffer") for p in opt.params]
    copied = host_copy([*model_state.values(), *buffers])
    model_host = dict(zip(model_state.keys(), copied[:len(model_state)]))
    return model_host, optimizer_state(opt, copied[len(model_state):])


class BackgroundEpochWriter(EpochWriter):
    """Runs the ends of epochs on one background thread, in the order submitted (see the module)."""

    background = True

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._run, name="adareg-epoch-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        with self._done:
            self._pending += 1
        self._queue.put(fn)

    def check(self) -> None:
        """Wait for everything submitted so far; raise what it raised (once)."""
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        self._raise()

    def close(self) -> None:
        """Wait for everything submitted and end the thread. Raises nothing of the writer's own (``check``
        does); an exception raised in this thread meanwhile (a signal) is raised once the thread has ended."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        interrupted: BaseException | None = None
        while self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException as e:  # noqa: BLE001 - a signal: finish writing first, then raise it
                interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            if self._error is None:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - handed to the training thread by check()
                    self._error = e
            with self._done:
                self._pending -= 1
                self._done.notify_all()


def epoch_writer(device: torch.device, background: bool | None = None) -> EpochWriter:
    """The writer of a trainer on ``device``: in the background on CUDA (``background=None``), else as
    ``background`` says (True: ``BackgroundEpochWriter``; False: the synchronous ``EpochWriter``)."""
    if background is None:
        background = device.type == "cuda"
    return BackgroundEpochWriter() if background else EpochWriter()

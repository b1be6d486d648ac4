"""What one run's epoch is, for the solo trainer (``training.loop``) and every member of a pack
(``training.packed``) alike: the seeded init, the mask redraw, the metrics dict, the checkpoint payload,
the restore, and the order in which an epoch's end is made durable and told.

A change to what a run logs or saves is made here, once. The trainers own only how the numbers are
computed (one model, or N fused into one).

The end of an epoch (``RunRecord.end_epoch``): the metrics join the history, the checkpoint of the
epoch is written atomically, and only then do the run's callbacks hear of it. Both happen on an
``EpochWriter``, in epoch order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from training.callbacks import DIAGNOSTICS, Callback, eval_names, taper_metrics
from training.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from training.config import RunConfig
from training.models import build_model
from training.regularizers import draw_masks, mask_seed
from training.schedules import EpochPlan, plan_for


class Diverged(RuntimeError):
    """A loss or error became non-finite: ``metric`` (e.g. ``test_loss``) is ``value`` at ``epoch``."""

    def __init__(self, epoch: int, value: float, metric: str = "train_loss"):
        super().__init__(f"diverged at epoch {epoch}: {metric.replace('_', ' ')} is {value}")
        self.epoch = epoch
        self.metric = metric
        self.value = value


def epoch_seed(run_seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order and augmentation."""
    return (run_seed * 1_000_033 + epoch * 104_729 + 3) % (2**63 - 1)


_GLOBAL_RNG = threading.Lock()  # runs on threads of one process (training.streams) seed it one at a time


def seeded_model(config: RunConfig) -> torch.nn.Module:
    """The run's model as initialised from its seed (on the CPU; the global RNG is left as it was)."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.arch, config.num_classes, config.image.channels)


def divergence(epoch: int, values: Sequence[tuple[str, float]]) -> Diverged | None:
    """``Diverged`` for the first of ``(name, value)`` that is not finite, else None."""
    for name, value in values:
        if not math.isfinite(value):
            return Diverged(epoch, value, name)
    return None


class RunRecord:
    """One run's bookkeeping across epochs: plan, history, masks (CPU), checkpoint and callbacks."""

    def __init__(self, config: RunConfig, callbacks: Sequence[Callback] = (),
                 checkpoint_path: str | Path | None = None):
        self.config, self.callbacks, self.checkpoint_path = config, list(callbacks), checkpoint_path
        self.plan: list[EpochPlan] = plan_for(config)
        self.eval_loss_name, self.eval_error_name = eval_names(config)
        self.history: list[dict[str, float]] = []
        self.masks: list[torch.Tensor] | None = None  # the current masks, on the CPU (checkpointed as they are)

    @property
    def start(self) -> int:
        """Epochs already trained (restored from the checkpoint)."""
        return len(self.history)

    def restore(self, model: torch.nn.Module, opt) -> bool:
        """Load the checkpoint, if any, into ``model`` and ``opt`` (a ``SparseSGD``) and the history and
        masks into this record. ``CheckpointError`` naming the file for one that cannot be resumed from
        (also one of another configuration); False when there is none."""
        if not self.checkpoint_path:
            return False
        state = load_checkpoint(self.checkpoint_path, identity=self.config.identity_dict())
        if state is None:
            return False
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.masks = list(state["masks"]) or None
        return True

    def on_start(self) -> None:
        for cb in self.callbacks:
            cb.on_start(self.config, self.plan, self.history)

    def new_masks(self, epoch: int, params: Sequence[torch.Tensor]) -> bool:
        """At the first epoch of a new sparsity level, draw that level's masks for ``params`` (shapes only
        count) into ``self.masks`` (None when dense) and say True; False when the level is unchanged."""
        sparsity = self.plan[epoch - 1].grad_sparsity
        previous = self.plan[epoch - 2].grad_sparsity if epoch > 1 else 0.0
        if sparsity == previous:
            return False
        cpu = [torch.empty(p.shape, dtype=p.dtype) for p in params]
        self.masks = draw_masks(cpu, sparsity, mask_seed(self.config.seed, epoch))
        return True

    def metrics(self, epoch: int, *, train_loss: float, train_error: float, eval_loss: float, eval_error: float,
                updated_fraction: float, epoch_seconds: float, images_per_second: float,
                diagnostics: dict[str, float]) -> dict[str, float]:
        """The epoch's metrics, in the order of ``training.callbacks.metric_names(config)``; ``diagnostics``
        are ``training.diagnostics``' of the epoch."""
        step = self.plan[epoch - 1]
        tapered = {name: float(getattr(step, name)) for name in taper_metrics(self.config)}
        return {
            "train_loss": train_loss,
            "train_error": train_error,
            self.eval_loss_name: eval_loss,
            self.eval_error_name: eval_error,
            "lr": step.lr,
            "weight_decay": step.weight_decay,
            "grad_sparsity": step.grad_sparsity,
            "updated_fraction": updated_fraction,
            "epoch_seconds": epoch_seconds,
            "images_per_second": images_per_second,
            **{name: diagnostics[name] for name in DIAGNOSTICS},
            **tapered,
        }

    def payload(self, epoch: int, model_state: dict[str, Any], optimizer_state: dict[str, Any],
                masks: list[torch.Tensor] | None, history: list[dict[str, float]]) -> dict[str, Any]:
        """The checkpoint of ``epoch`` (``training.checkpoint``'s layout)."""
        return {
            "version": CHECKPOINT_VERSION,
            "identity": self.config.identity_dict(),
            "epoch": epoch,
            "model": model_state,
            "optimizer": optimizer_state,
            "masks": list(masks) if masks is not None else [],
            "history": history,
        }

    def save(self, writer: EpochWriter, epoch: int, metrics: dict[str, float],
             state: Callable[[], tuple[dict[str, Any], dict[str, Any]]] | None) -> None:
        """Record ``metrics`` as epoch ``epoch``'s and, on ``writer``, write its checkpoint (if the run has a
        checkpoint path): ``state()`` gives the model and optimizer state dicts; it is called on the writer's
        thread and must not read state that training goes on changing."""
        self.history.append({"epoch": float(epoch), **metrics})
        if not self.checkpoint_path or state is None:
            return
        history, masks = list(self.history), self.masks

        def write() -> None:
            model_state, optimizer_state = state()
            save_checkpoint(self.checkpoint_path, self.payload(epoch, model_state, optimizer_state, masks, history))

        writer.submit(write)

    def tell(self, writer: EpochWriter, epoch: int, metrics: dict[str, float]) -> None:
        """On ``writer`` (so after the checkpoint): the callbacks hear of epoch ``epoch``."""
        def tell() -> None:
            for cb in self.callbacks:
                cb.on_epoch_end(epoch, metrics)

        writer.submit(tell)

    def diverged(self, writer: EpochWriter, epoch: int, message: str) -> None:
        """On ``writer``: a packed run's callbacks hear that it diverged at ``epoch`` (and left its pack)."""
        def tell() -> None:
            for cb in self.callbacks:
                cb.on_diverged(epoch, message)

        writer.submit(tell)

    def end_epoch(self, writer: EpochWriter, epoch: int, metrics: dict[str, float],
                  state: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """A solo run's end of an epoch: ``save`` then ``tell``."""
        self.save(writer, epoch, metrics, state)
        self.tell(writer, epoch, metrics)


class EpochWriter:
    """Runs the ends of epochs (checkpoint writes, then callbacks) in order. This one runs each at once,
    on the calling thread."""

    def submit(self, fn: Callable[[], None]) -> None:
        fn()

    def check(self) -> None:
        """Raise what a submitted end of epoch raised (nothing to do here: it raised in ``submit``)."""

    def close(self) -> None:
        """Wait for everything submitted."""

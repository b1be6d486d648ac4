"""What a run reports, and the hooks that receive it (no torch: cheap to import)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.schedules import EpochPlan

STAGES = ("stem", "stage1", "stage2", "stage3")
"""The parts of a CIFAR ResNet whose convolutions (each followed by BatchNorm) the diagnostics read: the
first convolution and the three stages of 16, 32 and 64 channels (``training.models``)."""

DIAGNOSTICS = (
    *(f"weight_norm_{s}" for s in STAGES), "weight_norm_fc",
    *(f"effective_lr_{s}" for s in STAGES),
    "decay_epochs",
)
"""Per-epoch diagnostics of what the regularizers do (``training.diagnostics``), after the epoch's last step:
``weight_norm_<stage>`` the L2 norm of the stage's convolution weights (``_fc`` the classifier's weight),
``effective_lr_<stage>`` the mean over the stage's convolutions of lr / ||w||^2 (the step of a weight that
BatchNorm makes scale-invariant), ``decay_epochs`` the weight-decay timescale in epochs (``NO_DECAY``
without decay)."""

NO_DECAY = sys.float_info.max
"""``decay_epochs`` of an epoch without weight decay: the infinite timescale as a finite number (the largest
float, which is also what MLflow stores for +inf), so that the metric has a value every epoch."""

METRICS = (
    "train_loss", "train_error", "test_loss", "test_error", "lr", "weight_decay", "grad_sparsity",
    "updated_fraction", "epoch_seconds", "images_per_second", *DIAGNOSTICS,
)
"""Per-epoch metrics of a run without a validation split, in this order; errors are fractions."""

VALIDATION_NAMES = {"test_loss": "val_loss", "test_error": "val_error"}

TAPER_METRICS = {"dropout": "dropout", "label_smoothing": "label_smoothing", "batch_size": "batch_sizes"}
"""Metrics a run reports after ``METRICS`` when it tapers them (metric name -> RunConfig field): the value in
force that epoch."""


def taper_metrics(config: RunConfig) -> tuple[str, ...]:
    """The ``TAPER_METRICS`` ``config``'s run reports (those whose field it sets)."""
    return tuple(name for name, field in TAPER_METRICS.items() if getattr(config, field) is not None)


def eval_names(config: RunConfig) -> tuple[str, str]:
    """The names of the evaluated loss and error: ``test_loss`` / ``test_error``, or with a validation split
    (which is then what is evaluated; the test split is never loaded) ``val_loss`` / ``val_error``."""
    names = ("test_loss", "test_error")
    return (VALIDATION_NAMES[names[0]], VALIDATION_NAMES[names[1]]) if config.validation else names


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """The per-epoch metrics ``config``'s run reports, in order: ``METRICS``, or with a validation split
    the same with ``val_loss`` / ``val_error`` in place of ``test_loss`` / ``test_error``; then the
    ``taper_metrics`` of a run that tapers dropout, label smoothing or the batch size."""
    names = METRICS if not config.validation else tuple(VALIDATION_NAMES.get(m, m) for m in METRICS)
    return names + taper_metrics(config)


class Callback:
    """Hooks of a run; override what you need. Exceptions propagate (e.g. to prune a trial)."""

    def on_start(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        """Before the first epoch to train; ``history`` holds the epochs restored from a checkpoint."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` is trained, evaluated and (if checkpointing) durable on disk."""

    def on_diverged(self, epoch: int, message: str) -> None:
        """A packed run (``training.packed``) diverged at ``epoch`` and left its pack; a solo run raises
        ``training.loop.Diverged`` instead."""


def history_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """Every metric of a history entry (all its keys but ``epoch``)."""
    return {k: float(v) for k, v in entry.items() if k != "epoch"}

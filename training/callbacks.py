"""What a run reports, and the hooks that receive it (no torch: cheap to import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.schedules import EpochPlan

METRICS = (
    "train_loss", "train_error", "test_loss", "test_error", "lr", "weight_decay", "grad_sparsity",
    "updated_fraction", "epoch_seconds", "images_per_second",
)
"""Per-epoch metrics, in this order; errors are fractions."""


class Callback:
    """Hooks of a run; override what you need. Exceptions propagate (e.g. to prune a trial)."""

    def on_start(self, config: RunConfig, plan: Sequence[EpochPlan], history: list[dict[str, float]]) -> None:
        """Before the first epoch to train; ``history`` holds the epochs restored from a checkpoint."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` is trained, evaluated and (if checkpointing) durable on disk."""


def history_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The metrics of a history entry (without its epoch)."""
    return {k: float(entry[k]) for k in METRICS}

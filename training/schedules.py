"""Schedules: pure functions of the epoch (no torch).

A run is a sequence of phases (warm-restart cycles); each phase is a sequence of learning-rate
steps; each step lasts ``max(1, round(n x scale))`` epochs (round half up). Durations are converted
once, here; everything else reads the resulting per-epoch plan. Epochs count from 1.

A phase is a cycle of the learning-rate family (``training.tapers``: the step grid, or cosine with warm
restarts, either after a linear warm-up); the plan carries the rate in force at each epoch and every
regularizer's value there (dropout, label smoothing and the batch size too, for runs that taper them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from training.config import RunConfig
from training.tapers import epoch_lrs, scaled_epochs

__all__ = ["EpochPlan", "scaled_epochs", "build_plan", "plan_for", "total_epochs", "phase_bounds"]


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with."""

    epoch: int  # from 1
    phase: int  # from 1
    step: int  # from 1, within the phase
    lr: float
    weight_decay: float
    grad_sparsity: float
    dropout: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 0  # 0 in a plan built from grids alone (``build_plan``): the run's batch_size


def build_plan(lr: Sequence[Sequence[float]], weight_decay: Sequence[Sequence[float]],
               grad_sparsity: Sequence[Sequence[float]], epochs_per_step: Sequence[int],
               epochs_scale: float = 1.0) -> tuple[EpochPlan, ...]:
    """The per-epoch plan of ``phases x steps`` grids."""
    plan: list[EpochPlan] = []
    for p, n in enumerate(epochs_per_step):
        length = scaled_epochs(n, epochs_scale)
        for s in range(len(lr[p])):
            for _ in range(length):
                plan.append(EpochPlan(len(plan) + 1, p + 1, s + 1, lr[p][s], weight_decay[p][s], grad_sparsity[p][s]))
    return tuple(plan)


def plan_for(config: RunConfig) -> tuple[EpochPlan, ...]:
    """The per-epoch plan of a run: its learning-rate family's rate and every regularizer's value per epoch."""
    lrs = epoch_lrs(config.lr, config.epochs_per_step, config.epochs_scale, config.lr_family, config.lr_min,
                    config.warmup_epochs)
    per_epoch = dict(config.per_epoch)

    def values(name: str, grid, default: float) -> list[float]:
        if name in per_epoch:
            return list(per_epoch[name])
        if grid is None:
            return [default] * len(lrs)
        return [grid[p - 1][s - 1] for p, s, _ in lrs]

    wd = values("weight_decay", config.weight_decay, 0.0)
    sparsity = values("grad_sparsity", config.grad_sparsity, 0.0)
    dropout = values("dropout", config.dropout, 0.0)
    smoothing = values("label_smoothing", config.label_smoothing, 0.0)
    batch = values("batch_sizes", config.batch_sizes, config.batch_size)
    return tuple(EpochPlan(e, p, s, rate, wd[e - 1], sparsity[e - 1], dropout[e - 1], smoothing[e - 1],
                           int(batch[e - 1]))
                 for e, (p, s, rate) in enumerate(lrs, start=1))


def total_epochs(config: RunConfig) -> int:
    """``len(plan_for(config))``, without building the plan."""
    return sum(scaled_epochs(n, config.epochs_scale) * len(config.lr[p]) for p, n in enumerate(config.epochs_per_step))


def phase_bounds(plan: Sequence[EpochPlan]) -> dict[int, tuple[int, int]]:
    """``{phase: (first_epoch, last_epoch)}`` of a plan."""
    bounds: dict[int, tuple[int, int]] = {}
    for e in plan:
        first, _ = bounds.get(e.phase, (e.epoch, e.epoch))
        bounds[e.phase] = (first, e.epoch)
    return bounds

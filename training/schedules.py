"""Schedules: pure functions of the epoch (no torch).

A run is a sequence of phases (warm-restart cycles); each phase is a sequence of learning-rate
steps; each step lasts ``max(1, round(n x scale))`` epochs (round half up). Durations are converted
once, here; everything else reads the resulting per-epoch plan. Epochs count from 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from training.config import RunConfig


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains with."""

    epoch: int  # from 1
    phase: int  # from 1
    step: int  # from 1, within the phase
    lr: float
    weight_decay: float
    grad_sparsity: float


def scaled_epochs(n: int, scale: float) -> int:
    """Epochs of a step of nominal length ``n`` at ``scale``: max(1, round half up(n x scale))."""
    return max(1, int(math.floor(n * scale + 0.5 + 1e-9)))


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
    """The per-epoch plan of a run."""
    return build_plan(config.lr, config.weight_decay, config.grad_sparsity, config.epochs_per_step,
                      config.epochs_scale)


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

"""Learning-rate families and tapers as functions of the realised learning rate (pure; no torch).

The paper's rule is "dial the explicit regularizer up as the learning rate goes down". This module
says it once for any schedule and any regularizer:

- **Learning-rate families** (``lr_family``): ``step`` (today's grid: phase p, step s has ``lr[p][s]``
  for its epochs) and ``cosine`` (SGDR, Loshchilov & Hutter: each phase is a cycle annealed from its
  peak ``lr[p][0]`` to ``lr_min``, ``lr = min + (peak - min) (1 + cos(pi t / T)) / 2`` at the cycle's
  t-th epoch (t from 0) of T, restarted at the next cycle). Either family may start with a linear
  warm-up over the run's first W epochs (``warmup_epochs``, scaled like a step): epoch e <= W trains
  at ``e / W`` x its planned rate.
- **Tapers**: a regularizer's value is a grid (``phases x steps``, today's form), or a function of
  the learning rate in force at each epoch:
  ``{"taper": "power", "ref": r, "ref_lr": l, "alpha": a, "min": m, "max": M}`` gives
  ``clip(r x (lr / l) ^ -a, m, M)`` (alpha 0: a constant; alpha 1: lr x value fixed; ``ref_lr``
  defaults to the run's peak rate), and ``{"taper": "table", "values": {lr: value, ...}}`` gives the
  value listed for the smallest listed rate >= the one in force: a value holds from its rate down to the
  next listed one (a rate in force above every listed one is an error).
  Either may be limited to some cycles (``"cycles": [1]``; ``"otherwise"`` elsewhere, default 0).

``training.config.RunConfig`` resolves a taper to one value per epoch here; values that are constant
within every step become the grid (so a taper that means today's grid IS today's grid, key and all),
the others are kept per epoch (``RunConfig.per_epoch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

LR_FAMILIES = ("step", "cosine")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
TAPER_KINDS = ("power", "table")
TAPERED = ("weight_decay", "grad_sparsity", "dropout", "label_smoothing", "batch_sizes")
"""The RunConfig fields that may be given as a taper (a grid, or a function of the learning rate)."""
_KEYS = {"power": ("taper", "ref", "ref_lr", "alpha", "min", "max", "cycles", "otherwise"),
         "table": ("taper", "values", "cycles", "otherwise")}
LR_KEYS = ("family", "values", "max", "min", "steps", "warmup")


class TaperError(ValueError):
    """A bad taper or learning-rate value; ``field`` names it (``training.config`` turns it into a
    ``ConfigError``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def scaled_epochs(n: int, scale: float) -> int:
    """Epochs of a step of nominal length ``n`` at ``scale``: max(1, round half up(n x scale))."""
    return max(1, int(math.floor(n * scale + 0.5 + 1e-9)))


def number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TaperError(where, f"expected a finite number, got {value!r}")
    return float(value)


# --- learning rate ------------------------------------------------------------------------------------

def epoch_lrs(lr: Sequence[Sequence[float]], epochs_per_step: Sequence[int], epochs_scale: float,
              family: str = "step", lr_min: float = 0.0, warmup_epochs: int = 0) -> list[tuple[int, int, float]]:
    """``(phase, step, lr)`` of every epoch (phases and steps from 1)."""
    out: list[tuple[int, int, float]] = []
    for p, n in enumerate(epochs_per_step):
        length = scaled_epochs(n, epochs_scale)
        cycle = length * len(lr[p])
        for s in range(len(lr[p])):
            for k in range(length):
                if family == "cosine":
                    t = s * length + k
                    rate = lr_min + (lr[p][0] - lr_min) * (1.0 + math.cos(math.pi * t / cycle)) / 2.0
                else:
                    rate = lr[p][s]
                out.append((p + 1, s + 1, rate))
    warm = warmup_length(warmup_epochs, epochs_scale)
    for e in range(min(warm, len(out))):
        p, s, rate = out[e]
        out[e] = (p, s, rate * (e + 1) / warm)
    return out


def warmup_length(warmup_epochs: int, epochs_scale: float) -> int:
    """Epochs of the warm-up as trained (0 stays 0; otherwise scaled like a step)."""
    return scaled_epochs(warmup_epochs, epochs_scale) if warmup_epochs else 0


def lr_spec(spec: Mapping[str, Any], phases: int) -> dict[str, Any]:
    """A sweep-style learning-rate mapping (``{family, values | max, min, steps, warmup}``) as RunConfig
    fields (``lr``, ``lr_family``, ``lr_min``, ``warmup_epochs``). A cosine cycle spans ``steps`` (default 1)
    steps of its phase, ``steps x epochs_per_step`` epochs: ``steps`` equal to a step grid's makes a cosine
    run as long as the grid's, phase for phase, and lets per-step tapers apply within a cycle."""
    for key in spec:
        if key not in LR_KEYS:
            raise TaperError(f"lr.{key}", f"unknown key (expected {', '.join(LR_KEYS)})")
    family = spec.get("family", "step")
    if family not in LR_FAMILIES:
        raise TaperError("lr.family", f"unknown family {family!r} (expected one of {', '.join(LR_FAMILIES)})")
    warmup = spec.get("warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise TaperError("lr.warmup", f"must be a whole number of epochs >= 0, got {warmup!r}")
    out: dict[str, Any] = {"lr_family": family, "warmup_epochs": warmup}
    if family == "step":
        for key in ("max", "min"):
            if key in spec:
                raise TaperError(f"lr.{key}", "only the cosine family has it (step: give values)")
        if "steps" in spec:
            raise TaperError("lr.steps", "only the cosine family has it (step: one value per step)")
        if "values" not in spec:
            raise TaperError("lr.values", "required for the step family (one rate per step)")
        out["lr"], out["lr_min"] = spec["values"], 0.0
        return out
    if "values" in spec:
        raise TaperError("lr.values", "the cosine family takes max and min, not values")
    if "max" not in spec:
        raise TaperError("lr.max", "required for the cosine family (the peak of every cycle)")
    peak = spec["max"]
    if isinstance(peak, (list, tuple)):
        if len(peak) != phases:
            raise TaperError("lr.max", f"has {len(peak)} values, the schedule has {phases} cycles")
        peaks = [number(v, f"lr.max[{p}]") for p, v in enumerate(peak)]
    else:
        peaks = [number(peak, "lr.max")] * phases
    for p, v in enumerate(peaks):
        if v <= 0:
            raise TaperError("lr.max" if not isinstance(peak, (list, tuple)) else f"lr.max[{p}]",
                             f"must be > 0, got {v:g}")
    low = number(spec.get("min", 0.0), "lr.min")
    if low < 0:
        raise TaperError("lr.min", f"must be >= 0, got {low:g}")
    if any(low > v for v in peaks):
        raise TaperError("lr.min", f"must not exceed the peak ({min(peaks):g}), got {low:g}")
    steps = spec.get("steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TaperError("lr.steps", f"must be a whole number >= 1, got {steps!r}")
    out["lr"], out["lr_min"] = [[v] * steps for v in peaks], low  # a cycle: steps x epochs_per_step epochs
    return out


# --- tapers -------------------------------------------------------------------------------------------

def is_taper(value: Any) -> bool:
    """A mapping (a function of the learning rate) rather than a grid."""
    return isinstance(value, Mapping)


def resolve(name: str, spec: Mapping[str, Any], lrs: Sequence[tuple[int, int, float]],
            peak_lr: float) -> list[float]:
    """The value of taper ``spec`` (field ``name``) at every epoch of ``lrs`` (``epoch_lrs``)."""
    kind = spec.get("taper")
    if kind not in TAPER_KINDS:
        raise TaperError(f"{name}.taper", f"unknown taper {kind!r} (expected one of {', '.join(TAPER_KINDS)})")
    for key in spec:
        if key not in _KEYS[kind]:
            raise TaperError(f"{name}.{key}", f"unknown key of a {kind} taper (expected {', '.join(_KEYS[kind])})")
    cycles = spec.get("cycles")
    if cycles is not None:
        if not isinstance(cycles, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cycles):
            raise TaperError(f"{name}.cycles", f"expected a list of cycle numbers (from 1), got {cycles!r}")
        cycles = set(cycles)
    otherwise = number(spec.get("otherwise", 0.0), f"{name}.otherwise")
    if kind == "power":
        if "ref" not in spec:
            raise TaperError(f"{name}.ref", "required (the value at ref_lr)")
        ref = number(spec["ref"], f"{name}.ref")
        ref_lr = number(spec.get("ref_lr", peak_lr), f"{name}.ref_lr")
        if ref_lr <= 0:
            raise TaperError(f"{name}.ref_lr", f"must be > 0, got {ref_lr:g}")
        alpha = number(spec.get("alpha", 0.0), f"{name}.alpha")
        low = number(spec.get("min", -math.inf), f"{name}.min") if "min" in spec else -math.inf
        high = number(spec.get("max", math.inf), f"{name}.max") if "max" in spec else math.inf
        if low > high:
            raise TaperError(f"{name}.max", f"must be >= min ({low:g}), got {high:g}")

        def value(rate: float, epoch: int) -> float:
            v = ref if alpha == 0 else ref * (rate / ref_lr) ** -alpha
            return min(max(v, low), high)
    else:
        table = _table(name, spec.get("values"))

        def value(rate: float, epoch: int) -> float:
            for key, v in reversed(table):  # smallest listed rate first
                if key >= rate * (1 - 1e-9):
                    return v
            raise TaperError(f"{name}.values", f"no value for lr {rate:g}, which is in force at epoch "
                                               f"{epoch}: the table's largest lr is {table[0][0]:g}")
    out = []
    for epoch, (phase, _, rate) in enumerate(lrs, start=1):
        out.append(canonical(otherwise if cycles is not None and phase not in cycles else value(rate, epoch)))
    return out


def canonical(v: float) -> float:
    """``v`` to 12 significant digits: two spellings of one value (``1e-4 x (lr / 0.1) ^ -1`` and
    ``1e-3 x (lr / 0.01) ^ -1``) give one float, and so one run key."""
    return float(f"{v:.12g}")


def _table(name: str, values: Any) -> list[tuple[float, float]]:
    if isinstance(values, Mapping):
        items = list(values.items())
    elif isinstance(values, (list, tuple)) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in values):
        items = [tuple(v) for v in values]
    else:
        raise TaperError(f"{name}.values", f"expected a mapping from learning rate to value, got {values!r}")
    if not items:
        raise TaperError(f"{name}.values", "is empty")
    table = []
    for k, v in items:
        rate = float(k) if isinstance(k, str) and _is_float(k) else k
        rate = number(rate, f"{name}.values")
        if rate <= 0:
            raise TaperError(f"{name}.values", f"learning rates must be > 0, got {rate:g}")
        table.append((rate, number(v, f"{name}.values[{k}]")))
    return sorted(table, reverse=True)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fold(values: Sequence[float], lrs: Sequence[tuple[int, int, float]],
         steps: Sequence[int]) -> tuple[tuple[tuple[float, ...], ...], bool]:
    """The ``phases x steps`` grid of per-epoch ``values`` (each step's first epoch) and whether that grid
    says all of them (constant within every step)."""
    grid: list[list[float]] = [[math.nan] * n for n in steps]
    exact = True
    for (p, s, _), v in zip(lrs, values):
        cell = grid[p - 1][s - 1]
        if math.isnan(cell):
            grid[p - 1][s - 1] = v
        elif cell != v:
            exact = False
    return tuple(tuple(row) for row in grid), exact

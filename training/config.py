"""The run configuration: one frozen, validated dataclass that says everything about a run.

Every taper is stored as a grid ``phases x steps``: phase p (a warm-restart cycle) has
``len(lr[p])`` learning-rate steps, each lasting ``epochs_per_step[p]`` epochs before scaling.
Callers may pass a scalar (same value everywhere), a list of per-step values (same in every
phase) or a list of per-phase lists; construction normalises all three to tuples of tuples.

Learning-rate families (cosine with warm restarts, linear warm-up) and tapers given as functions of the
learning rate (``training.tapers``) are resolved here, at construction, to one value per epoch: values
constant within every step become the grid fields themselves, the rest are kept in ``per_epoch``. So two
spellings of one schedule are one config (and one run key), and one that says today's grid is today's.

Fields whose ``metadata["identity"]`` is False (labels, paths, evaluation batch size) do not change
the result; the orchestrator leaves them out of the run key. Fields marked ``"if_set"`` (added after
runs were logged) count only when they differ from their default, so adding them changed no key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.tapers import (
    LR_FAMILIES,
    TAPERED,
    WEIGHT_DECAY_MODES,
    TaperError,
    epoch_lrs,
    fold,
    is_taper,
    lr_spec,
    resolve,
    warmup_length,
)

ARCH_PATTERN = re.compile(r"^resnet(\d+)$")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class ImageSpec:
    """What a dataset's images are: classes, channels, side length, and whether a mirror image is the same class."""

    classes: int
    channels: int
    size: int
    flip: bool


DATASET_SPECS = {
    "cifar10": ImageSpec(classes=10, channels=3, size=32, flip=True),
    "cifar100": ImageSpec(classes=100, channels=3, size=32, flip=True),
    "digits": ImageSpec(classes=10, channels=3, size=32, flip=False),  # a mirrored digit is another symbol
    "fashion-mnist": ImageSpec(classes=10, channels=1, size=28, flip=True),
}
DATASETS = tuple(DATASET_SPECS)
NUM_CLASSES = {name: spec.classes for name, spec in DATASET_SPECS.items()}

TABLE1_LR = (0.1, 0.01, 0.001, 0.0001, 0.00001)
TABLE1_EPOCHS_PER_STEP = (50, 20, 20)

Grid = tuple[tuple[float, ...], ...]


class ConfigError(ValueError):
    """A bad configuration value; ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class DataError(Exception):
    """A dataset that cannot be loaded (one-line, user-facing message naming the dataset and folder)."""


def default_data_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adareg", "data")


def resnet_depth(arch: str) -> int:
    """Depth of a ``resnet{6n+2}`` name; ConfigError('arch') otherwise."""
    m = ARCH_PATTERN.match(arch) if isinstance(arch, str) else None
    if not m:
        raise ConfigError("arch", f"unknown architecture {arch!r} (expected resnet{{6n+2}}, e.g. resnet14, resnet32)")
    depth = int(m.group(1))
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError("arch", f"{arch!r} is not a CIFAR ResNet: depth must be 6n+2 with n >= 1 "
                                  "(8, 14, 20, 32, ...)")
    return depth


def to_grid(name: str, value: Any, phases: int, steps: int) -> Grid:
    """Normalise scalar | per-step list | per-phase list of lists to a ``phases x steps`` grid."""
    def num(v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(where, f"expected a number, got {v!r}")
        if not math.isfinite(v):
            raise ConfigError(where, f"must be finite, got {v!r}")
        return float(v)

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tuple(tuple(num(value, name) for _ in range(steps)) for _ in range(phases))
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(name, f"expected a number, a list of {steps} per-step values or {phases} such lists")
    if all(isinstance(v, (list, tuple)) for v in value):
        if len(value) != phases:
            raise ConfigError(name, f"has {len(value)} phases, the schedule has {phases}")
        rows = []
        for p, row in enumerate(value):
            if len(row) != steps:
                raise ConfigError(f"{name}[{p}]", f"has {len(row)} steps, the schedule has {steps}")
            rows.append(tuple(num(v, f"{name}[{p}][{s}]") for s, v in enumerate(row)))
        return tuple(rows)
    if len(value) != steps:
        raise ConfigError(name, f"has {len(value)} values, the schedule has {steps} steps per phase")
    row = tuple(num(v, f"{name}[{s}]") for s, v in enumerate(value))
    return tuple(row for _ in range(phases))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (validated on construction)."""

    arch: str = "resnet14"
    """CIFAR ResNet of He et al. §4.2: ``resnet{6n+2}`` (resnet14 'Shallow Resnet', resnet32 'Resnet')."""
    dataset: str = "digits"
    """``cifar10``, ``cifar100``, ``fashion-mnist`` (1x28x28) or ``digits`` (scikit-learn's offline 8x8 digits,
    upscaled to 32x32)."""
    seed: int = 0
    """Seeds model init, data order, augmentation, sparsity masks, label noise and the subset."""
    scheme: str = field(default="custom", metadata={"identity": False})
    """Name of the regularization scheme (a label; the values below are what count)."""
    variant: str = field(default="", metadata={"identity": "if_set"})
    """Free label that IS part of the run's identity when not empty (e.g. a tuning study and trial, so
    that two trials never share a run)."""
    lr: Grid = (TABLE1_LR,) * 3
    """Learning rate per phase and step (Table 1: 1e-1 .. 1e-5 in 5 steps, restarted twice)."""
    epochs_per_step: tuple[int, ...] = TABLE1_EPOCHS_PER_STEP
    """Epochs of each learning-rate step, per phase (Table 1: 50, 20, 20), before ``epochs_scale``."""
    weight_decay: Grid = ((1e-4,) * 5,) * 3
    """Coupled L2 weight decay per phase and step."""
    grad_sparsity: Grid = ((0.0,) * 5,) * 3
    """Share of each parameter tensor frozen by a fixed random mask, per phase and step (0 = dense)."""
    momentum: float = 0.9
    """SGD momentum."""
    batch_size: int = 50
    """Training mini-batch size (the paper: 50)."""
    epochs_scale: float = 1.0
    """Every step lasts max(1, round(n x epochs_scale)) epochs (0.1 turns 450 epochs into 45)."""
    train_subset: int = 0
    """Train on the first N of a seeded permutation of the training split (0 = all of it)."""
    label_noise: float = 0.0
    """Share of training labels replaced by uniformly random classes (seeded)."""
    augment: bool = True
    """Random crop after 4-pixel zero padding (+ horizontal flip on CIFAR and Fashion-MNIST)."""
    validation: float = field(default=0.0, metadata={"identity": "if_set"})
    """Share of the training split held out for validation (0 = none). The held-out part is stratified by
    class and drawn with a fixed seed (the same for every run seed), before ``train_subset`` and
    ``label_noise`` apply to the rest; its labels stay clean. With it the run reports ``val_loss`` /
    ``val_error`` instead of ``test_loss`` / ``test_error`` and never loads the test split."""
    precision: str = field(default="fp32", metadata={"identity": "if_set"})
    """``fp32``; ``tf32`` (TensorFloat-32 matmuls and convolutions on CUDA; same as fp32 on the CPU) or
    ``bf16`` (autocast to bfloat16, fp32 master weights)."""
    data_dir: str = field(default_factory=default_data_dir, metadata={"identity": False})
    """Where CIFAR archives and Fashion-MNIST files live (not part of the run's identity; Fashion-MNIST is also
    looked for in ``$ADAREG_DATA`` and Debian's ``/usr/share/datasets/fashion-mnist``)."""
    allow_unofficial_data: bool = field(default=False, metadata={"identity": False})
    """Load CIFAR archives / batch files whose md5 is not the official one (e.g. small test archives).
    Off by default: those files are unpickled, and a tampered one could run code."""
    eval_batch_size: int = field(default=1000, metadata={"identity": False})
    """Batch size for evaluation (does not change the result)."""
    compile: bool = field(default=False, metadata={"identity": False})
    """Speed option: run the model through ``torch.compile`` (a warm-up of a minute or so per process;
    the same numbers up to float rounding, so not part of the run's identity). Models are always
    channels_last."""
    graph: bool = field(default=False, metadata={"identity": False})
    """Speed option for CUDA: capture the whole training step (forward, backward, masked SGD update) once as a
    CUDA graph and replay it (``training.graphed``), with ``cudnn.benchmark``; the same numbers up to float
    rounding, so not part of the run's identity. Elsewhere the same static-buffer step runs eagerly. Off by
    default until a GPU run has passed its correctness check (``benchmarks/gpu_check.sh``)."""
    lr_family: str = field(default="step", metadata={"identity": "if_set"})
    """``step`` (each step trains at its ``lr``) or ``cosine`` (each phase is an SGDR cycle annealed from its
    peak ``lr[p][0]`` to ``lr_min``, restarted at the next phase; ``training.tapers``)."""
    lr_min: float = field(default=0.0, metadata={"identity": "if_set"})
    """The rate every cosine cycle anneals to (``lr_family`` cosine)."""
    warmup_epochs: int = field(default=0, metadata={"identity": "if_set"})
    """Linear warm-up over the run's first W epochs (scaled like a step): epoch e <= W trains at e/W of its
    planned rate (0 = none)."""
    weight_decay_mode: str = field(default="coupled", metadata={"identity": "if_set"})
    """``coupled`` (L2 in the gradient, as torch.optim.SGD: each step shrinks weights by about lr x wd) or
    ``decoupled`` (w <- w - wd x w every step, independent of the learning rate)."""
    dropout: Grid | None = field(default=None, metadata={"identity": "if_set"})
    """Dropout rate before the classifier per phase and step, in [0, 1) (None = no dropout)."""
    label_smoothing: Grid | None = field(default=None, metadata={"identity": "if_set"})
    """Label smoothing of the training loss per phase and step, in [0, 1) (None = none)."""
    batch_sizes: Grid | None = field(default=None, metadata={"identity": "if_set"})
    """Mini-batch size per phase and step, whole numbers >= 1 (None = ``batch_size`` throughout)."""
    per_epoch: tuple[tuple[str, tuple[float, ...]], ...] = field(default=(), metadata={"identity": "if_set"})
    """Per-epoch values of the tapered fields that vary within a step (resolved from tapers of the learning
    rate; name -> one value per epoch). Set by construction; the grid of such a field holds each step's first
    epoch's value."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        resnet_depth(self.arch)
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {self.dataset!r} (expected one of {', '.join(DATASETS)})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {self.seed!r}")
        eps = self.epochs_per_step
        if isinstance(eps, int) and not isinstance(eps, bool):
            eps = (eps,) * 3
        if not isinstance(eps, (list, tuple)) or not eps:
            raise ConfigError("epochs_per_step", f"expected a list with one positive integer per phase, got {eps!r}")
        for i, n in enumerate(eps):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"epochs_per_step[{i}]", f"must be a positive integer, got {n!r}")
        set_("epochs_per_step", tuple(eps))
        phases = len(eps)
        lr = self.lr
        if isinstance(lr, Mapping):
            try:
                spec = lr_spec(lr, phases)
            except TaperError as e:
                raise ConfigError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
            for k, v in spec.items():
                set_(k, v)
            lr = self.lr
        steps = len(lr[0]) if isinstance(lr, (list, tuple)) and lr and isinstance(lr[0], (list, tuple)) else (
            len(lr) if isinstance(lr, (list, tuple)) else 5)
        if steps < 1:
            raise ConfigError("lr", "needs at least one step")
        set_("lr", to_grid("lr", lr, phases, steps))
        for p, row in enumerate(self.lr):
            for s, v in enumerate(row):
                if v <= 0:
                    raise ConfigError(f"lr[{p}][{s}]", f"must be > 0, got {v}")
        es = self.epochs_scale
        if isinstance(es, bool) or not isinstance(es, (int, float)) or not math.isfinite(es) or es <= 0:
            raise ConfigError("epochs_scale", f"must be > 0, got {es!r}")
        set_("epochs_scale", float(es))
        self._resolve_tapers(phases, steps)
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum!r}")
        set_("momentum", float(self.momentum))
        for name in ("batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        ts = self.train_subset
        if ts is None:
            ts = 0
        if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
            raise ConfigError("train_subset", f"must be a non-negative integer (0 = all), got {ts!r}")
        set_("train_subset", ts)
        ln = self.label_noise
        if isinstance(ln, bool) or not isinstance(ln, (int, float)) or not 0 <= ln <= 1:
            raise ConfigError("label_noise", f"must be in [0, 1], got {ln!r}")
        set_("label_noise", float(ln))
        for name in ("augment", "allow_unofficial_data", "compile", "graph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        va = self.validation
        if isinstance(va, bool) or not isinstance(va, (int, float)) or not 0 <= va < 1:
            raise ConfigError("validation", f"must be in [0, 1) (a share of the training split), got {va!r}")
        set_("validation", float(va))
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"unknown precision {self.precision!r} (expected one of "
                                           f"{', '.join(PRECISIONS)})")
        if not isinstance(self.variant, str):
            raise ConfigError("variant", f"must be a string, got {self.variant!r}")
        set_("data_dir", str(Path(self.data_dir).expanduser()))
        if self.graph:
            used = [name for name, on in (("dropout", self.dropout is not None),
                                          ("label_smoothing", self.label_smoothing is not None),
                                          ("batch_sizes", self.batch_sizes is not None),
                                          ("weight_decay_mode", self.weight_decay_mode != "coupled")) if on]
            if used:
                raise ConfigError("graph", f"the CUDA-graph step does not support {used[0].replace('_', ' ')} "
                                           "yet: turn graph off for this run")

    def _resolve_tapers(self, phases: int, steps: int) -> None:
        """Validate the learning-rate family and resolve every tapered field to its grid (and, where it varies
        within a step, its per-epoch values)."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.lr_family not in LR_FAMILIES:
            raise ConfigError("lr_family", f"unknown family {self.lr_family!r} (expected one of "
                                           f"{', '.join(LR_FAMILIES)})")
        lo = self.lr_min
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not math.isfinite(lo) or lo < 0:
            raise ConfigError("lr_min", f"must be >= 0, got {lo!r}")
        set_("lr_min", float(lo) if self.lr_family == "cosine" else 0.0)  # the step family has no use for it
        if self.lr_family == "cosine":
            for p, row in enumerate(self.lr):
                if any(v != row[0] for v in row):
                    raise ConfigError(f"lr[{p}]", "a cosine cycle has one peak: give one rate per phase")
                if lo > row[0]:
                    raise ConfigError("lr_min", f"must not exceed the peak {row[0]:g}, got {lo:g}")
        w = self.warmup_epochs
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError("warmup_epochs", f"must be a whole number >= 0, got {w!r}")
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ConfigError("weight_decay_mode", f"unknown mode {self.weight_decay_mode!r} (expected one of "
                                                   f"{', '.join(WEIGHT_DECAY_MODES)})")
        lrs = epoch_lrs(self.lr, self.epochs_per_step, self.epochs_scale, self.lr_family, self.lr_min, w)
        if warmup_length(w, self.epochs_scale) > len(lrs):
            raise ConfigError("warmup_epochs", f"is longer than the run ({len(lrs)} epochs)")
        peak = max(v for row in self.lr for v in row)
        given = self.per_epoch
        if isinstance(given, Mapping):
            given = tuple(given.items())
        if not isinstance(given, (list, tuple)) or not all(isinstance(g, (list, tuple)) and len(g) == 2
                                                           for g in given):
            raise ConfigError("per_epoch", f"expected (name, values) pairs, got {given!r}")
        given = dict(given)
        for name in given:
            if name not in TAPERED:
                raise ConfigError("per_epoch", f"{name!r} is not a tapered field (expected {', '.join(TAPERED)})")
        per_epoch: dict[str, tuple[float, ...]] = {}
        for name in TAPERED:
            value, values = getattr(self, name), None
            if name in given and not is_taper(value):
                listed = given[name]
                if not isinstance(listed, (list, tuple)) or len(listed) != len(lrs):
                    raise ConfigError(f"per_epoch.{name}", f"needs one value for each of the {len(lrs)} epochs")
                listed = [float(v) for v in listed]
                # a grid changed (``replace``) after the values were resolved wins over them
                if value is None or _grid_or_none(value, phases, steps) == fold(listed, lrs, [steps] * phases)[0]:
                    values = listed
            if values is not None:
                pass
            elif is_taper(value):
                try:
                    values = resolve(name, value, lrs, peak)
                except TaperError as e:
                    raise ConfigError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
                if name == "batch_sizes" and value.get("taper") == "power":
                    values = [float(max(1, round(v))) for v in values]
            elif value is None:
                continue
            else:
                grid = to_grid(name, value, phases, steps)
                for p, row in enumerate(grid):
                    for s, v in enumerate(row):
                        _check_range(name, v, f"{name}[{p}][{s}]")
                set_(name, grid)
                continue
            for e, v in enumerate(values, start=1):
                _check_range(name, v, name, f" at epoch {e}")
            grid, exact = fold(values, lrs, [len(row) for row in self.lr])
            set_(name, grid)
            if not exact:
                per_epoch[name] = tuple(values)
        # canonical forms: an unused regularizer is None, a constant batch schedule is batch_size
        for name in ("dropout", "label_smoothing"):
            if getattr(self, name) is not None and name not in per_epoch and not any(
                    v for row in getattr(self, name) for v in row):
                set_(name, None)
        if self.batch_sizes is not None:
            set_("batch_sizes", tuple(tuple(int(v) for v in row) for row in self.batch_sizes))
            if "batch_sizes" in per_epoch:
                per_epoch["batch_sizes"] = tuple(int(v) for v in per_epoch["batch_sizes"])
            flat = per_epoch.get("batch_sizes") or [v for row in self.batch_sizes for v in row]
            set_("batch_size", int(flat[0]))
            if all(v == flat[0] for v in flat):
                set_("batch_sizes", None)
                per_epoch.pop("batch_sizes", None)
        set_("per_epoch", tuple(sorted(per_epoch.items())))

    @property
    def batch_schedule(self) -> tuple[int, ...]:
        """The training batch size of every epoch when it changes (a batch-size taper), else ()."""
        if self.batch_sizes is None:
            return ()
        from training.schedules import plan_for
        return tuple(e.batch_size for e in plan_for(self))

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    @property
    def image(self) -> ImageSpec:
        """The dataset's image shape (classes, channels, side length, flips)."""
        return DATASET_SPECS[self.dataset]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); ``RunConfig.from_dict`` inverts it."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], "unknown configuration field")
        return cls(**data)

    def identity_dict(self) -> dict[str, Any]:
        """The fields that change the result, as plain JSON-able values (an ``"if_set"`` field only
        when it differs from its default)."""
        full = self.to_dict()
        out = {}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("identity", True)
            if kind is False or (kind == "if_set" and getattr(self, f.name) == f.default):
                continue
            out[f.name] = full[f.name]
        return out


_RANGES = {"weight_decay": (0.0, math.inf, "must be >= 0"), "grad_sparsity": (0.0, 1.0, "must be in [0, 1)"),
           "dropout": (0.0, 1.0, "must be in [0, 1)"), "label_smoothing": (0.0, 1.0, "must be in [0, 1)"),
           "batch_sizes": (1.0, math.inf, "must be a whole number >= 1")}


def _grid_or_none(value: Any, phases: int, steps: int) -> Grid | None:
    try:
        return to_grid("", value, phases, steps)
    except ConfigError:
        return None


def _check_range(name: str, v: float, where: str, suffix: str = "") -> None:
    low, high, what = _RANGES[name]
    bad = not low <= v < high
    if name == "batch_sizes" and v != int(v):
        bad = True
    if bad:
        raise ConfigError(where, f"{what}, got {v}{suffix}")


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


SHAPE_FIELDS = ("arch", "dataset", "lr", "epochs_per_step", "epochs_scale", "batch_size", "momentum", "augment",
                "train_subset", "label_noise", "validation", "precision", "lr_family", "lr_min", "warmup_epochs",
                "batch_schedule")
"""Fields every member of a pack shares."""


def shape_of(config: RunConfig) -> tuple:
    """What must be equal for two runs to share a pack (``training.packed``): all but seed and tapers."""
    return tuple(getattr(config, name) for name in SHAPE_FIELDS)

"""Sweep files' schema: what a sweep may say (pydantic models, strict, frozen, unknown keys refused), and
how a scheme, arch, dataset and seed become a ``RunConfig``. Values are checked by building RunConfigs, so
the allowed ranges live in ``training.config`` alone."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import typing
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.errors import UserError
from training.config import TABLE1_EPOCHS_PER_STEP, TABLE1_LR, ConfigError, RunConfig

_MODELS = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)
_LISTS = {"arch": "archs", "dataset": "datasets", "seed": "seeds"}

Taper = Any
"""A number (same everywhere), a list of per-step values (same in every phase) or one such list per
phase (checked by ``training.config.to_grid``); or a function of the learning rate in force
(``training.tapers``): ``{taper: power, ref, ref_lr, alpha, min, max}`` or ``{taper: table, values: {lr:
value}}``, either optionally with ``cycles: [..]`` and ``otherwise``."""


class Schedule(BaseModel):
    """The learning-rate schedule every scheme trains on: phases (warm-restart cycles) x steps."""

    model_config = _MODELS

    lr: Taper = Field(default_factory=lambda: list(TABLE1_LR))
    """Learning rate per step, restarted in each phase (Table 1: 0.1 down to 0.00001 in 5 steps); or a family:
    ``{family: step, values: [...], warmup: W}`` (the same, after a linear warm-up over the first W epochs) or
    ``{family: cosine, max: 0.1, min: 0.0, warmup: W}`` (SGDR: each phase one cosine cycle from max to min)."""
    epochs_per_step: Any = Field(default_factory=lambda: list(TABLE1_EPOCHS_PER_STEP))
    """Epochs of each learning-rate step, one number per phase (Table 1: 50, 20, 20); with the cosine family,
    the epochs of each cycle."""


class Scheme(BaseModel):
    """One regularization scheme; values per step as in ``Schedule.lr``."""

    model_config = _MODELS

    weight_decay: Taper
    """Weight decay, >= 0 (coupled L2 unless ``weight_decay_mode`` says decoupled)."""
    grad_sparsity: Taper = 0.0
    """Share of each weight tensor frozen by a fixed random mask, in [0, 1) (0 = dense)."""
    lr: Taper = None
    """Learning rate for this scheme only (null = ``schedule.lr``)."""
    weight_decay_mode: Literal["coupled", "decoupled"] = "coupled"
    """``coupled``: L2 in the gradient, as torch.optim.SGD (each step shrinks weights by about lr x wd);
    ``decoupled``: w <- w - wd x w every step, independent of the learning rate."""
    dropout: Taper = None
    """Dropout rate before the classifier, in [0, 1) (null = none)."""
    label_smoothing: Taper = None
    """Label smoothing of the training loss, in [0, 1) (null = none)."""
    batch_size: Taper = None
    """Mini-batch size, whole numbers >= 1 (null = ``train.batch_size``; a power law is rounded). Runs of
    different batch schedules never share a pack."""


_ELSEWHERE = ("arch", "dataset", "seed", "scheme", "lr", "epochs_per_step", "weight_decay", "grad_sparsity",
              "lr_family", "lr_min", "warmup_epochs", "weight_decay_mode", "dropout", "label_smoothing",
              "batch_sizes", "per_epoch")
"""RunConfig fields a sweep sets outside ``train:`` (its lists, schedule and schemes)."""


def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a class (``name: T = ...`` followed by a string), from its source."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return {}
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def _train_settings() -> type[BaseModel]:
    """``train:``: every RunConfig field not set elsewhere in a sweep file, with RunConfig's type, default
    and docstring, so that a field added to RunConfig is a sweep-file setting at once. A field whose
    default is computed (``data_dir``) defaults to null here, meaning RunConfig's default."""
    hints, docs = typing.get_type_hints(RunConfig), _field_docs(RunConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in _ELSEWHERE:
            continue
        doc = docs.get(f.name) or f.name.replace("_", " ")
        if f.default is dataclasses.MISSING:
            doc = doc.rstrip(".") + " (null = RunConfig's default)."
            fields[f.name] = (hints[f.name] | None, Field(default=None, description=doc))
        else:
            fields[f.name] = (hints[f.name], Field(default=f.default, description=doc))
    return create_model("TrainSettings", __config__=_MODELS, __doc__=(
        "Training settings shared by every run of the sweep: any RunConfig field but the grid's own "
        "(defaults: RunConfig's)."), **fields)


TrainSettings = _train_settings()


class Range(BaseModel):
    """A search range for ``adareg tune``."""

    model_config = _MODELS

    low: float
    """Smallest value."""
    high: float
    """Largest value."""
    log: bool = False
    """Sample on a log scale (needs low > 0)."""


LEGACY_SPACE = ("weight_decay_base", "weight_decay_peak", "grad_sparsity")
"""The Table 1-shaped space's parameters (the space of a ``tune`` section without ``space``)."""


class TuneSpace(BaseModel):
    """What ``adareg tune`` searches: any numeric field of a scheme (``space``), or, without ``space``,
    Table 1-shaped tapers: weight decay per step of every phase ``[base, base, peak / 2, peak, peak]``
    (schemes 01 and 02 have this shape); gradient sparsity ``s`` in steps 3-5 of phase 1 and 0 elsewhere
    (schemes 21-23). A number fixes a value."""

    model_config = _MODELS

    scheme: str | dict[str, Any] | None = None
    """The scheme a trial starts from, whose fields ``space`` varies: a name in ``schemes``, or a scheme
    written here (default: the sweep's first scheme)."""
    space: dict[str, Range | float] | None = None
    """What a trial samples: dotted fields of ``scheme`` -> a range (or a number: fixed), e.g.
    ``weight_decay.alpha: {low: -1, high: 1}``. Every field is checked at both ends of its range when the
    file is read. Without it: the Table 1 shape (``weight_decay_base``, ``weight_decay_peak``,
    ``grad_sparsity``)."""

    objective: Literal["val_error", "val_loss"] = "val_error"
    """Validation metric minimised: its mean over the trial's seeds at the last epoch (the test split is never
    read during a trial); the same mean per epoch is what the pruner sees."""
    validation: float = Field(default=0.1, gt=0, lt=1)
    """Share of the training split held out (stratified, fixed seed) to score trials on."""
    seeds: int = Field(default=2, ge=1)
    """Seeds a trial trains: the sweep's first ``seeds`` seeds."""
    weight_decay_base: Range | float = Field(default_factory=lambda: Range(low=1e-5, high=1e-3, log=True))
    """Weight decay of the high-learning-rate steps (1 and 2)."""
    weight_decay_peak: Range | float = Field(default_factory=lambda: Range(low=1e-4, high=1e-2, log=True))
    """Weight decay of the low-learning-rate steps (4 and 5; step 3 gets half of it)."""
    grad_sparsity: Range | float = 0.0
    """Gradient sparsity of steps 3-5 of phase 1, in [0, 1)."""
    pruner: Literal["median", "none"] = "median"
    """``median``: stop a trial whose objective is worse than the median of earlier trials at that epoch."""
    sampler_seed: int = 0
    """Seed of the TPE sampler, mixed with a per-process random number: several tuners on one study must not
    propose the same tapers."""

    @model_validator(mode="after")
    def _ranges_are_sane(self) -> TuneSpace:
        if self.space is not None:
            if given := [name for name in LEGACY_SPACE if name in self.model_fields_set]:
                raise at(f"tune.{given[0]}", "give either tune.space or the Table 1 shape "
                                             f"({', '.join(LEGACY_SPACE)}), not both")
            if not self.space:
                raise at("tune.space", "is empty: name at least one field of the scheme to search")
            for path, value in self.space.items():
                if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", path):
                    raise at(f"tune.space.{path}", "expected a dotted field of the scheme, e.g. weight_decay.alpha")
                if isinstance(value, Range) and not value.low < value.high:
                    raise at(f"tune.space.{path}.high", f"must be greater than low ({value.low}), got {value.high}")
                if isinstance(value, Range) and value.log and value.low <= 0:
                    raise at(f"tune.space.{path}.low", f"must be > 0 on a log scale, got {value.low}")
            return self
        if self.scheme is not None:
            raise at("tune.scheme", "needs tune.space (the Table 1 shape starts from no scheme)")
        for name in LEGACY_SPACE:
            value = getattr(self, name)
            if not isinstance(value, Range):
                continue
            if not value.low < value.high:
                raise at(f"tune.{name}.high", f"must be greater than low ({value.low}), got {value.high}")
            if value.log and value.low <= 0:
                raise at(f"tune.{name}.low", f"must be > 0 on a log scale, got {value.low}")
            if value.low < 0:
                raise at(f"tune.{name}.low", f"must be >= 0, got {value.low}")
            if name == "grad_sparsity" and value.high >= 1:
                raise at(f"tune.{name}.high", f"must be < 1, got {value.high}")
        return self


def parse_pack(value: Any) -> int | str:
    """A pack setting (sweep file ``pack:`` or ``--pack``): a size N >= 1, ``auto`` or ``off``."""
    if value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
        return value.strip().lower()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PydanticCustomError("pack", "expected a pack size >= 1, auto or off", {})
    return value


TRAIN_EXPERIMENT = "adareg-train"
"""Where ``adareg train`` logs a run that is not on its sweep's grid."""
TRAIN_DESCRIPTION = ("Runs of `adareg train` off their sweep's grid (an arch, dataset or seed the sweep file does not "
                     "list). Each run's tag adareg.sweep names the sweep file whose schemes and settings it used; "
                     "its artifacts config.json and sweep.yaml hold them resolved.")


class Sweep(BaseModel):
    """A sweep file: the grid datasets x archs x schemes x seeds, validated on construction."""

    model_config = _MODELS

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Sweep name (letters, digits, '.', '_', '-'); tags every MLflow run as ``adareg.sweep``."""
    experiment: str = Field(min_length=1)
    """MLflow experiment the runs are logged to."""
    description: str | None = None
    """The experiment's description in the MLflow UI (default: what the sweep runs)."""
    pack: int | str = "auto"
    """Train runs of one shape together as one fused model (``training.packed``): a pack size N >= 1, ``off``
    (one run per process), or ``auto`` (packs on a GPU, one run per process on the CPU, where packing
    measured slower)."""
    datasets: list[str] = Field(min_length=1)
    """Datasets: cifar10, cifar100, digits."""
    archs: list[str] = Field(min_length=1)
    """Architectures: resnet{6n+2}, e.g. resnet14, resnet32."""
    seeds: list[int] = Field(min_length=1)
    """Seeds, one run each per dataset x arch x scheme."""
    schedule: Schedule = Field(default_factory=Schedule)
    """Learning-rate schedule."""
    schemes: dict[str, Scheme] = Field(min_length=1)
    """Regularization schemes by name, expanded in file order."""
    train: TrainSettings = Field(default_factory=TrainSettings)
    """Training settings."""
    tune: TuneSpace | None = None
    """Search space of ``adareg tune`` (optional)."""

    @field_validator("schemes", mode="before")
    @classmethod
    def _scheme_names_are_text(cls, value: Any) -> Any:
        for name in value if isinstance(value, dict) else ():
            if not isinstance(name, str):
                raise PydanticCustomError(
                    "scheme_name", "scheme name {name} is not text: quote it (e.g. \"01\")", {"name": repr(name)})
        return value

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_size_auto_or_off(cls, value: Any) -> Any:
        return parse_pack(value)

    @field_validator("datasets", "archs", "seeds")
    @classmethod
    def _no_repeats(cls, values: list, info: Any) -> list:
        for i, v in enumerate(values):
            if v in values[:i]:
                raise at(f"{info.field_name}[{i}]", f"repeats {v!r} (already {info.field_name}[{values.index(v)}])")
        return values

    @model_validator(mode="after")
    def _values_make_run_configs(self) -> Sweep:
        """Build one RunConfig per scheme, and per arch, dataset and seed; name every culprit on failure."""
        found: dict[str, str] = {}

        def check(scheme: str, index: dict[str, int]) -> bool:
            args = {field: getattr(self, plural)[index.get(field, 0)] for field, plural in _LISTS.items()}
            try:
                self.run_config(scheme, **args)
            except ConfigError as e:
                found.setdefault(self._locate(e.field, scheme, index), str(e).removeprefix(f"{e.field}: "))
                return False
            return True

        good = [scheme for scheme in self.schemes if check(scheme, {})]
        for field, plural in _LISTS.items():
            for i in range(1, len(getattr(self, plural))):
                check(good[0] if good else next(iter(self.schemes)), {field: i})
        if found:
            raise PydanticCustomError("sweep_values", "{count} invalid values",
                                      {"count": len(found), "items": list(found.items())})
        return self

    def _locate(self, field: str, scheme: str, index: dict[str, int]) -> str:
        """The sweep-file path of a RunConfig field name such as ``weight_decay[0][2]``."""
        name, suffix = re.fullmatch(r"(\w+)(.*)", field).groups()
        if name in _LISTS:
            return f"{_LISTS[name]}[{index.get(name, 0)}]"
        owner = self.schemes[scheme]
        if name in _LR_FIELDS:
            name, suffix = "lr", _LR_FIELDS[name]
        if name in _SCHEME_FIELDS or (name == "lr" and owner.lr is not None):
            key = _SCHEME_FIELDS.get(name, name)
            return f"schemes.{scheme}.{key}{as_written(suffix, getattr(owner, key))}"
        if name in ("lr", "epochs_per_step"):
            return f"schedule.{name}{as_written(suffix, getattr(self.schedule, name))}"
        return f"train.{name}"

    def for_run(self, arch: str, dataset: str, seed: int) -> Sweep:
        """The sweep one run of ``adareg train`` is logged under: this one where the run is on its grid (the
        sweep then counts it as done), else the same settings under the experiment ``TRAIN_EXPERIMENT`` (a
        digits run of Table 1's schemes is none of Table 1's CIFAR runs). Either way the run's
        ``adareg.sweep`` tag names the sweep whose schemes and settings it used."""
        if arch in self.archs and dataset in self.datasets and seed in self.seeds:
            return self
        return self.model_copy(update={"experiment": TRAIN_EXPERIMENT, "description": TRAIN_DESCRIPTION})

    def run_config(self, scheme: str, arch: str, dataset: str, seed: int) -> RunConfig:
        """The RunConfig of one run (arch, dataset and seed need not be in the sweep's lists)."""
        if scheme not in self.schemes:
            raise UserError(f"unknown scheme {scheme!r}{did_you_mean(scheme, self.schemes)} "
                            f"(this sweep has {', '.join(self.schemes)})")
        chosen = self.schemes[scheme]
        return RunConfig(
            arch=arch, dataset=dataset, seed=seed, scheme=scheme,
            lr=self.schedule.lr if chosen.lr is None else chosen.lr,
            epochs_per_step=self.schedule.epochs_per_step,
            weight_decay=chosen.weight_decay, grad_sparsity=chosen.grad_sparsity,
            weight_decay_mode=chosen.weight_decay_mode, dropout=chosen.dropout,
            label_smoothing=chosen.label_smoothing, batch_sizes=chosen.batch_size,
            **self.train.model_dump(exclude_none=True),
        )


_SCHEME_FIELDS = {"weight_decay": "weight_decay", "grad_sparsity": "grad_sparsity", "dropout": "dropout",
                  "label_smoothing": "label_smoothing", "batch_sizes": "batch_size",
                  "weight_decay_mode": "weight_decay_mode"}
"""RunConfig fields a scheme sets -> the scheme's key for them."""
_LR_FIELDS = {"lr_family": ".family", "lr_min": ".min", "warmup_epochs": ".warmup"}
"""RunConfig fields a ``lr:`` mapping sets -> their key in it."""


def at(path: str, reason: str) -> PydanticCustomError:
    return PydanticCustomError("sweep_value", "{path}: {reason}", {"path": path, "reason": reason})


def as_written(suffix: str, raw: Any) -> str:
    """Map a normalised ``[phase][step]`` index back to the shape written in the file."""
    if suffix.startswith("."):  # a key of a mapping (a taper or a learning-rate family)
        return suffix
    if not isinstance(raw, (list, tuple)):
        return ""
    indices = re.findall(r"\[(\d+)\]", suffix)
    if len(indices) == 2 and not all(isinstance(v, (list, tuple)) for v in raw):
        return f"[{indices[1]}]"
    return suffix


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""



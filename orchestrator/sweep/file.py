"""Sweep files: YAML in, a validated ``Sweep`` out, expanded (purely) into ``RunConfig`` s.

A sweep crosses datasets x archs x schemes x seeds on one learning-rate schedule and one set of
training settings. Values are checked by building RunConfigs, so the allowed ranges live in
``training.config`` alone. Every failure is a one-line ``UserError`` naming the file and the
culprit's dotted path, e.g. ``sweeps/x.yaml: schemes.01.weight_decay[2]: must be >= 0, got -1.0``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.errors import UserError
from orchestrator.identity import Planned, plan
from training.config import TABLE1_EPOCHS_PER_STEP, TABLE1_LR, ConfigError, RunConfig

_MODELS = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)
_ONLY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if not isinstance(f.default, tuple))
_LISTS = {"arch": "archs", "dataset": "datasets", "seed": "seeds"}

Taper = Any
"""A number (same everywhere), a list of per-step values (same in every phase) or one such list per
phase; checked by ``training.config.to_grid``."""


class Schedule(BaseModel):
    """The learning-rate schedule every scheme trains on: phases (warm restarts) x steps."""

    model_config = _MODELS

    lr: Taper = Field(default_factory=lambda: list(TABLE1_LR))
    """Learning rate per step, restarted in each phase (Table 1: 0.1 down to 0.00001 in 5 steps)."""
    epochs_per_step: Any = Field(default_factory=lambda: list(TABLE1_EPOCHS_PER_STEP))
    """Epochs of each learning-rate step, one number per phase (Table 1: 50, 20, 20)."""


class Scheme(BaseModel):
    """One regularization scheme; values per step as in ``Schedule.lr``."""

    model_config = _MODELS

    weight_decay: Taper
    """Coupled L2 weight decay, >= 0."""
    grad_sparsity: Taper = 0.0
    """Share of each weight tensor frozen by a fixed random mask, in [0, 1) (0 = dense)."""
    lr: Taper = None
    """Learning rate for this scheme only (null = ``schedule.lr``)."""


_ELSEWHERE = ("arch", "dataset", "seed", "scheme", "lr", "epochs_per_step", "weight_decay", "grad_sparsity")
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


class TuneSpace(BaseModel):
    """What ``adareg tune`` searches: Table 1-shaped tapers. Weight decay per step of every phase is
    ``[base, base, peak / 2, peak, peak]`` (schemes 01 and 02 have this shape); gradient sparsity is
    ``s`` in steps 3-5 of phase 1 and 0 elsewhere (schemes 21-23). A number fixes a value."""

    model_config = _MODELS

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
        for name in ("weight_decay_base", "weight_decay_peak", "grad_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, Range):
                continue
            if not value.low < value.high:
                raise _at(f"tune.{name}.high", f"must be greater than low ({value.low}), got {value.high}")
            if value.log and value.low <= 0:
                raise _at(f"tune.{name}.low", f"must be > 0 on a log scale, got {value.low}")
            if value.low < 0:
                raise _at(f"tune.{name}.low", f"must be >= 0, got {value.low}")
            if name == "grad_sparsity" and value.high >= 1:
                raise _at(f"tune.{name}.high", f"must be < 1, got {value.high}")
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
                raise _at(f"{info.field_name}[{i}]", f"repeats {v!r} (already {info.field_name}[{values.index(v)}])")
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
        if name in ("weight_decay", "grad_sparsity") or (name == "lr" and owner.lr is not None):
            return f"schemes.{scheme}.{name}{_as_written(suffix, getattr(owner, name))}"
        if name in ("lr", "epochs_per_step"):
            return f"schedule.{name}{_as_written(suffix, getattr(self.schedule, name))}"
        return f"train.{name}"

    def run_config(self, scheme: str, arch: str, dataset: str, seed: int) -> RunConfig:
        """The RunConfig of one run (arch, dataset and seed need not be in the sweep's lists)."""
        if scheme not in self.schemes:
            raise UserError(f"unknown scheme {scheme!r}{_did_you_mean(scheme, self.schemes)} "
                            f"(this sweep has {', '.join(self.schemes)})")
        chosen = self.schemes[scheme]
        return RunConfig(
            arch=arch, dataset=dataset, seed=seed, scheme=scheme,
            lr=self.schedule.lr if chosen.lr is None else chosen.lr,
            epochs_per_step=self.schedule.epochs_per_step,
            weight_decay=chosen.weight_decay, grad_sparsity=chosen.grad_sparsity,
            **self.train.model_dump(exclude_none=True),
        )


def _at(path: str, reason: str) -> PydanticCustomError:
    return PydanticCustomError("sweep_value", "{path}: {reason}", {"path": path, "reason": reason})


def _as_written(suffix: str, raw: Any) -> str:
    """Map a normalised ``[phase][step]`` index back to the shape written in the file."""
    if not isinstance(raw, (list, tuple)):
        return ""
    indices = re.findall(r"\[(\d+)\]", suffix)
    if len(indices) == 2 and not all(isinstance(v, (list, tuple)) for v in raw):
        return f"[{indices[1]}]"
    return suffix


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a number (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_NODES = 100_000
"""The most values (mapping keys and values, list items, scalars) a sweep file or a ``--set`` value may hold
once YAML aliases are expanded: far above any real sweep (Table 1's file holds a few hundred), far below
what hangs validation (nine levels of ten aliases each, "billion laughs", expand to 10^9)."""


def _check_size(doc: Any, where: str) -> None:
    """Refuse a document that holds more than ``MAX_NODES`` values when its aliases are expanded.

    PyYAML builds an alias as a second reference to one object, so loading is cheap; whatever walks the
    result (validation, error messages) pays for every repetition. The walk stops at the limit, so the
    check itself costs at most ``MAX_NODES`` steps, even for a recursive alias (``&a [*a]``)."""
    stack, count = [doc], 1
    while stack:
        node = stack.pop()
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node if isinstance(node, list) else ()
        count += len(children)  # counted before they are stacked: the stack never outgrows the limit
        if count > MAX_NODES:
            raise UserError(f"{where}: holds more than {MAX_NODES:,} values once YAML aliases (*name) are "
                            f"expanded (the limit for a sweep file)")
        stack.extend(children)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, not a sweep file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read: {e}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(e.problem or e.context).split())
        if e.problem and e.context and e.context_mark and mark and e.context_mark.line != mark.line:
            problem += f" ({e.context} from line {e.context_mark.line + 1})"
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "\t" in line[: len(line) - len(line.lstrip())]:
            problem += " (this line is indented with a tab; YAML needs spaces)"
        where_in = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"{where}: {where_in}invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    _check_size(doc, where)
    if doc is None:
        raise UserError(f"{where}: is empty (expected name, experiment, datasets, archs, seeds, schemes, ...)")
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping of sweep settings at the top level, got {type(doc).__name__}")
    return doc


def _set(doc: dict[str, Any], parts: Sequence[str], value: Any, origin: str) -> str:
    """Put ``value`` at the dotted path (creating missing mappings); return the path as errors spell it."""
    node: Any = doc
    path = ""
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"{origin}: {path} is a list of {len(node)}; {part!r} is not an index into it")
            key: Any = int(part)
            path += f"[{key}]"
        elif isinstance(node, dict):
            key = part
            path += f".{key}" if path else key
        else:
            raise UserError(f"{origin}: {path} is {node!r}, not a mapping")
        if depth == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
    return path


def _apply_set(doc: dict[str, Any], item: str) -> tuple[str, str]:
    origin = f"--set {item!r}"
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"{origin}: expected KEY=VALUE (KEY dotted, e.g. train.batch_size=100)")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{origin}: VALUE is not valid YAML: {' '.join(problem.split())}") from None
    _check_size(value, origin)
    return _set(doc, [p.strip() for p in parts], value, origin), origin


def load_sweep(path: str | Path, sets: Sequence[str] = (), epochs_scale: float | None = None,
               train_subset: int | None = None) -> Sweep:
    """Read, override (``--set KEY=VALUE``, ``--epochs-scale``, ``--train-subset``) and validate a sweep file."""
    where = str(path)
    doc = _read_yaml(Path(path), where)
    origins = [_apply_set(doc, item) for item in sets]
    if sets:  # each value is bounded on its own; so is what they make together
        _check_size(doc, f"{where} with its --set values")
    for field, value, flag in (("epochs_scale", epochs_scale, "--epochs-scale"),
                               ("train_subset", train_subset, "--train-subset")):
        if value is not None:
            origins.append((_set(doc, ["train", field], value, flag), f"{flag} {value}"))
    try:
        return Sweep.model_validate(doc)
    except ValidationError as e:
        raise UserError(f"{where}: {_describe(e, origins)}") from None


MAX_ERRORS = 5
"""How many problems one error line lists (then: 'and N more')."""


def _describe(error: ValidationError, origins: Sequence[tuple[str, str]]) -> str:
    """One line listing every problem (up to ``MAX_ERRORS``), each as ``path: reason``, '; '-separated.

    Unknown keys come first (a typo is the likeliest cause of the rest), and a required key reported
    missing is left out when an unknown key is a close match for it (``seedz`` for ``seeds``)."""
    problems: list[tuple[str, str]] = []
    for err in _without_other_union_branches(error.errors(include_url=False)):
        if err["type"] == "sweep_values":
            problems += [tuple(item) for item in err["ctx"]["items"]]
        else:
            problems.append(_explain(err))
    unknown = [(p, r) for p, r in problems if r.startswith("unknown key")]
    meant = {(_parent(p), close) for p, r in unknown for close in re.findall(r"did you mean '([^']+)'", r)}
    typo_for = [(p, r) for p, r in problems if r == "required key missing" and (_parent(p), _last(p)) in meant]
    problems = list(dict.fromkeys(unknown + [x for x in problems if x not in unknown and x not in typo_for]))
    parts = []
    for path, reason in problems[:MAX_ERRORS]:
        for key, origin in reversed(origins):
            if path == key or path.startswith((key + ".", key + "[")):
                reason += f" (from {origin})"
                break
        parts.append(f"{path}: {reason}")
    more = len(problems) - MAX_ERRORS
    return "; ".join(parts) + (f" (and {more} more error{'s' if more > 1 else ''})" if more > 0 else "")


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _without_other_union_branches(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a field such as ``Range | float``, keep the errors of the branch the input was meant for (the
    mapping's when a mapping was given, else the scalar's) and drop the branch name from the location."""
    kept = []
    for err in errors:
        loc, tag_at = tuple(err["loc"]), None
        node: Any = Sweep
        for i, part in enumerate(loc):
            node, is_tag = _child(node, part)
            if is_tag:
                tag_at = i
                break
        if tag_at is None:
            kept.append(err)
            continue
        branch = _child(_child_chain(loc[:tag_at]), loc[tag_at])[0]
        given = _value_at(errors, loc[:tag_at])
        if _is_model(branch) == isinstance(given, dict):
            kept.append({**err, "loc": loc[:tag_at] + loc[tag_at + 1:]})
    return kept


def _value_at(errors: list[dict[str, Any]], prefix: tuple) -> Any:
    """What the file held at ``prefix`` (a scalar branch's error carries it as its input)."""
    for err in errors:
        loc = tuple(err["loc"])
        if len(loc) == len(prefix) + 1 and loc[: len(prefix)] == prefix and not _is_model(
                _child(_child_chain(prefix), loc[-1])[0]):
            return err["input"]
    return {}


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _child_chain(loc: Sequence[Any]) -> Any:
    node: Any = Sweep
    for part in loc:
        node, _ = _child(node, part)
    return node


def _child(node: Any, part: Any) -> tuple[Any, bool]:
    """The type found at ``part`` below ``node`` (a model, a dict/list type or a union), and whether
    ``part`` was a union branch's name rather than a key."""
    if node is None:
        return None, False
    if _is_model(node):
        field = node.model_fields.get(part) if isinstance(part, str) else None
        return (field.annotation if field else None), False
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if getattr(arg, "__name__", None) == part or str(arg) == part:
                return arg, True
        members = [a for a in args if a is not type(None)]
        return (_child(members[0], part) if len(members) == 1 else (None, False))
    if origin is dict and len(args) == 2:
        return args[1], False
    if origin is list and args and isinstance(part, int):
        return args[0], False
    return None, False


def _explain(err: dict[str, Any]) -> tuple[str, str]:
    loc, kind = err["loc"], err["type"]
    if kind == "sweep_value":
        return err["ctx"]["path"], err["ctx"]["reason"]
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    path = path or "(top level)"
    if kind == "extra_forbidden":
        return path, "unknown key" + _did_you_mean(str(loc[-1]), _keys_at(loc[:-1]))
    if kind == "missing":
        return path, "required key missing"
    message = err["msg"][:1].lower() + err["msg"][1:]
    return path, message if kind == "scheme_name" else f"{message}, got {err['input']!r}"


def _keys_at(loc: tuple) -> list[str]:
    """Known keys of the mapping at ``loc`` (for 'did you mean'), at any depth."""
    node = _child_chain(loc)
    if not _is_model(node):  # e.g. a union such as Range | float, or Scheme | None
        args = typing.get_args(node)
        node = next((a for a in args if _is_model(a)), None)
    return list(node.model_fields) if node else []


# ------------------------------------------------------------------------------------- expansion


def _parse_only_items(items: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    parsed = []
    for item in items:
        field, sep, text = item.partition("=")
        field = field.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not field or not values:
            raise UserError(f"--only {item!r}: expected FIELD=V1,V2 (e.g. scheme=01,22)")
        if field not in _ONLY_FIELDS:
            raise UserError(f"--only {item!r}: unknown field {field!r}{_did_you_mean(field, _ONLY_FIELDS)} "
                            f"(expected one of {', '.join(_ONLY_FIELDS)})")
        parsed.append((item, field, values))
    return parsed


def parse_only(items: Sequence[str]) -> dict[str, set[str]]:
    """``['scheme=01,22', 'seed=0']`` -> ``{'scheme': {'01', '22'}, 'seed': {'0'}}`` (same field: union)."""
    wanted: dict[str, set[str]] = {}
    for _, field, values in _parse_only_items(items):
        wanted.setdefault(field, set()).update(values)
    return wanted


def _matches(actual: Any, wanted: str) -> bool:
    if str(actual) == wanted or (isinstance(actual, bool) and str(actual).lower() == wanted.lower()):
        return True
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(wanted) == actual
        except ValueError:
            return False
    return False


def _select(runs: list[Planned], only: Sequence[str]) -> list[Planned]:
    for item, field, values in _parse_only_items(only):
        for value in values:
            if not any(_matches(getattr(r.config, field), value) for r in runs):
                known = list(dict.fromkeys(str(getattr(r.config, field)) for r in runs))
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise UserError(f"--only {item!r}: no run has {field} {value}{_did_you_mean(value, known)} "
                                f"(the sweep has {shown})")
    wanted = parse_only(only)
    kept = [r for r in runs
            if all(any(_matches(getattr(r.config, f), v) for v in values) for f, values in wanted.items())]
    if not kept:
        raise UserError(" ".join(f"--only {item!r}" for item in only) + ": together they select no run")
    return kept


def expand(sweep: Sweep, only: Sequence[str] = ()) -> list[Planned]:
    """Every run of the sweep, planned (``orchestrator.identity.plan``), ordered dataset, arch, scheme (file
    order), seed; ``only`` keeps a subset."""
    runs = [plan(sweep.run_config(scheme, arch, dataset, seed))
            for dataset in sweep.datasets for arch in sweep.archs
            for scheme in sweep.schemes for seed in sweep.seeds]
    seen: dict[str, Planned] = {}
    for run in runs:
        other = seen.setdefault(run.key, run)
        if other is not run:
            raise UserError(f"schemes {other.config.scheme!r} and {run.config.scheme!r} give identical runs "
                            f"(run key {run.key}): change or remove one")
    return _select(runs, only)

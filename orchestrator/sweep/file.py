"""Sweep files: YAML in (bounded, duplicate keys refused, ``--set`` overrides applied), a validated ``Sweep``
out (``orchestrator.sweep.schema``). Every failure is a one-line ``UserError`` naming the file and the
culprit's dotted path, e.g. ``sweeps/x.yaml: schemes.01.weight_decay[2]: must be >= 0, got -1.0``.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import BadValue, UserError, arg
from orchestrator.identity import Planned
from orchestrator.sweep.schema import Range, Sweep, did_you_mean

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
            raise BadValue(f"{where}: holds more than {MAX_NODES:,} values once YAML aliases (*name) are "
                           f"expanded (the limit for a sweep file)")
        stack.extend(children)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = ", ".join(Path(n).stem for n in shipped_sweeps())
        raise UserError(f"{where}: no such file (installed with adareg: {shipped})") from None
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


def _set(doc: dict[str, Any], parts: Sequence[str], value: Any, origin: str, add: bool = True) -> str:
    """Put ``value`` at the dotted path; return the path as errors spell it. A missing key is created where
    ``add`` is set or the schema knows it (``train.momentum`` where the file leaves it at its default), else
    refused naming the close matches (a typo must not add a scheme)."""
    node: Any = doc
    path = ""
    loc: list[Any] = []
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise BadValue(f"{origin}: {path} is a list of {len(node)}; {part!r} is not an index into it")
            key: Any = int(part)
            path += f"[{key}]"
        elif isinstance(node, dict):
            key = part
            known = _schema_keys(tuple(loc))
            if not add and key not in node and key not in known:
                hint = "" if known else f"; to add it, write +{'.'.join(parts)}=..."
                raise BadValue(f"{origin}: {_no_key(path, key, [*node, *known])}{hint}")
            path += f".{key}" if path else key
        else:
            raise BadValue(f"{origin}: {path} is {node!r}, not a mapping")
        loc.append(key)
        if depth == len(parts) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
    return path


def _no_key(path: str, key: str, known: Sequence[str]) -> str:
    where = f"{path} has" if path else "the sweep file has"
    if path == "schemes":
        names = ", ".join(map(str, known[:12])) + (", ..." if len(known) > 12 else "")
        return f"{where} no scheme {key!r}{did_you_mean(key, known)} (it has {names})"
    return f"{where} no key {key!r}{did_you_mean(key, [str(k) for k in known])}"


def _schema_keys(loc: tuple) -> list[str]:
    """The keys the schema knows at ``loc`` (none below a mapping of names such as ``schemes``)."""
    node = _child_chain(loc)
    if typing.get_origin(node) is dict or node is None:
        return []
    return _keys_at(loc)


def _apply_set(doc: dict[str, Any], item: str) -> tuple[str, str]:
    origin = f"{arg('set')} {item!r}"
    key, sep, text = item.partition("=")
    key = key.strip()
    add = key.startswith("+")
    parts = key.removeprefix("+").strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise BadValue(f"{origin}: expected KEY=VALUE (KEY dotted, e.g. train.batch_size=100; +KEY=VALUE adds a "
                       "key the file does not have)")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise BadValue(f"{origin}: VALUE is not valid YAML: {' '.join(problem.split())}") from None
    _check_size(value, origin)
    return _set(doc, [p.strip() for p in parts], value, origin, add=add), origin


SHIPPED = Path(__file__).resolve().with_name("files")
"""The sweep files installed with adareg (the repository's ``sweeps/``, shipped in the wheel as package data)."""


def shipped_sweeps() -> list[str]:
    """Names of the sweep files installed with adareg (``table1.yaml``, ``demo.yaml``, ...)."""
    return sorted(p.name for p in SHIPPED.glob("*.yaml"))


def locate(path: str | Path) -> Path:
    """``path`` where it exists; else, for a bare name (``table1``, ``demo.yaml``) or a missing
    ``sweeps/NAME.yaml``, the sweep file of that name installed with adareg; else ``path`` (then reading it
    says it does not exist)."""
    path = Path(path)
    if path.exists() or len(path.parts) > 2 or (len(path.parts) == 2 and path.parts[0] != "sweeps"):
        return path
    for name in (path.name, f"{path.name}.yaml"):
        if (SHIPPED / name).is_file():
            return SHIPPED / name
    return path


def load_sweep(path: str | Path, sets: Sequence[str] = (), epochs_scale: float | None = None,
               train_subset: int | None = None) -> Sweep:
    """Read, override (``sets``: ``KEY=VALUE`` items; ``epochs_scale``, ``train_subset``) and validate a sweep
    file (``locate``: a missing ``sweeps/table1.yaml`` or a bare ``demo`` is the one installed with adareg)."""
    path = locate(path)
    where = str(path)
    doc = _read_yaml(Path(path), where)
    origins = [_apply_set(doc, item) for item in sets]
    if sets:  # each value is bounded on its own; so is what they make together
        _check_size(doc, f"{where} with its {arg('set')} values")
    for field, value in (("epochs_scale", epochs_scale), ("train_subset", train_subset)):
        if value is not None:
            origins.append((_set(doc, ["train", field], value, arg(field)), f"{arg(field)} {value}"))
    try:
        sweep = Sweep.model_validate(doc)
    except ValidationError as e:
        raise BadValue(f"{where}: {_describe(e, origins)}") from None
    if sweep.tune is not None and sweep.tune.space is not None:
        _check_tune_space(sweep, where)
    return sweep


def resolved_yaml(sweep: Sweep) -> str:
    """The sweep as YAML once its overrides are applied and defaults filled in: what its runs were planned from."""
    doc = sweep.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110)


def scheme_summary(planned: Sequence[Planned]) -> list[str]:
    """One line per scheme of the planned runs: its runs, epochs per run, and its expanded values (tapers
    resolved; a value constant everywhere as one number, equal phases as one list of steps)."""
    from orchestrator.store.runs import config_params

    lines = []
    for scheme in dict.fromkeys(p.config.scheme for p in planned):
        mine = [p for p in planned if p.config.scheme == scheme]
        params = config_params(mine[0].config)
        values = " ".join(f"{k}={params[k]}" for k in SHOWN if k in params)
        lines.append(f"{scheme}: {len(mine)} run{'s' if len(mine) != 1 else ''} x {mine[0].total_epochs} epochs; "
                     f"{values}")
    return lines


SHOWN = ("lr", "weight_decay", "grad_sparsity", "dropout", "label_smoothing", "batch_sizes", "weight_decay_mode",
         "lr_family", "warmup_epochs", "per_epoch")
"""The config fields ``scheme_summary`` shows (those a scheme sets)."""


# --- a tuning space over any field of a scheme ---------------------------------------------------------------

TRIAL_SCHEME = "trial"
"""The name a trial's scheme is checked under."""


def base_scheme(sweep: Sweep) -> dict[str, Any]:
    """``tune.scheme`` as a sweep-file document (a scheme of the file by name, or written in place)."""
    chosen = sweep.tune.scheme
    if isinstance(chosen, dict):
        return copy.deepcopy(chosen)
    name = chosen if chosen is not None else next(iter(sweep.schemes))
    if name not in sweep.schemes:
        raise BadValue(f"tune.scheme: unknown scheme {name!r}{did_you_mean(name, sweep.schemes)} "
                       f"(this sweep has {', '.join(sweep.schemes)})")
    return sweep.schemes[name].model_dump(mode="json", exclude_none=True, exclude_defaults=True)


def scheme_with(sweep: Sweep, values: dict[str, Any]) -> dict[str, Any]:
    """``base_scheme`` with each dotted field of ``values`` set (``{"weight_decay.alpha": 0.4}``)."""
    scheme = base_scheme(sweep)
    for path, value in values.items():
        _set(scheme, path.split("."), value, f"tune.space.{path}")
    return scheme


def sweep_of_scheme(sweep: Sweep, name: str, scheme: dict[str, Any]) -> Sweep:
    """The sweep with ``scheme`` (a document) as its only scheme, ``name``, validated as a file would be."""
    doc = sweep.model_dump(mode="json", exclude={"tune"}, exclude_none=True)
    doc["schemes"] = {name: scheme}
    return Sweep.model_validate(doc)


def _check_tune_space(sweep: Sweep, where: str) -> None:
    """Every field of ``tune.space`` at both ends of its range (the others at their low end) must make a
    scheme that trains: else one line naming the field, the end and the scheme's complaint."""
    space = sweep.tune.space
    low = {path: (v.low if isinstance(v, Range) else v) for path, v in space.items()}
    for path, value in space.items():
        ends = (("low", value.low), ("high", value.high)) if isinstance(value, Range) else (("value", value),)
        for end, bound in ends:
            try:
                sweep_of_scheme(sweep, TRIAL_SCHEME, scheme_with(sweep, {**low, path: bound}))
            except BadValue as e:
                raise BadValue(f"{where}: {e.template}") from None
            except ValidationError as e:
                reason = _describe(e, []).replace(f"schemes.{TRIAL_SCHEME}.", "")
                raise BadValue(f"{where}: tune.space.{path}: at its {end} {bound:g} the scheme is invalid: "
                               f"{reason}") from None


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
        return path, "unknown key" + did_you_mean(str(loc[-1]), _keys_at(loc[:-1]))
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



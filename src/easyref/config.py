"""Typed configuration: dataclasses filled from a section of ``params.yaml``, validated with clear messages.

Each part of the library owns its config dataclass (``@dataclass(kw_only=True)``, a docstring under every field);
this module only knows how to fill one from a mapping, check field names and types, and report mistakes with the
file and key path, e.g. ``params.yaml: model.num_tokens: expected int, got 'abc'``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from easyref.errors import UserError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the parameters file with --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; invalid JSON or another top-level type is a :class:`UserError` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields.

    Unknown keys and values of the wrong type raise :class:`UserError` naming ``where`` + the key.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:  # __post_init__ validation
        raise UserError(f"{where or cls.__name__}: {exc}") from exc


def load_section(cls: type[T], params: str | Path | None, section: str, overrides: dict[str, Any] | None = None) -> T:
    """``cls`` from the ``section`` of the params file (defaults without a file), with ``overrides`` on top.

    ``overrides`` are command-line flags: a ``None`` value means "not given" and keeps the file's value. Invalid
    combinations (``__post_init__`` checks) become a :class:`UserError`.
    """
    config = cls() if params is None else from_dict(cls, load_yaml(params).get(section), f"{params}: {section}")
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as exc:
        raise UserError(f"{section}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (tuples become lists), suitable for YAML/JSON."""
    return _plain(dataclasses.asdict(obj))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the form MLflow params and DVC expect."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, x, f"{where}[{i}]") for i, x in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value

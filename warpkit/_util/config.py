"""One loader for every YAML config: a mapping read into a dataclass, recursively, with clear errors.

Used by the WARP config, the frontier config, merge recipes and anything else a user writes in YAML:

- unknown fields are refused with the list of valid ones (a typo never silently falls back to a default);
- values are checked against the field's type hint (`int`, `float`, `str`, `bool`, `list[...]`,
  `dict[...]`, `Literal[...]`, unions, nested dataclasses): `iterations: "two"`, `iterations: 2.5` or
  `iterations: true` name the field and what it must be (a bool is not an int here, unlike in Python);
- `--field VALUE` / `--section.field=VALUE` command-line overrides, values parsed as YAML.

Errors are `ConfigError` (a ValueError); type mismatches are `ConfigTypeError`, also a TypeError.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "apply_overrides",
    "build_dataclass",
    "load_dataclass",
    "load_yaml_mapping",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot work: unknown or missing fields, values out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (also a TypeError, as Python would raise)."""


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file; FileNotFoundError if it is missing, ConfigError if it is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {_one_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{what} file {path} must hold a mapping of fields, got {type(data).__name__}.")
    return data


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` with `--field VALUE` / `--section.field=VALUE` overrides applied (values parsed as YAML)."""
    import yaml

    raw = copy.deepcopy(dict(raw))
    items = list(overrides)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise ConfigError(
                f"unexpected argument {token!r}: overrides look like --field VALUE or --rl.field VALUE."
            )
        key, eq, value = token[2:].partition("=")
        if not eq:
            if not items:
                raise ConfigError(f"override {token} has no value.")
            value = items.pop(0)
        *parents, leaf = key.split(".")
        target = raw
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {token}: {parent} is not a section.")
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {token}: {value!r} is not a YAML value ({_one_line(e)}).") from e
    return raw


def _one_line(error: Exception) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or str(error).splitlines()[0]}{where}"


def build_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Instantiate dataclass `cls` from a mapping, recursively; `where` prefixes every error (a file name)."""
    if not isinstance(data, dict):
        raise ConfigTypeError(
            f"{where} must be a mapping of {cls.__name__} fields, got {type(data).__name__}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown}. Valid fields of {cls.__name__}: {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}.")
    return cls(**kwargs)


def load_dataclass(
    cls: type[T],
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    what: str = "config",
    **fields: Any,
) -> T:
    """`cls` from a YAML file (or nothing), then command-line `overrides`, then `fields` (None values skipped)."""
    raw = load_yaml_mapping(path, what) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    raw.update({k: v for k, v in fields.items() if v is not None})
    return build_dataclass(cls, raw, str(path) if path is not None else what)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(hint, value, where)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigTypeError(f"{where} must be a list, got {type(value).__name__}.")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where} must be a mapping, got {type(value).__name__}.")
        return dict(value)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool))
    ):
        raise ConfigTypeError(f"{where} must be {hint.__name__}, got {value!r}.")
    return value


def _convert_union(hint: Any, value: Any, where: str) -> Any:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, where)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    raise ConfigTypeError(f"{where}: {value!r} matches none of {hint}: {'; '.join(errors)}")

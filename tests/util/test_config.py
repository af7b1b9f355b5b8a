"""The one YAML-to-dataclass loader: types, unknown fields, overrides, one clear error each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from warpkit._util.config import (
    ConfigError,
    ConfigTypeError,
    apply_overrides,
    build_dataclass,
    load_dataclass,
    load_yaml_mapping,
)


@dataclass
class Inner:
    name: str
    weight: float = 1.0


@dataclass
class Outer:
    steps: int
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    inner: Inner | None = None
    extra: dict[str, int] = field(default_factory=dict)
    maybe: int | None = None


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ({"steps": "two"}, ConfigTypeError, r"^c\.yaml\.steps must be int, got 'two'\.$"),
        ({"steps": 2.5}, ConfigTypeError, r"^c\.yaml\.steps must be int, got 2\.5\.$"),
        ({"steps": True}, ConfigTypeError, r"^c\.yaml\.steps must be int, got True\.$"),
        ({"steps": 1, "rate": True}, ConfigTypeError, r"^c\.yaml\.rate must be float, got True\.$"),
        ({"steps": 1, "kind": "c"}, ConfigError, r"^c\.yaml\.kind must be one of \('a', 'b'\), got 'c'\.$"),
        ({"steps": 1, "tags": "x"}, ConfigTypeError, r"^c\.yaml\.tags must be a list, got str\.$"),
        ({"steps": 1, "tags": [1]}, ConfigTypeError, r"^c\.yaml\.tags\[0\] must be str, got 1\.$"),
        ({"steps": 1, "inner": {"nme": "x"}}, ConfigError, r"c\.yaml\.inner: unknown field\(s\) \['nme'\]\. Valid"),
        ({"steps": 1, "inner": {}}, ConfigError, r"c\.yaml\.inner: missing required field\(s\) \['name'\]"),
        ({"steps": 1, "extra": [1]}, ConfigTypeError, r"^c\.yaml\.extra must be a mapping, got list\.$"),
        ({"steps": 1, "maybe": "x"}, ConfigTypeError, r"c\.yaml\.maybe: 'x' matches none of int \| None"),
        ({"stesp": 1}, ConfigError, r"^c\.yaml: unknown field\(s\) \['stesp'\]\. Valid fields of Outer: "),
        ({}, ConfigError, r"^c\.yaml: missing required field\(s\) \['steps'\]\.$"),
        ([1], ConfigTypeError, r"^c\.yaml must be a mapping of Outer fields, got list\.$"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field_and_what_it_must_be(data, error, message):
    with pytest.raises(error, match=message):
        build_dataclass(Outer, data, "c.yaml")


def test_type_errors_are_value_errors_too():
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, ValueError)


def test_good_values_convert():
    built = build_dataclass(Outer, {"steps": 3, "rate": 1, "inner": {"name": "n"}, "maybe": None}, "c")
    assert built == Outer(steps=3, rate=1.0, inner=Inner("n"))
    assert isinstance(built.rate, float)


def test_overrides_nested_and_parsed_as_yaml():
    raw = {"a": 1, "rl": {"beta": 0.1}}
    got = apply_overrides(
        raw, ["--a", "2", "--rl.beta=0.05", "--rl.max_steps", "7", "--new.deep.x", "[1, 2]"]
    )
    assert got == {"a": 2, "rl": {"beta": 0.05, "max_steps": 7}, "new": {"deep": {"x": [1, 2]}}}
    assert raw == {"a": 1, "rl": {"beta": 0.1}}  # the input is not modified
    with pytest.raises(ConfigError, match=r"^override --a has no value\.$"):
        apply_overrides({}, ["--a"])
    with pytest.raises(ConfigError, match="unexpected argument 'a'"):
        apply_overrides({}, ["a", "1"])
    with pytest.raises(ConfigError, match=r"override --a\.b: a is not a section"):
        apply_overrides({"a": 1}, ["--a.b", "2"])


def test_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    with pytest.raises(FileNotFoundError, match=r"config file .*c\.yaml does not exist"):
        load_yaml_mapping(path)
    path.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml_mapping(path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigTypeError, match="must hold a mapping of fields, got list"):
        load_yaml_mapping(path)
    path.write_text("")
    assert load_yaml_mapping(path) == {}
    path.write_text("steps: 1\nrate: 0.5\n")
    assert load_dataclass(Outer, path, ["--steps", "4"], rate=None, kind="b") == Outer(4, 0.5, "b")

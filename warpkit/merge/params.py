"""A typed setting of a merge method or of the merge engine (`Param`) and how the user spells it (`spell`).

The registry (`warpkit.merge.methods`) declares every setting once as a `Param`; `Param.check` is the one
conversion and range check behind the CLI flags, YAML keys, `merge_folders` keywords and the WARP config's
`merge_kwargs`, so every refusal reads the same: the setting as the user wrote it, the value, what is
allowed and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Param", "spell"]


def spell(name: str, cli: bool) -> str:
    """A setting as the user wrote it: `density` in Python and YAML, `--density` on the command line."""
    return "--" + name.replace("_", "-") if cli else name


@dataclass(frozen=True)
class Param:
    """One setting: its type (bool, int, float, str, or list of floats), default, range or choices, help.

    low / high bound numbers, inclusive unless `low_open` (then low itself is refused); `fix` is added to
    an out-of-range message (what to pass instead and why the edge is refused).
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    low_open: bool = False
    fix: str = ""

    def check(self, value: Any, where: str) -> Any:
        """`value` converted to this type, or ValueError naming `where`, the value and what is allowed."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}={value!r} must be true or false.")
            return value
        if self.type is list:
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise ValueError(f"{where}={value!r} must be a list of numbers.")
            return [self._number(float(v), where) for v in value]
        if self.type in (int, float):
            if not _is_number(value) or (self.type is int and float(value) != int(value)):
                raise ValueError(
                    f"{where}={value!r} must be {'an integer' if self.type is int else 'a number'}."
                )
            return self._number(self.type(value), where)
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            allowed = f"one of {list(self.choices)}" if self.choices else "a string"
            raise ValueError(f"{where}={value!r} must be {allowed}.")
        return value

    def _number(self, value: float, where: str) -> Any:
        if not math.isfinite(value):
            raise ValueError(f"{where}={value} must be finite.")
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not (low < value if self.low_open else low <= value) or not value <= high:
            interval = f"{'(' if self.low_open else '['}{low:g}, {high:g}]"
            fix = f"; {self.fix}" if self.fix else ""
            raise ValueError(f"{where}={value} is outside {interval} ({self.help}){fix}.")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

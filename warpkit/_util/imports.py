"""`package.module:object` specs (reward functions, prompt sets, scorers) imported with one clear error."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object", "is_object_spec"]


def is_object_spec(spec: str) -> bool:
    """True for `package.module:object` (a colon with text on both sides), as opposed to a path."""
    module, sep, name = spec.partition(":")
    return bool(sep and module and name)


def import_object(spec: str, what: str, *, callable_: bool = False) -> Any:
    """The object named by `spec` = `package.module:object`; `what` names it in errors (e.g. "reward").

    ValueError when the spec is malformed or cannot be imported; TypeError when `callable_` and it is not.
    """
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{what} {spec!r} must be 'package.module:function'.")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"{what} {spec!r} cannot be imported: {e}. Check the spelling, and that its module is importable "
            "here (installed, or its folder on PYTHONPATH)."
        ) from e
    if callable_ and not callable(obj):
        raise TypeError(f"{what} {spec!r} is not callable.")
    return obj

"""Scorers importable by `warpkit merge --method greedy_soup --scorer tests.merge.scorers:<name>`.

`table_score` is the greedy_soup docstring's example: it reads which candidates a folder holds (the
folder's own name, or the models of its warpkit_merge.json) and looks the score up, recording each call.
"""

from __future__ import annotations

import json
from pathlib import Path

from warpkit.testing import POSITIVE_TOKENS

TABLE = {"A": 0.7, "B": 0.9, "C": 0.8, "B,C": 0.92, "A,B,C": 0.91}
CALLS: list[str] = []
NOT_CALLABLE = 3.0


def ingredients(folder: Path) -> list[str]:
    recipe = Path(folder) / "warpkit_merge.json"
    if recipe.exists():
        return sorted(Path(m["path"]).name for m in json.loads(recipe.read_text())["models"])
    return [Path(folder).name]


def table_score(folder: Path) -> float:
    key = ",".join(ingredients(folder))
    CALLS.append(key)
    return TABLE[key]


def positive_fraction(prompts, completions, completion_ids, **_) -> list[float]:
    """A frontier reward (TRL's signature): the fraction of a completion's tokens that are the ten positive
    words the hand-made frontier policies of `warpkit.testing.build_tiny_frontier_models` push up."""
    positive = set(POSITIVE_TOKENS)
    return [sum(t in positive for t in ids) / max(len(ids), 1) for ids in completion_ids]

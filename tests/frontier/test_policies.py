"""Policy entries: one kind each, LITI etas, soup weights, trajectory order, the points they expand to."""

from __future__ import annotations

import pytest
import yaml

from warpkit.frontier.config import FrontierConfig, load_frontier_config
from warpkit.frontier.policies import PolicySpec, SoupSweep, expand_trajectory


def _load_policy(tmp_path, policy: dict) -> FrontierConfig:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"reference": "x", "policies": [{"name": "rs", "method": "m", **policy}]}))
    return load_frontier_config(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "reference: x\npolicies:\n  - {name: a, method: m, path: p, liti: {init: i, merged: j}}\n",
            "exactly one of path, trajectory, liti",
        ),
        (
            "reference: x\npolicies:\n  - {name: a, method: m, liti: {init: i, merged: j, etas: [0.5, 1.5]}}\n",
            r"liti.etas \[1.5\] are outside \[0, 1\].*allow_extrapolation",
        ),
    ],
    ids=["two-kinds", "eta-above-1"],
)
def test_bad_policy_entry_is_refused_when_the_config_loads(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_frontier_config(path)


@pytest.mark.parametrize(
    ("soup", "match"),
    [
        (
            {"models": ["a", "b"], "weights": [[0.5, 0.4]]},
            r"policy 'rs': soup weight vector \[0.5, 0.4\] sums to 0.9",
        ),
        (
            {"models": ["a", "b"], "weights": [[1.5, -0.5]]},
            r"\[1.5, -0.5\] has a negative entry.*>= 0 that sum to 1",
        ),
        (
            {"models": ["a", "b"], "weights": [[0.5, 0.25, 0.25]]},
            r"\[0.5, 0.25, 0.25\] has 3 entries for 2 models",
        ),
        ({"models": ["a", "b", "c"]}, r"soup of 3 models needs explicit soup.weights"),
        ({"models": ["a"]}, r"a soup needs at least 2 models, got 1.*`path` entry"),
        ({"models": ["a", "b"], "num_points": 1}, r"num_points must be >= 2"),
        ({"models": ["a", "b"], "weights": []}, r"soup.weights is empty"),
        ({"models": ["a", "b"], "weights": [[0.5, 0.5]], "num_points": 3}, r"num_points=3 and soup.weights"),
    ],
    ids=["sum", "negative", "length", "three-without-weights", "one-model", "one-point", "empty", "both"],
)
def test_bad_soup_is_refused_when_the_config_loads(tmp_path, soup, match):
    with pytest.raises(ValueError, match=match):
        _load_policy(tmp_path, {"soup": soup})


def test_soup_sweep_vectors_and_point_names():
    assert SoupSweep(["a", "b"]).vectors() == [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    spec = PolicySpec("rs", "m", soup=SoupSweep(["a", "b", "c"], weights=[[0.5, 0.25, 0.25], [0, 0, 1]]))
    FrontierConfig(reference="r", policies=[spec])  # three models with explicit weights are fine
    points = [point for point, folder in spec.points()]
    assert [p.name for p in points] == ["rs/w=0.5,0.25,0.25", "rs/w=0,0,1"]
    assert {p.kind for p in points} == {"soup"} and points[0].weights == [0.5, 0.25, 0.25]


def test_trajectory_glob_is_in_step_order_not_lexicographic(tmp_path, monkeypatch):
    for step in (100, 20, 3):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    monkeypatch.setenv("RUN", str(tmp_path / "run"))
    got = expand_trajectory("${RUN}/checkpoint-*")
    assert [s for s, _ in got] == [3, 20, 100]
    assert got[0][1] == str(tmp_path / "run" / "checkpoint-3")
    assert expand_trajectory(["b/final", "a/checkpoint-7"]) == [(0, "b/final"), (7, "a/checkpoint-7")]
    with pytest.raises(ValueError, match="matches no folder"):
        expand_trajectory(str(tmp_path / "nothing-*"))

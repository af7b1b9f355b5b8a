"""`FrontierConfig` and its YAML loader: unknown or badly typed fields, shipped configs, reserved names."""

from __future__ import annotations

from pathlib import Path

import pytest

from warpkit.frontier.config import FrontierConfig, load_frontier_config
from warpkit.frontier.policies import LitiSweep, PolicySpec

SHIPPED = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("reference: x\ntemprature: 0.9\n", ValueError, r"unknown field\(s\) \['temprature'\].*Valid fields"),
        (
            "reference: x\npolicies:\n  - {name: a, method: m, path: p, betta: 1}\n",
            ValueError,
            r"policies\[0\]: unknown field\(s\) \['betta'\]",
        ),
        ("reference: x\nsamples_per_prompt: two\n", TypeError, "samples_per_prompt must be int"),
        ("reference: x\ntemperature: 0\n", ValueError, "temperature must be > 0"),
    ],
    ids=["unknown-field", "unknown-policy-field", "bad-type", "temperature"],
)
def test_unknown_and_badly_typed_config_fields_are_refused(tmp_path, text, error, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(error, match=match):
        load_frontier_config(path)


def test_every_shipped_frontier_config_parses(monkeypatch):
    monkeypatch.setenv("WARPKIT_TINY", "/tiny")
    monkeypatch.setenv("WARPKIT_RUN", "/run")
    configs = sorted([*SHIPPED.glob("frontier_*.yaml"), *SHIPPED.glob("rewarded_soup_*.yaml")])
    assert {c.name for c in configs} >= {"frontier_tiny.yaml", "rewarded_soup_tiny.yaml"}
    for c in configs:
        config = load_frontier_config(c)
        assert config.policies
    tiny = load_frontier_config(configs[[c.name for c in configs].index("frontier_tiny.yaml")])
    assert tiny.reference == "/tiny/sft"  # $VARS expanded in paths
    assert tiny.policies[-1].liti == LitiSweep("/tiny/sft", "/tiny/bias-6", [0.0, 0.3, 0.5, 0.8, 1.0])


def test_reference_name_is_reserved():
    with pytest.raises(ValueError, match="'sft' names the reference point"):
        FrontierConfig(reference="x", policies=[PolicySpec("sft", "m", path="p")])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"extra_rewards": {"not a name": "m:f"}},
            r"extra_rewards name 'not a name' is not usable.*identifiers",
        ),
        ({"extra_rewards": {"reward": "m:f"}}, r"extra_rewards name 'reward' is not usable"),
        ({"extra_rewards": {"Len": "m:f", "len": "m:g"}}, r"\['Len', 'len'\] differ only in case"),
        ({"extra_rewards": {"b": ""}}, r"extra_rewards\['b'\] must be a reward spec"),
        (
            {"extra_rewards": {"b": "m:f"}, "reward_axes": ["b", "c"]},
            r"reward_axes must be two different names",
        ),
        ({"reward_axes": ["reward", "b"]}, r"reward_axes .* needs extra_rewards"),
    ],
    ids=["not-identifier", "reward", "case", "empty-spec", "unknown-axis", "axes-without-extras"],
)
def test_bad_extra_rewards_are_refused(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FrontierConfig(reference="x", **fields)

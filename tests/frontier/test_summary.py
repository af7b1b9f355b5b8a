"""`summarise`: fronts across rewards on hand-made rows (the reward-KL fronts: tests/frontier/test_cli.py)."""

from __future__ import annotations

import math

from tests.frontier.helpers import RUN_FACTS, hand_made_row, without_extra_rewards
from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.summary import summarise


def test_reward_fronts_in_summary_on_hand_made_rows():
    rows = [
        hand_made_row("sft", "sft", 0.0, 0.5),
        hand_made_row("soup/w=1,0", "rs", 1.0, 0.0, "soup", [1.0, 0.0]),
        hand_made_row("soup/w=0.5,0.5", "rs", 0.7, 0.7, "soup", [0.5, 0.5]),
        hand_made_row("soup/w=0,1", "rs", -0.2, 1.0, "soup", [0.0, 1.0]),
        hand_made_row("bad-mix", "rs", 0.3, 0.3),  # dominated by the middle of the soup
        hand_made_row("ppo", "other", 0.5, 0.0),
        hand_made_row(
            "nan", "other", 0.9, math.nan
        ),  # no value on the y reward: left out of the reward front
    ]
    config = FrontierConfig(reference="r", extra_rewards={"b": "m:f"})
    result = summarise(config, rows, **RUN_FACTS)
    assert result.reward_front_axes == ["reward", "b"]
    assert result.reward_fronts == {
        "rs": ["soup/w=0,1", "soup/w=0.5,0.5", "soup/w=1,0"],
        "other": ["sft", "ppo"],
    }
    # reward_axes swaps the axes: the same points, in increasing order of the new x.
    config = FrontierConfig(reference="r", extra_rewards={"b": "m:f"}, reward_axes=["b", "reward"])
    result = summarise(config, rows, **RUN_FACTS)
    assert result.reward_fronts["rs"] == ["soup/w=1,0", "soup/w=0.5,0.5", "soup/w=0,1"]
    # Without extra rewards: no reward front.
    plain = without_extra_rewards(rows[:-1])
    result = summarise(FrontierConfig(reference="r"), plain, **RUN_FACTS)
    assert result.reward_fronts == {} and result.reward_front_axes == []

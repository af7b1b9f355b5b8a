"""`write_frontier` on hand-made results: rewards.png and reward fronts only with extra rewards.

(The files of real runs are checked in tests/frontier/test_run.py and test_cli.py.)
"""

from __future__ import annotations

import json

from tests.frontier.helpers import RUN_FACTS, hand_made_row, without_extra_rewards
from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.output import write_frontier
from warpkit.frontier.summary import summarise


def test_rewards_png_only_with_extra_rewards(tmp_path):
    rows = [
        hand_made_row("sft", "sft", 0.0, 0.5),
        *[
            hand_made_row(f"soup/w={1 - t:g},{t:g}", "rs", 1 - t**2, t, "soup", [1 - t, t])
            for t in (0, 0.25, 0.5, 0.75, 1)
        ],
        hand_made_row("ppo", "other", 0.5, 0.1),
    ]
    config = FrontierConfig(
        reference="r", extra_rewards={"b": "m:f"}, title="Hand-made", method_labels={"rs": "rewarded soup"}
    )
    out = write_frontier(summarise(config, rows, **RUN_FACTS), tmp_path / "with")
    png = out / "rewards.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "reward_fronts" in json.loads((out / "frontier.json").read_text())

    plain = without_extra_rewards(rows)
    out = write_frontier(summarise(FrontierConfig(reference="r"), plain, **RUN_FACTS), tmp_path / "without")
    assert (out / "frontier.png").is_file() and not (out / "rewards.png").exists()
    assert "reward_fronts" not in json.loads((out / "frontier.json").read_text())
    assert "weights" in (out / "frontier.csv").read_text().splitlines()[0]


def test_each_method_of_a_plot_gets_its_own_colour():
    """Up to 20 methods, no two share a colour (the evidence plot has 11; tab10 repeated one), and up to
    10 they are tab10's, as before."""
    from matplotlib import colormaps

    from warpkit.frontier.plot import method_colours

    for n in range(1, 21):
        colours = method_colours(n)
        assert len(colours) == n and len(set(colours)) == n, n
    assert method_colours(10) == [colormaps["tab10"](i) for i in range(10)]
    assert method_colours(21)[20] == method_colours(21)[0]  # past 20 they cycle

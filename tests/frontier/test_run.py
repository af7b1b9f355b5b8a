"""`run_frontier` on rewarded soups: soup points built in memory, extra rewards on the same samples,
fronts across rewards, and the files written.

The models (`warpkit.testing.build_rewarded_soup_models`): a tiny GPT-2 whose lm_head column 0 is an exact
per-token logit bias, and two hand-made "policies fine-tuned on different rewards" from it: ``positive``
adds a bias to ten positive words (sentiment reward), ``concise`` adds a bias to EOS (brevity reward). A
soup of the two interpolates both biases linearly in w, so sweeping w trades one reward for the other.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.frontier.helpers import CALLS, PROMPTS, THIS, small_config
from warpkit._util.files import TMP_MARK
from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.output import write_frontier
from warpkit.frontier.policies import PolicySpec, SoupSweep
from warpkit.frontier.run import run_frontier
from warpkit.frontier.summary import FrontierResult
from warpkit.merge import weighted_average
from warpkit.testing import POSITIVE_TOKENS


def _soup(root: Path, **kw) -> PolicySpec:
    return PolicySpec(
        "soup", "rewarded_soup", soup=SoupSweep([str(root / "positive"), str(root / "concise")], **kw)
    )


# ----------------------------------------------------------------------------- the interpolation


def test_weighted_average_is_the_float64_weighted_sum(soup_root):
    a = AutoModelForCausalLM.from_pretrained(soup_root / "positive").state_dict()
    b = AutoModelForCausalLM.from_pretrained(soup_root / "concise").state_dict()
    # Make the two states differ everywhere, so the check covers every tensor, not just lm_head.
    b = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in b.items()}
    soup = weighted_average([a, b], [0.25, 0.75])
    assert soup.keys() == a.keys()
    for name, t in soup.items():
        expected = (0.25 * a[name].double() + 0.75 * b[name].double()).to(a[name].dtype)
        assert t.dtype == a[name].dtype and torch.equal(t, expected), name
    # Weights that are not binary fractions tell a float64 accumulation from a float32 one: each entry is
    # the float64 sum rounded once to float32, within half a float32 ulp (|error| <= 2^-24 |value|), which
    # a float32 accumulation misses (it rounds after every product and sum).
    c = {k: -v for k, v in a.items()}
    soup = weighted_average([a, b, c], [0.3, 0.6, 0.1])
    for name, t in soup.items():
        expected = 0.3 * a[name].double() + 0.6 * b[name].double() + 0.1 * c[name].double()
        assert ((t.double() - expected).abs() <= 2**-24 * (1 + 1e-9) * expected.abs() + 1e-45).all(), name
    # The end points are the models themselves, bit for bit.
    assert all(torch.equal(v, a[k]) for k, v in weighted_average([a, b], [1.0, 0.0]).items())
    assert all(torch.equal(v, b[k]) for k, v in weighted_average([a, b], [0.0, 1.0]).items())
    # Integer buffers are copied from the first state, never interpolated.
    ints = weighted_average([{"n": torch.tensor([3])}, {"n": torch.tensor([5])}], [0.5, 0.5])
    assert torch.equal(ints["n"], torch.tensor([3]))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="different tensors"):
        weighted_average([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [0.5, 0.5])


# ----------------------------------------------------------------------------- a run


@dataclass
class SoupRun:
    """One run of sft, the two models as plain points and their 3-point soup, on three extra rewards."""

    config: FrontierConfig
    result: FrontierResult
    calls: list[dict]  # what the main reward scored, point by point

    @property
    def rows(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.result.points}


@pytest.fixture(scope="module")
def soup_run(soup_root) -> SoupRun:
    config = small_config(
        soup_root / "sft",
        [
            PolicySpec("positive", "single_reward", path=str(soup_root / "positive")),
            PolicySpec("concise", "single_reward", path=str(soup_root / "concise")),
            _soup(soup_root, num_points=3),
        ],
        extra_rewards={
            "positive": f"{THIS}:positive_count",
            "chars": f"{THIS}:char_count",
            "sometimes": f"{THIS}:nan_first",
        },
        on_nan_reward="skip",
        reward=f"{THIS}:recorded_length",
        max_new_tokens=4,
    )
    CALLS.clear()
    result = run_frontier(config, progress=False)
    return SoupRun(config, result, list(CALLS))


def test_soup_points_are_the_models_at_the_ends(soup_run):
    rows = soup_run.rows
    assert list(rows) == ["sft", "positive", "concise", "soup/w=1,0", "soup/w=0.5,0.5", "soup/w=0,1"]
    assert rows["soup/w=0.5,0.5"]["kind"] == "soup" and rows["soup/w=0.5,0.5"]["weights"] == [0.5, 0.5]
    assert rows["positive"]["weights"] is None

    # The end points of the soup ARE the two models: same weights bit for bit, same random numbers, hence
    # the very same samples and numbers as the plain path points.
    keys = (
        "reward_mean",
        "reward_stderr",
        "kl_mean",
        "kl_stderr",
        "kl_exact_mean",
        "length_mean",
        "diversity",
    )
    for soup, model in (("soup/w=1,0", "positive"), ("soup/w=0,1", "concise")):
        for key in keys:
            assert rows[soup][key] == rows[model][key], (soup, key)
        assert rows[soup]["rewards"] == rows[model]["rewards"]
    # The middle of the soup is neither model (the interpolation really happened).
    assert rows["soup/w=0.5,0.5"]["kl_exact_mean"] not in (
        rows["positive"]["kl_exact_mean"],
        rows["concise"]["kl_exact_mean"],
    )
    # The hand-made trade-off: the positive model says positive words, the concise one stops early.
    assert rows["positive"]["rewards"]["positive"]["mean"] > rows["concise"]["rewards"]["positive"]["mean"]
    assert rows["positive"]["length_mean"] > rows["concise"]["length_mean"]


def test_extra_rewards_score_the_samples_of_the_main_reward(soup_run):
    """Extra rewards scored the very completions the main reward saw, and their means and standard errors
    match an independent recomputation (sample j of prompt i is row i * k + j)."""
    config, result, rows = soup_run.config, soup_run.result, soup_run.rows
    assert len(soup_run.calls) == len(rows)
    for call, row in zip(soup_run.calls, result.points, strict=True):
        index = [i for i in range(len(PROMPTS)) for _ in range(config.samples_per_prompt)]
        counts = [float(sum(Counter(ids)[t] for t in POSITIVE_TOKENS)) for ids in call["ids"]]
        chars = [float(len(c)) for c in call["completions"]]
        for name, values in (("positive", counts), ("chars", chars)):
            mean, stderr = row["rewards"][name]["mean"], row["rewards"][name]["stderr"]
            assert mean == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-12), (row["name"], name)
            per_prompt = [
                [v for v, i in zip(values, index, strict=True) if i == p] for p in range(len(PROMPTS))
            ]
            se2 = sum((g[0] - g[1]) ** 2 / 2 / 2 for g in per_prompt) / len(PROMPTS) ** 2  # s^2 / n, n = 2
            assert stderr == pytest.approx(math.sqrt(se2), rel=1e-9, abs=1e-12), (row["name"], name)
            assert row["rewards"][name]["num_skipped"] == 0
        # on_nan_reward: skip drops the NaN of an extra reward from its mean and counts it.
        assert row["rewards"]["sometimes"]["mean"] == 1.0 and row["rewards"]["sometimes"]["num_skipped"] == 1
    assert result.skipped["extra_rewards"]["sometimes"] == {name: 1 for name in rows}


def test_fronts_across_rewards(soup_run):
    """Fronts across rewards: (main reward, first extra reward), both maximised, within each method."""
    result, rows = soup_run.result, soup_run.rows
    assert result.reward_front_axes == ["reward", "positive"]
    assert set(result.reward_fronts) == {"single_reward", "rewarded_soup"}
    for method, names in result.reward_fronts.items():
        xs = [rows[n]["reward_mean"] for n in names]
        ys = [rows[n]["rewards"]["positive"]["mean"] for n in names]
        assert xs == sorted(xs) and ys == sorted(ys, reverse=True), method
        members = [r for r in result.points if r["method"] in (method, "sft")]
        for r in members:  # nothing outside the front dominates a front point
            assert r["name"] in names or any(
                rows[n]["reward_mean"] >= r["reward_mean"]
                and rows[n]["rewards"]["positive"]["mean"] >= r["rewards"]["positive"]["mean"]
                for n in names
            )
    metrics = result.metrics()
    assert (
        metrics["frontier/soup/w=0.5,0.5/reward_positive_mean"]
        == rows["soup/w=0.5,0.5"]["rewards"]["positive"]["mean"]
    )
    assert "frontier/sft/reward_chars_stderr" in metrics


def test_files_of_a_soup_run(soup_run, tmp_path):
    result, rows = soup_run.result, soup_run.rows
    out = write_frontier(result, tmp_path / "out")
    doc = json.loads((out / "frontier.json").read_text())
    assert doc["reward_fronts"] == result.reward_fronts and doc["reward_front_axes"] == ["reward", "positive"]
    with open(out / "frontier.csv", newline="") as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header[-7:] == [
        "weights",
        "reward_positive_mean",
        "reward_positive_stderr",
        "reward_chars_mean",
        "reward_chars_stderr",
        "reward_sometimes_mean",
        "reward_sometimes_stderr",
    ]
    by_name = {r["name"]: r for r in table}
    assert json.loads(by_name["soup/w=0.5,0.5"]["weights"]) == [0.5, 0.5] and by_name["sft"]["weights"] == ""
    assert float(by_name["concise"]["reward_chars_mean"]) == rows["concise"]["rewards"]["chars"]["mean"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert set(samples[0]["rewards"]) == {"positive", "chars", "sometimes"}
    for png in ("frontier.png", "rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if TMP_MARK in p.name]

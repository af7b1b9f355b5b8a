"""Rewards of the frontier: functions and reward-model folders, their values checked (NaN, length, type)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from tests.frontier.helpers import THIS, small_config
from warpkit.frontier.rewards import load_reward
from warpkit.frontier.run import run_frontier


def test_nan_reward_errors_or_is_skipped_and_counted(sft):
    config = small_config(sft, reward=f"{THIS}:nan_first")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*on_nan_reward: skip"):
        run_frontier(config, progress=False)
    config.on_nan_reward = "skip"
    result = run_frontier(config, progress=False)
    (row,) = result.points
    assert row["num_reward_skipped"] == 1 and result.skipped["rewards"] == {"sft": 1}
    assert math.isfinite(row["reward_mean"])
    assert result.metrics()["frontier/sft/reward_mean"] == row["reward_mean"]


def test_nan_extra_reward_is_an_error_by_default(soup_root):
    config = small_config(
        soup_root / "sft",
        reward=f"{THIS}:recorded_length",
        max_new_tokens=4,
        extra_rewards={"sometimes": f"{THIS}:nan_first"},
    )
    with pytest.raises(
        ValueError, match=r"extra reward 'sometimes' returned 1 non-finite.*on_nan_reward: skip"
    ):
        run_frontier(config, progress=False)


@pytest.mark.parametrize(
    ("reward", "error", "match"),
    [
        ("one_short", ValueError, r"returned 3 values for 4 completions"),
        ("strings", TypeError, "returned 'good'"),
        ("missing", ValueError, "cannot be imported"),
    ],
)
def test_reward_of_the_wrong_length_or_type_is_refused(sft, reward, error, match):
    with pytest.raises(error, match=match):
        run_frontier(small_config(sft, reward=f"{THIS}:{reward}"), progress=False)


def test_reward_model_folder(sft, tmp_path):
    """A folder with a 1-label sequence classifier is a reward: scores equal a direct forward pass."""
    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=50256)
    ).eval()
    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.save_pretrained(folder)
    reward = load_reward(str(folder), torch.device("cpu"), batch_size=2)
    prompts, completions = ["The movie was", "Plot:"], [" great fun", " a total mess, honestly"]
    got = reward(prompts=prompts, completions=completions)
    with torch.no_grad():
        want = [
            rm(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert got == pytest.approx(want, abs=1e-5)
    result = run_frontier(small_config(sft, reward=str(folder)), progress=False)
    assert math.isfinite(result.points[0]["reward_mean"])

"""Helpers of the frontier tests: a small config, rewards that configs name as
`tests.frontier.helpers:<function>`, and hand-made rows of frontier.json.

pytest puts the checkout on sys.path, so the frontier imports this very module when a config names one of
its rewards: `CALLS` seen by a test is the list `recorded_length` appended to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.policies import PolicySpec
from warpkit.testing import POSITIVE_TOKENS

THIS = "tests.frontier.helpers"
PROMPTS = ["The movie was", "I think the ending"]


def small_config(reference: str | Path, policies: Sequence[PolicySpec] = (), **fields) -> FrontierConfig:
    """A frontier of ``PROMPTS`` on CPU, 2 samples of at most 3 tokens each, the VADER reward; ``fields``
    replace any setting."""
    settings = {
        "prompts": PROMPTS,
        "num_prompts": None,
        "samples_per_prompt": 2,
        "max_new_tokens": 3,
        "batch_size": 8,
        "reward": "warpkit.workloads.default:vader_reward",
        "device": "cpu",
    } | fields
    return FrontierConfig(reference=str(reference), policies=list(policies), **settings)


# The main reward records what it scored, so extra rewards can be recomputed independently.
CALLS: list[dict] = []


def recorded_length(completions, completion_ids, **_):
    CALLS.append({"completions": list(completions), "ids": [list(c) for c in completion_ids]})
    return [float(len(c)) for c in completion_ids]


def positive_count(completion_ids, **_):
    # A tensor, as reward models return: the frontier converts it (check_rewards).
    positive = torch.tensor(POSITIVE_TOKENS)
    return torch.stack(
        [torch.isin(torch.tensor(c, dtype=torch.long), positive).sum() for c in completion_ids]
    ).float()


def char_count(completions, **_):
    return [float(len(c)) for c in completions]


def nan_first(completions, **_):
    return [math.nan] + [1.0] * (len(completions) - 1)


def one_short(completions, **_):
    return [0.0] * (len(completions) - 1)


def strings(completions, **_):
    return ["good"] * len(completions)


# What `summarise` needs to know of a run, as a run on 2 prompts on CPU would give it.
RUN_FACTS = {"reference_dir": "r", "device": "cpu", "context": None, "prompts_too_long": [], "num_prompts": 2}


def hand_made_row(
    name: str, method: str, reward: float, other: float, kind: str = "path", weights=None
) -> dict:
    """A row of frontier.json with main reward ``reward`` and extra reward ``b`` = ``other``; KL 0 for the
    SFT reference, 1 otherwise."""
    return {
        "name": name,
        "method": method,
        "kind": kind,
        "spec": name.split("/")[0],
        "step": None,
        "eta": None,
        "weights": weights,
        "reward_mean": reward,
        "reward_stderr": 0.02,
        "kl_mean": 0.0 if method == "sft" else 1.0,
        "kl_stderr": 0.01,
        "kl_exact_mean": 0.0 if method == "sft" else 1.0,
        "kl_exact_stderr": 0.01,
        "length_mean": 3.0,
        "diversity": 1.0,
        "num_reward_skipped": 0,
        "params": {},
        "rewards": {"b": {"mean": other, "stderr": 0.03, "num_skipped": 0}},
    }


def without_extra_rewards(rows: list[dict]) -> list[dict]:
    """The rows as a run without extra rewards makes them (empty ``rewards``)."""
    return [{k: v for k, v in r.items() if k != "rewards"} | {"rewards": {}} for r in rows]

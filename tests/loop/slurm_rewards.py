"""Reward functions for the SLURM tests: the tiny config's VADER reward, slowed down so that a job can be
cancelled between two of its checkpoints (same values, so the same training bits), and one that always fails."""

from __future__ import annotations

import os
import time
from typing import Any

from warpkit.workloads.default import vader_reward as _vader


def vader_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """`warpkit.workloads.default:vader_reward` after WARPKIT_TEST_REWARD_SLEEP seconds (default 1.5)."""
    time.sleep(float(os.environ.get("WARPKIT_TEST_REWARD_SLEEP", "1.5")))
    return _vader(completions, **kwargs)


def broken_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    raise RuntimeError("broken_reward always fails (a test of max_retries)")

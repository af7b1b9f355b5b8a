"""Statistics of a point's samples: mean and standard error over a fixed prompt set, distinct-n (by hand)."""

from __future__ import annotations

import math

import pytest

from warpkit.frontier.stats import distinct_n, mean_stderr


@pytest.mark.parametrize(
    ("values", "prompt_index", "mean", "se"),
    [
        # Prompt 0: [1, 3] (mean 2, var 2); prompt 1: [4, 6, 8] (mean 6, var 4).
        # mean = (2 + 6) / 2 = 4; se^2 = (2/2 + 4/3) / 2^2 = 7/12; NaN values are left out.
        ([1, 3, 4, 6, math.nan, 8], [0, 0, 1, 1, 1, 1], 4.0, math.sqrt(7 / 12)),
        # One sample per prompt: the i.i.d. formula, values 1, 2, 6: mean 3, var 7, se sqrt(7/3).
        ([1, 2, 6], [0, 1, 2], 3.0, math.sqrt(7 / 3)),
    ],
    ids=["within-prompt", "one-sample-per-prompt"],
)
def test_mean_stderr_hand_numbers(values, prompt_index, mean, se):
    assert mean_stderr(values, prompt_index) == (pytest.approx(mean), pytest.approx(se))


@pytest.mark.parametrize(
    ("completions", "n", "eos", "expected"),
    [
        # bigrams: (1,2) (2,1) (1,2) | (1,2) (2,3): 5 in all, 3 distinct; EOS (6) dropped; no cross-sample n-gram
        ([[1, 2, 1, 2, 6], [1, 2, 3]], 2, 6, 3 / 5),
        ([[1, 2, 3]], 1, None, 1.0),
        ([[1], [2]], 2, None, math.nan),  # no completion has 2 tokens
    ],
    ids=["repeats-and-eos", "all-distinct", "too-short"],
)
def test_distinct_n_hand_numbers(completions, n, eos, expected):
    got = distinct_n(completions, n, eos_token_id=eos)
    assert math.isnan(got) if math.isnan(expected) else got == expected  # exact: ratios of small integers

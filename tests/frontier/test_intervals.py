"""Paired intervals of reward gaps at matched KL and bootstrap intervals of hypervolumes, against numbers
worked out by hand (in the comments) and against the exact bootstrap distribution enumerated for 2 prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.frontier.helpers import RUN_FACTS
from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.intervals import (
    bootstrap_counts,
    bootstrap_interval,
    front_coefficients,
    hypervolumes,
    paired_gap,
    t_interval,
    t_quantile,
)
from warpkit.frontier.output import comparison_lines
from warpkit.frontier.stats import per_prompt_means
from warpkit.frontier.summary import summarise


@pytest.mark.parametrize(
    ("q", "df", "table"),  # Student's t table (4 decimals)
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 34, 2.0322), (0.95, 10, 1.8125), (0.995, 5, 4.0321)],
)
def test_t_quantile_matches_the_table(q, df, table):
    assert t_quantile(q, df) == pytest.approx(table, abs=1e-4)


def test_t_interval_of_three_seeds_by_hand():
    # mean 2, s = 1, half width t_{0.975,2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (mean, lo, hi) == pytest.approx((2.0, -0.484138, 4.484138), abs=1e-5)
    assert t_interval([5.0])[0] == 5.0 and math.isnan(t_interval([5.0])[1])
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_front_coefficients_interpolate_the_front_only():
    kl, reward = [0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.1, 0.9]  # (2, 0.1) is dominated by (1, 0.5)
    assert front_coefficients(kl, reward, 2.0) == pytest.approx({1: 0.5, 3: 0.5})
    assert front_coefficients(kl, reward, 0.25) == pytest.approx({0: 0.75, 1: 0.25})
    assert front_coefficients(kl, reward, 3.0) == pytest.approx({1: 0.0, 3: 1.0})
    assert front_coefficients(kl, reward, 3.5) == {}


def test_paired_gap_by_hand():
    sft = [0.0, 0.3, 0.6]  # per-prompt rewards of 3 prompts
    a = [sft, [0.6, 0.6, 0.9]]  # r_a = 0.5 sft + 0.5 a1 = [0.3, 0.45, 0.75]
    b = [sft, [0.2, 0.5, 0.5]]  # r_b = b1
    # d = [0.1, -0.05, 0.25]: mean 0.1, s = 0.15, se = 0.15 / sqrt(3) = 0.0866025, half = 4.302653 se = 0.372621
    gap, se, lo, hi = paired_gap(a, {0: 0.5, 1: 0.5}, b, {1: 1.0})
    assert (gap, se, lo, hi) == pytest.approx((0.1, 0.0866025, -0.272621, 0.472621), abs=1e-6)
    # pairing matters: the same means unpaired (prompt order of b reversed) give another interval
    shuffled = paired_gap(a, {0: 0.5, 1: 0.5}, [sft, [0.5, 0.5, 0.2]], {1: 1.0})
    assert shuffled[0] == pytest.approx(0.1) and shuffled[1] != pytest.approx(se)
    # a prompt without a reward (NaN) leaves the comparison: d = [0.1, 0.25]
    holed = paired_gap([sft, [0.6, math.nan, 0.9]], {0: 0.5, 1: 0.5}, b, {1: 1.0})
    assert holed[0] == pytest.approx(0.175) and holed[1] == pytest.approx(0.075)


def _all_resamples_of_two_prompts() -> np.ndarray:
    """The 4 equally likely ordered draws of 2 prompts with replacement, as counts."""
    return np.array([[2, 0], [1, 1], [1, 1], [0, 2]])


def test_bootstrap_interval_is_the_percentile_of_the_enumerated_resamples():
    kl = np.array([[1.0, 3.0]])
    reward = np.array([[0.5, 0.9]])
    counts = _all_resamples_of_two_prompts()
    # mean reward per resample: 0.5, 0.7, 0.7, 0.9 -> quantiles 0.25 and 0.75 (linear): 0.65 and 0.75
    got = bootstrap_interval(kl, reward, counts, lambda k, r: {"r": r[0]}, level=0.5)
    assert got["r"] == pytest.approx((0.65, 0.75))
    # hypervolume of {(kl, reward)} against (4, 0): (4 - kl)(reward - 0) = 1.5, 1.4, 1.4, 0.9 per resample
    # -> sorted 0.9, 1.4, 1.4, 1.5 -> quantile 0.25 = 0.9 + 0.75 * 0.5 = 1.275, 0.75 = 1.4 + 0.25 * 0.1 = 1.425
    got = bootstrap_interval(kl, reward, counts, hypervolumes({"m": [0]}, 4.0, 0.0), level=0.5)
    assert got["m"] == pytest.approx((1.275, 1.425))
    # a prompt without a value for the point is left out of that point's mean: every resample gives 0.5 or
    # (when only the missing prompt is drawn) NaN, which the percentile ignores
    holed = bootstrap_interval(kl, np.array([[0.5, math.nan]]), counts, lambda k, r: {"r": r[0]}, level=0.5)
    assert holed["r"] == pytest.approx((0.5, 0.5))


def test_bootstrap_counts_draw_every_prompt_set_with_its_probability():
    counts = bootstrap_counts(2, 40000, seed=0)
    assert counts.shape == (40000, 2) and (counts.sum(axis=1) == 2).all()
    # P(both draws prompt 0) = 1/4, P(one of each) = 1/2
    assert (counts[:, 0] == 2).mean() == pytest.approx(0.25, abs=0.01)
    assert (counts[:, 0] == 1).mean() == pytest.approx(0.5, abs=0.01)
    assert (bootstrap_counts(5, 3, seed=1) == bootstrap_counts(5, 3, seed=1)).all()


def test_per_prompt_means_skip_nan_and_keep_prompt_order():
    got = per_prompt_means([1.0, 3.0, math.nan, math.nan, 2.0], [0, 0, 1, 1, 2])
    assert got[0] == 2.0 and math.isnan(got[1]) and got[2] == 2.0


def _row(name: str, method: str, kl: list[float], reward: list[float]) -> dict:
    return {
        "name": name, "method": method, "kind": "path", "spec": name, "step": None, "eta": None,
        "weights": None, "params": {}, "rewards": {}, "num_reward_skipped": 0,
        "reward_mean": sum(reward) / len(reward), "reward_stderr": 0.01,
        "kl_mean": sum(kl) / len(kl), "kl_stderr": 0.01,
        "kl_exact_mean": sum(kl) / len(kl), "kl_exact_stderr": 0.01,
        "per_prompt": {"reward": reward, "kl": kl, "kl_exact": kl},
    }  # fmt: skip


def test_frontier_summary_carries_the_paired_gap_and_hypervolume_intervals():
    rows = [
        _row("sft", "sft", [0.0, 0.0, 0.0], [0.0, 0.3, 0.6]),
        _row("a1", "a", [2.0, 2.0, 2.0], [0.6, 0.6, 0.9]),
        _row("b1", "b", [1.0, 1.0, 1.0], [0.2, 0.5, 0.5]),
    ]
    config = FrontierConfig(reference="r", bootstrap_resamples=500)  # compare: every pair, here (a, b)
    result = summarise(config, rows, **{**RUN_FACTS, "num_prompts": 3})
    [matched] = result.matched_kl
    # overlap [0, 1]: at KL 1 method a is halfway from sft to a1 -> the hand case of test_paired_gap_by_hand
    assert matched["kl"][-1] == 1.0 and matched["gap"][-1] == pytest.approx(0.1)
    assert matched["gap_interval"][-1] == pytest.approx([-0.272621, 0.472621], abs=1e-6)
    # at KL 0 both are the SFT: the gap is exactly 0 on every prompt, so its stderr is 0
    assert matched["gap"][0] == 0.0 and matched["gap_stderr"][0] == 0.0
    # the mean gap over the grid: coefficients averaged over 11 KLs k = j / 10 -> d_p = mean_j(k_j) * d_p(1)
    assert matched["mean_gap"] == pytest.approx(0.05)
    assert matched["mean_gap_stderr"] == pytest.approx(0.5 * 0.0866025, abs=1e-6)
    hv = result.hypervolume
    assert set(hv["interval"]) == {"a", "b"} and hv["bootstrap"]["resamples"] == 500
    for m, (lo, hi) in hv["interval"].items():
        assert lo <= hv["by_method"][m] <= hi
    [diff] = hv["differences"]
    assert diff["difference"] == pytest.approx(hv["by_method"]["a"] - hv["by_method"]["b"])
    assert diff["interval"][0] <= diff["difference"] <= diff["interval"][1]
    # the verdict line the printout, the driver's log and the plot show: this interval contains 0
    [line] = comparison_lines(result)
    assert line == "a - b at matched KL: +0.050 [-0.136, +0.236] (95%): not resolved, the interval contains 0"
    # no resamples: no intervals, the estimates unchanged
    plain = summarise(
        FrontierConfig(reference="r", bootstrap_resamples=0), rows, **{**RUN_FACTS, "num_prompts": 3}
    )
    assert "interval" not in plain.hypervolume and plain.hypervolume["by_method"] == hv["by_method"]


def test_bad_interval_settings_are_refused():
    with pytest.raises(ValueError, match="confidence_level must be in"):
        FrontierConfig(reference="r", confidence_level=95)
    with pytest.raises(ValueError, match="bootstrap_resamples must be >= 0"):
        FrontierConfig(reference="r", bootstrap_resamples=-1)

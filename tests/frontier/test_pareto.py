"""Pareto front, hypervolume and reward at matched KL on hand-made points (numbers derived by hand below)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from warpkit.frontier.pareto import (
    hypervolume,
    pareto_front,
    pareto_front_max,
    reward_at_kl,
    reward_at_matched_kl,
)

# index:      0    1    2    3    4    5    6    7
KL = [0.0, 1.0, 2.0, 2.0, 3.0, 1.0, 4.0, 1.0]
REWARD = [0.1, 0.5, 0.4, 0.7, 0.7, 0.5, 0.9, 0.3]
# 0: (0, .1) front (lowest KL).        1: (1, .5) front.     5: duplicate of 1 -> dropped (first kept).
# 7: (1, .3) same KL as 1, lower reward -> dominated.        2: (2, .4) dominated by 1 (less KL, more reward).
# 3: (2, .7) front.   4: (3, .7) same reward as 3 at more KL -> dominated.   6: (4, .9) front.


def test_pareto_front_with_ties_and_dominated_points():
    assert pareto_front(KL, REWARD) == [0, 1, 3, 6]


def test_pareto_front_matches_brute_force_definition():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        kl = [float(rng.randint(0, 4)) for _ in range(n)]  # small integer grid: many ties
        reward = [float(rng.randint(0, 4)) for _ in range(n)]

        def dominated(i: int, kl=kl, reward=reward) -> bool:
            return any(
                kl[j] <= kl[i] and reward[j] >= reward[i] and (kl[j], reward[j]) != (kl[i], reward[i])
                for j in range(len(kl))
            )

        first_of_duplicates = [
            i for i in range(n) if (kl[i], reward[i]) not in list(zip(kl, reward, strict=True))[:i]
        ]
        expected = sorted((i for i in first_of_duplicates if not dominated(i)), key=lambda i: kl[i])
        assert pareto_front(kl, reward) == expected


def test_hypervolume_staircase_by_hand():
    """Reference (5, 0). Front (0,.1) (1,.5) (2,.7) (4,.9); steps sum_i (5 - k_i)(r_i - r_{i-1}):
    5 * .1 + 4 * .4 + 3 * .2 + 1 * .2 = 0.5 + 1.6 + 0.6 + 0.2 = 2.9. Dominated points change nothing."""
    assert hypervolume(KL, REWARD, 5.0, 0.0) == pytest.approx(2.9)
    front = pareto_front(KL, REWARD)
    assert hypervolume([KL[i] for i in front], [REWARD[i] for i in front], 5.0, 0.0) == pytest.approx(2.9)


def test_hypervolume_clips_to_the_reference_box():
    """Reference (3, 0.45): only (1,.5) and (2,.7) are inside; (0,.1) is below, (4,.9) right of it.
    Area: (3 - 1) * (.5 - .45) + (3 - 2) * (.7 - .5) = 0.1 + 0.2 = 0.3."""
    assert hypervolume(KL, REWARD, 3.0, 0.45) == pytest.approx(0.3)
    assert hypervolume([4.0], [1.0], 3.0, 0.0) == 0.0  # right of the reference: nothing
    assert hypervolume([], [], 3.0, 0.0) == 0.0


def test_hypervolume_is_the_area_of_the_union_of_rectangles():
    """Independent check on random points: the union area by a fine grid count (Monte Carlo-free)."""
    rng = random.Random(1)
    for _ in range(20):
        pts = [(rng.randint(0, 9) / 10, rng.randint(0, 9) / 10) for _ in range(rng.randint(1, 6))]
        ref = (1.0, 0.0)
        n = 100  # cells of 0.01 x 0.01; corners on the 0.1 grid, so the count is exact
        cells = sum(
            any(k <= (a + 0.5) / n < ref[0] and ref[1] <= (b + 0.5) / n < r for k, r in pts)
            for a, b in itertools.product(range(n), range(n))
        )
        area = hypervolume([p[0] for p in pts], [p[1] for p in pts], *ref)
        assert area == pytest.approx(cells / n**2, abs=1e-9)


@pytest.mark.parametrize(
    ("query", "expected"),
    [(1.5, 0.6), (3.0, 0.8), (1.0, 0.5), (4.5, math.nan), (-0.1, math.nan)],
    ids=["between-1-and-2", "between-2-and-4", "on-a-point", "right-of-front", "left-of-front"],
)
def test_reward_at_kl_interpolates_the_front_and_never_extrapolates(query, expected):
    # front (0,.1) (1,.5) (2,.7) (4,.9): at 1.5 -> .6; at 3 -> .8; at 1 exactly -> .5; NaN outside [0, 4]
    got = reward_at_kl(KL, REWARD, query)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


def test_reward_at_matched_kl_on_the_overlap():
    """A: (0,0) (2,1) (4,1.5); B: (1,0) (3,1). Overlap [1, 3], grid 1, 2, 3:
    A = .5, 1, 1.25; B = 0, .5, 1; gap .5 .5 .25, mean 1.25 / 3."""
    a = [(0.0, 0.0), (2.0, 1.0), (4.0, 1.5), (3.0, 0.2)]  # (3, .2) is dominated and ignored
    b = [(1.0, 0.0), (3.0, 1.0)]
    m = reward_at_matched_kl("warp", a, "sft_anchor", b, num=3)
    assert m.kl == pytest.approx([1.0, 2.0, 3.0])
    assert m.reward_a == pytest.approx([0.5, 1.0, 1.25])
    assert m.reward_b == pytest.approx([0.0, 0.5, 1.0])
    assert m.mean_gap == pytest.approx(1.25 / 3)
    apart = reward_at_matched_kl("a", [(0.0, 0.0), (1.0, 1.0)], "b", [(2.0, 0.0), (3.0, 1.0)])
    assert apart.kl == [] and math.isnan(apart.mean_gap)


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        # (0, 3), (1, 2), (2, 0) are non-dominated; (1, 1) and (0.5, 1) are dominated by (1, 2); the repeats
        # of (2, 0) and (1, 2) keep their first index. Sorted by increasing x, hence decreasing y.
        ([0.0, 1.0, 2.0, 1.0, 0.5, 2.0, 1.0], [3.0, 2.0, 0.0, 1.0, 1.0, 0.0, 2.0], [0, 1, 2]),
        ([1.0], [1.0], [0]),
        ([0.0, 1.0], [0.0, 1.0], [1]),  # one point dominates: a single-point front
    ],
    ids=["hand-made", "one-point", "one-dominates"],
)
def test_pareto_front_max_on_hand_made_points(x, y, expected):
    assert pareto_front_max(x, y) == expected


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pareto_front([0.0, 1.0], [0.5]), "kl has 2 values but reward has 1"),
        (lambda: pareto_front([0.0, float("nan")], [0.5, 0.6]), "point 1 is"),
        (lambda: hypervolume([0.0], [1.0], float("inf"), 0.0), "reference point must be finite"),
        (lambda: reward_at_matched_kl("a", [], "b", [(0.0, 1.0)]), "no points"),
    ],
    ids=["lengths", "nan", "reference", "empty"],
)
def test_bad_points_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()

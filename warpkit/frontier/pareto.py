"""Pure math on (KL, reward) points: Pareto front, hypervolume, reward at matched KL. No torch.

Convention everywhere: KL is a cost (lower is better) and reward a gain (higher is better), as in the
WARP paper's plots of reward against KL(policy || SFT). A point is a pair ``(kl, reward)``.

- ``a`` dominates ``b`` when ``a.kl <= b.kl`` and ``a.reward >= b.reward`` with at least one strict.
- The Pareto front is the set of points no other point dominates. Exact duplicates do not dominate
  each other; the front keeps the first of a group of duplicates only (same geometry, no double count).
- The hypervolume against a reference point ``(ref_kl, ref_reward)`` is the area of the union of the
  rectangles ``[kl, ref_kl] x [ref_reward, reward]`` over the front: the region a method's points
  dominate, bounded by the reference. A point with ``kl >= ref_kl`` or ``reward <= ref_reward``
  adds nothing. Use the same reference point for every method you compare.
- Across rewards (rewarded soups: reward R_1 against reward R_2, both maximised), `pareto_front_max`
  reuses the same sweep with the first coordinate negated: maximising R_1 is minimising -R_1.
- Reward at matched KL interpolates each front linearly between its points (points of a LITI sweep are
  reachable in between; between two separate runs it is an interpolation, not a guarantee) and never
  extrapolates: outside a front's KL range the value is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MatchedKL",
    "hypervolume",
    "pareto_front",
    "pareto_front_max",
    "reward_at_kl",
    "reward_at_matched_kl",
]


def _check_points(kl: Sequence[float], reward: Sequence[float]) -> None:
    if len(kl) != len(reward):
        raise ValueError(f"kl has {len(kl)} values but reward has {len(reward)}; pass one of each per point.")
    for i, (k, r) in enumerate(zip(kl, reward, strict=True)):
        if not (math.isfinite(k) and math.isfinite(r)):
            raise ValueError(f"point {i} is (kl={k}, reward={r}): both must be finite; drop it first.")


def pareto_front(kl: Sequence[float], reward: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, sorted by increasing KL (hence increasing reward).

    Ties: among exact duplicates only the first index is kept; a point with the same KL as another but
    a lower reward (or the same reward at a higher KL) is dominated. O(n log n).
    """
    _check_points(kl, reward)
    # Sort by KL ascending, then reward descending, then index: for equal KL the best reward comes first,
    # and among duplicates the first index. A sweep keeps each point whose reward beats all before it.
    order = sorted(range(len(kl)), key=lambda i: (kl[i], -reward[i], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if reward[i] > best:
            front.append(i)
            best = reward[i]
    return front


def pareto_front_max(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points when BOTH coordinates are maximised (e.g. two rewards),
    sorted by increasing ``x`` (hence decreasing ``y``). Same tie rules as `pareto_front`."""
    return pareto_front([-v for v in x], y)[::-1]


def hypervolume(kl: Sequence[float], reward: Sequence[float], ref_kl: float, ref_reward: float) -> float:
    """Area dominated by the points and bounded by the reference point ``(ref_kl, ref_reward)``.

    With the front sorted by KL, ``k_1 < ... < k_n`` and ``r_1 < ... < r_n``, the area is the staircase
    ``sum_i (ref_kl - k_i) * (r_i - r_{i-1})`` with ``r_0 = ref_reward``, after clipping away points
    outside the reference box. Units: nats x reward.
    """
    if not (math.isfinite(ref_kl) and math.isfinite(ref_reward)):
        raise ValueError(f"the reference point must be finite, got ({ref_kl}, {ref_reward}).")
    _check_points(kl, reward)
    inside = [i for i in range(len(kl)) if kl[i] < ref_kl and reward[i] > ref_reward]
    sub_kl = [kl[i] for i in inside]
    sub_reward = [reward[i] for i in inside]
    area = 0.0
    previous = ref_reward
    for i in pareto_front(sub_kl, sub_reward):
        area += (ref_kl - sub_kl[i]) * (sub_reward[i] - previous)
        previous = sub_reward[i]
    return area


def reward_at_kl(kl: Sequence[float], reward: Sequence[float], query_kl: float) -> float:
    """Reward of the front of the points at ``query_kl``, linearly interpolated; NaN outside its KL range."""
    front = pareto_front(kl, reward)
    xs = [kl[i] for i in front]
    ys = [reward[i] for i in front]
    if not xs or query_kl < xs[0] or query_kl > xs[-1]:
        return math.nan
    for j in range(len(xs) - 1):
        if xs[j] <= query_kl <= xs[j + 1]:
            t = (query_kl - xs[j]) / (xs[j + 1] - xs[j])
            return ys[j] + t * (ys[j + 1] - ys[j])
    return ys[-1]  # a single-point front queried at its own KL


@dataclass(frozen=True)
class MatchedKL:
    """Reward of two methods' fronts on a common KL grid (within the overlap of their KL ranges).

    ``gap[i] = reward_a[i] - reward_b[i]``; ``mean_gap`` averages it over the grid (NaN when the
    fronts' KL ranges do not overlap, and then the grid is empty).
    """

    method_a: str
    method_b: str
    kl: list[float]
    reward_a: list[float]
    reward_b: list[float]
    gap: list[float]
    mean_gap: float


def reward_at_matched_kl(
    method_a: str,
    points_a: Sequence[tuple[float, float]],
    method_b: str,
    points_b: Sequence[tuple[float, float]],
    num: int = 11,
) -> MatchedKL:
    """Compare two methods at equal KL: both fronts interpolated on ``num`` evenly spaced KL values.

    The grid spans the overlap ``[max(min_a, min_b), min(max_a, max_b)]`` of the two fronts' KL ranges,
    so neither front is extrapolated. ``points_*`` are ``(kl, reward)`` pairs.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    fronts = []
    for name, points in ((method_a, points_a), (method_b, points_b)):
        if not points:
            raise ValueError(f"method {name!r} has no points to compare.")
        kl, reward = [p[0] for p in points], [p[1] for p in points]
        front = pareto_front(kl, reward)
        fronts.append(([kl[i] for i in front], [reward[i] for i in front]))
    lo = max(fronts[0][0][0], fronts[1][0][0])
    hi = min(fronts[0][0][-1], fronts[1][0][-1])
    if lo > hi:
        return MatchedKL(method_a, method_b, [], [], [], [], math.nan)
    grid = [lo] if num == 1 or lo == hi else [lo + (hi - lo) * j / (num - 1) for j in range(num)]
    ra = [reward_at_kl(*fronts[0], k) for k in grid]
    rb = [reward_at_kl(*fronts[1], k) for k in grid]
    gap = [a - b for a, b in zip(ra, rb, strict=True)]
    return MatchedKL(method_a, method_b, grid, ra, rb, gap, sum(gap) / len(gap))

"""Intervals for comparisons between points evaluated on the same prompts with the same random numbers.

Every point of a frontier run samples the same P held-out prompts with common random numbers, so two
points' results are paired by prompt. Each row keeps its per-prompt means (``per_prompt``: reward and
both KL estimators, shape [P]). Two intervals come from them:

- **Reward at matched KL** (paired difference). Method a's front interpolated at KL k is a linear
  combination of two of its points, r_a(k) = c_1 r_j + c_2 r_{j+1}, the coefficients c from the points'
  mean KLs. Per prompt p the paired difference is d_p = r_{a,p}(k) - r_{b,p}(k) with the same
  coefficients; its mean is the gap of the means, and the interval is
  mean(d) +- t_{(1+level)/2, P-1} sd(d) / sqrt(P). The KL of the match is held at its estimate.
- **Hypervolume** (percentile bootstrap over prompts). Each resample draws P prompts with replacement,
  recomputes every point's mean KL and reward, the fronts and the areas; the same resamples serve every
  method, so the interval of a difference of two hypervolumes is paired too.

Prompts are the resampling unit: the interval covers both the sampling noise and the spread between
prompts (a prompt set drawn again), wider than the per-point standard errors (`stats.mean_stderr`, which
hold the prompt set fixed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from warpkit.frontier.pareto import hypervolume, pareto_front

__all__ = [
    "bootstrap_counts",
    "bootstrap_interval",
    "front_coefficients",
    "hypervolumes",
    "paired_gap",
    "t_interval",
    "t_quantile",
]


@functools.lru_cache(maxsize=256)  # every gap of a frontier asks for the same few quantiles
def t_quantile(q: float, df: int) -> float:
    """The q quantile of Student's t with df degrees of freedom (t_{0.975, 2} = 4.3027), by bisection on
    the CDF from Simpson's rule on the density (no SciPy); the normal quantile's accuracy is not enough
    for 2 degrees of freedom (3 seeds)."""
    if not 0.5 <= q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= q < 1 and df >= 1, got q={q}, df={df}.")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{(1+level)/2, n-1} s / sqrt(n) of the finite values; NaN bounds with
    fewer than two values."""
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t_quantile((1 + level) / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def front_coefficients(kl: Sequence[float], reward: Sequence[float], query_kl: float) -> dict[int, float]:
    """{point index: coefficient} whose combination of the points' rewards is the front's reward at
    `query_kl` (`pareto.reward_at_kl`): two points, or one at a front point's own KL; {} outside the
    front's KL range."""
    front = pareto_front(kl, reward)
    xs = [kl[i] for i in front]
    if not xs or query_kl < xs[0] or query_kl > xs[-1]:
        return {}
    for j in range(len(xs) - 1):
        if xs[j] <= query_kl <= xs[j + 1]:
            t = (query_kl - xs[j]) / (xs[j + 1] - xs[j])
            return {front[j]: 1 - t, front[j + 1]: t} if t > 0 else {front[j]: 1.0}
    return {front[-1]: 1.0}


def paired_gap(
    per_prompt_a: Sequence[Sequence[float]],
    coef_a: Mapping[int, float],
    per_prompt_b: Sequence[Sequence[float]],
    coef_b: Mapping[int, float],
    level: float = 0.95,
) -> tuple[float, float, float, float]:
    """(gap, stderr, low, high) of r_a - r_b from per-prompt rewards ([points][P] of each method) and each
    front's interpolation coefficients; prompts where an involved point has no reward (NaN) are left out."""
    rows = [(per_prompt_a[i], c) for i, c in coef_a.items()] + [
        (per_prompt_b[i], -c) for i, c in coef_b.items()
    ]
    d = np.zeros(len(rows[0][0]))
    for values, c in rows:
        d = d + c * np.asarray(values, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), math.nan, math.nan, math.nan
    stderr = float(d.std(ddof=1) / math.sqrt(len(d)))
    half = t_quantile((1 + level) / 2, len(d) - 1) * stderr
    return float(d.mean()), stderr, float(d.mean() - half), float(d.mean() + half)


def bootstrap_counts(num_prompts: int, num_resamples: int, seed: int) -> np.ndarray:
    """[num_resamples, num_prompts] counts: how often each prompt is drawn in each resample (P draws)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_prompts, [1.0 / num_prompts] * num_prompts, size=num_resamples)


def bootstrap_interval(
    kl: np.ndarray,
    reward: np.ndarray,
    counts: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], Mapping[str, float]],
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `statistic(kl_means, reward_means)` (each [points]) over resamples.

    `kl`, `reward`: [points, P] per-prompt means (NaN: no value for that prompt); `counts`: [B, P] from
    `bootstrap_counts`. A resample's mean of a point is its count-weighted mean over its finite prompts.
    Returns {name: (low, high)} for every name the statistic returns.
    """
    draws: dict[str, list[float]] = {}
    for c in counts:
        means = [_weighted_means(values, c) for values in (kl, reward)]
        for name, value in statistic(*means).items():
            draws.setdefault(name, []).append(value)
    alpha = (1 - level) / 2
    return {
        name: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha)))
        for name, v in draws.items()
    }


def _weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    w = np.where(finite, weights[None, :], 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (np.where(finite, values, 0.0) * w).sum(axis=1) / total, np.nan)


def hypervolumes(
    members: Mapping[str, Sequence[int]], ref_kl: float, ref_reward: float
) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """A `bootstrap_interval` statistic: each method's hypervolume from its member points' means."""

    def statistic(kl: np.ndarray, reward: np.ndarray) -> dict[str, float]:
        out = {}
        for m, idx in members.items():
            pts = [i for i in idx if math.isfinite(kl[i]) and math.isfinite(reward[i])]
            out[m] = hypervolume([kl[i] for i in pts], [reward[i] for i in pts], ref_kl, ref_reward)
        return out

    return statistic

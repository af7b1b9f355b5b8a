"""Statistics of a point's samples: the mean and its standard error over a fixed prompt set, distinct-n.

Standard errors are for the mean over the fixed prompt set: with k >= 2 samples per prompt,
se^2 = sum_x s_x^2 / (k P^2) (within-prompt variances s_x^2); with k = 1, the i.i.d. formula s / sqrt(n)
(conservative: it also counts between-prompt spread).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["distinct_n", "mean_stderr", "per_prompt_means"]


def mean_stderr(values: Sequence[float], prompt_index: Sequence[int]) -> tuple[float, float]:
    """(mean, standard error) of per-sample values; NaN values (skipped rewards) are left out.

    With n_x >= 2 values for every prompt x: the mean over the P prompts of the per-prompt means, and
    se^2 = sum_x s_x^2 / n_x / P^2 (the prompt set is fixed, only the sampling is random). Otherwise (some
    prompt has a single value, e.g. one sample per prompt): the plain mean of all n values and the i.i.d.
    s / sqrt(n), which also counts the spread between prompts (conservative). With equal n_x both means
    are the same number.
    """
    groups: dict[int, list[float]] = {}
    for v, i in zip(values, prompt_index, strict=True):
        if not math.isnan(v):
            groups.setdefault(i, []).append(float(v))
    flat = [v for g in groups.values() for v in g]
    if not flat:
        return math.nan, math.nan
    mean = sum(sum(g) / len(g) for g in groups.values()) / len(groups)

    def var(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    if all(len(g) >= 2 for g in groups.values()):
        se2 = sum(var(g) / len(g) for g in groups.values()) / len(groups) ** 2
        return mean, math.sqrt(se2)
    if len(flat) < 2:
        return mean, math.nan
    return sum(flat) / len(flat), math.sqrt(var(flat) / len(flat))


def per_prompt_means(values: Sequence[float], prompt_index: Sequence[int]) -> list[float]:
    """[P] the mean of each prompt's finite values, prompts 0..max(prompt_index); NaN for a prompt without
    one (every reward skipped)."""
    sums: dict[int, list[float]] = {}
    for v, i in zip(values, prompt_index, strict=True):
        if not math.isnan(v):
            sums.setdefault(i, []).append(float(v))
    return [sum(sums[i]) / len(sums[i]) if i in sums else math.nan for i in range(max(prompt_index) + 1)]


def distinct_n(completions: Sequence[Sequence[int]], n: int, eos_token_id: int | None = None) -> float:
    """Distinct-n diversity: unique n-grams / all n-grams over the completions (token ids, EOS dropped).

    1.0 when no n-gram repeats; near 0 for a collapsed policy. n-grams never cross two completions.
    NaN when no completion has n tokens. Compare it only between runs with the same number of samples.
    """
    seen: set[tuple[int, ...]] = set()
    total = 0
    for c in completions:
        toks = [t for t in c if t != eos_token_id]
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan

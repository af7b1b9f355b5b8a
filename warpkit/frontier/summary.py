"""From samples to results: the row of each point, then the fronts, hypervolumes and matched-KL comparisons.

A row (one point of frontier.json) holds the mean and standard error of the reward and both KL estimators,
the mean length, distinct-1/2, counts, and ``rewards`` (each extra reward's mean, stderr, skipped count).
`summarise` derives from the rows, per method (the SFT reference belongs to every method):

- ``fronts``: the reward-KL Pareto front (`pareto.pareto_front`, KL estimator ``front_kl``);
- ``hypervolume``: the area each front dominates, against one reference point for all methods, with
  bootstrap intervals over prompts of each area and of the compared pairs' differences;
- ``matched_kl``: reward of two methods' fronts on a common KL grid (`pareto.reward_at_matched_kl`), with
  the paired interval of each gap and of the mean gap (`intervals`: every point shares the prompts and
  random numbers);
- ``reward_fronts``: with extra rewards, the front where two rewards are both maximised (rewarded soups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.estimate import PolicySamples
from warpkit.frontier.intervals import (
    bootstrap_counts,
    bootstrap_interval,
    front_coefficients,
    hypervolumes,
    paired_gap,
)
from warpkit.frontier.pareto import hypervolume, pareto_front, pareto_front_max, reward_at_matched_kl
from warpkit.frontier.policies import Point
from warpkit.frontier.stats import distinct_n, mean_stderr, per_prompt_means

__all__ = ["FrontierResult", "Row", "point_row", "reward_value", "summarise"]

Row = dict[str, Any]


@dataclass
class FrontierResult:
    """Rows of frontier.json (``points``) and what is derived from them. KL in nats per completion.

    ``reward_fronts`` maps each method to the names of its points on the front of the two rewards named by
    ``reward_front_axes`` (both maximised, in increasing order of the first); both are empty without
    extra rewards.
    """

    points: list[Row]
    fronts: dict[str, list[str]]
    hypervolume: dict[str, Any]
    matched_kl: list[dict[str, Any]]
    skipped: dict[str, Any]
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    reward_fronts: dict[str, list[str]] = field(default_factory=dict)
    reward_front_axes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced scalars for a Trainer / tracker log: ``frontier/<point>/<field>`` and
        ``frontier/hypervolume/<method>``, e.g. to log the front after every WARP iteration; with extra
        rewards also ``frontier/<point>/reward_<name>_mean`` and ``_stderr``."""
        keys = ("reward_mean", "reward_stderr", "kl_mean", "kl_stderr", "kl_exact_mean", "kl_exact_stderr")
        out = {
            f"frontier/{p['name']}/{k}": float(p[k])
            for p in self.points
            for k in (*keys, "length_mean", "diversity")
        }
        out |= {
            f"frontier/{p['name']}/reward_{name}_{k}": float(r[k])
            for p in self.points
            for name, r in p.get("rewards", {}).items()
            for k in ("mean", "stderr")
        }
        out |= {f"frontier/hypervolume/{m}": float(v) for m, v in self.hypervolume["by_method"].items()}
        return out


def point_row(point: Point, s: PolicySamples, eos_token_id: int | None, extra: dict[str, list[float]]) -> Row:
    """The row of one evaluated point: ``s`` with its main rewards set, ``extra`` rewards by name."""
    assert s.rewards is not None, "the main reward is set before the row is made"
    row: Row = {
        "name": point.name,
        "method": point.method,
        "kind": point.kind,
        "spec": point.spec,
        "step": point.step,
        "eta": point.eta,
    }
    for key, values in (("reward", s.rewards), ("kl", s.kl), ("kl_exact", s.kl_exact)):
        row[f"{key}_mean"], row[f"{key}_stderr"] = mean_stderr(values, s.prompt_index)
    row["per_prompt"] = {  # [P] per-prompt means: the paired intervals (`intervals`) resample these
        key: per_prompt_means(values, s.prompt_index)
        for key, values in (("reward", s.rewards), ("kl", s.kl), ("kl_exact", s.kl_exact))
    }
    row["length_mean"] = sum(s.length) / len(s.length)
    row["distinct_1"] = distinct_n(s.completions, 1, eos_token_id)
    row["distinct_2"] = distinct_n(s.completions, 2, eos_token_id)
    row["diversity"] = row["distinct_2"]
    row["num_samples"] = len(s.length)
    row["num_reward_skipped"] = sum(math.isnan(r) for r in s.rewards)
    row["params"] = point.params
    row["weights"] = point.weights
    row["rewards"] = {}
    for name, values in extra.items():
        mean, stderr = mean_stderr(values, s.prompt_index)
        skipped = sum(math.isnan(v) for v in values)
        row["rewards"][name] = {"mean": mean, "stderr": stderr, "num_skipped": skipped}
    return row


def reward_value(row: Row, axis: str) -> tuple[float, float]:
    """(mean, stderr) of reward ``axis`` in a row: ``reward`` is the main reward, else an extra reward."""
    if axis == "reward":
        return row["reward_mean"], row["reward_stderr"]
    return row["rewards"][axis]["mean"], row["rewards"][axis]["stderr"]


def summarise(
    config: FrontierConfig,
    rows: list[Row],
    samples: list[dict[str, Any]] | None = None,
    *,
    reference_dir: str,
    device: str,
    context: int | None,
    prompts_too_long: Sequence[tuple[int, int]],
    num_prompts: int,
) -> FrontierResult:
    """Fronts, hypervolumes, matched KL and reward fronts of ``rows``; the run's facts go into settings.

    ``reference_dir``, ``device``, ``context`` (smallest context of the models), ``prompts_too_long``
    (``(index, length)`` of skipped prompts) and ``num_prompts`` (prompts used) describe the run.
    """
    kl_key = f"{config.front_kl}_mean"
    ok = [r for r in rows if math.isfinite(r[kl_key]) and math.isfinite(r["reward_mean"])]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "sft"]
    members = {m: _members(ok, m) for m in methods}
    fronts = {
        m: [pts[i]["name"] for i in pareto_front([p[kl_key] for p in pts], [p["reward_mean"] for p in pts])]
        for m, pts in members.items()
    }
    settings = asdict(config) | {
        "reference_resolved": reference_dir,
        "device": str(device),
        "context": context,
        "num_prompts_used": num_prompts,
    }
    axes = config.front_reward_axes()
    return FrontierResult(
        points=rows,
        fronts=fronts,
        hypervolume=_hypervolumes(config, ok, members),
        matched_kl=_matched_kl(config, ok, methods),
        skipped=_skipped(config, rows, prompts_too_long),
        settings=settings,
        samples=list(samples or []),
        reward_fronts=_reward_fronts(axes, members),
        reward_front_axes=axes,
    )


def _members(ok: list[Row], method: str) -> list[Row]:
    """The finite rows of ``method`` and the SFT reference's: the reference belongs to every method, since
    each can stay at KL = 0 (eta = 0, no training step)."""
    return [r for r in ok if r["method"] == method] + [r for r in ok if r["method"] == "sft"]


def _hypervolumes(config: FrontierConfig, ok: list[Row], members: dict[str, list[Row]]) -> dict[str, Any]:
    """Each method's hypervolume against one reference point (the config's, or a default named in ``how``),
    with bootstrap intervals of each and of the compared pairs' differences (`intervals`)."""
    kl_key = f"{config.front_kl}_mean"
    sft = [r for r in ok if r["method"] == "sft"]
    if config.hypervolume_reference is not None:
        ref_kl, ref_reward = config.hypervolume_reference
        how = "from the config"
    else:
        ref_kl = 1.1 * max([r[kl_key] for r in ok] + [0.0]) or 1.0
        ref_reward = sft[0]["reward_mean"] if sft else min((r["reward_mean"] for r in ok), default=0.0)
        how = "default: KL = 1.1 x the largest KL of all points, reward = " + (
            "the SFT reference's reward" if sft else "the lowest reward"
        )
    by_method = {
        m: hypervolume([r[kl_key] for r in pts], [r["reward_mean"] for r in pts], ref_kl, ref_reward)
        for m, pts in members.items()
    }
    out = {
        "reference_point": {"kl": ref_kl, "reward": ref_reward, "how": how, "kl_estimator": config.front_kl},
        "by_method": by_method,
    }
    if config.bootstrap_resamples and ok and all("per_prompt" in r for r in ok):
        out |= _hypervolume_intervals(config, ok, members, by_method, (ref_kl, ref_reward))
    return out


def _hypervolume_intervals(
    config: FrontierConfig,
    ok: list[Row],
    members: dict[str, list[Row]],
    by_method: dict[str, float],
    ref: tuple[float, float],
) -> dict[str, Any]:
    """Percentile bootstrap over prompts of each hypervolume and of each compared pair's difference; the
    reference point stays fixed (the estimates' own, so a resample is measured against the same box)."""
    index = {r["name"]: n for n, r in enumerate(ok)}
    kl = np.array([r["per_prompt"][config.front_kl] for r in ok], dtype=np.float64)
    reward = np.array([r["per_prompt"]["reward"] for r in ok], dtype=np.float64)
    idx = {m: [index[r["name"]] for r in pts] for m, pts in members.items()}
    area = hypervolumes(idx, *ref)
    pairs = [(a, b) for a, b in _pairs(config, list(members)) if a in idx and b in idx]

    def statistic(kl_means: np.ndarray, reward_means: np.ndarray) -> dict[str, float]:
        hv = area(kl_means, reward_means)
        return hv | {f"{a} - {b}": hv[a] - hv[b] for a, b in pairs}

    counts = bootstrap_counts(kl.shape[1], config.bootstrap_resamples, config.seed)
    bounds = bootstrap_interval(kl, reward, counts, statistic, config.confidence_level)
    return {
        "interval": {m: list(bounds[m]) for m in idx},
        "differences": [
            {"method_a": a, "method_b": b, "difference": by_method[a] - by_method[b], "interval": list(bounds[f"{a} - {b}"])}
            for a, b in pairs
        ],
        "bootstrap": {
            "resamples": config.bootstrap_resamples, "seed": config.seed, "level": config.confidence_level,
            "unit": "prompt",
        },
    }  # fmt: skip


def _pairs(config: FrontierConfig, methods: list[str]) -> list[list[str]]:
    """The config's ``compare`` pairs, or every pair of methods."""
    if config.compare is not None:
        return config.compare
    return [[a, b] for i, a in enumerate(methods) for b in methods[i + 1 :]]


def _matched_kl(config: FrontierConfig, ok: list[Row], methods: list[str]) -> list[dict[str, Any]]:
    """Reward at matched KL for the config's ``compare`` pairs (default: every pair of methods), with the
    paired interval of each gap and of the mean gap (`intervals.paired_gap`)."""
    kl_key = f"{config.front_kl}_mean"
    matched = []
    for a, b in _pairs(config, methods):
        rows_a, rows_b = _members(ok, a), _members(ok, b)
        pa = [(r[kl_key], r["reward_mean"]) for r in rows_a]
        pb = [(r[kl_key], r["reward_mean"]) for r in rows_b]
        if pa and pb:
            entry = asdict(reward_at_matched_kl(a, pa, b, pb))
            if entry["kl"] and all("per_prompt" in r for r in rows_a + rows_b):
                entry |= _gap_intervals(config, entry["kl"], rows_a, rows_b)
            matched.append(entry)
    return matched


def _gap_intervals(config: FrontierConfig, grid: list[float], rows_a: list[Row], rows_b: list[Row]) -> Row:
    """Per grid KL the paired (gap, stderr, low, high); the mean gap's from the grid-averaged coefficients
    (interpolation is linear, so the mean over the grid is one more linear combination of the points)."""
    kl_key = f"{config.front_kl}_mean"
    coefs = []
    for rows in (rows_a, rows_b):
        kl, reward = [r[kl_key] for r in rows], [r["reward_mean"] for r in rows]
        coefs.append([front_coefficients(kl, reward, k) for k in grid])
    per_prompt = [[r["per_prompt"]["reward"] for r in rows] for rows in (rows_a, rows_b)]
    level = config.confidence_level
    gaps = [paired_gap(per_prompt[0], ca, per_prompt[1], cb, level) for ca, cb in zip(*coefs, strict=True)]
    mean_coefs = [_averaged(c) for c in coefs]
    _, se, lo, hi = paired_gap(per_prompt[0], mean_coefs[0], per_prompt[1], mean_coefs[1], level)
    return {
        "gap_stderr": [g[1] for g in gaps],
        "gap_interval": [[g[2], g[3]] for g in gaps],
        "mean_gap_stderr": se,
        "mean_gap_interval": [lo, hi],
        "level": level,
    }


def _averaged(coefficients: list[dict[int, float]]) -> dict[int, float]:
    total: dict[int, float] = {}
    for c in coefficients:
        for i, v in c.items():
            total[i] = total.get(i, 0.0) + v / len(coefficients)
    return total


def _skipped(
    config: FrontierConfig, rows: list[Row], prompts_too_long: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """What was left out: long prompts, and per point the NaN rewards (main, then extra rewards)."""
    skipped: dict[str, Any] = {
        "prompts_too_long": [{"index": i, "length": n} for i, n in prompts_too_long],
        "rewards": {r["name"]: r["num_reward_skipped"] for r in rows if r["num_reward_skipped"]},
    }
    extra_skipped = {
        name: {
            r["name"]: r["rewards"][name]["num_skipped"] for r in rows if r["rewards"][name]["num_skipped"]
        }
        for name in config.extra_rewards
    }
    if any(extra_skipped.values()):
        skipped["extra_rewards"] = extra_skipped
    return skipped


def _reward_fronts(axes: list[str], members: dict[str, list[Row]]) -> dict[str, list[str]]:
    """Per method, its points on the front of the two rewards ``axes`` (both maximised); {} without axes."""
    if not axes:
        return {}
    fronts = {}
    for m, rows in members.items():
        pts = [r for r in rows if all(math.isfinite(reward_value(r, a)[0]) for a in axes)]
        x, y = ([reward_value(r, a)[0] for r in pts] for a in axes)
        fronts[m] = [pts[i]["name"] for i in pareto_front_max(x, y)]
    return fronts

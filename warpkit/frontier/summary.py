"""From samples to results: the row of each point, then the fronts, hypervolumes and matched-KL comparisons.

A row (one point of frontier.json) holds the mean and standard error of the reward and both KL estimators,
the mean length, distinct-1/2, counts, and ``rewards`` (each extra reward's mean, stderr, skipped count).
`summarise` derives from the rows, per method (the SFT reference belongs to every method):

- ``fronts``: the reward-KL Pareto front (`pareto.pareto_front`, KL estimator ``front_kl``);
- ``hypervolume``: the area each front dominates, against one reference point for all methods;
- ``matched_kl``: reward of two methods' fronts on a common KL grid (`pareto.reward_at_matched_kl`);
- ``reward_fronts``: with extra rewards, the front where two rewards are both maximised (rewarded soups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.estimate import PolicySamples
from warpkit.frontier.pareto import hypervolume, pareto_front, pareto_front_max, reward_at_matched_kl
from warpkit.frontier.policies import Point
from warpkit.frontier.stats import distinct_n, mean_stderr

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
    """Each method's hypervolume against one reference point: the config's, or a default named in ``how``."""
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
    return {
        "reference_point": {"kl": ref_kl, "reward": ref_reward, "how": how, "kl_estimator": config.front_kl},
        "by_method": {
            m: hypervolume([r[kl_key] for r in pts], [r["reward_mean"] for r in pts], ref_kl, ref_reward)
            for m, pts in members.items()
        },
    }


def _matched_kl(config: FrontierConfig, ok: list[Row], methods: list[str]) -> list[dict[str, Any]]:
    """Reward at matched KL for the config's ``compare`` pairs (default: every pair of methods)."""
    kl_key = f"{config.front_kl}_mean"
    pairs = (
        config.compare
        if config.compare is not None
        else [[a, b] for i, a in enumerate(methods) for b in methods[i + 1 :]]
    )
    matched = []
    for a, b in pairs:
        pa = [(r[kl_key], r["reward_mean"]) for r in _members(ok, a)]
        pb = [(r[kl_key], r["reward_mean"]) for r in _members(ok, b)]
        if pa and pb:
            matched.append(asdict(reward_at_matched_kl(a, pa, b, pb)))
    return matched


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

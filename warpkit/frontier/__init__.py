"""The reward-KL frontier: reward against KL(policy || SFT) of policies, their Pareto fronts, and plots.

Modules, leaves first (each imports only those above it, `warpkit._util`, `warpkit.workloads` and the
merge math):

- `pareto`: Pareto fronts, hypervolume, reward at matched KL (pure Python, no torch);
- `stats`: mean and standard error over a fixed prompt set, distinct-n;
- `decode`: KV-cache decoding with log-probs, the reference's prompt cache (`ReferencePrompts`), both KL sums;
- `estimate`: sampling at temperature T and the two sequence-KL estimators of one policy;
- `policies`: the policy entries (path, trajectory, LITI sweep, rewarded soup) and the points they expand to;
- `config`: `FrontierConfig` and its YAML loader;
- `inputs`: model names, folders, tokenizers, prompts, all checked before the first sample;
- `rewards`: reward functions and reward-model folders, called and checked;
- `summary`: each point's row, then fronts, hypervolumes, matched KL (`FrontierResult`);
- `plot`: the reward-KL and reward-reward PNGs (matplotlib);
- `output`: frontier.json, frontier.csv, samples.jsonl, the plots, the printed table;
- `run`: `run_frontier`, the orchestration;
- `scorer`: a greedy-soup scorer backed by a frontier evaluation.

The names below are imported lazily, so `import warpkit.frontier.pareto` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FrontierConfig": "config",
    "load_frontier_config": "config",
    "LitiSweep": "policies",
    "PolicySpec": "policies",
    "SoupSweep": "policies",
    "expand_trajectory": "policies",
    "PolicySamples": "estimate",
    "ReferencePrompts": "decode",
    "evaluate_policy": "estimate",
    "evaluate_policy_slow": "estimate",
    "sample_completions": "estimate",
    "score_completions": "estimate",
    "distinct_n": "stats",
    "mean_stderr": "stats",
    "MatchedKL": "pareto",
    "hypervolume": "pareto",
    "pareto_front": "pareto",
    "pareto_front_max": "pareto",
    "reward_at_kl": "pareto",
    "reward_at_matched_kl": "pareto",
    "FrontierResult": "summary",
    "run_frontier": "run",
    "print_frontier": "output",
    "write_frontier": "output",
    "plot_frontier": "plot",
    "plot_rewards": "plot",
    "FrontierScorer": "scorer",
    "frontier_scorer": "scorer",
}

__all__ = [
    "FrontierConfig",
    "FrontierResult",
    "FrontierScorer",
    "LitiSweep",
    "MatchedKL",
    "PolicySamples",
    "PolicySpec",
    "ReferencePrompts",
    "SoupSweep",
    "distinct_n",
    "evaluate_policy",
    "evaluate_policy_slow",
    "expand_trajectory",
    "frontier_scorer",
    "hypervolume",
    "load_frontier_config",
    "mean_stderr",
    "pareto_front",
    "pareto_front_max",
    "plot_frontier",
    "plot_rewards",
    "print_frontier",
    "reward_at_kl",
    "reward_at_matched_kl",
    "run_frontier",
    "sample_completions",
    "score_completions",
    "write_frontier",
]

if TYPE_CHECKING:
    from warpkit.frontier.config import FrontierConfig, load_frontier_config
    from warpkit.frontier.decode import ReferencePrompts
    from warpkit.frontier.estimate import (
        PolicySamples,
        evaluate_policy,
        evaluate_policy_slow,
        sample_completions,
        score_completions,
    )
    from warpkit.frontier.output import print_frontier, write_frontier
    from warpkit.frontier.pareto import (
        MatchedKL,
        hypervolume,
        pareto_front,
        pareto_front_max,
        reward_at_kl,
        reward_at_matched_kl,
    )
    from warpkit.frontier.plot import plot_frontier, plot_rewards
    from warpkit.frontier.policies import LitiSweep, PolicySpec, SoupSweep, expand_trajectory
    from warpkit.frontier.run import run_frontier
    from warpkit.frontier.scorer import FrontierScorer, frontier_scorer
    from warpkit.frontier.stats import distinct_n, mean_stderr
    from warpkit.frontier.summary import FrontierResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *(m for m in set(_LAZY.values()))])

"""warpkit: WARP (Weight Averaged Rewarded Policies, Ramé et al. 2024) for Hugging Face TRL.

Public names are imported lazily, so `import warpkit` stays cheap and has no side effects:
the merge math does not pull in transformers or TRL, and TRL is imported only by what needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "EMAAnchorCallback": "warpkit.anchor",
    "BEMAAnchorCallback": "warpkit.anchor",
    "ElasticResetCallback": "warpkit.anchor",
    "task_vector": "warpkit.merge.math",
    "lerp": "warpkit.merge.math",
    "slerp": "warpkit.merge.math",
    "liti": "warpkit.merge.math",
    "weighted_average": "warpkit.merge.math",
    "merge_folders": "warpkit.merge.folders",
    "MergeReport": "warpkit.merge.folders",
    "greedy_soup": "warpkit.merge.soups",
    "uniform_soup": "warpkit.merge.soups",
    "warm": "warpkit.merge.soups",
    "frontier_scorer": "warpkit.frontier.scorer",
    "FrontierConfig": "warpkit.frontier.config",
    "load_frontier_config": "warpkit.frontier.config",
    "run_frontier": "warpkit.frontier.run",
    "write_frontier": "warpkit.frontier.output",
    "evaluate_policy": "warpkit.frontier.estimate",
    "pareto_front": "warpkit.frontier.pareto",
    "pareto_front_max": "warpkit.frontier.pareto",
    "hypervolume": "warpkit.frontier.pareto",
    "reward_at_matched_kl": "warpkit.frontier.pareto",
    "plot_frontier": "warpkit.frontier.plot",
    "plot_rewards": "warpkit.frontier.plot",
    "ForgetConfig": "warpkit.forget.config",
    "load_forget_config": "warpkit.forget.config",
    "run_forget": "warpkit.forget.run",
    "write_forget": "warpkit.forget.output",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'warpkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

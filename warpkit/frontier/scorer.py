"""A greedy-soup scorer from a frontier evaluation: `folder -> reward_mean - kl_coef * KL_mean`.

`warpkit.merge.soups.greedy_soup` takes any `folder -> float`; this one runs `run_frontier` on the folder
with a config's reference, reward, prompts and sampling settings. The merge package never imports it:
`warpkit merge --score-config` builds it in the CLI.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from warpkit.frontier.config import FrontierConfig, load_frontier_config
from warpkit.frontier.policies import PolicySpec
from warpkit.frontier.run import run_frontier

__all__ = ["FrontierScorer", "frontier_scorer"]


class FrontierScorer:
    """`folder -> reward_mean - kl_coef * KL_mean` from one frontier evaluation of the folder.

    The RLHF objective E[r(x, y)] - beta KL(pi || pi_sft) (beta = `kl_coef`) estimated with the
    frontier's sampler: the config's reference, reward, prompts and sampling settings (temperature,
    max_new_tokens, seed: common random numbers, so two candidates see the same draws), its KL estimator
    `front_kl`. Its `policies` are ignored (replaced by the candidate) and the reference is not evaluated.
    Results are cached per folder path and the size and mtime of its files, so a folder rewritten in place
    is evaluated again. `rows[str(folder)]` keeps the full frontier row of the last evaluation.
    """

    def __init__(self, config: FrontierConfig, *, kl_coef: float = 0.0, progress: bool = False) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(
                f"kl_coef={kl_coef} must be finite and >= 0: it is the KL penalty beta of "
                "reward - beta * KL (0: plain mean reward)."
            )
        self.config = copy.deepcopy(config)
        self.config.policies = []
        self.config.include_reference = False
        self.kl_coef = float(kl_coef)
        self.progress = progress
        self.rows: dict[str, dict[str, Any]] = {}
        self._cache: dict[tuple, float] = {}
        self.description = (
            f"frontier_scorer(reward={self.config.reward!r}, reference={self.config.reference!r}, "
            f"kl_coef={self.kl_coef:g}, kl={self.config.front_kl})"
        )

    def objective(self, row: dict[str, Any]) -> float:
        """reward_mean - kl_coef * <front_kl>_mean of one frontier row (no KL term when kl_coef is 0)."""
        if self.kl_coef == 0.0:
            return float(row["reward_mean"])
        return float(row["reward_mean"]) - self.kl_coef * float(row[f"{self.config.front_kl}_mean"])

    def __call__(self, folder: str | Path) -> float:
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise ValueError(f"cannot score {folder}: not a folder.")
        key = (str(folder), tuple((p.name, *_stat(p)) for p in sorted(folder.iterdir()) if p.is_file()))
        if key in self._cache:
            return self._cache[key]
        config = copy.deepcopy(self.config)
        config.policies = [PolicySpec(name="candidate", method="soup", path=str(folder))]
        (row,) = run_frontier(config, progress=self.progress).points
        value = self.objective(row)
        if not math.isfinite(value):
            raise ValueError(
                f"the frontier evaluation of {folder} gave a non-finite score {value} (reward_mean "
                f"{row['reward_mean']}, {row['num_reward_skipped']} rewards skipped): a greedy soup cannot "
                "rank it. Check the reward (on_nan_reward: skip drops NaN rewards from the mean)."
            )
        self.rows[str(folder)] = row
        self._cache[key] = value
        return value


def _stat(p: Path) -> tuple[int, int]:
    s = p.stat()
    return s.st_size, s.st_mtime_ns


def frontier_scorer(
    config: FrontierConfig | str | Path, *, kl_coef: float = 0.0, progress: bool = False
) -> FrontierScorer:
    """A greedy-soup scorer from a frontier config (a `FrontierConfig` or its YAML file; `policies` may be
    empty, they are ignored): see `FrontierScorer`.

    Example: `greedy_soup(runs, frontier_scorer("frontier.yaml", kl_coef=0.1), "soup")` keeps a run only
    if the soup's mean reward minus 0.1 x its KL to the reference (nats per completion) improves.
    """
    if not isinstance(config, FrontierConfig):
        config = load_frontier_config(config)
    return FrontierScorer(config, kl_coef=kl_coef, progress=progress)

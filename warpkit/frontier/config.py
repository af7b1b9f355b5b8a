"""The frontier's settings: `FrontierConfig`, read from YAML with unknown fields refused.

A config names a reference (SFT) model, a reward (and optionally more rewards, evaluated on the same
samples), held-out prompts, the sampling settings, and policies grouped by method (single checkpoints,
trajectories, LITI sweeps, rewarded soups: `warpkit.frontier.policies`). `FrontierConfig` checks its own
fields when it is built and calls each policy's `check`.

Paths expand ``$VARS`` and ``~`` and are relative to the current directory. The model names of
`warpkit.workloads.resolve_model_path` (``warpkit:default``, ``warpkit:tiny``, and the frontier's historical
``default``) are accepted for reference, path, liti.init and soup.models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from warpkit._util.config import load_dataclass
from warpkit._util.imports import is_object_spec
from warpkit.frontier.policies import PolicySpec, expand_path

__all__ = ["DTYPES", "FrontierConfig", "load_frontier_config"]

DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class FrontierConfig:
    """Everything one `warpkit frontier` run needs.

    Args:
        reference: the SFT model folder that KL is measured against, or ``default`` (also
            ``warpkit:default``) for the embedded SmolLM2-135M-Instruct, or ``warpkit:tiny``.
        policies: the policies to evaluate, grouped by ``method``.
        reward: ``module:function`` with TRL's ``reward_funcs`` signature, or a folder holding an
            ``AutoModelForSequenceClassification`` with one label.
        extra_rewards: more rewards, ``{name: spec}`` with the same kinds of spec as ``reward``, each
            evaluated on the very samples the main reward scores (rewarded soups evaluate every point on
            every reward R_1..R_M). Names are identifiers; each adds ``reward_<name>_mean`` / ``_stderr``.
        reward_axes: two of ``reward`` (the main reward) and the ``extra_rewards`` names: the axes of the
            reward-reward fronts and of rewards.png; default ``[reward, <first extra reward>]``.
        prompts: ``module:function`` returning a dataset or list with a ``prompt`` column, a data file
            (``.jsonl``, ``.json``, ``.parquet``, ``.csv``) with a ``prompt`` column, a ``.txt`` file (one
            prompt per line), a ``save_to_disk`` folder, or an inline list (`warpkit.workloads`).
        prompts_kwargs: keyword arguments for a ``prompts`` function; its ``split`` (default ``eval``) also
            picks the split of a dataset folder.
        num_prompts: keep the first N prompts (None: all).
        samples_per_prompt: completions sampled per prompt and policy (>= 2 gives within-prompt errors).
        max_new_tokens: completion length cap.
        temperature: the policy's training sampling temperature; samples AND both KL estimators use the
            distribution softmax(logits / temperature), with no top-k or top-p truncation.
        batch_size: sequences per generation batch.
        seed: sampling seed; every policy sees the same random numbers (common random numbers).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: model weights dtype; log-softmax and KL are always computed in float32.
        include_reference: also evaluate the reference itself (the KL = 0 point, method ``sft``). It then
            belongs to every method's front: any method can stay at the SFT (eta = 0, no training).
        on_long_prompt: ``error`` or ``skip`` prompts whose length + max_new_tokens exceeds a context.
        on_nan_reward: ``error`` or ``skip`` (drop from the reward mean, counted in the output).
        hypervolume_reference: ``[kl, reward]``; default ``[1.1 * largest KL, reference's reward]``.
        front_kl: the KL estimator used for fronts, hypervolume, matched KL and the plot's x axis:
            ``kl_exact`` (per-position exact KL, lower variance) or ``kl`` (Monte Carlo log-ratio).
            Both have the same expectation; both are always written.
        compare: method pairs ``[a, b]`` for reward at matched KL (with the paired interval of the gap) and
            for the difference of their hypervolumes; default every pair.
        confidence_level: level of every interval (`warpkit.frontier.intervals`): the paired t interval of
            reward gaps at matched KL and the bootstrap intervals of hypervolumes.
        bootstrap_resamples: resamples of the prompts for the hypervolume intervals (0: no intervals).
        method_labels: display names for the plot legend, by method.
        allow_pickle: accept ``pytorch_model.bin`` checkpoints (pickle: runs code on load). Off by default.
        output_dir: where frontier.json, frontier.csv, frontier.png (and rewards.png with extra rewards) go.
        title: plot title.
        note: one line written under the plot's title and at the end of the printout (e.g. what a small
            budget cannot resolve, and where a larger run is).
        plot_xscale: ``linear`` or ``symlog`` (linear below 1 nat, log above) for the plot's KL axis.
    """

    reference: str
    policies: list[PolicySpec] = field(default_factory=list)
    reward: str = "warpkit.workloads.default:vader_reward"
    extra_rewards: dict[str, str] = field(default_factory=dict)
    reward_axes: list[str] | None = None
    prompts: str | list[str] = "warpkit.workloads.default:review_prompts"
    prompts_kwargs: dict[str, Any] = field(default_factory=lambda: {"split": "eval"})
    num_prompts: int | None = 64
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    temperature: float = 0.9
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    include_reference: bool = True
    on_long_prompt: Literal["error", "skip"] = "error"
    on_nan_reward: Literal["error", "skip"] = "error"
    hypervolume_reference: list[float] | None = None
    front_kl: Literal["kl_exact", "kl"] = "kl_exact"
    compare: list[list[str]] | None = None
    confidence_level: float = 0.95
    bootstrap_resamples: int = 2000
    method_labels: dict[str, str] = field(default_factory=dict)
    allow_pickle: bool = False
    output_dir: str = "frontier_out"
    title: str | None = None
    note: str | None = None
    plot_xscale: Literal["linear", "symlog"] = "linear"

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_outputs()
        self._check_extra_rewards()
        self._check_policies()

    def _check_sampling(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or null, got {self.num_prompts}.")
        for name in ("on_long_prompt", "on_nan_reward"):
            if getattr(self, name) not in ("error", "skip"):
                raise ValueError(f"{name} must be 'error' or 'skip', got {getattr(self, name)!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}.")

    def _check_outputs(self) -> None:
        if self.plot_xscale not in ("linear", "symlog"):
            raise ValueError(f"plot_xscale must be 'linear' or 'symlog', got {self.plot_xscale!r}.")
        if self.front_kl not in ("kl_exact", "kl"):
            raise ValueError(f"front_kl must be 'kl_exact' or 'kl', got {self.front_kl!r}.")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), e.g. 0.95, got {self.confidence_level}.")
        if self.bootstrap_resamples < 0:
            raise ValueError(
                f"bootstrap_resamples must be >= 0 (0: no hypervolume intervals), got {self.bootstrap_resamples}."
            )
        if self.hypervolume_reference is not None and len(self.hypervolume_reference) != 2:
            raise ValueError(f"hypervolume_reference must be [kl, reward], got {self.hypervolume_reference}.")

    def _check_policies(self) -> None:
        names = [p.name for p in self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"policy names must be unique; repeated: {dup}.")
        if "sft" in names or "sft" in {p.method for p in self.policies}:
            raise ValueError(
                "'sft' names the reference point (name and method); give your policy another name."
            )
        for p in self.policies:
            p.check()
        methods = {p.method for p in self.policies} | {"sft"}
        for pair in self.compare or []:
            if len(pair) != 2 or not set(pair) <= methods:
                raise ValueError(f"compare entry {pair} must be two of the methods {sorted(methods)}.")

    def _check_extra_rewards(self) -> None:
        for name, spec in self.extra_rewards.items():
            # The name becomes a CSV column, a metric key and an axis name: an identifier keeps all three sane.
            if not isinstance(name, str) or not name.isidentifier() or name == "reward":
                raise ValueError(
                    f"extra_rewards name {name!r} is not usable: names become columns reward_<name>_mean, so "
                    "they must be Python identifiers (letters, digits, _) other than 'reward' (the main "
                    "reward's axis name). Rename it, e.g. 'brevity'."
                )
            if not isinstance(spec, str) or not spec:
                raise TypeError(
                    f"extra_rewards[{name!r}] must be a reward spec ('module:function' or a reward model "
                    f"folder), got {spec!r}."
                )
        folded = [n.lower() for n in self.extra_rewards]
        clash = sorted({n for n in self.extra_rewards if folded.count(n.lower()) > 1})
        if clash:
            raise ValueError(
                f"extra_rewards names {clash} differ only in case; their columns would be confused on a "
                "case-insensitive file system or spreadsheet. Rename one."
            )
        if self.reward_axes is not None:
            allowed = ["reward", *self.extra_rewards]
            if not self.extra_rewards:
                raise ValueError(
                    f"reward_axes {self.reward_axes} needs extra_rewards: with the main reward alone there "
                    "is no reward-reward front. Add extra_rewards or drop reward_axes."
                )
            if (
                len(self.reward_axes) != 2
                or len(set(self.reward_axes)) != 2
                or not set(self.reward_axes) <= set(allowed)
            ):
                raise ValueError(
                    f"reward_axes must be two different names among {allowed}, got {self.reward_axes}."
                )

    def front_reward_axes(self) -> list[str]:
        """The (x, y) rewards of the reward-reward fronts and rewards.png; [] without extra rewards."""
        if not self.extra_rewards:
            return []
        return list(self.reward_axes or ["reward", next(iter(self.extra_rewards))])


def load_frontier_config(path: str | Path, **overrides: Any) -> FrontierConfig:
    """Read a YAML file into a `FrontierConfig`; ``overrides`` (e.g. ``output_dir``) replace its fields
    (None values are ignored).

    Path-valued fields expand ``$VARS`` and ``~``.
    """
    config = load_dataclass(FrontierConfig, path, what="frontier config", **overrides)
    config.reference = expand_path(config.reference)
    config.output_dir = expand_path(config.output_dir)
    config.reward = _expand_reward(config.reward)
    config.extra_rewards = {name: _expand_reward(spec) for name, spec in config.extra_rewards.items()}
    if isinstance(config.prompts, str) and not is_object_spec(config.prompts):
        config.prompts = expand_path(config.prompts)
    for p in config.policies:
        p.expand_paths()
    return config


def _expand_reward(spec: str) -> str:
    """A reward-model folder expanded; a ``module:function`` spec as written."""
    return expand_path(spec) if not is_object_spec(spec) or os.path.exists(expand_path(spec)) else spec

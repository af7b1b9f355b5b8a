"""The frontier's settings: one dataclass per concept, read from YAML with unknown fields refused.

A config names a reference (SFT) model, a reward, held-out prompts, the sampling settings, and policies
grouped by method. A policy entry is one of three kinds:

- ``path``: one checkpoint folder (one point);
- ``trajectory``: an ordered list of checkpoint folders, or a glob such as ``run/checkpoint-*`` sorted by
  its step number (one point per checkpoint, drawn as a training trajectory);
- ``liti``: a LITI sweep ``theta_eta = (1 - eta) * init + eta * merged`` over ``etas`` (one point per eta,
  interpolated in memory from tensors loaded once).

Paths expand ``$VARS`` and ``~`` and are relative to the current directory; the folder name ``default``
(reference, path, liti.init) means the embedded SmolLM2-135M-Instruct (`warpkit.default`).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FrontierConfig", "LitiSweep", "PolicySpec", "expand_trajectory", "load_frontier_config"]


@dataclass
class LitiSweep:
    """A LITI sweep (WARP stage 3) between an iteration's init and its merged policy.

    Args:
        init: checkpoint folder of the init (θ_init; the SFT model in iteration 1).
        merged: checkpoint folder of the merged policy (θ_slerp).
        etas: the η values; the paper traces the front with {0, 0.1, 0.3, 0.5, 0.8, 1}.
        allow_extrapolation: permit η > 1 (ExPO-style extrapolation past the merge).
    """

    init: str
    merged: str
    etas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    allow_extrapolation: bool = False


@dataclass
class PolicySpec:
    """Policies of one method: exactly one of ``path``, ``trajectory`` or ``liti``.

    Args:
        name: unique name; points are named ``name``, ``name/step=N`` or ``name/eta=E``.
        method: the group drawn with one colour and one Pareto front (e.g. ``sft_anchor``, ``ema_anchor``,
            ``warp_iter1``, ``warp_m1``).
        path: one checkpoint folder.
        trajectory: checkpoint folders in training order, or one glob sorted by the number in each name.
        liti: a LITI sweep.
        params: free-form hyperparameters recorded with each point (e.g. ``{beta: 0.1}``).
    """

    name: str
    method: str
    path: str | None = None
    trajectory: list[str] | str | None = None
    liti: LitiSweep | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FrontierConfig:
    """Everything one `warpkit frontier` run needs.

    Args:
        reference: the SFT model folder that KL is measured against, or ``default`` for the embedded
            SmolLM2-135M-Instruct.
        policies: the policies to evaluate, grouped by ``method``.
        reward: ``module:function`` with TRL's ``reward_funcs`` signature, or a folder holding an
            ``AutoModelForSequenceClassification`` with one label.
        prompts: ``module:function`` returning a dataset or list with a ``prompt`` column, a ``.jsonl``
            file with a ``prompt`` field, a ``.txt`` file (one prompt per line), or an inline list.
        prompts_kwargs: keyword arguments for a ``prompts`` function.
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
        compare: method pairs ``[a, b]`` for reward at matched KL; default every pair.
        method_labels: display names for the plot legend, by method.
        allow_pickle: accept ``pytorch_model.bin`` checkpoints (pickle: runs code on load). Off by default.
        output_dir: where frontier.json, frontier.csv and frontier.png go.
        title: plot title.
        plot_xscale: ``linear`` or ``symlog`` (linear below 1 nat, log above) for the plot's KL axis.
    """

    reference: str
    policies: list[PolicySpec] = field(default_factory=list)
    reward: str = "warpkit.default:vader_reward"
    prompts: str | list[str] = "warpkit.default:review_prompts"
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
    method_labels: dict[str, str] = field(default_factory=dict)
    allow_pickle: bool = False
    output_dir: str = "frontier_out"
    title: str | None = None
    plot_xscale: Literal["linear", "symlog"] = "linear"

    def __post_init__(self) -> None:
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
        if self.plot_xscale not in ("linear", "symlog"):
            raise ValueError(f"plot_xscale must be 'linear' or 'symlog', got {self.plot_xscale!r}.")
        if self.front_kl not in ("kl_exact", "kl"):
            raise ValueError(f"front_kl must be 'kl_exact' or 'kl', got {self.front_kl!r}.")
        if self.hypervolume_reference is not None and len(self.hypervolume_reference) != 2:
            raise ValueError(f"hypervolume_reference must be [kl, reward], got {self.hypervolume_reference}.")
        names = [p.name for p in self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"policy names must be unique; repeated: {dup}.")
        if "sft" in names or "sft" in {p.method for p in self.policies}:
            raise ValueError(
                "'sft' names the reference point (name and method); give your policy another name."
            )
        for p in self.policies:
            kinds = [k for k in ("path", "trajectory", "liti") if getattr(p, k) is not None]
            if len(kinds) != 1:
                raise ValueError(
                    f"policy {p.name!r} must set exactly one of path, trajectory, liti; it sets {kinds or 'none'}."
                )
            if p.liti is not None:
                if not p.liti.etas:
                    raise ValueError(f"policy {p.name!r}: liti.etas is empty; give at least one eta.")
                bad = [
                    e
                    for e in p.liti.etas
                    if not math.isfinite(e) or e < 0 or (e > 1 and not p.liti.allow_extrapolation)
                ]
                if bad:
                    raise ValueError(
                        f"policy {p.name!r}: liti.etas {bad} are outside [0, 1]. eta > 1 extrapolates past the "
                        "merge (as in ExPO): set liti.allow_extrapolation: true if that is what you want."
                    )
        methods = {p.method for p in self.policies} | {"sft"}
        for pair in self.compare or []:
            if len(pair) != 2 or not set(pair) <= methods:
                raise ValueError(f"compare entry {pair} must be two of the methods {sorted(methods)}.")


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def expand_trajectory(trajectory: list[str] | str) -> list[tuple[int, str]]:
    """``(step, folder)`` pairs in training order.

    A list keeps its order, steps read from a trailing number in each folder name (``checkpoint-300``)
    or, failing that, the position. A string is a glob, sorted by that number.
    """

    def step_of(path: str, default: int) -> int:
        m = re.search(r"(\d+)\D*$", Path(path).name)
        return int(m.group(1)) if m else default

    if isinstance(trajectory, str):
        paths = glob.glob(_expand(trajectory))
        if not paths:
            raise ValueError(f"trajectory glob {trajectory!r} matches no folder (check the path and $VARS).")
        paths.sort(key=lambda p: (step_of(p, 0), p))
    else:
        paths = [_expand(p) for p in trajectory]
        if not paths:
            raise ValueError("a trajectory needs at least one checkpoint folder.")
    return [(step_of(p, i), p) for i, p in enumerate(paths)]


def _build(cls: Any, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursively; unknown keys are refused."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping of {cls.__name__} fields, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown}. Valid fields of {cls.__name__}: {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}.")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{where}: {value!r} matches none of {hint}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a list, got {type(value).__name__}.")
        (item,) = typing.get_args(hint) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {type(value).__name__}.")
        return dict(value)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise TypeError(f"{where} must be {hint.__name__}, got {value!r}.")
    return value


def load_frontier_config(path: str | Path, **overrides: Any) -> FrontierConfig:
    """Read a YAML file into a `FrontierConfig`; ``overrides`` (e.g. ``output_dir``) replace its fields.

    Path-valued fields expand ``$VARS`` and ``~``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frontier config {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a mapping of FrontierConfig fields, got {type(data).__name__}.")
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = _build(FrontierConfig, data, str(path))
    config.reference = _expand(config.reference)
    config.output_dir = _expand(config.output_dir)
    if ":" not in config.reward or os.path.exists(_expand(config.reward)):
        config.reward = _expand(config.reward)
    if isinstance(config.prompts, str) and ":" not in config.prompts:
        config.prompts = _expand(config.prompts)
    for p in config.policies:
        if p.path is not None:
            p.path = _expand(p.path)
        if isinstance(p.trajectory, list):
            p.trajectory = [_expand(t) for t in p.trajectory]
        if p.liti is not None:
            p.liti.init, p.liti.merged = _expand(p.liti.init), _expand(p.liti.merged)
    return config

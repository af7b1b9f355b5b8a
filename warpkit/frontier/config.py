"""The frontier's settings: one dataclass per concept, read from YAML with unknown fields refused.

A config names a reference (SFT) model, a reward (and optionally more rewards, evaluated on the same
samples), held-out prompts, the sampling settings, and policies grouped by method. A policy entry is one
of four kinds:

- ``path``: one checkpoint folder (one point);
- ``trajectory``: an ordered list of checkpoint folders, or a glob such as ``run/checkpoint-*`` sorted by
  its step number (one point per checkpoint, drawn as a training trajectory);
- ``liti``: a LITI sweep ``theta_eta = (1 - eta) * init + eta * merged`` over ``etas`` (one point per eta,
  interpolated in memory from tensors loaded once);
- ``soup``: a rewarded soup (Ramé et al. 2023) ``theta(w) = sum_m w_m theta_m`` of M policies fine-tuned
  from one init on different rewards, one point per weight vector ``w`` on the simplex (interpolated in
  memory like LITI).

Paths expand ``$VARS`` and ``~`` and are relative to the current directory; the folder name ``default``
(reference, path, liti.init, soup.models) means the embedded SmolLM2-135M-Instruct (`warpkit.default`).
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

__all__ = [
    "FrontierConfig",
    "LitiSweep",
    "PolicySpec",
    "SoupSweep",
    "expand_trajectory",
    "load_frontier_config",
]


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
class SoupSweep:
    """A rewarded-soups sweep (Ramé et al. 2023, arXiv 2306.04488) over M policies of one init.

    Each point is ``theta(w) = sum_m w_m theta_m`` with ``w`` on the simplex (``w_m >= 0``, ``sum w = 1``),
    interpolated in memory; evaluating every point on every reward traces the front across rewards.

    Args:
        models: the M >= 2 checkpoint folders θ_1..θ_M (same architecture and shapes), each fine-tuned from
            the same init on its own reward R_m.
        weights: the weight vectors, each of length M; None (M = 2 only) sweeps ``w = (1 - t, t)`` over
            ``num_points`` evenly spaced t in [0, 1].
        num_points: number of t values when ``weights`` is None (>= 2, default 5); not with ``weights``.
    """

    models: list[str]
    weights: list[list[float]] | None = None
    num_points: int | None = None

    def vectors(self) -> list[list[float]]:
        """The weight vectors w in sweep order: ``weights``, or ``[1 - t, t]`` for t = 0, 1/(n-1), ..., 1."""
        if self.weights is not None:
            return [list(w) for w in self.weights]
        n = 5 if self.num_points is None else self.num_points
        return [[1.0 - i / (n - 1), i / (n - 1)] for i in range(n)]


@dataclass
class PolicySpec:
    """Policies of one method: exactly one of ``path``, ``trajectory``, ``liti`` or ``soup``.

    Args:
        name: unique name; points are named ``name``, ``name/step=N``, ``name/eta=E`` or ``name/w=W1,W2``.
        method: the group drawn with one colour and one Pareto front (e.g. ``sft_anchor``, ``ema_anchor``,
            ``warp_iter1``, ``warp_m1``).
        path: one checkpoint folder.
        trajectory: checkpoint folders in training order, or one glob sorted by the number in each name.
        liti: a LITI sweep.
        soup: a rewarded-soups sweep.
        params: free-form hyperparameters recorded with each point (e.g. ``{beta: 0.1}``).
    """

    name: str
    method: str
    path: str | None = None
    trajectory: list[str] | str | None = None
    liti: LitiSweep | None = None
    soup: SoupSweep | None = None
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
        extra_rewards: more rewards, ``{name: spec}`` with the same kinds of spec as ``reward``, each
            evaluated on the very samples the main reward scores (rewarded soups evaluate every point on
            every reward R_1..R_M). Names are identifiers; each adds ``reward_<name>_mean`` / ``_stderr``.
        reward_axes: two of ``reward`` (the main reward) and the ``extra_rewards`` names: the axes of the
            reward-reward fronts and of rewards.png; default ``[reward, <first extra reward>]``.
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
        output_dir: where frontier.json, frontier.csv, frontier.png (and rewards.png with extra rewards) go.
        title: plot title.
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
        self._check_extra_rewards()
        for p in self.policies:
            kinds = [k for k in ("path", "trajectory", "liti", "soup") if getattr(p, k) is not None]
            if len(kinds) != 1:
                raise ValueError(
                    f"policy {p.name!r} must set exactly one of path, trajectory, liti, soup; "
                    f"it sets {kinds or 'none'}."
                )
            if p.soup is not None:
                _check_soup(p.name, p.soup)
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


def _check_soup(name: str, soup: SoupSweep) -> None:
    """Refuse a soup that is not a convex combination of at least two models, naming the bad vector."""
    m = len(soup.models)
    if m < 2:
        raise ValueError(
            f"policy {name!r}: a soup needs at least 2 models, got {m} ({soup.models}). A single checkpoint "
            "is a `path` entry."
        )
    if soup.weights is None:
        if m > 2:
            raise ValueError(
                f"policy {name!r}: a soup of {m} models needs explicit soup.weights (a list of weight vectors "
                f"of length {m}, e.g. {[[1.0 if i == j else 0.0 for i in range(m)] for j in range(m)]} plus "
                "the mixtures you want); only a 2-model soup sweeps w = (1 - t, t) by default."
            )
        if soup.num_points is not None and soup.num_points < 2:
            raise ValueError(
                f"policy {name!r}: soup.num_points must be >= 2 (the sweep includes both ends t = 0 and "
                f"t = 1), got {soup.num_points}."
            )
        return
    if not soup.weights:
        raise ValueError(f"policy {name!r}: soup.weights is empty; give at least one weight vector.")
    if soup.num_points is not None:
        raise ValueError(
            f"policy {name!r}: soup.num_points={soup.num_points} and soup.weights both given; num_points "
            "only spaces the default 2-model sweep w = (1 - t, t). Drop one of them."
        )
    for w in soup.weights:
        why = None
        if len(w) != m:
            why = f"has {len(w)} entries for {m} models"
        elif not all(math.isfinite(x) for x in w):
            why = "has a non-finite entry"
        elif any(x < 0 for x in w):
            why = "has a negative entry"
        elif abs(sum(w) - 1.0) > 1e-6:
            why = f"sums to {sum(w):.6g}"
        if why:
            raise ValueError(
                f"policy {name!r}: soup weight vector {w} {why}. Each vector needs {m} entries >= 0 that sum "
                f"to 1 (a point on the simplex: rewarded soups interpolate between the models, they do not "
                f"extrapolate), e.g. {[0.5, 0.5] + [0.0] * (m - 2)}."
            )


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
    for name, spec in config.extra_rewards.items():
        if ":" not in spec or os.path.exists(_expand(spec)):
            config.extra_rewards[name] = _expand(spec)
    if isinstance(config.prompts, str) and ":" not in config.prompts:
        config.prompts = _expand(config.prompts)
    for p in config.policies:
        if p.path is not None:
            p.path = _expand(p.path)
        if isinstance(p.trajectory, list):
            p.trajectory = [_expand(t) for t in p.trajectory]
        if p.liti is not None:
            p.liti.init, p.liti.merged = _expand(p.liti.init), _expand(p.liti.merged)
        if p.soup is not None:
            p.soup.models = [_expand(m) for m in p.soup.models]
    return config

"""The registry of merge methods: each declared once, with its paper, typed parameters and input contract.

Everything that lists or checks methods reads this module: `merge_folders` (which settings apply, how the
weights are validated, which streaming pass runs), `warpkit merge` (its flags and YAML keys), the WARP
driver (its `merge_kwargs` check), the error messages, and the README's methods table (a test compares
them). Adding a method is one `MergeMethod(...)` entry here plus its math and its test.

A method is one of three kinds, by the implementation it names:

- coefficient (`coefficients`): one coefficient per model from a group's Gram matrix
  (`warpkit.merge.coefficients`); `needs_geometry` when they depend on G (a reading pass first);
- element-wise (`combine`): a chunk function of the task vectors (`warpkit.merge.elementwise`), with
  TIES's magnitude trim (`trims`) or DARE's random masks (`random`);
- whole-model (`runner`): soups, which average models without an init (`warpkit.merge.soups`), named
  as `module:function` so this module imports no file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from warpkit.merge.coefficients import (
    GroupStats,
    karcher_coefficients,
    lerp_coefficients,
    linear_coefficients,
    model_stock_coefficients,
    slerp_coefficients,
    task_arithmetic_coefficients,
)
from warpkit.merge.elementwise import (
    dare_generator,
    dare_linear_chunk,
    dare_ties_chunk,
    keep_mask,
    negmerge_chunk,
    ties_chunk,
)
from warpkit.merge.math import GRANULARITIES, merge_lambdas

__all__ = [
    "ENGINE_OPTIONS",
    "INIT_OPTIONS",
    "METHODS",
    "MergeMethod",
    "Param",
    "all_params",
    "get_method",
    "methods_table",
    "spell",
]


def spell(name: str, cli: bool) -> str:
    """A setting as the user wrote it: `density` in Python and YAML, `--density` on the command line."""
    return "--" + name.replace("_", "-") if cli else name


@dataclass(frozen=True)
class Param:
    """One setting: its type (bool, int, float, str, or list of floats), default, range or choices, help."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    def check(self, value: Any, where: str) -> Any:
        """`value` converted to this type, or ValueError naming `where`, the value and what is allowed."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}={value!r} must be true or false.")
            return value
        if self.type is list:
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise ValueError(f"{where}={value!r} must be a list of numbers.")
            return [self._number(float(v), where) for v in value]
        if self.type in (int, float):
            if not _is_number(value) or (self.type is int and float(value) != int(value)):
                raise ValueError(
                    f"{where}={value!r} must be {'an integer' if self.type is int else 'a number'}."
                )
            return self._number(self.type(value), where)
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            allowed = f"one of {list(self.choices)}" if self.choices else "a string"
            raise ValueError(f"{where}={value!r} must be {allowed}.")
        return value

    def _number(self, value: float, where: str) -> Any:
        if not math.isfinite(value):
            raise ValueError(f"{where}={value} must be finite.")
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not low <= value <= high:
            raise ValueError(f"{where}={value} is outside [{low:g}, {high:g}] ({self.help}).")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


WeightRule = Literal["lambdas", "free", "none"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method. See the module docstring for the three kinds.

    init: "required" (a task-vector method), "config" (the init supplies only config and tokenizer) or
    "none" (soups: the first model does). weights: how per-model weights are read: "lambdas" (the SLERP
    recursion's λ_k = w_k / sum_{j<=k} w_j, in [0, 1] unless extrapolating), "free" (any finite; the
    coefficient rule refuses what it cannot use, e.g. a zero sum to normalise), "none" (not taken).
    """

    name: str
    summary: str
    paper: str
    init: Literal["required", "config", "none"]
    min_models: int
    weights: WeightRule = "free"
    params: tuple[Param, ...] = ()
    coefficients: Callable[..., GroupStats] | None = None  # (gram, numel, weights=, lambdas=, **params)
    needs_geometry: bool = False
    combine: Callable[..., Any] | None = None  # (d, w, keep=, density=, generators=)
    trims: bool = False
    random: bool = False
    runner: str | None = None
    check: Callable[[Mapping[str, Any], int, bool], None] | None = None  # (params, num_models, cli)
    weights_note: str = ""
    param_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_names", tuple(p.name for p in self.params))

    @property
    def kind(self) -> str:
        return "coefficient" if self.coefficients else "elementwise" if self.combine else "whole-model"

    def resolve(self, settings: Mapping[str, Any], *, cli: bool = False) -> dict[str, Any]:
        """This method's parameters: the given `settings` checked and converted, defaults for the rest.

        A setting of another method is refused, naming the methods it belongs to.
        """
        unknown = [k for k in settings if not any(k in m.param_names for m in METHODS.values())]
        if unknown:
            takes = ", ".join(spell(k, cli) for k in self.param_names) or "no settings"
            raise ValueError(
                f"unknown setting(s) {', '.join(spell(k, cli) for k in unknown)}; {self.name} takes {takes}."
            )
        foreign = [k for k in settings if k not in self.param_names]
        if foreign:
            owners = sorted(
                {m.name for m in METHODS.values() if set(foreign) & set(m.param_names)}, key=_order
            )
            names = ", ".join(spell(k, cli) for k in foreign)
            if cli:
                raise ValueError(
                    f"{names} only apply to --method {', '.join(owners)}, not {self.name}; drop them or "
                    f"use {owners[0]}."
                )
            verb = "applies" if len(foreign) == 1 else "apply"
            only = " only" if len(owners) == 1 else ""
            raise ValueError(f"{names} {verb} to {', '.join(owners)}{only}, not {self.name}.")
        return {
            p.name: p.check(settings[p.name], spell(p.name, cli))
            if settings.get(p.name) is not None
            else p.default
            for p in self.params
        }

    def check_inputs(
        self, num_models: int, weights: Sequence[float] | None, params: Mapping[str, Any], *,
        allow_extrapolation: bool = False, cli: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Refuse a model count, weights or a combination of settings this method cannot use.

        Returns the weights to use ({"weights": [...]}, uniform by default) and, for the "lambdas" rule,
        the SLERP recursion's λ ({"lambdas": [...]}).
        """
        if num_models < self.min_models:
            raise ValueError(f"{self.name} needs at least {self.min_models} models, got {num_models}.")
        if self.check is not None:
            self.check(params, num_models, cli)
        if weights is not None and self.weights == "none":
            flag = spell("weights", cli)
            raise ValueError(
                f"{self.name} takes no {flag} (got {list(weights)}){self.weights_note}; drop {flag}."
            )
        w = [float(x) for x in weights] if weights is not None else [1.0] * num_models
        if len(w) != num_models:
            raise ValueError(f"got {len(w)} weights for {num_models} models; give one weight per model.")
        if any(not math.isfinite(x) for x in w):
            raise ValueError(f"weights must be finite, got {w}.")
        if self.weights == "lambdas":
            return {"weights": w, "lambdas": merge_lambdas(w, allow_extrapolation=allow_extrapolation)}
        return {"weights": w}

    def merge_task_vectors(
        self, d: Any, weights: Sequence[float] | None = None, *, name: str = "", **params: Any
    ) -> Any:
        """Element-wise methods in memory: the merged task vector (n,) of one whole tensor's task vectors
        d (M, n) (the streaming engine does the same chunk by chunk). TIES trims each row to its own top
        density; DARE's masks come from `dare_generator(seed, name, m)`."""
        import torch

        if self.combine is None:
            raise ValueError(
                f"{self.name} is not an element-wise method; use merge_folders or its coefficients."
            )
        settings = self.resolve(params)
        w = torch.tensor(list(weights) if weights is not None else [1.0] * d.shape[0], dtype=d.dtype)[:, None]
        keep = keep_mask(d, settings["density"]) if self.trims else None
        generators = (
            [dare_generator(settings["seed"], name, m) for m in range(d.shape[0])] if self.random else None
        )
        return self.combine(
            d, w.to(d.device), keep=keep, density=settings.get("density", 1.0), generators=generators
        )


def _order(name: str) -> int:
    return list(METHODS).index(name)


# ----------------------------------------------------------------------------- the settings


SCALE = Param("scale", float, 1.0, "factor on the merged task vector; negative weights negate")
DENSITY = Param("density", float, 1.0, "ties: fraction of entries kept; dare: keep probability", 0.0, 1.0)
SEED = Param("seed", int, 0, "dare mask seed (masks depend on seed, tensor name and model)")
TRIM_SCOPE = Param(
    "trim_scope", str, "tensor", "ties: trim per tensor (mergekit, peft) or over the whole model (the TIES paper)",
    choices=("tensor", "model"),
)  # fmt: skip
NORMALIZE = Param("normalize", bool, True, "linear: divide by the sum of the weights")
SCORER = Param("scorer", str, None, "a callable folder -> float, higher is better", metavar="MODULE:FUNCTION")
SCORE_CONFIG = Param(
    "score_config", str, None,
    "score = mean reward of a frontier evaluation (its reference, reward, prompts, sampling; its policies "
    "are ignored) minus kl_coef x KL", metavar="FRONTIER_YAML",
)  # fmt: skip
KL_COEF = Param("kl_coef", float, None, "with score_config: the KL penalty beta (default 0)", 0.0)
SCORES = Param("scores", list, None, "precomputed candidate scores, one per model (skips scoring them)")

# Settings of the engine itself (merge_folders' keyword arguments, `warpkit merge` flags, recipe keys).
INIT_OPTIONS = (  # meaningful only relative to an init
    Param("granularity", str, "block", "one SLERP angle per transformer layer, tensor or model", choices=GRANULARITIES),
    Param("liti_eta", float, None, "write (1 - eta) * init + eta * merge (WARP stage 3)"),
    Param("allow_extrapolation", bool, False, "allow eta > 1 and negative weights"),
)  # fmt: skip
ENGINE_OPTIONS = (
    Param("weights", list, None, "one per model; default uniform"),
    *INIT_OPTIONS,
    Param("dtype", str, None, "output dtype (default: the init's)"),
    Param("device", str, None, "where the arithmetic runs (cpu, cuda); default cpu"),
    Param("compute_dtype", str, "float32", "float32 (default) or float64"),
    Param("max_shard_size", str, "5GB", "shard the output by bytes"),
    Param("overwrite", bool, False, "replace an existing output folder"),
)


def _check_greedy(params: Mapping[str, Any], num_models: int, cli: bool) -> None:
    scorer, config = params.get("scorer"), params.get("score_config")
    if bool(scorer) == bool(config):
        raise ValueError(
            f"greedy_soup needs exactly one of {spell('scorer', cli)} MODULE:FUNCTION (a callable folder -> "
            f"float) or {spell('score_config', cli)} FRONTIER_YAML (mean reward of a frontier evaluation); got "
            f"{'both' if scorer else 'neither'}."
        )
    if params.get("kl_coef") is not None and not config:
        raise ValueError(
            f"{spell('kl_coef', cli)} is the KL penalty of a {spell('score_config', cli)} frontier evaluation; "
            f"a {spell('scorer', cli)} function computes its own score. Drop {spell('kl_coef', cli)} or use "
            f"{spell('score_config', cli)}."
        )
    scores = params.get("scores")
    if scores is not None and len(scores) != num_models:
        raise ValueError(
            f"{spell('scores', cli)} has {len(scores)} values for {num_models} {spell('models', cli)}; give one "
            "precomputed score per model, in the same order, or drop it."
        )


# ----------------------------------------------------------------------------- the methods

_ENTRIES = [
    MergeMethod(
        "slerp", "spherical interpolation of task vectors, recursive for M > 2, one angle per layer",
        "Ramé et al. 2024 (WARP)", "required", 1, "lambdas",
        coefficients=lambda gram, numel, lambdas, **_: slerp_coefficients(gram, lambdas, numel),
        needs_geometry=True,
    ),
    MergeMethod(
        "lerp", "weighted average of task vectors", "Wortsman et al. 2022", "required", 1, "lambdas",
        coefficients=lambda gram, numel, weights, **_: lerp_coefficients(gram, weights, numel),
    ),
    MergeMethod(
        "linear", "Σ w θ / Σ w (or unnormalised, `--no-normalize`)", "Wortsman et al. 2022", "config", 1,
        params=(NORMALIZE,),
        coefficients=lambda gram, numel, weights, normalize, **_: linear_coefficients(
            gram, weights, numel, normalize=normalize
        ),
    ),
    MergeMethod(
        "task_arithmetic", "init + scale · Σ w τ; negative w negates (unlearning)", "Ilharco et al. 2023",
        "required", 1, params=(SCALE,),
        coefficients=lambda gram, numel, weights, scale, **_: task_arithmetic_coefficients(
            gram, weights, numel, scale=scale
        ),
    ),
    MergeMethod(
        "model_stock", "init + t · mean τ, t = k cos / (1 + (k − 1) cos), clamped to [0, 1]",
        "Jang et al. 2024", "required", 2, "none",
        coefficients=lambda gram, numel, **_: model_stock_coefficients(gram, numel), needs_geometry=True,
    ),
    MergeMethod(
        "karcher", "weighted spherical (Karcher) mean of M task vectors", "Karcher 1977", "required", 1,
        coefficients=lambda gram, numel, weights, **_: karcher_coefficients(gram, weights, numel),
        needs_geometry=True,
    ),
    MergeMethod(
        "ties", "trim to the top density by magnitude (per tensor, or `--trim-scope model`), elect the sign "
        "by mass, disjoint mean", "Yadav et al. 2023", "required", 1,
        params=(DENSITY, SCALE, TRIM_SCOPE), combine=ties_chunk, trims=True,
    ),
    MergeMethod(
        "dare_linear", "drop with probability 1 − p, rescale by 1/p, then a weighted sum", "Yu et al. 2024",
        "required", 1, params=(DENSITY, SEED, SCALE), combine=dare_linear_chunk, random=True,
    ),
    MergeMethod(
        "dare_ties", "drop with probability 1 − p, rescale by 1/p, then TIES's elect and disjoint mean",
        "Yu et al. 2024", "required", 1, params=(DENSITY, SEED, SCALE), combine=dare_ties_chunk, random=True,
    ),
    MergeMethod(
        "negmerge", "sign-consensus mean of task vectors, negated and scaled", "Kim et al. 2024", "required",
        1, "none", params=(SCALE,), combine=negmerge_chunk,
    ),
    MergeMethod(
        "soup", "uniform soup Σ θ / M, or weighted Σ w θ / Σ w with `--weights`", "Wortsman et al. 2022",
        "none", 2, runner="warpkit.merge.soups:run_soup",
    ),
    MergeMethod(
        "greedy_soup", "candidates sorted by score, each added only if the soup's score improves; "
        "`--scorer` or `--score-config`", "Wortsman et al. 2022", "none", 1, "none",
        params=(SCORER, SCORE_CONFIG, KL_COEF, SCORES), runner="warpkit.merge.soups:run_greedy_soup",
        check=_check_greedy,
        weights_note=": it averages its ingredients uniformly; use --method soup --weights for a weighted soup",
    ),
    MergeMethod(
        "warm", "weight average of reward models (score head included), checked to be 1-label classifiers",
        "Ramé et al. 2024 (WARM)", "none", 2, runner="warpkit.merge.soups:run_warm",
    ),
]  # fmt: skip
METHODS: dict[str, MergeMethod] = {m.name: m for m in _ENTRIES}


def get_method(name: str) -> MergeMethod:
    """The registry entry of `name`, or ValueError listing the methods."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {list(METHODS)}.")
    return METHODS[name]


def all_params() -> list[Param]:
    """Every method parameter once, in registry order (the `warpkit merge` flags beyond the engine's)."""
    seen: dict[str, Param] = {}
    for method in METHODS.values():
        for p in method.params:
            seen.setdefault(p.name, p)
    return list(seen.values())


def methods_table() -> list[str]:
    """The README's methods table rows, one per method: name, what it does, models, init, paper."""
    init = {"required": "yes", "config": "no (config only)", "none": "no"}
    return [
        f"| `{m.name}` | {m.summary} | ≥ {m.min_models} | {init[m.init]} | {m.paper} |"
        for m in METHODS.values()
    ]

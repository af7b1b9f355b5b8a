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

import difflib
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
from warpkit.merge.params import Param, spell

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


WeightRule = Literal["lambdas", "convex", "free", "none"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method. See the module docstring for the three kinds.

    init: "required" (a task-vector method), "config" (the init supplies only config and tokenizer) or
    "none" (soups: the first model does). weights: how per-model weights are read: "lambdas" (the SLERP
    recursion's λ_k = w_k / sum_{j<=k} w_j, in [0, 1] unless extrapolating), "convex" (a weighted average
    Σ w θ / Σ w: negative weights extrapolate, so they need allow_extrapolation, as for "lambdas"),
    "free" (any finite; the coefficient rule refuses what it cannot use, e.g. a zero sum to normalise),
    "none" (not taken). allow_extrapolation is refused where there is nothing to extrapolate (no init and
    no weights).
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
        if allow_extrapolation and self.init == "none" and self.weights == "none":
            flag = spell("allow_extrapolation", cli)
            raise ValueError(
                f"{self.name} takes no weights and no init, so {flag} has nothing to allow; drop {flag}."
            )
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
        if self.weights == "convex" and not allow_extrapolation and any(x < 0 for x in w):
            fix = "--allow-extrapolation" if cli else "allow_extrapolation=True (CLI: --allow-extrapolation)"
            raise ValueError(
                f"{self.name} weights {w} include negative values: Σ w θ / Σ w then extrapolates beyond the "
                f"models instead of averaging them. Use weights >= 0, or pass {fix} if that is intended."
            )
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
DENSITY = Param(
    "density", float, 1.0, "ties: fraction of entries kept; dare: keep probability", 0.0, 1.0, low_open=True,
    fix="density 0 would keep nothing and return the init unchanged; pass a value in (0, 1], e.g. 0.2 "
    "(1 keeps every entry)",
)  # fmt: skip
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
    Param(
        "lora_base_ok", bool, False,
        "merge LoRA adapters whose base_model_name_or_path names another model than the init (only when it "
        "is the same model, e.g. a copy)",
    ),
)  # fmt: skip
ENGINE_OPTIONS = (
    Param("weights", list, None, "one per model; default uniform"),
    *INIT_OPTIONS,
    Param("allow_extrapolation", bool, False, "allow eta > 1 and negative weights (lerp, slerp, soups)"),
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
        "by mass, disjoint mean; an exact sign tie keeps the init (the paper's sgn(0) = 0; peft and mergekit "
        "elect +)", "Yadav et al. 2023", "required", 1,
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
        "soup", "uniform soup Σ θ / M, or weighted Σ w θ / Σ w with `--weights` (negative ones need "
        "`--allow-extrapolation`)", "Wortsman et al. 2022", "none", 2, "convex", runner="warpkit.merge.soups:run_soup",
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
        "Ramé et al. 2024 (WARM)", "none", 2, "convex", runner="warpkit.merge.soups:run_warm",
    ),
]  # fmt: skip
METHODS: dict[str, MergeMethod] = {m.name: m for m in _ENTRIES}


def get_method(name: str) -> MergeMethod:
    """The registry entry of `name`, or ValueError listing the methods (and the closest name, if any)."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        guess = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"method={name!r} is not one of {list(METHODS)}{guess}")
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

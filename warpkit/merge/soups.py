"""Model soups (Wortsman et al. 2022) and WARM (Ramé et al. 2024) over `save_pretrained` folders.

A soup is a weighted average of fine-tunes of one init: `merge_folders("linear", ...)`. The greedy soup
sorts the candidates by a validation score and adds each one only if the soup's score improves; the score
is any callable `folder -> float`, e.g. `warpkit.frontier.scorer.frontier_scorer`: the candidate's mean
reward (minus a KL penalty) under a frontier evaluation. WARM is the same average applied to reward models (sequence-
classification heads included: the merge engine is tensor-name based), so its result is usable as the
reward model of a run (`reward_funcs: [folder]`) or of a frontier (`reward: folder`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warpkit._util.files import publish_dir, temp_prefix
from warpkit.merge.folders import merge_folders
from warpkit.merge.methods import get_method
from warpkit.merge.output import check_out, writing

__all__ = [
    "SOUP_RECORD",
    "SoupResult",
    "check_reward_model",
    "greedy_soup",
    "run_greedy_soup",
    "run_soup",
    "run_warm",
    "uniform_soup",
    "warm",
]

SOUP_RECORD = "warpkit_soup.json"  # the greedy soup's history, written inside its output folder
Scorer = Callable[[Path], float]
# Files that make a folder loadable by AutoTokenizer (TRL and the frontier load a reward model's tokenizer
# from the reward model's own folder).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class SoupResult:
    """The soup's folder, which candidates went in (in order), and every score that was computed."""

    out: Path
    ingredients: list[Path]
    score: float
    history: list[tuple[str, float, bool]] = field(default_factory=list)  # (candidate, soup score, kept)
    candidate_scores: list[float] = field(default_factory=list)  # one per input model, input order


def _read_config(path: Path, what: str) -> dict:
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"{what} {path} is a LoRA adapter: a soup averages full models, and an adapter's weights only "
            "mean something on top of its base. Merge it first (`PeftModel.from_pretrained(base, path)"
            ".merge_and_unload().save_pretrained(out)`) and pass out."
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {path} is not a save_pretrained folder (no config.json); check the path.")
    return json.loads((path / "config.json").read_text())


def _check_soup_inputs(paths: Sequence[Path], what: str = "model") -> None:
    """Full folders of one architecture, checked from config.json alone: before any (costly) scoring."""
    configs = [_read_config(p, what) for p in paths]
    for p, c in zip(paths[1:], configs[1:], strict=True):
        for key in ("model_type", "architectures"):
            if c.get(key) != configs[0].get(key):
                raise ValueError(
                    f"{what} {p} has {key}={c.get(key)!r} but {paths[0]} has {configs[0].get(key)!r}: a soup "
                    "averages fine-tunes of one init, which share one architecture."
                )


def uniform_soup(
    models: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None, **merge_kwargs
) -> Path:
    """Uniform (or weighted) soup: theta = sum_m w_m theta_m / sum_m w_m. The first model supplies config
    and tokenizer. Example: weights (1, 3) give 0.25 theta_1 + 0.75 theta_2.

    `merge_kwargs` go to `merge_folders` (dtype, max_shard_size, compute_dtype, overwrite, ...). Negative
    weights extrapolate and need `allow_extrapolation=True`, as for lerp. For reward models use `warm`,
    which checks that every input is one.
    """
    paths = [Path(m) for m in models]
    if len(paths) < 2:
        raise ValueError(f"a soup needs at least 2 models, got {len(paths)}.")
    get_method("soup").check_inputs(
        len(paths), weights, {}, allow_extrapolation=bool(merge_kwargs.get("allow_extrapolation"))
    )
    check_out(out, paths, bool(merge_kwargs.get("overwrite")))
    _check_soup_inputs(paths)
    # The first model doubles as merge_folders' init: linear's normalised coefficients give it weight 0
    # as the init, so only its config and tokenizer come from that role.
    return merge_folders("linear", paths[0], paths, out, weights, **merge_kwargs).out


# ----------------------------------------------------------------------------- WARM


def _num_labels(config: dict) -> int:
    # As transformers' PretrainedConfig: id2label wins; without it, num_labels, defaulting to 2.
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)


def check_reward_model(path: str | Path) -> None:
    """Refuse anything that is not a one-output sequence-classification model (a scalar reward r(x, y)).

    Read from config.json: `architectures` must end in "ForSequenceClassification" and the number of labels
    (len(id2label), else num_labels, else 2, as transformers derives it) must be 1.
    """
    path = Path(path)
    config = _read_config(path, "reward model")
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"reward model {path} has architectures={archs}, not a *ForSequenceClassification model: WARM "
            "averages reward models, whose head maps a sequence to one score. To average policies (causal "
            "LMs) use `warpkit merge --method soup`; to build a reward model, fine-tune "
            "AutoModelForSequenceClassification with num_labels=1 (e.g. TRL's RewardTrainer)."
        )
    n = _num_labels(config)
    if n != 1:
        raise ValueError(
            f"reward model {path} has {n} labels (architectures={archs}): a reward model outputs one "
            "score, num_labels=1. A multi-label classifier's logits are not a reward; retrain the head with "
            "num_labels=1 (TRL's RewardTrainer does)."
        )


def warm(
    reward_models: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    **merge_kwargs: Any,
) -> Path:
    """WARM (Ramé et al. 2024, arXiv 2401.12187): r_WARM = r(., sum_m w_m phi_m / sum_m w_m), the weight
    average of M reward models phi_m fine-tuned from one shared init (score head included).

    Every input must be a one-label `*ForSequenceClassification` folder (see `check_reward_model`), and
    the first must hold a tokenizer: it is carried into `out`, where TRL (`reward_funcs: [out]`) and the
    frontier (`reward: out`) load it. Example: two reward models whose score heads are (1, 3) and (3, 5)
    give a head (2, 4) with uniform weights. Returns `out`.
    """
    paths = [Path(m) for m in reward_models]
    if len(paths) < 2:
        raise ValueError(f"WARM averages at least 2 reward models, got {len(paths)}.")
    check_out(out, paths, bool(merge_kwargs.get("overwrite")))
    for p in paths:
        check_reward_model(p)
    if not any((paths[0] / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"reward model {paths[0]} (the first, whose files are carried) has no tokenizer: the WARM folder "
            "would not load as a reward (TRL reads the tokenizer from it). Save the reward models' tokenizer "
            "there (`tokenizer.save_pretrained(folder)`) or list a reward model that has one first."
        )
    return uniform_soup(paths, out, weights, **merge_kwargs)


# ----------------------------------------------------------------------------- greedy soup


def _describe(score: Scorer) -> str:
    described = getattr(score, "description", None)
    if isinstance(described, str):
        return described
    return f"{getattr(score, '__module__', '?')}:{getattr(score, '__qualname__', type(score).__name__)}"


def greedy_soup(
    models: Sequence[str | Path],
    score: Scorer,
    out: str | Path,
    *,
    scores: Sequence[float] | None = None,
    **merge_kwargs,
) -> SoupResult:
    """Greedy soup (Wortsman et al. 2022, recipe 1): candidates sorted by `scores` (or `score(folder)`,
    higher is better), the best one is the start, and each next one joins only if `score` of the uniform
    soup strictly improves.

    score: e.g. a validation accuracy, or `warpkit.frontier.scorer.frontier_scorer(...)` (mean reward
    minus a KL penalty). scores: precomputed candidate scores, one per model (saves one evaluation each).
    Example: candidate scores (0.7, 0.9, 0.8) -> order B, C, A; the soup starts as B (0.9); {B, C} scores
    0.92 > 0.9: kept; {B, C, A} scores 0.91: A left out. Result: the soup of B and C, score 0.92.
    The history (order, every score, kept flags, ingredients) is written to `out/warpkit_soup.json`; the
    folder appears at `out` only when complete. `merge_kwargs` go to `merge_folders` (`overwrite=True`
    replaces an earlier warpkit output at `out`; nothing else is ever replaced).
    """
    paths = [Path(m) for m in models]
    if not paths:
        raise ValueError("greedy_soup needs at least one model.")
    overwrite = bool(merge_kwargs.pop("overwrite", False))
    merge_kwargs.setdefault("progress", False)
    out = check_out(out, paths, overwrite)
    if scores is not None and len(scores) != len(paths):
        raise ValueError(
            f"got {len(scores)} scores for {len(paths)} models; give one precomputed score per model, in "
            "the models' order, or none (each candidate is then scored)."
        )
    _check_soup_inputs(paths)
    scores = [float(s) for s in (scores if scores is not None else [score(p) for p in paths])]
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"candidate scores {scores} contain NaN: they cannot be sorted; fix the scorer.")
    order = sorted(range(len(paths)), key=lambda i: -scores[i])
    first = paths[order[0]]
    result = SoupResult(out, [first], scores[order[0]], [(str(first), scores[order[0]], True)], scores)
    with writing(out):  # a full disk is reported for `out`, not for a candidate folder
        work = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))  # same filesystem: rename
        try:
            best_folder = _grow_soup(result, [paths[i] for i in order[1:]], score, work, merge_kwargs)
            record = {
                "warpkit_soup": 1,
                "method": "greedy_soup",
                "scorer": _describe(score),
                "candidates": [{"path": str(p), "score": s} for p, s in zip(paths, scores, strict=True)],
                "order": [str(paths[i]) for i in order],
                "steps": _steps(result.history),
                "ingredients": [str(p) for p in result.ingredients],
                "score": result.score,
            }
            # Inside the folder before the rename: the soup and its history appear together or not at all.
            (best_folder / SOUP_RECORD).write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
            publish_dir(best_folder, out, overwrite=overwrite)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _grow_soup(
    result: SoupResult, candidates: list[Path], score: Scorer, work: Path, merge_kwargs: dict[str, Any]
) -> Path:
    """Try each candidate in order; keep it when the soup's score strictly improves (NaN never does).

    Updates `result` (ingredients, score, history) and returns the folder of the best soup, under `work`.
    """
    best_folder: Path | None = None
    for step, path in enumerate(candidates):
        candidate = work / f"step{step}"
        uniform_soup([*result.ingredients, path], candidate, **merge_kwargs)
        value = float(score(candidate))
        kept = value > result.score
        result.history.append((str(path), value, kept))
        if kept:
            result.ingredients.append(path)
            result.score = value
            if best_folder is not None:
                shutil.rmtree(best_folder)
            best_folder = candidate
        else:
            shutil.rmtree(candidate)
    if best_folder is None:  # no mixture beat the best single model: the soup is that model
        best_folder = Path(shutil.copytree(result.ingredients[0], work / "single"))
    return best_folder


def _steps(history: list[tuple[str, float, bool]]) -> list[dict[str, Any]]:
    """Each step of the history with its soup: the ingredients kept so far plus its candidate."""
    steps, soup = [], []
    for candidate, value, kept in history:
        steps.append({"candidate": candidate, "soup": [*soup, candidate], "score": value, "kept": kept})
        soup += [candidate] if kept else []
    return steps


# ----------------------------------------------------------------------------- `warpkit merge` runners
# The registry (`warpkit.merge.methods`) names these; each returns the line `warpkit merge` prints.


def run_soup(
    models: Sequence[str], out: str, weights: Sequence[float] | None, params: Mapping[str, Any], **common
) -> str:
    """`warpkit merge --method soup`: the (weighted) average of the models."""
    path = uniform_soup(models, out, weights, **common)
    return f"{path} (soup of {len(models)} models)"


def run_warm(
    models: Sequence[str], out: str, weights: Sequence[float] | None, params: Mapping[str, Any], **common
) -> str:
    """`warpkit merge --method warm`: the (weighted) average of reward models."""
    path = warm(models, out, weights, **common)
    return f"{path} (warm of {len(models)} reward models)"


def run_greedy_soup(
    models: Sequence[str], out: str, weights: Sequence[float] | None, params: Mapping[str, Any], **common
) -> str:
    """`warpkit merge --method greedy_soup`: `params["score"]` is the scorer the caller built from
    `scorer` (an imported callable) or `score_config` (a frontier evaluation)."""
    result = greedy_soup(models, params["score"], out, scores=params.get("scores"), **common)
    lines = [f"  {'kept   ' if kept else 'dropped'} {c}: soup score {v:.6g}" for c, v, kept in result.history]
    lines.append(
        f"{result.out} (greedy_soup of {len(result.ingredients)}/{len(models)} models, score {result.score:.6g})"
    )
    return "\n".join(lines)

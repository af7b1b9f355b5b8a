"""Model soups (Wortsman et al. 2022) and WARM (Ramé et al. 2024) over `save_pretrained` folders.

A soup is a weighted average of fine-tunes of one init: `merge_folders("linear", ...)`. The greedy soup
sorts the candidates by a validation score and adds each one only if the soup's score improves. WARM is
the same average applied to reward models (any architecture, sequence-classification heads included:
the merge engine is tensor-name based), so its result is usable as the reward model of a run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from warpkit.merge_io import merge_folders

__all__ = ["SoupResult", "greedy_soup", "uniform_soup"]

Scorer = Callable[[Path], float]


@dataclass
class SoupResult:
    """The soup's folder, which candidates went in (in order), and every score that was computed."""

    out: Path
    ingredients: list[Path]
    score: float
    history: list[tuple[str, float, bool]] = field(default_factory=list)  # (candidate, soup score, kept)


def uniform_soup(
    models: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None, **merge_kwargs
) -> Path:
    """Uniform (or weighted) soup: sum_m w_m theta_m / sum w. The first model supplies config and tokenizer.

    For WARM pass reward-model folders; `merge_kwargs` go to `merge_folders` (dtype, max_shard_size, ...).
    """
    paths = [Path(m) for m in models]
    if len(paths) < 2:
        raise ValueError(f"a soup needs at least 2 models, got {len(paths)}.")
    return merge_folders("linear", paths[0], paths, out, weights, **merge_kwargs).out


def greedy_soup(
    models: Sequence[str | Path],
    score: Scorer,
    out: str | Path,
    *,
    scores: Sequence[float] | None = None,
    **merge_kwargs,
) -> SoupResult:
    """Greedy soup: candidates sorted by `scores` (or `score(folder)`, higher is better), the best one is
    the start, and each next one joins only if `score` of the uniform soup strictly improves.

    score: e.g. a validation accuracy or a mean reward from a frontier evaluation of a folder.
    Example: candidate scores (0.7, 0.9, 0.8) -> order B, C, A; the soup starts as B (0.9); {B, C} scores
    0.92 > 0.9: kept; {B, C, A} scores 0.91: A left out. Result: the soup of B and C, score 0.92.
    """
    paths = [Path(m) for m in models]
    if not paths:
        raise ValueError("greedy_soup needs at least one model.")
    out = Path(out)
    if out.exists():
        raise ValueError(f"out={out} already exists; remove it first.")
    if scores is None:
        scores = [float(score(p)) for p in paths]
    if len(scores) != len(paths):
        raise ValueError(f"got {len(scores)} scores for {len(paths)} models.")
    order = sorted(range(len(paths)), key=lambda i: -scores[i])
    ingredients, best = [paths[order[0]]], float(scores[order[0]])
    result = SoupResult(
        out=out, ingredients=ingredients, score=best, history=[(str(ingredients[0]), best, True)]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.soup-", dir=out.parent))  # same filesystem: rename
    try:
        best_folder: Path | None = None
        for step, i in enumerate(order[1:]):
            candidate = work / f"step{step}"
            uniform_soup([*ingredients, paths[i]], candidate, progress=False, **merge_kwargs)
            value = float(score(candidate))
            kept = value > best
            result.history.append((str(paths[i]), value, kept))
            if kept:
                ingredients.append(paths[i])
                best = value
                if best_folder is not None:
                    shutil.rmtree(best_folder)
                best_folder = candidate
            else:
                shutil.rmtree(candidate)
        if best_folder is None:  # no mixture beat the best single model: the soup is that model
            shutil.copytree(ingredients[0], out)
        else:
            best_folder.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.ingredients, result.score = ingredients, best
    return result

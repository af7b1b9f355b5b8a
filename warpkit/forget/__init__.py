"""Fuse to Forget (Zaman et al. 2023, arXiv 2311.07682): what a merge keeps and what it forgets.

Models fine-tuned from one reference on partly shared data, and their fusions, are scored on probe sets
marked with the models that saw them: memorized texts seen by one model only are forgotten by the fusion
(their Average Likelihood Ratio rises back towards the reference's 1), texts every model saw are kept.

Modules, leaves first:

- `metrics`: the math: mean token log-likelihood, perplexity, ALR, exact match, Fisher overlap, errors;
- `score`: a model on encoded texts: per-text log-likelihoods and exact match, the diagonal Fisher;
- `config`: `ForgetConfig` (models, probe sets, fusions, Fisher pairs) and its YAML loader;
- `inputs`: folders, architectures, tokenizers and probe texts, all checked before any model is loaded;
- `points`: the scored models: reference, models, interpolation paths in place, registry merges;
- `summary`: rows per point and probe set, kept / forgotten per fusion point;
- `run`: `run_forget`, the orchestration;
- `plot`, `output`: the PNGs; forget.json, forget.csv and the printed table;
- `samples`: probe texts sampled from a policy (the WARP case: each run's own completions);
- `cli`: the `warpkit forget` subcommand.

The names below are imported lazily, so importing the package (the console script does) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "ForgetConfig": "config",
    "ProbeSet": "config",
    "FusionSpec": "config",
    "PathSpec": "config",
    "MergeSpec": "config",
    "FisherSpec": "config",
    "load_forget_config": "config",
    "run_forget": "run",
    "ForgetResult": "run",
    "write_forget": "output",
    "score_texts": "score",
    "diagonal_fisher": "score",
    "fisher_overlap": "metrics",
    "likelihood_ratios": "metrics",
    "policy_completions": "samples",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"warpkit.forget.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'warpkit.forget' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

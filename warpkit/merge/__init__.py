"""Merging fine-tunes of one init (WARP stages 2 and 3, and the toolbox around them).

Layers, leaves first: `math` (task vectors, SLERP / LERP / LITI on state dicts), `coefficients` (merge
rules from a Gram matrix), `elementwise` (TIES, DARE, NegMerge), `methods` (the registry: each method
declared once), `checkpoint` / `writer` (streamed safetensors reads and sharded writes), `stream` (the
chunked passes), `folders` (`merge_folders`: checks, streaming, recipe, atomic publish), `soups` (model
soups, greedy soups, WARM).
"""

from warpkit.merge.coefficients import (
    GroupStats,
    karcher_coefficients,
    lerp_coefficients,
    linear_coefficients,
    model_stock_coefficients,
    slerp_coefficients,
    stats_to_log,
    task_arithmetic_coefficients,
)
from warpkit.merge.folders import MergeReport, liti_folder, merge_folders
from warpkit.merge.math import (
    GRANULARITIES,
    Granularity,
    check_eta,
    combine,
    gram_matrix,
    group_key,
    lerp,
    liti,
    merge_lambdas,
    slerp,
    task_vector,
    weighted_average,
)
from warpkit.merge.methods import METHODS, MergeMethod, get_method

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "Granularity",
    "GroupStats",
    "MergeMethod",
    "MergeReport",
    "check_eta",
    "combine",
    "get_method",
    "gram_matrix",
    "group_key",
    "karcher_coefficients",
    "lerp",
    "lerp_coefficients",
    "linear_coefficients",
    "liti",
    "liti_folder",
    "merge_folders",
    "merge_lambdas",
    "model_stock_coefficients",
    "slerp",
    "slerp_coefficients",
    "stats_to_log",
    "task_arithmetic_coefficients",
    "task_vector",
    "weighted_average",
]

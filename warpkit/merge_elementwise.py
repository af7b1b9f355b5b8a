"""Streamed element-wise merges (TIES, DARE, NegMerge), chunk by chunk like SLERP's write pass.

Each tensor is read in row chunks of every input; the chunk's task vectors d (M, n) become one merged
task vector (`warpkit.toolbox.combine_chunk`) and init + alpha * merged is written at once. The only
non-local step is TIES's trim: per model, the k-th largest |d_m| over its scope, one tensor (default,
as mergekit and peft do) or the whole model (the TIES paper's own trim). `TopKByMagnitude` finds it
exactly in 2 (float32) or 4 (float64) counting passes over the scope's chunks before the write pass.
DARE's random mask streams with the chunks. Memory is one chunk per input, whatever the tensor size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from warpkit.merge import GroupStats, lerp_coefficients
from warpkit.toolbox import TopKByMagnitude, combine_chunk, dare_generator, trim_count

__all__ = ["TRIM_SCOPES", "write_elementwise"]

TrimScope = Literal["tensor", "model"]
TRIM_SCOPES: tuple[str, ...] = ("tensor", "model")


def write_elementwise(
    stream,
    names: Sequence[str],
    method: str,
    weights: Sequence[float],
    *,
    density: float,
    seed: int,
    trim_scope: TrimScope,
    chunks: Callable[[str], list[tuple[int, int]]],
    alpha: float,
    dtype_of: Callable[[str], torch.dtype],
    write: Callable[[str, int, torch.Tensor], None],
    tick: Callable[[], None],
) -> dict[str, GroupStats]:
    """Merge the floating tensors `names` with an element-wise method; returns per-tensor geometry.

    stream: `merge_io._Stream` over init and the M models. chunks(name): its (row_start, row_end) pairs.
    alpha: eta * scale, the factor on the merged task vector. write(name, row_start, rows) stores a chunk.
    tick() is called once per tensor per pass (progress).
    """
    num_models = len(stream.inputs) - 1
    init = stream.inputs[0]
    units = [list(names)] if trim_scope == "model" else [[n] for n in names]
    stats: dict[str, GroupStats] = {}
    for unit in units:
        stream.new_group()
        grams = {n: torch.zeros(num_models, num_models, dtype=torch.float64) for n in unit}
        selector, keep_none = None, False
        if method == "ties":
            numel = sum(init.tensors[n].numel for n in unit)
            k = trim_count(numel, density)
            keep_none = k == 0
            if 0 < k < numel:
                selector = TopKByMagnitude([k] * num_models, stream.cd)
        # The Gram matrix (stats, and the NaN/Inf refusal) is taken on the first pass over the data only.
        for pass_index in range(selector.passes if selector else 0):
            for n in unit:
                for a, b in chunks(n):
                    views = stream.read(n, a, b, keep=True)
                    d = stream.diff(views)
                    if pass_index == 0:  # refuses NaN/Inf before anything is selected
                        grams[n] += stream.gram(n, views, d)
                    selector.observe(d)
                tick()
            selector.end_pass()
        for n in unit:
            generators = [dare_generator(seed, n, m) for m in range(num_models)]
            norm_sq = 0.0
            for a, b in chunks(n):
                views = stream.read(n, a, b, keep=False)
                d = stream.diff(views)
                if selector is None:
                    grams[n] += stream.gram(n, views, d)
                if keep_none:
                    keep = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
                else:
                    keep = selector.keep(d) if selector is not None else None
                delta = combine_chunk(method, d, weights, keep=keep, density=density, generators=generators)
                write(n, a, stream.add_to_init(views, delta, alpha, dtype_of(n)))
                norm_sq += float(delta.double().square().sum())
            stats[n] = lerp_coefficients(grams[n], [1.0] * num_models, init.tensors[n].numel)
            stats[n].coefficients, stats[n].merged_norm = [], math.sqrt(norm_sq)
            tick()
    return stats

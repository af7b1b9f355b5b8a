"""The streaming passes of a folder merge: every input read in row chunks, merged, written at once.

Coefficient methods (SLERP, LERP, linear, ...), per group of parameters (`warpkit.merge.math.group_key`):
pass 1 streams the group's tensors and accumulates the Gram matrix of the task vectors (only when the
coefficients depend on it); the method turns G into one coefficient per model; pass 2 streams the same
rows again (now in the page cache, or in the re-read arena) and writes
(1 - η sum c) * init + η sum c_m theta_m straight into the output shard.

Element-wise methods (TIES, DARE, NegMerge), tensor by tensor: the chunk's task vectors d (M, n) become
one merged task vector (the method's chunk function) and init + η * scale * merged is written at once.
The only non-local step is TIES's trim: per model, the k-th largest |d_m| over its scope, one tensor
(default, as mergekit and peft do) or the whole model (the TIES paper's own trim), found exactly by
`TopKByMagnitude` in 2 (float32) or 4 (float64) counting passes before the write pass. DARE's random
masks stream with the chunks.

Memory is one chunk per input plus the arena, whatever the size or number of the models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from warpkit.merge.checkpoint import Checkpoint, LoraCheckpoint
from warpkit.merge.coefficients import GroupStats, lerp_coefficients
from warpkit.merge.elementwise import TopKByMagnitude, dare_generator, trim_count
from warpkit.merge.math import gram_matrix
from warpkit.merge.methods import MergeMethod

__all__ = ["ChunkStream", "merge_coefficient_groups", "merge_elementwise", "num_passes"]


class ChunkStream:
    """Chunks of every input read into reusable buffers, the arithmetic of both passes on them, and the
    output they are written to (`writer.write(name, start_row, flat)`), with a progress bar (`bar.update`).

    Buffers are allocated once and reused: fresh multi-megabyte allocations (and mapped files) cost a
    page fault per 4 KiB on first touch, which dominated the run time. Up to `cache_bytes` of a group's
    raw reads from pass 1 stay in an arena, so pass 2 reads only what did not fit.
    """

    def __init__(
        self, init: Checkpoint, models: Sequence[Checkpoint | LoraCheckpoint], *, compute_dtype: torch.dtype,
        device: torch.device, cache_bytes: int, chunk_numel: int, out_dtype: torch.dtype | None, writer, bar,
    ) -> None:  # fmt: skip
        self.init, self.inputs = init, [init, *models]
        self.cd, self.device = compute_dtype, device
        self.chunk_numel, self.out_dtype = chunk_numel, out_dtype
        self.writer, self.bar = writer, bar
        self.arena = torch.empty(cache_bytes, dtype=torch.uint8)
        self.used = 0
        self.cache: dict[tuple[str, int], list[torch.Tensor | None]] = {}
        self.scratch = [torch.empty(0, dtype=torch.uint8) for _ in self.inputs]
        self.work: dict[str, torch.Tensor] = {}

    @property
    def num_models(self) -> int:
        return len(self.inputs) - 1

    def chunks(self, name: str) -> list[tuple[int, int]]:
        """(row_start, row_end) ranges of tensor `name`, about `chunk_numel` elements each."""
        info = self.init.tensors[name]
        step = max(1, self.chunk_numel // max(info.row_numel, 1))
        return [(a, min(info.rows, a + step)) for a in range(0, info.rows, step)]

    def dtype_of(self, name: str) -> torch.dtype:
        return self.out_dtype or self.init.tensors[name].dtype

    def _buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.work.get(key)
        if t is None or t.numel() < numel or t.dtype != dtype:
            t = self.work[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return t[:numel]

    def new_group(self) -> None:
        self.used = 0
        self.cache.clear()

    def read(self, name: str, a: int, b: int, keep: bool) -> list[torch.Tensor]:
        """Rows [a, b) of `name` from the init and every model (dense ones in their stored dtype)."""
        cached = self.cache.get((name, a)) or [None] * len(self.inputs)
        views: list[torch.Tensor] = []
        kept: list[torch.Tensor | None] = []
        for k, ckpt in enumerate(self.inputs):
            if cached[k] is not None:
                views.append(cached[k])
                kept.append(None)
                continue
            if isinstance(ckpt, LoraCheckpoint):  # densified on the fly, never cached
                views.append(ckpt.rows(name, a, b, self.cd))
                kept.append(None)
                continue
            info = ckpt.tensors[name]
            nbytes = (b - a) * info.row_numel * info.dtype.itemsize
            in_arena = keep and self.used + nbytes <= self.arena.numel()
            if in_arena:
                buffer = self.arena[self.used : self.used + nbytes]
                self.used += -(-nbytes // 64) * 64  # keep every slice aligned for any dtype
            else:
                if self.scratch[k].numel() < nbytes:
                    self.scratch[k] = torch.empty(nbytes, dtype=torch.uint8)
                buffer = self.scratch[k]
            view = ckpt.raw_rows(name, a, b, buffer)
            views.append(view)
            kept.append(view if in_arena else None)
        if keep:
            self.cache[(name, a)] = kept
        return [v.to(self.device) for v in views]

    def diff(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The chunk's task vectors d_m = theta_m - init (M, n) in the compute dtype, valid until the next
        call (a reused buffer)."""
        n = views[0].numel()
        base = self._buffer("base", n, self.cd).copy_(views[0])
        d = self._buffer("d", (len(views) - 1) * n, self.cd).view(len(views) - 1, n)
        for m, theta in enumerate(views[1:]):
            torch.sub(theta, base, out=d[m])  # promotes bf16 inputs to the compute dtype
        return d

    def gram(self, name: str, views: list[torch.Tensor], d: torch.Tensor | None = None) -> torch.Tensor:
        """Gram matrix of the chunk's task vectors d (`diff(views)` unless given), float64, NaN/Inf refused."""
        gram = gram_matrix(self.diff(views) if d is None else d)
        if not torch.isfinite(gram.diagonal()).all():
            bad = [
                str(c.path) for c, v in zip(self.inputs, views, strict=True) if not torch.isfinite(v).all()
            ]
            raise ValueError(
                f"{name} has NaN or Inf weights in {bad or 'the task vectors'}; refusing to merge. Drop that "
                "model or use an earlier checkpoint of it (a diverged run?)."
            )
        return gram

    def write_delta(self, name: str, a: int, views: list[torch.Tensor], delta: torch.Tensor, alpha: float):
        """Write rows [a, ...) of `name` as init + alpha * delta, computed in the compute dtype, cast once."""
        out = self._buffer("out", delta.numel(), self.cd).copy_(views[0]).add_(delta, alpha=alpha)
        self._write(name, a, out)

    def write_combination(self, name: str, a: int, views: list[torch.Tensor], c0: float, coefs: list[float]):
        """Write rows [a, ...) of `name` as c0 * init + sum_m c_m theta_m, in the compute dtype, cast once."""
        out = self._buffer("out", views[0].numel(), self.cd).copy_(views[0]).mul_(c0)
        for theta, c in zip(views[1:], coefs, strict=True):
            if c != 0.0:
                out.add_(theta, alpha=c)
        self._write(name, a, out)

    def _write(self, name: str, a: int, out: torch.Tensor) -> None:
        dtype = self.dtype_of(name)
        self.writer.write(
            name, a, out if dtype == self.cd else self._buffer("cast", out.numel(), dtype).copy_(out)
        )


def num_passes(method: MergeMethod, settings: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
    """Reading passes over each tensor (for the progress bar): 2 with geometry or a TIES threshold."""
    if method.trims and 0.0 < settings["density"] < 1.0:
        return 1 + TopKByMagnitude([], compute_dtype).passes
    return 2 if method.needs_geometry else 1


# ----------------------------------------------------------------------------- coefficient methods


def merge_coefficient_groups(
    stream: ChunkStream,
    groups: Mapping[str, list[str]],
    method: MergeMethod,
    settings: Mapping[str, Any],
    eta: float,
) -> dict[str, GroupStats]:
    """Merge every group with a coefficient method; returns each group's geometry (angles, norms, ...).

    settings: the method's resolved parameters plus `weights` (and `lambdas`). eta: LITI's η (1: the merge).
    """
    return {group: _merge_group(stream, names, method, settings, eta) for group, names in groups.items()}


def _merge_group(
    stream: ChunkStream, names: list[str], method: MergeMethod, settings: Mapping[str, Any], eta: float
) -> GroupStats:
    numel = sum(stream.init.tensors[n].numel for n in names)
    gram = torch.zeros(stream.num_models, stream.num_models, dtype=torch.float64)
    stream.new_group()
    if method.needs_geometry:  # pass 1: the group's Gram matrix, then its coefficients
        for n in names:
            for a, b in stream.chunks(n):
                gram += stream.gram(n, stream.read(n, a, b, keep=True))
            stream.bar.update()
    stats = method.coefficients(gram, numel, **settings)  # single-pass methods need no geometry
    coefs = [eta * c for c in stats.coefficients]
    ic = stats.init_coefficient
    c0 = 1.0 - math.fsum(coefs) if ic is None else 1.0 - eta + eta * ic
    for n in names:  # pass 2: c0 * init + η sum c_m theta_m, cast once, written
        for a, b in stream.chunks(n):
            views = stream.read(n, a, b, keep=False)
            if not method.needs_geometry:  # one pass: the Gram feeds the stats and the NaN check
                gram += stream.gram(n, views)
            stream.write_combination(n, a, views, c0, coefs)
        stream.bar.update()
    return stats if method.needs_geometry else method.coefficients(gram, numel, **settings)


# ----------------------------------------------------------------------------- element-wise methods


def merge_elementwise(
    stream: ChunkStream, names: Sequence[str], method: MergeMethod, settings: Mapping[str, Any], eta: float
) -> dict[str, GroupStats]:
    """Merge the floating tensors `names` with an element-wise method; returns per-tensor geometry.

    TIES trims over `settings["trim_scope"]`: each tensor alone, or the whole model (one selection over
    every tensor's chunks, in order). The merged task vector is scaled by η * `scale`.
    """
    scope = settings.get("trim_scope", "tensor")
    units = [list(names)] if scope == "model" else [[n] for n in names]
    stats: dict[str, GroupStats] = {}
    for unit in units:
        stream.new_group()
        grams = {n: torch.zeros(stream.num_models, stream.num_models, dtype=torch.float64) for n in unit}
        selector, keep_none = _trim_selector(stream, unit, method, settings, grams)
        for n in unit:
            stats[n] = _write_tensor(stream, n, method, settings, eta, grams[n], selector, keep_none)
    return stats


def _trim_selector(
    stream: ChunkStream, unit: list[str], method: MergeMethod, settings: Mapping[str, Any], grams: dict
) -> tuple[TopKByMagnitude | None, bool]:
    """TIES's threshold over `unit`, by counting passes (the Gram and NaN check on the first pass);
    (None, keep_none) when nothing or everything is kept."""
    if not method.trims:
        return None, False
    numel = sum(stream.init.tensors[n].numel for n in unit)
    k = trim_count(numel, settings["density"])
    if not 0 < k < numel:
        return None, k == 0
    selector = TopKByMagnitude([k] * stream.num_models, stream.cd)
    for pass_index in range(selector.passes):
        for n in unit:
            for a, b in stream.chunks(n):
                views = stream.read(n, a, b, keep=True)
                d = stream.diff(views)
                if pass_index == 0:  # refuses NaN/Inf before anything is selected
                    grams[n] += stream.gram(n, views, d)
                selector.observe(d)
            stream.bar.update()
        selector.end_pass()
    return selector, False


def _write_tensor(
    stream: ChunkStream, name: str, method: MergeMethod, settings: Mapping[str, Any], eta: float,
    gram: torch.Tensor, selector: TopKByMagnitude | None, keep_none: bool,
) -> GroupStats:  # fmt: skip
    """The write pass of one tensor: init + η * scale * merged chunk by chunk; returns its geometry."""
    generators = (
        [dare_generator(settings["seed"], name, m) for m in range(stream.num_models)]
        if method.random
        else None
    )
    alpha = eta * settings.get("scale", 1.0)
    norm_sq = 0.0
    for a, b in stream.chunks(name):
        views = stream.read(name, a, b, keep=False)
        d = stream.diff(views)
        if selector is None:
            gram += stream.gram(name, views, d)
        keep = torch.zeros(d.shape, dtype=torch.bool, device=d.device) if keep_none else None
        if selector is not None:
            keep = selector.keep(d)
        w = torch.tensor(settings["weights"], dtype=d.dtype, device=d.device)[:, None]
        delta = method.combine(d, w, keep=keep, density=settings.get("density", 1.0), generators=generators)
        stream.write_delta(name, a, views, delta, alpha)
        norm_sq += float(delta.double().square().sum())
    stats = lerp_coefficients(gram, [1.0] * stream.num_models, stream.init.tensors[name].numel)
    stats.coefficients, stats.merged_norm = [], math.sqrt(norm_sq)
    stream.bar.update()
    return stats

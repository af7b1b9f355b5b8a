"""Merge `save_pretrained` folders (and peft LoRA adapters) tensor by tensor: WARP's SLERP or LERP of task
vectors, optionally followed by LITI towards the init in the same pass.

Per group of parameters (see `warpkit.merge.group_key`), pass 1 streams the group's tensors in row chunks
and accumulates the Gram matrix of the task vectors; `slerp_coefficients` turns it into one coefficient
per model; pass 2 streams the same rows again (now in the page cache) and writes
(1 - η sum c) * init + η sum c_m theta_m straight into the output shard. The working set is one chunk
per input, so memory does not grow with the size or number of models.

The toolbox's coefficient methods (linear, task arithmetic, Model Stock, Karcher) run on the same two
passes. Its element-wise methods (TIES, DARE, NegMerge) stream the same chunks through
`warpkit.merge_elementwise`, TIES with extra counting passes for its magnitude threshold.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from warpkit.checkpoint import (
    RECIPE_NAME,
    Checkpoint,
    LoraCheckpoint,
    ShardedWriter,
    carry_files,
    input_hashes,
    open_checkpoint,
    parse_size,
    write_config,
)
from warpkit.merge import (
    GRANULARITIES,
    Granularity,
    GroupStats,
    _check_eta,
    gram_matrix,
    group_key,
    lerp_coefficients,
    merge_lambdas,
    slerp_coefficients,
    stats_to_log,
)
from warpkit.merge_elementwise import TRIM_SCOPES, TrimScope, write_elementwise
from warpkit.toolbox import (
    ELEMENTWISE,
    TopKByMagnitude,
    karcher_coefficients,
    linear_coefficients,
    model_stock_coefficients,
    task_arithmetic_coefficients,
)

__all__ = ["MergeReport", "merge_folders"]

Method = Literal[
    "slerp", "lerp", "linear", "task_arithmetic", "model_stock", "karcher",
    "ties", "dare_linear", "dare_ties", "negmerge",
]  # fmt: skip
METHODS: tuple[str, ...] = (
    "slerp", "lerp", "linear", "task_arithmetic", "model_stock", "karcher", *ELEMENTWISE
)  # fmt: skip
# Methods whose coefficients depend on the group's geometry: pass 1 (Gram) before pass 2 (write).
_TWO_PASS = ("slerp", "model_stock", "karcher")
# Config fields two models must agree on to be merged (shapes and names are checked tensor by tensor).
_ARCH_KEYS = ("model_type", "architectures", "tie_word_embeddings")


@dataclass
class MergeReport:
    """What `merge_folders` did: the output folder, per-group geometry, wall time and the recipe written."""

    out: Path
    stats: dict[str, GroupStats]
    seconds: float
    recipe: dict

    def log(self, prefix: str = "merge") -> dict[str, float]:
        """Scalar metrics for a logger: `merge/<group>/angle_deg`, `/cos`, `/norm_<m>`, `/merged_norm`."""
        return stats_to_log(self.stats, prefix)


def _as_dtype(dtype: torch.dtype | str | None, what: str) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        result = dtype
    else:
        result = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(result, torch.dtype):
            raise ValueError(
                f"{what}={dtype!r} is not a torch dtype; use float32, bfloat16, float16 or float64."
            )
    if result is not None and not result.is_floating_point:
        raise ValueError(f"{what}={dtype!r} must be a floating dtype (float32, bfloat16, float16, float64).")
    return result


def _validate(init: Checkpoint, models: Sequence[Checkpoint | LoraCheckpoint], drop: set[str]) -> None:
    for path, model in zip(range(len(models)), models, strict=True):
        where = f"model {path} ({model.path})"
        if isinstance(model, LoraCheckpoint):
            continue  # its tensors are the init's by construction; targets were checked on open
        for key in _ARCH_KEYS:
            a, b = init.config.get(key), model.config.get(key)
            if a != b:
                raise ValueError(
                    f"{where} has {key}={b!r}, the init {init.path} has {a!r}: different architectures."
                )
        missing = sorted(set(init.tensors) - set(model.tensors) - drop)
        extra = sorted(set(model.tensors) - set(init.tensors) - drop)
        if missing or extra:
            raise ValueError(
                f"{where} does not match the init: missing tensors {missing[:5]}, extra {extra[:5]}."
            )
        for name, info in init.tensors.items():
            if name in drop:
                continue
            other = model.tensors[name]
            if other.shape != info.shape:
                raise ValueError(f"{where}: {name} has shape {other.shape}, the init has {info.shape}.")
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise ValueError(f"{where}: {name} is {other.dtype}, the init's is {info.dtype}.")


def _chunks(rows: int, row_numel: int, chunk_numel: int):
    step = max(1, chunk_numel // max(row_numel, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _Stream:
    """Chunks of every input read into reusable buffers, and the arithmetic of both passes on them.

    Buffers are allocated once and reused: fresh multi-megabyte allocations (and mapped files) cost a
    page fault per 4 KiB on first touch, which dominated the run time. Up to `cache_bytes` of a group's
    raw reads from pass 1 stay in an arena, so pass 2 reads only what did not fit.
    """

    def __init__(self, init: Checkpoint, models, cd: torch.dtype, device: torch.device, cache_bytes: int):
        self.inputs = [init, *models]
        self.cd, self.device = cd, device
        self.arena = torch.empty(cache_bytes, dtype=torch.uint8)
        self.used = 0
        self.cache: dict[tuple[str, int], list[torch.Tensor | None]] = {}
        self.scratch = [torch.empty(0, dtype=torch.uint8) for _ in self.inputs]
        self.work: dict[str, torch.Tensor] = {}

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
        """Gram matrix of the chunk's task vectors d (`diff(views)` unless given), float64, NaN/Inf
        refused."""
        gram = gram_matrix(self.diff(views) if d is None else d)
        if not torch.isfinite(gram.diagonal()).all():
            bad = [
                str(c.path) for c, v in zip(self.inputs, views, strict=True) if not torch.isfinite(v).all()
            ]
            raise ValueError(
                f"{name} has NaN or Inf weights in {bad or 'the task vectors'}; refusing to merge."
            )
        return gram

    def add_to_init(self, views: list[torch.Tensor], delta: torch.Tensor, alpha: float, dtype: torch.dtype):
        """init + alpha * delta in the compute dtype, then cast once (element-wise methods)."""
        out = self._buffer("out", delta.numel(), self.cd).copy_(views[0]).add_(delta, alpha=alpha)
        return out if dtype == self.cd else self._buffer("cast", delta.numel(), dtype).copy_(out)

    def combine(
        self, views: list[torch.Tensor], c0: float, coefs: list[float], dtype: torch.dtype
    ) -> torch.Tensor:
        """c0 * init + sum_m c_m theta_m in the compute dtype, then the one cast to the output dtype."""
        n = views[0].numel()
        out = self._buffer("out", n, self.cd).copy_(views[0]).mul_(c0)
        for theta, c in zip(views[1:], coefs, strict=True):
            if c != 0.0:
                out.add_(theta, alpha=c)
        return out if dtype == self.cd else self._buffer("cast", n, dtype).copy_(out)


def merge_folders(
    method: Method,
    init: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    *,
    granularity: Granularity = "block",
    liti_eta: float | None = None,
    allow_extrapolation: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    max_shard_size: int | str = "5GB",
    chunk_numel: int = 1 << 18,
    cache_size: int | str = "256MB",
    overwrite: bool = False,
    hash_inputs: bool = True,
    num_threads: int = 1,
    progress: bool = True,
    scale: float | None = None,
    density: float | None = None,
    seed: int = 0,
    normalize: bool = True,
    trim_scope: TrimScope | None = None,
) -> MergeReport:
    """Merge `models` (save_pretrained folders or LoRA adapters of `init`) relative to `init` into `out`.

    method: "slerp" (WARP stage 2, the paper's recursion for M > 2) or "lerp" of task vectors, or a
    toolbox method (see `warpkit.toolbox`): "linear" (`normalize`), "task_arithmetic" (`scale`, negative
    weights negate), "model_stock", "karcher", "ties" (`density`), "dare_linear" / "dare_ties" (`density`
    = keep probability, `seed`), "negmerge" (`scale`). TIES trims each task vector per tensor, or over
    the whole model with trim_scope="model" (the TIES paper's trim; two more reading passes).
    weights: one per model, uniform by default. granularity: "block" (default), "tensor" or "model".
    liti_eta: if set, write LITI (1 - η) * init + η * merged (WARP stage 3) instead of the merge itself.
    dtype: output dtype (default: each tensor keeps the init's); arithmetic runs in `compute_dtype`.
    hash_inputs: record each input file's sha256 in the recipe (hashed by a background thread).
    num_threads: torch threads for the arithmetic (restored afterwards). One by default: streaming
    element-wise work is memory-bound, chunks of 2^18 elements stay in cache, and on a shared machine
    spinning OpenMP workers made two threads several times slower than one.
    Memory: one chunk of `chunk_numel` elements per input plus `cache_size` bytes that spare pass 2 a
    re-read of the group's tensors (a transformer layer of a 0.5B model in fp32 fits in 256MB), for
    every method: the element-wise ones stream the same chunks.
    All inputs are checked before anything is written; the folder appears at `out` only when complete.
    Returns a `MergeReport` whose `stats` hold each group's angle, task-vector norms and cosines.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
    out_dtype = _as_dtype(dtype, "dtype")
    cd = _as_dtype(compute_dtype, "compute_dtype")
    if cd not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype={compute_dtype!r}: merges run in float32 or float64.")
    device = torch.device(device or "cpu")
    if liti_eta is not None:
        _check_eta(liti_eta, allow_extrapolation)
    init_path, out = Path(init), Path(out)
    paths = [Path(m) for m in models]
    # One model is allowed for the task-vector methods: merging it alone returns it, so with liti_eta it is
    # plain LITI (1 - eta) init + eta model, and M = 1 is WARP's no-merge ablation.
    at_least = 2 if method == "model_stock" else 1
    if len(paths) < at_least:
        raise ValueError(f"{method} needs at least {at_least} models, got {len(paths)}.")
    w = [float(x) for x in weights] if weights is not None else [1.0] * len(paths)
    if len(w) != len(paths):
        raise ValueError(f"got {len(w)} weights for {len(paths)} models; give one weight per model.")
    if any(not math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}.")
    if method in ("model_stock", "negmerge") and weights is not None:
        raise ValueError(f"{method} takes no weights (got {w}); drop --weights.")
    if scale is not None and method not in ("task_arithmetic", *ELEMENTWISE):
        raise ValueError(f"scale applies to task_arithmetic, ties, dare_* and negmerge, not {method}.")
    if density is not None and method not in ("ties", "dare_linear", "dare_ties"):
        raise ValueError(f"density applies to ties, dare_linear and dare_ties, not {method}.")
    if trim_scope is not None and method != "ties":
        raise ValueError(f"trim_scope applies to ties only, not {method}.")
    trim_scope = trim_scope or "tensor"
    if trim_scope not in TRIM_SCOPES:
        raise ValueError(f"trim_scope={trim_scope!r} is not one of {TRIM_SCOPES}.")
    scale = 1.0 if scale is None else float(scale)
    density = 1.0 if density is None else float(density)
    if not (math.isfinite(scale) and 0.0 <= density <= 1.0):
        raise ValueError(f"scale={scale} must be finite and density={density} in [0, 1].")
    lambdas = (
        merge_lambdas(w, allow_extrapolation=allow_extrapolation) if method in ("slerp", "lerp") else None
    )
    if method == "karcher" and (any(x < 0 for x in w) or sum(w) <= 0):
        raise ValueError(f"karcher weights must be >= 0 with a positive sum, got {w}.")
    if method == "linear":
        linear_coefficients(torch.eye(len(w)), w, normalize=normalize)  # refuses a zero weight sum now

    def coefficients_of(gram: torch.Tensor, numel: int) -> GroupStats:
        if method == "slerp":
            return slerp_coefficients(gram, lambdas, numel)
        if method == "lerp":
            return lerp_coefficients(gram, w, numel)
        if method == "linear":
            return linear_coefficients(gram, w, numel, normalize=normalize)
        if method == "task_arithmetic":
            return task_arithmetic_coefficients(gram, w, numel, scale=scale)
        if method == "model_stock":
            return model_stock_coefficients(gram, numel)
        return karcher_coefficients(gram, w, numel)

    for p in [init_path, *paths]:
        if p.exists() and out.exists() and p.resolve() == out.resolve():
            raise ValueError(f"out={out} is one of the inputs; write the merge to a new folder.")
    if out.exists() and not overwrite:
        raise ValueError(f"out={out} already exists; remove it or pass overwrite=True (CLI: --overwrite).")

    init_ckpt = Checkpoint(init_path)
    if (init_path / "adapter_config.json").exists():
        raise ValueError(
            f"init {init_path} is a LoRA adapter; the init must be the full model the adapters share."
        )
    ckpts = [open_checkpoint(p, init_ckpt) for p in paths]
    # Tied embeddings: the head is the embedding, so it is merged once, as the embedding, and not written.
    drop = {"lm_head.weight"} if init_ckpt.tied and "lm_head.weight" in init_ckpt.tensors else set()
    _validate(init_ckpt, ckpts, drop)
    names = [n for n in init_ckpt.tensors if n not in drop]
    plan = []
    for n in names:
        info = init_ckpt.tensors[n]
        plan.append((n, out_dtype if out_dtype and info.dtype.is_floating_point else info.dtype, info.shape))
    groups: dict[str, list[str]] = {}
    for n in names:
        if init_ckpt.tensors[n].dtype.is_floating_point:
            groups.setdefault(group_key(n, granularity), []).append(n)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    pool = ThreadPoolExecutor(1)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        files = [f for c in [init_ckpt, *ckpts] for f in c.files]
        hashes = pool.submit(input_hashes, files) if hash_inputs else None
        writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
        for n in names:  # integer and bool buffers: copied from the init, never interpolated
            info = init_ckpt.tensors[n]
            if not info.dtype.is_floating_point:
                writer.write(n, 0, init_ckpt.raw_rows(n, 0, info.rows))
        eta = 1.0 if liti_eta is None else liti_eta
        stats: dict[str, GroupStats] = {}
        passes = 2 if method in _TWO_PASS else 1
        if method == "ties" and 0.0 < density < 1.0:  # the threshold's counting passes (2 in float32)
            passes = 1 + TopKByMagnitude([], cd).passes
        bar = tqdm(
            total=passes * sum(len(v) for v in groups.values()),
            unit="tensor",
            disable=not progress,
            desc=f"warpkit merge ({method})",
        )
        stream = _Stream(init_ckpt, ckpts, cd, device, parse_size(cache_size))
        if method in ELEMENTWISE:  # init + η * scale * merged task vector, chunk by chunk
            stats = write_elementwise(
                stream,
                [n for group_names in groups.values() for n in group_names],
                method,
                w,
                density=density,
                seed=seed,
                trim_scope=trim_scope,
                chunks=lambda n: list(
                    _chunks(init_ckpt.tensors[n].rows, init_ckpt.tensors[n].row_numel, chunk_numel)
                ),
                alpha=eta * scale,
                dtype_of=lambda n: out_dtype or init_ckpt.tensors[n].dtype,
                write=writer.write,
                tick=bar.update,
            )
            groups = {}
        for group, group_names in groups.items():
            numel = sum(init_ckpt.tensors[n].numel for n in group_names)
            gram = torch.zeros(len(ckpts), len(ckpts), dtype=torch.float64)
            stream.new_group()
            if method in _TWO_PASS:  # pass 1: the group's Gram matrix, then its coefficients
                for n in group_names:
                    info = init_ckpt.tensors[n]
                    for a, b in _chunks(info.rows, info.row_numel, chunk_numel):
                        gram += stream.gram(n, stream.read(n, a, b, keep=True))
                    bar.update()
            stats[group] = coefficients_of(gram, numel)  # single-pass methods need no geometry
            coefs = [eta * c for c in stats[group].coefficients]
            ic = stats[group].init_coefficient
            c0 = 1.0 - math.fsum(coefs) if ic is None else 1.0 - eta + eta * ic
            for n in group_names:  # pass 2: c0 * init + η sum c_m theta_m, cast once, written
                info = init_ckpt.tensors[n]
                for a, b in _chunks(info.rows, info.row_numel, chunk_numel):
                    views = stream.read(n, a, b, keep=False)
                    if method not in _TWO_PASS:  # one pass: the Gram feeds the stats and the NaN check
                        gram += stream.gram(n, views)
                    writer.write(n, a, stream.combine(views, c0, coefs, out_dtype or info.dtype))
                bar.update()
            if method not in _TWO_PASS:
                stats[group] = coefficients_of(gram, numel)
        bar.close()
        writer.close()
        write_config(init_ckpt, tmp, out_dtype)
        carried = carry_files(init_path, tmp)
        digests = hashes.result() if hashes is not None else {}
        recipe = {
            "warpkit_merge": 1,
            "method": method,
            "granularity": granularity,
            "weights": w,
            "lambdas": lambdas if method == "slerp" else None,
            "scale": scale if method in ("task_arithmetic", *ELEMENTWISE) else None,
            "density": density if method in ("ties", "dare_linear", "dare_ties") else None,
            "seed": seed if method.startswith("dare") else None,
            "trim_scope": trim_scope if method == "ties" else None,
            "normalize": normalize if method == "linear" else None,
            "liti_eta": liti_eta,
            "allow_extrapolation": allow_extrapolation,
            "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
            "compute_dtype": str(cd).removeprefix("torch."),
            "init": {
                "path": str(init_path.resolve()),
                "sha256": {f.name: digests.get(str(f)) for f in init_ckpt.files},
            },
            "models": [
                {
                    "path": str(c.path.resolve()),
                    "kind": "lora" if isinstance(c, LoraCheckpoint) else "full",
                    "sha256": {f.name: digests.get(str(f)) for f in c.files},
                }
                for c in ckpts
            ],
            "tied_not_written": sorted(drop),
            "carried_files": carried,
            "stats": {g: asdict(s) for g, s in stats.items()},
        }
        (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
        pool.shutdown(wait=True, cancel_futures=True)
        for c in [init_ckpt, *ckpts]:
            c.close()
    return MergeReport(out=out, stats=stats, seconds=time.perf_counter() - t0, recipe=recipe)

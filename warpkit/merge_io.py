"""Merge `save_pretrained` folders (and peft LoRA adapters) tensor by tensor: WARP's SLERP or LERP of task
vectors, optionally followed by LITI towards the init in the same pass.

Per group of parameters (see `warpkit.merge.group_key`), pass 1 streams the group's tensors in row chunks
and accumulates the Gram matrix of the task vectors; `slerp_coefficients` turns it into one coefficient
per model; pass 2 streams the same rows again (now in the page cache) and writes
(1 - η sum c) * init + η sum c_m theta_m straight into the output shard. The working set is one chunk
per input, so memory does not grow with the size or number of models.
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
    group_key,
    lerp_coefficients,
    merge_lambdas,
    slerp_coefficients,
    stats_to_log,
)

__all__ = ["MergeReport", "merge_folders"]

Method = Literal["slerp", "lerp"]
METHODS: tuple[str, ...] = ("slerp", "lerp")
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


def _thetas(models, name, a, b, cd, device):
    """Each model's rows as a tensor on `device`; dense reads stay in their stored dtype (promoted on use)."""
    out = []
    for model in models:
        if isinstance(model, LoraCheckpoint):
            out.append(model.rows(name, a, b, cd).to(device))
        else:
            out.append(model.raw_rows(name, a, b).to(device))
    return out


def _gram_chunk(init, models, name, a, b, cd, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    base = init.raw_rows(name, a, b).to(device=device, dtype=cd, copy=True)  # never write into the map
    thetas = _thetas(models, name, a, b, cd, device)
    d = torch.empty(len(models), base.numel(), dtype=cd, device=device)
    for m, theta in enumerate(thetas):
        torch.sub(theta, base, out=d[m])
    gram = (d @ d.T).to("cpu", torch.float64)
    if not torch.isfinite(gram.diagonal()).all():
        bad = [str(init.path)] if not torch.isfinite(base).all() else []
        bad += [str(mdl.path) for mdl, t in zip(models, thetas, strict=True) if not torch.isfinite(t).all()]
        raise ValueError(f"{name} has NaN or Inf weights in {bad or 'the task vectors'}; refusing to merge.")
    return gram, base, thetas


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
    chunk_numel: int = 1 << 22,
    overwrite: bool = False,
    hash_inputs: bool = True,
    progress: bool = True,
) -> MergeReport:
    """Merge `models` (save_pretrained folders or LoRA adapters of `init`) relative to `init` into `out`.

    method: "slerp" (WARP stage 2, the paper's recursion for M > 2) or "lerp" of task vectors.
    weights: one per model, uniform by default. granularity: "block" (default), "tensor" or "model".
    liti_eta: if set, write LITI (1 - η) * init + η * merged (WARP stage 3) instead of the merge itself.
    dtype: output dtype (default: each tensor keeps the init's); arithmetic runs in `compute_dtype`.
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
    if not paths:
        raise ValueError(f"{method} needs at least one model (one model with liti_eta is plain LITI).")
    w = [float(x) for x in weights] if weights is not None else [1.0] * len(paths)
    if len(w) != len(paths):
        raise ValueError(f"got {len(w)} weights for {len(paths)} models; give one weight per model.")
    lambdas = merge_lambdas(w, allow_extrapolation=allow_extrapolation)
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
        passes = 2 if method == "slerp" else 1
        bar = tqdm(
            total=passes * sum(len(v) for v in groups.values()),
            unit="tensor",
            disable=not progress,
            desc=f"warpkit merge ({method})",
        )
        for group, group_names in groups.items():
            numel = sum(init_ckpt.tensors[n].numel for n in group_names)
            gram = torch.zeros(len(ckpts), len(ckpts), dtype=torch.float64)
            if method == "slerp":  # pass 1: the group's Gram matrix, then its coefficients
                for n in group_names:
                    info = init_ckpt.tensors[n]
                    for a, b in _chunks(info.rows, info.row_numel, chunk_numel):
                        gram += _gram_chunk(init_ckpt, ckpts, n, a, b, cd, device)[0]
                    bar.update()
                stats[group] = slerp_coefficients(gram, lambdas, numel)
            else:
                stats[group] = lerp_coefficients(gram, w, numel)
            coefs = [eta * c for c in stats[group].coefficients]
            c0 = 1.0 - math.fsum(coefs)
            for n in group_names:  # pass 2: (1 - η sum c) init + η sum c_m theta_m, cast once, written
                info = init_ckpt.tensors[n]
                for a, b in _chunks(info.rows, info.row_numel, chunk_numel):
                    if method == "lerp":  # one pass: the Gram only feeds the stats (and the NaN check)
                        g, base, thetas = _gram_chunk(init_ckpt, ckpts, n, a, b, cd, device)
                        gram += g
                    else:
                        base = init_ckpt.raw_rows(n, a, b).to(device=device, dtype=cd, copy=True)
                        thetas = _thetas(ckpts, n, a, b, cd, device)
                    merged = base.mul_(c0)
                    for theta, c in zip(thetas, coefs, strict=True):
                        if c != 0.0:
                            merged.add_(theta, alpha=c)
                    writer.write(n, a, merged.to(out_dtype or info.dtype))
                bar.update()
            if method == "lerp":
                stats[group] = lerp_coefficients(gram, w, numel)
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
        pool.shutdown(wait=True, cancel_futures=True)
        for c in [init_ckpt, *ckpts]:
            c.close()
    return MergeReport(out=out, stats=stats, seconds=time.perf_counter() - t0, recipe=recipe)

"""Merge `save_pretrained` folders (and peft LoRA adapters) of one init into a new folder: any method of the
registry (`warpkit.merge.methods`), optionally followed by LITI towards the init in the same pass.

`merge_folders` does four things, each in its own function: check every setting and input before
anything is written (`_check_settings`, `_open_inputs`), stream the merge into the output shards
(`warpkit.merge.stream`), write the recipe (`_recipe`: method, settings, per-group geometry, sha256 of
every input), and publish the folder atomically (`warpkit._util.files.atomic_dir`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from warpkit._util.files import atomic_dir, sha256_file
from warpkit._util.tensors import check_same_tensors
from warpkit.merge.checkpoint import Checkpoint, LoraCheckpoint, open_checkpoint
from warpkit.merge.coefficients import GroupStats, stats_to_log
from warpkit.merge.lora_base import check_lora_base
from warpkit.merge.math import GRANULARITIES, Granularity, check_eta, group_key
from warpkit.merge.methods import METHODS, MergeMethod, get_method
from warpkit.merge.output import check_out, writing
from warpkit.merge.stream import ChunkStream, merge_coefficient_groups, merge_elementwise, num_passes
from warpkit.merge.writer import RECIPE_NAME, ShardedWriter, carry_files, parse_size, write_config

__all__ = ["MergeReport", "as_device", "as_dtype", "liti_folder", "merge_folders"]

# Config fields two models must agree on to be merged (shapes and names are checked tensor by tensor).
_ARCH_KEYS = ("model_type", "architectures", "tie_word_embeddings")
_SAME_INIT = "Merge only fine-tunes of the init (its architecture and sizes), or pass the init they share."


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


def as_dtype(dtype: torch.dtype | str | None, what: str) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name ("bfloat16", "torch.float32"); None stays None."""
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


def as_device(device: torch.device | str | None, what: str) -> torch.device:
    """A device of this machine that torch can compute on, from a device or its name ("cpu", "cuda",
    "cuda:1"); None is the cpu."""
    try:
        result = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}={device!r} is not a torch device; use cpu, cuda or cuda:N.") from e
    if result.type == "cpu":
        return result
    backend, count = getattr(torch, result.type, None), 0
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        count = getattr(backend, "device_count", lambda: 1)()
    if (result.index or 0) >= count:
        have = f"{count} {result.type} device(s)" if count else f"no {result.type} device torch can use"
        raise ValueError(
            f"{what}={device!r}: this machine has {have}; drop {what} (merges run on the cpu by default) "
            "or name a device it has."
        )
    return result


def merge_folders(
    method: str,
    init: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    *,
    granularity: Granularity = "block",
    liti_eta: float | None = None,
    allow_extrapolation: bool = False,
    lora_base_ok: bool = False,
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
    **params: Any,
) -> MergeReport:
    """Merge `models` (save_pretrained folders or LoRA adapters of `init`) relative to `init` into `out`.

    method: a name of `warpkit.merge.methods.METHODS` with an init: "slerp" (WARP stage 2, the paper's
    recursion for M > 2), "lerp", "linear" (`normalize`), "task_arithmetic" (`scale`, negative weights
    negate), "model_stock", "karcher", "ties" (`density`, `scale`, `trim_scope`: "tensor" or "model", the
    TIES paper's trim, two more reading passes), "dare_linear" / "dare_ties" (`density` = keep probability,
    `seed`, `scale`), "negmerge" (`scale`). `params` are the method's settings; another method's is refused.
    weights: one per model, uniform by default. granularity: "block" (default), "tensor" or "model".
    liti_eta: if set, write LITI (1 - η) * init + η * merged (WARP stage 3) instead of the merge itself.
    lora_base_ok: merge LoRA adapters whose `base_model_name_or_path` names another model than `init`
    (refused by default, see `warpkit.merge.lora_base`): say so only when it is the same model.
    dtype: output dtype (default: each tensor keeps the init's); arithmetic runs in `compute_dtype`.
    hash_inputs: record each input file's sha256 in the recipe (hashed by a background thread).
    num_threads: torch threads for the arithmetic (restored afterwards). One by default: streaming
    element-wise work is memory-bound, chunks of 2^18 elements stay in cache, and on a shared machine
    spinning OpenMP workers made two threads several times slower than one.
    Memory: one chunk of `chunk_numel` elements per input plus `cache_size` bytes that spare pass 2 a
    re-read of the group's tensors (a transformer layer of a 0.5B model in fp32 fits in 256MB), for
    every method: the element-wise ones stream the same chunks.
    All inputs are checked before anything is written (`out` before any is read: never an input, inside
    or around one, and replaced only if it is an earlier warpkit output and `overwrite`); the folder
    appears at `out` only when complete. Returns a `MergeReport` whose `stats` hold each group's angle, task-vector norms and cosines.
    """
    t0 = time.perf_counter()
    entry, settings = _check_settings(
        method, len(models), weights, params, granularity, liti_eta, allow_extrapolation
    )
    out_dtype, cd = as_dtype(dtype, "dtype"), as_dtype(compute_dtype, "compute_dtype")
    if cd not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype={compute_dtype!r}: merges run in float32 or float64.")
    settings |= {"allow_extrapolation": allow_extrapolation, "dtype": out_dtype, "compute_dtype": cd}
    settings["lora_base_ok"] = lora_base_ok
    options = {"device": as_device(device, "device"), "cache_bytes": parse_size(cache_size, "cache_size")}
    options |= {
        "chunk_numel": chunk_numel,
        "progress": progress,
        "max_shard_bytes": parse_size(max_shard_size, "max_shard_size"),
    }
    init_path, paths = Path(init), [Path(m) for m in models]
    out = check_out(out, [init_path, *paths], overwrite)
    init_ckpt, ckpts, drop = _open_inputs(init_path, paths, lora_base_ok)
    pool = ThreadPoolExecutor(1)
    try:
        files = [f for c in [init_ckpt, *ckpts] for f in c.files]
        hashes = pool.submit(lambda: {str(f): sha256_file(f) for f in files}) if hash_inputs else None
        with writing(out), atomic_dir(out, overwrite=overwrite) as tmp, _torch_threads(num_threads):
            stats = _write_weights(tmp, init_ckpt, ckpts, drop, entry, settings, options)
            write_config(init_ckpt, tmp, out_dtype)
            carried = carry_files(init_path, tmp)
            digests = hashes.result() if hashes is not None else {}
            recipe = _recipe(entry, settings, init_ckpt, ckpts, digests, stats, carried, drop)
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for c in [init_ckpt, *ckpts]:
            c.close()
    return MergeReport(out=out, stats=stats, seconds=time.perf_counter() - t0, recipe=recipe)


def liti_folder(
    init: str | Path,
    merged: str | Path,
    out: str | Path,
    eta: float,
    allow_extrapolation: bool = False,
    **kwargs,
) -> MergeReport:
    """LITI (WARP stage 3) streamed to `out`: (1 - η) init + η merged, the LERP of the single model `merged`."""
    return merge_folders(
        "lerp", init, [merged], out, liti_eta=eta, allow_extrapolation=allow_extrapolation, **kwargs
    )


def _check_settings(
    method: str, num_models: int, weights: Sequence[float] | None, params: Mapping[str, Any],
    granularity: str, liti_eta: float | None, allow_extrapolation: bool,
) -> tuple[MergeMethod, dict[str, Any]]:  # fmt: skip
    """The registry entry and every setting resolved (its params, weights, λ, granularity, η), or ValueError."""
    entry = get_method(method)
    if entry.init == "none":
        soups = [m.name for m in METHODS.values() if m.init == "none"]
        raise ValueError(
            f"{method} averages models without an init; call warpkit.merge.soups (or `warpkit merge --method "
            f"{method}`) instead of merge_folders. Methods without an init: {soups}."
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")
    if liti_eta is not None:
        check_eta(liti_eta, allow_extrapolation)
    settings = entry.resolve(params)
    settings |= entry.check_inputs(num_models, weights, settings, allow_extrapolation=allow_extrapolation)
    if entry.coefficients is not None:  # refuses weights the rule cannot use (a zero sum...) up front
        entry.coefficients(torch.eye(num_models, dtype=torch.float64), 0, **settings)
    return entry, settings | {"granularity": granularity, "liti_eta": liti_eta}


def _open_inputs(
    init_path: Path, paths: Sequence[Path], lora_base_ok: bool = False
) -> tuple[Checkpoint, list, set[str]]:
    """The init and every model opened lazily and checked against the init; the tied head to skip."""
    init_ckpt = Checkpoint(init_path)
    if (init_path / "adapter_config.json").exists():
        raise ValueError(
            f"init {init_path} is a LoRA adapter; the init must be the full model the adapters share."
        )
    ckpts = [open_checkpoint(p, init_ckpt) for p in paths]
    # Tied embeddings: the head is the embedding, so it is merged once, as the embedding, and not written.
    drop = {"lm_head.weight"} if init_ckpt.tied and "lm_head.weight" in init_ckpt.tensors else set()
    for i, model in enumerate(ckpts):
        where = f"model {i} ({model.path})"
        if isinstance(model, LoraCheckpoint):  # its tensors are the init's; targets were checked on open
            if not lora_base_ok:
                check_lora_base(model.base_model, init_path, init_ckpt.config, where)
            continue
        for key in _ARCH_KEYS:
            a, b = init_ckpt.config.get(key), model.config.get(key)
            if a != b:
                raise ValueError(
                    f"{where} has {key}={b!r}, the init {init_ckpt.path} has {a!r}: different architectures. "
                    f"{_SAME_INIT}"
                )
        shapes = {n: info.shape for n, info in model.tensors.items()}
        init_shapes = {n: info.shape for n, info in init_ckpt.tensors.items()}
        check_same_tensors(
            init_shapes, shapes, where, f"the init {init_ckpt.path}", ignore=drop, fix=_SAME_INIT
        )
        for name, info in init_ckpt.tensors.items():
            other = model.tensors[name] if name not in drop else info
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise ValueError(f"{where}: {name} is {other.dtype}, the init's is {info.dtype}.")
    return init_ckpt, ckpts, drop


def _write_weights(
    tmp: Path, init: Checkpoint, ckpts: list, drop: set[str], entry: MergeMethod, settings: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, GroupStats]:  # fmt: skip
    """Stream the merge into `tmp`'s shards; returns the per-group (or per-tensor) geometry."""
    out_dtype, cd = settings["dtype"], settings["compute_dtype"]
    names = [n for n in init.tensors if n not in drop]
    floating = [n for n in names if init.tensors[n].dtype.is_floating_point]
    plan = [
        (n, out_dtype if out_dtype and n in floating else init.tensors[n].dtype, init.tensors[n].shape)
        for n in names
    ]
    groups: dict[str, list[str]] = {}
    for n in floating:
        groups.setdefault(group_key(n, settings["granularity"]), []).append(n)
    writer = ShardedWriter(tmp, plan, options["max_shard_bytes"])
    total = num_passes(entry, settings, cd) * len(floating)
    bar = tqdm(
        total=total, unit="tensor", disable=not options["progress"], desc=f"warpkit merge ({entry.name})"
    )
    try:
        for n in names:  # integer and bool buffers: copied from the init, never interpolated
            if n not in floating:
                writer.write(n, 0, init.raw_rows(n, 0, init.tensors[n].rows))
        stream = ChunkStream(
            init, ckpts, compute_dtype=cd, device=options["device"], cache_bytes=options["cache_bytes"],
            chunk_numel=options["chunk_numel"], out_dtype=out_dtype, writer=writer, bar=bar,
        )  # fmt: skip
        eta = 1.0 if settings["liti_eta"] is None else settings["liti_eta"]
        if entry.combine is not None:  # init + η * scale * merged task vector, chunk by chunk
            stats = merge_elementwise(stream, [n for g in groups.values() for n in g], entry, settings, eta)
        else:
            stats = merge_coefficient_groups(stream, groups, entry, settings, eta)
    except BaseException:
        writer.abort()
        bar.leave = False  # on a terminal the bar is erased: the error is what stays on screen
        bar.close()
        raise
    bar.close()
    writer.close()
    return stats


def _recipe(
    entry: MergeMethod, settings: dict[str, Any], init: Checkpoint, ckpts: list, digests: dict[str, str],
    stats: dict[str, GroupStats], carried: list[str], drop: set[str],
) -> dict[str, Any]:  # fmt: skip
    """warpkit_merge.json: the method, every setting (None where it does not apply), inputs and geometry."""
    params = {p.name: settings.get(p.name) for m in METHODS.values() if m.init != "none" for p in m.params}
    return {
        "warpkit_merge": 1,
        "method": entry.name,
        "granularity": settings["granularity"],
        "weights": settings["weights"],
        "lambdas": settings.get("lambdas"),
        **params,
        "liti_eta": settings["liti_eta"],
        "allow_extrapolation": settings["allow_extrapolation"],
        "lora_base_ok": settings["lora_base_ok"],
        "dtype": _dtype_name(settings["dtype"]),
        "compute_dtype": _dtype_name(settings["compute_dtype"]),
        "init": {
            "path": str(init.path.resolve()),
            "sha256": {f.name: digests.get(str(f)) for f in init.files},
        },
        "models": [
            {
                "path": str(c.path.resolve()),
                "kind": "lora" if isinstance(c, LoraCheckpoint) else "full",
                **({"base_model_name_or_path": c.base_model} if isinstance(c, LoraCheckpoint) else {}),
                "sha256": {f.name: digests.get(str(f)) for f in c.files},
            }
            for c in ckpts
        ],
        "tied_not_written": sorted(drop),
        "carried_files": carried,
        "stats": {g: asdict(s) for g, s in stats.items()},
    }


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype else None


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Streaming safetensors checkpoints, write side: preallocated sharded writes, config and the init's files.

`ShardedWriter` fixes every header up front from the plan (name, dtype, shape), so rows can be written in
any order with one `pwrite` each and nothing is buffered; shards split by bytes like `save_pretrained`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from warpkit.merge.checkpoint import DTYPES, Checkpoint

__all__ = ["RECIPE_NAME", "ShardedWriter", "carry_files", "parse_size", "write_config"]

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Files of a model folder that are weights or merge bookkeeping; everything else (config, generation
# config, tokenizer, chat template) is carried over from the init.
_NOT_CARRIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl)$|.*\.index\.json$|adapter_config\.json$")
RECIPE_NAME = "warpkit_merge.json"


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from 5000000, "5GB", "500MB" or "2GiB"; `what` names the setting in the error."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    pattern = r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*"
    m = re.fullmatch(pattern, size, re.IGNORECASE) if isinstance(size, str) else None
    if not m:
        raise ValueError(f"cannot parse {what} {size!r}; use e.g. 5GB, 500MB or a number of bytes.")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


class ShardedWriter:
    """Writes tensors into preallocated safetensors shards at known offsets (rows may arrive in any order).

    The plan (name, dtype, shape) fixes every header up front, so nothing is buffered: `write(name, start_row,
    flat)` is one `pwrite`. Shards split by bytes like `save_pretrained` ("model-00001-of-00003.safetensors"
    plus model.safetensors.index.json; a single shard is "model.safetensors").
    """

    def __init__(
        self, folder: Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
    ):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, row bytes)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._fds: list[int] = []
        try:
            self._allocate(names, shards)
        except BaseException:
            self.abort()
            raise
        self.n_shards = n

    def _allocate(self, names: list[str], shards: list) -> None:
        """Create each shard: its header written, its data region sized (a sparse file until written)."""
        for file, entries in zip(names, shards, strict=True):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in entries:
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                header[name] = {
                    "dtype": DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
            fd = os.open(self.folder / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, len(blob).to_bytes(8, "little") + blob, 0, f"the header of {file}")
            os.ftruncate(fd, 8 + len(blob) + offset)
            for name, dtype, shape in entries:
                start = 8 + len(blob) + header[name]["data_offsets"][0]
                row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
                self.where[name] = (fd, start, row_numel * torch.empty((), dtype=dtype).element_size())
                self.weight_map[name] = file
            self.total_size += offset

    def write(self, name: str, start_row: int, flat: torch.Tensor) -> None:
        """Rows from `start_row` of `name` (`flat`: the rows flattened, in the planned dtype)."""
        fd, offset, row_bytes = self.where[name]
        _pwrite_all(
            fd, flat.contiguous().cpu().view(torch.uint8).numpy(), offset + start_row * row_bytes, name
        )

    def close(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if self.n_shards > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the shards without syncing (a failed merge: the caller removes the folder, and the space of
        an unlinked file is freed only once it is closed)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _pwrite_all(fd: int, data, offset: int, what: str) -> None:
    """Write all of `data` at `offset`. A short write (the disk filling up) is retried for the rest, so the
    OS reports why it stopped (ENOSPC); a write that makes no progress is reported as ENOSPC."""
    view, done = memoryview(data).cast("B"), 0
    while done < view.nbytes:
        written = os.pwrite(fd, view[done:], offset + done)
        if written <= 0:
            raise OSError(errno.ENOSPC, f"short write for {what}: {done} of {view.nbytes} bytes, then none")
        done += written


def write_config(init: Checkpoint, folder: Path, dtype: torch.dtype | None) -> None:
    """The init's config.json with `dtype` set to the output dtype (and `torch_dtype` if the file uses it)."""
    if not init.config:
        return
    config = dict(init.config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def carry_files(init: Path, folder: Path) -> list[str]:
    """Copy the init's non-weight files (generation config, tokenizer, chat template, ...); config.json is
    written by `write_config`. Returns the names copied."""
    copied = []
    for p in sorted(init.iterdir()):
        if p.is_file() and p.name not in ("config.json", RECIPE_NAME) and not _NOT_CARRIED.fullmatch(p.name):
            shutil.copy2(p, folder / p.name)
            copied.append(p.name)
    return copied

"""Streaming safetensors checkpoints: lazy reads, exact LoRA densification, atomic sharded writes, recipes.

Reads map each file (`mmap`, copy-on-write) and hand out zero-copy row ranges of a tensor, so what a
merge holds in anonymous memory is one chunk per input, whatever the size or number of the models; the
pages themselves are the kernel's file cache. The safetensors layout (8-byte little-endian header length,
JSON header, raw little-endian data) is parsed here directly, as the format specifies.

A peft LoRA adapter folder reads as the dense model it stands for: init + scaling * B @ A per target
(transposed for fan_in_fan_out and embeddings), modules_to_save and trained biases as full tensors.
The product B @ A is formed row block by row block; A and B are never combined separately.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Checkpoint",
    "LoraCheckpoint",
    "ShardedWriter",
    "TensorInfo",
    "carry_files",
    "open_checkpoint",
    "parse_size",
    "sha256_file",
    "write_config",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of a model folder that are weights or merge bookkeeping; everything else (config, generation
# config, tokenizer, chat template) is carried over from the init.
_NOT_CARRIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|pkl)$|.*\.index\.json$|adapter_config\.json$")
RECIPE_NAME = "warpkit_merge.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `file`, absolute byte `offset`, `dtype`, `shape`."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        """Elements per index of dim 0 (a 0-d or 1-d tensor has rows of one element)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        n = int.from_bytes(head, "little")
        if n > 100_000_000 or n > path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} is impossible).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (unreadable header: {e}).") from e
    return header, 8 + n


class _Files:
    """Copy-on-write maps of safetensors files, opened on first use (reads never copy a page)."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def view(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor as a flat zero-copy tensor of its stored dtype."""
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (stop - start) * info.row_numel
        if count == 0:
            return torch.empty(0, dtype=info.dtype)
        item = torch.empty((), dtype=info.dtype).element_size()
        return torch.frombuffer(
            mm, dtype=info.dtype, count=count, offset=info.offset + start * info.row_numel * item
        )

    def close(self) -> None:
        for mm in self._maps.values():
            with contextlib.suppress(
                BufferError
            ):  # a tensor still views it: closed when that tensor is freed
                mm.close()
        self._maps.clear()


class Checkpoint:
    """A `save_pretrained` folder with single or sharded safetensors weights, read lazily.

    `tensors` maps names to `TensorInfo`; `rows(name, a, b, dtype)` returns rows [a, b) flattened.
    """

    def __init__(self, path: str | Path, files: Sequence[Path] | None = None) -> None:
        self.path = _existing_dir(path)
        self.files = list(files) if files is not None else _weight_files(self.path)
        config = self.path / "config.json"
        self.config: dict = _read_json(config) if files is None and config.exists() else {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            header, data_start = _read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in DTYPES:
                    raise ValueError(
                        f"{file}: tensor {name} has dtype {meta['dtype']}, which warpkit cannot merge."
                    )
                if name in self.tensors:
                    raise ValueError(f"{self.path}: tensor {name} is stored twice ({file.name}).")
                self.tensors[name] = TensorInfo(
                    file, data_start + meta["data_offsets"][0], DTYPES[meta["dtype"]], tuple(meta["shape"])
                )
        if not self.tensors:
            raise ValueError(f"{self.path} holds no tensors.")
        self._io = _Files()

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`, flattened, converted to `dtype` (a fresh tensor)."""
        return self._io.view(self.tensors[name], start, stop).to(dtype, copy=True)

    def raw_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, a read-only view of the file (do not modify)."""
        return self._io.view(self.tensors[name], start, stop)

    def close(self) -> None:
        self._io.close()


class LoraCheckpoint:
    """A peft LoRA adapter folder seen as the dense model init + ΔW, with ΔW = scaling * B @ A.

    scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; alpha_pattern and the stored rank
    per module respected). fan_in_fan_out (GPT-2's Conv1D) and embedding adapters store W transposed,
    so their ΔW is (B @ A)^T. modules_to_save and trained biases replace the init's tensor.
    DoRA, LoRA biases and other adapter types are refused: their dense form is not a plain B @ A.
    """

    def __init__(self, path: str | Path, init: Checkpoint) -> None:
        self.path = _existing_dir(path)
        self.init = init
        self.config = init.config
        cfg = _read_json(self.path / "adapter_config.json")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"{self.path}: peft_type {cfg.get('peft_type')!r} is not LORA; only LoRA adapters merge."
            )
        for flag in ("use_dora", "lora_bias", "use_qalora"):
            if cfg.get(flag):
                raise ValueError(
                    f"{self.path}: {flag}=True adapters have no plain B @ A dense form; "
                    "merge_and_unload them with peft and pass the dense folder instead."
                )
        files = [p for p in (self.path / "adapter_model.safetensors",) if p.exists()]
        if not files:
            if any(self.path.glob("adapter_model*.bin")):
                raise ValueError(
                    f"{self.path}: adapter_model.bin is a pickle; save the adapter as safetensors."
                )
            raise ValueError(f"{self.path} has adapter_config.json but no adapter_model.safetensors.")
        self.adapter = Checkpoint(self.path, files)
        self.tensors = init.tensors
        self.lora: dict[
            str, tuple[str, str, float, bool]
        ] = {}  # target -> (A key, B key, scaling, transposed)
        self.replaced: dict[str, str] = {}  # target -> adapter key of a full tensor
        self._index(cfg)

    def _index(self, cfg: dict) -> None:
        prefix = "base_model.model."
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        for key, info in self.adapter.tensors.items():
            name = key.removeprefix(prefix)
            if ".lora_A." in name or name.endswith(".lora_embedding_A"):
                embedding = name.endswith(".lora_embedding_A")
                module = name.rsplit(".lora_embedding_A", 1)[0] if embedding else name.split(".lora_A.")[0]
                b_key = (
                    key.replace("lora_embedding_A", "lora_embedding_B")
                    if embedding
                    else key.replace(".lora_A.", ".lora_B.")
                )
                if b_key not in self.adapter.tensors:
                    raise ValueError(f"{self.path}: {key} has no matching {b_key}.")
                target = f"{module}.weight"
                rank = info.shape[0]
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
                scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
                self.lora[target] = (key, b_key, scaling, embedding or fan_in_fan_out)
            elif ".lora_B." in name or name.endswith(".lora_embedding_B") or ".base_layer." in name:
                continue  # B is read with its A; base_layer is peft's copy of the init's weight
            elif "lora_" in name:
                raise ValueError(f"{self.path}: adapter tensor {key} is of a kind warpkit does not densify.")
            else:
                self.replaced[name] = key
        for target, (a_key, b_key, _, transposed) in self.lora.items():
            if target not in self.init.tensors:
                raise ValueError(
                    f"{self.path}: LoRA target {target} is not a tensor of the init {self.init.path}."
                )
            a, b = self.adapter.tensors[a_key].shape, self.adapter.tensors[b_key].shape
            dense = (a[1], b[0]) if transposed else (b[0], a[1])
            if dense != self.init.tensors[target].shape:
                raise ValueError(
                    f"{self.path}: LoRA {target} densifies to {dense}, the init has {self.init.tensors[target].shape}."
                )
        for target, key in self.replaced.items():
            if target not in self.init.tensors:
                raise ValueError(
                    f"{self.path}: adapter tensor {key} replaces {target}, which the init lacks."
                )
            if self.adapter.tensors[key].shape != self.init.tensors[target].shape:
                raise ValueError(
                    f"{self.path}: {key} has shape {self.adapter.tensors[key].shape}, init {target} "
                    f"{self.init.tensors[target].shape}."
                )

    def delta_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor | None:
        """ΔW rows [start, stop) flattened in `dtype`, or None when the adapter leaves `name` as in the init."""
        if name in self.lora:
            a_key, b_key, scaling, transposed = self.lora[name]
            a = self.adapter.rows(a_key, 0, self.adapter.tensors[a_key].rows, dtype).view(
                self.adapter.tensors[a_key].shape
            )
            b = self.adapter.rows(b_key, 0, self.adapter.tensors[b_key].rows, dtype).view(
                self.adapter.tensors[b_key].shape
            )
            # rows of W = B @ A are rows of B; rows of W = (B @ A)^T are columns of A
            block = a[:, start:stop].T @ b.T if transposed else b[start:stop] @ a
            return (block * scaling).flatten()
        if name in self.replaced:
            key = self.replaced[name]
            return self.adapter.rows(key, start, stop, dtype) - self.init.rows(name, start, stop, dtype)
        return None

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if name in self.replaced:
            return self.adapter.rows(self.replaced[name], start, stop, dtype)
        base = self.init.rows(name, start, stop, dtype)
        delta = self.delta_rows(name, start, stop, dtype)
        return base if delta is None else base.add_(delta)

    @property
    def files(self) -> list[Path]:
        return self.adapter.files

    @property
    def tied(self) -> bool:
        return self.init.tied

    def close(self) -> None:
        self.adapter.close()


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():  # peft's rule: the key matches the module name's tail
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def open_checkpoint(path: str | Path, init: Checkpoint | None = None) -> Checkpoint | LoraCheckpoint:
    """A dense `save_pretrained` folder, or (given the init) a peft LoRA adapter folder."""
    path = _existing_dir(path)
    if (path / "adapter_config.json").exists():
        if init is None:
            raise ValueError(f"{path} is a LoRA adapter; the init must be a full model folder.")
        return LoraCheckpoint(path, init)
    return Checkpoint(path)


def _existing_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist; pass a save_pretrained folder or a peft adapter folder.")
    if not p.is_dir():
        raise ValueError(
            f"{p} is a file; pass the folder that holds config.json and the safetensors weights."
        )
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {missing[:3]}.")
        return [path / f for f in files]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{path} holds only pickled weights ({pickles[:3]}); warpkit reads safetensors only, since loading "
            "a pickle can run arbitrary code. Convert it once with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    raise ValueError(f"{path} has no *.safetensors weights (nor model.safetensors.index.json).")


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB", "500MB" or "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a number of bytes.")
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
        self._fds = []
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
            fd = os.open(folder / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(blob).to_bytes(8, "little") + blob, 0)
            os.ftruncate(fd, 8 + len(blob) + offset)
            for name, dtype, shape in entries:
                start = 8 + len(blob) + header[name]["data_offsets"][0]
                row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
                self.where[name] = (fd, start, row_numel * torch.empty((), dtype=dtype).element_size())
                self.weight_map[name] = file
            self.total_size += offset
        self.n_shards = n

    def write(self, name: str, start_row: int, flat: torch.Tensor) -> None:
        fd, offset, row_bytes = self.where[name]
        data = flat.contiguous().cpu().view(torch.uint8).numpy()
        written = os.pwrite(fd, data, offset + start_row * row_bytes)
        if written != data.nbytes:
            raise OSError(f"short write for {name}: {written} of {data.nbytes} bytes.")

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


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_hashes(files: Iterable[Path]) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in files}

"""Streaming safetensors checkpoints, read side: lazy row reads and exact LoRA densification.

Reads copy row ranges of a tensor into reusable buffers with `preadv`, so what a merge holds in memory
is a bounded set of chunks, whatever the size or number of the models. The safetensors layout (8-byte little-endian header length,
JSON header, raw little-endian data) is parsed here directly, as the format specifies.

A peft LoRA adapter folder reads as the dense model it stands for: init + scaling * B @ A per target
(transposed for fan_in_fan_out and embeddings), modules_to_save and trained biases as full tensors.
The product B @ A is formed row block by row block; A and B are never combined separately.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DTYPES",
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "LoraCheckpoint",
    "TensorInfo",
    "check_weights",
    "open_checkpoint",
    "weight_shapes",
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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def _check_length(file: Path, header: dict, data_start: int) -> None:
    """Refuse a file cut short (a crash or a full disk while it was written) before any of it is trusted."""
    ends = [m["data_offsets"][1] for n, m in header.items() if n != "__metadata__"]
    need, size = data_start + max(ends, default=0), file.stat().st_size
    if need > size:
        raise ValueError(
            f"{file} is truncated: its header describes {need} bytes but the file has {size} (a crash or a full "
            "disk while it was written?); write it again or restore it."
        )


def check_weights(folder: str | Path) -> None:
    """Refuse a model (or adapter) folder whose safetensors files are unreadable or truncated, from their
    headers and sizes alone (no tensor is read)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        files = [folder / "adapter_model.safetensors"]
        Checkpoint(folder, [f for f in files if f.exists()] or files).close()
    else:
        Checkpoint(folder).close()


def weight_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a model folder's safetensors weights, from the headers and file sizes
    alone (no tensor is read, nothing is unpickled): a truncated or unreadable file, a missing shard or
    pickled weights only are refused, naming the file. Any dtype is accepted (nothing is merged here)."""
    path = _existing_dir(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(path):
        header, data_start = _read_header(file)
        _check_length(file, header, data_start)
        shapes |= {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}
    return shapes


class _Files:
    """Positional reads (`pread`) of tensor rows into caller-owned buffers.

    Not mmap: on a VM every 4 KiB page fault of a mapped file costs microseconds, which made mapped reads
    several times slower than copying the same bytes from the page cache in large `preadv` calls.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(
        self, info: TensorInfo, start: int, stop: int, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows [start, stop) of the tensor, flattened, in its stored dtype, read into `buffer` (a uint8
        tensor of at least the needed bytes; a fresh one if None). Returns a typed view of the buffer."""
        item = torch.empty((), dtype=info.dtype).element_size()
        nbytes = (stop - start) * info.row_numel * item
        target = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            view, offset, done = memoryview(target.numpy()), info.offset + start * info.row_numel * item, 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ValueError(
                        f"{info.file} is truncated: tensor data ends before byte {offset + nbytes}."
                    )
                done += n
        return target.view(info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
            _check_length(file, header, data_start)
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
        return self._io.read(self.tensors[name], start, stop).to(dtype)

    def raw_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, read into `buffer` (uint8) when given."""
        return self._io.read(self.tensors[name], start, stop, buffer)

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
        self.base_model: str | None = cfg.get("base_model_name_or_path")  # what it was trained on
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
            elif ".lora_B." in name or name.endswith(".lora_embedding_B"):
                continue  # read with its A
            elif "lora_" in name:
                raise ValueError(f"{self.path}: adapter tensor {key} is of a kind warpkit does not densify.")
            else:  # modules_to_save, trained biases (bias="all"), saved embedding layers: full tensors
                self.replaced[name.replace(".base_layer.", ".")] = key
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

    def _lora_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        a_key, b_key, scaling, transposed = self.lora[name]
        a_info, b_info = self.adapter.tensors[a_key], self.adapter.tensors[b_key]
        a = self.adapter.rows(a_key, 0, a_info.rows, dtype).view(a_info.shape)
        b = self.adapter.rows(b_key, 0, b_info.rows, dtype).view(b_info.shape)
        # rows of W = B @ A are rows of B; rows of W = (B @ A)^T are columns of A
        return (a[:, start:stop].T @ b.T if transposed else b[start:stop] @ a).flatten().mul_(scaling)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense rows: the saved full tensor (or the init's) plus scaling * B @ A where the module has LoRA."""
        if name in self.replaced:
            base = self.adapter.rows(self.replaced[name], start, stop, dtype)
        else:
            base = self.init.rows(name, start, stop, dtype)
        return base.add_(self._lora_rows(name, start, stop, dtype)) if name in self.lora else base

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

"""Inputs of a Fuse-to-Forget run, loaded and checked before the first model is loaded.

Every error names the offending value and the fix: a folder that is not a model, pickled weights (only
safetensors are read: unpickling runs code), truncated safetensors, a model of another architecture or
tensor shapes than the reference (ratios and fusions need one architecture), another tokenizer (the same
ids must mean the same text), a probe set that reads no text, a text with nothing to score or longer than
the context. `prepare_inputs` runs them all and returns the encoded probe sets (`ForgetInputs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from warpkit._util.tensors import check_same_tensors
from warpkit.forget.config import REFERENCE, ForgetConfig, ProbeSet
from warpkit.forget.score import Encoded
from warpkit.frontier.inputs import check_folder, context_length, resolve_device
from warpkit.workloads import (
    DEFAULT_MODEL,
    TINY_MODEL,
    check_same_tokenizer,
    read_dataset,
    resolve_model_path,
)

__all__ = [
    "ForgetInputs",
    "check_model_folder",
    "check_same_model",
    "encode_probe_set",
    "load_model",
    "load_probe_rows",
    "prepare_inputs",
]

_ARCH_KEYS = ("model_type", "architectures", "vocab_size")


@dataclass
class ForgetInputs:
    """What every point is scored on, once checked: folders by model name (``reference`` included), the
    reference's tokenizer and pad id, the device, and each probe set's encoded texts."""

    folders: dict[str, str]
    tokenizer: Any
    pad_token_id: int
    device: torch.device
    probes: dict[str, list[Encoded]]


def check_model_folder(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Refuse a folder that is not a save_pretrained model with complete safetensors weights; return its
    tensor shapes (read from the safetensors headers, no weight is loaded, nothing is unpickled)."""
    folder = Path(path)
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        raise ValueError(
            f"{what} {path!r} has no .safetensors weights{f' (found {found})' if found else ''}: warpkit forget "
            "reads safetensors only, since a pickled checkpoint runs code when loaded. Convert it once: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path) writes model.safetensors."
        )
    shapes = check_folder(path, what, allow_pickle=False)
    assert shapes is not None, "safetensors present"
    return dict(shapes)


def _read_config(path: str) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def check_same_model(
    reference: str, path: str, what: str, shapes: dict, ref_shapes: dict, tokenizer: Any
) -> None:
    """Refuse a model of another architecture, tensor shapes or tokenizer than the reference."""

    ref_cfg, cfg = _read_config(reference), _read_config(path)
    fix = (
        "Every model of a Fuse-to-Forget run is a fine-tune of one base (the reference): likelihood ratios "
        "compare the same token ids and fusions average the same tensors. Use models fine-tuned from it."
    )
    for key in _ARCH_KEYS:
        if cfg.get(key) != ref_cfg.get(key):
            raise ValueError(
                f"{what} {path!r} has {key}={cfg.get(key)!r} but the reference has {ref_cfg.get(key)!r}. {fix}"
            )
    check_same_tensors(ref_shapes, shapes, f"{what} {path!r}", "the reference", fix=fix)
    check_same_tokenizer(tokenizer, path, what, fix)


def load_model(path: str, dtype: str, device: torch.device) -> torch.nn.Module:
    """A causal LM in eval mode: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval()


def load_probe_rows(probe: ProbeSet) -> list[tuple[str, str | None]]:
    """(text or prompt, target or None) per row of ``probe``, after ``rows``; ValueError when none."""
    import datasets

    data = read_dataset(probe.texts, split=probe.split, kwargs=probe.kwargs)
    if isinstance(data, datasets.DatasetDict):
        if probe.split not in data:
            raise ValueError(f"probe set {probe.name!r}: no split {probe.split!r} (splits: {list(data)}).")
        data = data[probe.split]
    if isinstance(data, list) and all(isinstance(t, str) for t in data):
        if probe.target_column is not None:
            raise ValueError(
                f"probe set {probe.name!r} gives plain strings, which have no {probe.target_column!r} column; "
                "give rows with prompt and target columns (a .jsonl file or a list of mappings)."
            )
        rows: list[tuple[str, str | None]] = [(t, None) for t in data]
    else:
        table = datasets.Dataset.from_list(list(data)) if isinstance(data, list) else data
        needed = [c for c in (probe.column, probe.target_column) if c is not None]
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise ValueError(
                f"probe set {probe.name!r} has no column {missing} (columns: {table.column_names}); set column "
                "(and target_column) to the columns holding the texts."
            )
        targets = table[probe.target_column] if probe.target_column else [None] * len(table)
        rows = list(zip(table[probe.column], targets, strict=True))
    if probe.rows is not None:
        rows = rows[probe.rows[0] : probe.rows[1]]
    if not rows:
        where = f" in rows {probe.rows}" if probe.rows is not None else ""
        raise ValueError(
            f"probe set {probe.name!r} is empty: {probe.texts!r} gave no text{where}. Point it at texts (check "
            "the spec, split and rows); an empty set has no likelihood to compare."
        )
    return rows


def encode_probe_set(
    probe: ProbeSet, tokenizer: Any, context: int | None, max_tokens: int | None
) -> list[Encoded]:
    """Each row's token ids: a text cut to ``max_tokens``; a pair as prompt + target (never cut)."""
    encoded = []
    for i, (text, target) in enumerate(load_probe_rows(probe)):
        where = f"probe set {probe.name!r} row {i} ({str(text)[:40]!r})"
        if not isinstance(text, str) or (target is not None and not isinstance(target, str)):
            raise ValueError(f"{where}: texts and targets must be strings, got {type(text).__name__}.")
        if target is None:
            ids = tokenizer(text)["input_ids"][: max_tokens or None]
            if len(ids) < 2:
                raise ValueError(
                    f"{where} has {len(ids)} token(s): nothing to predict. Drop it or join it to a longer text."
                )
            row = Encoded(tuple(ids), 1)
        else:
            prompt = tokenizer(text)["input_ids"]
            answer = tokenizer(target, add_special_tokens=False)["input_ids"]
            if not prompt or not answer:
                raise ValueError(f"{where}: a pair needs a prompt and a target of at least one token each.")
            row = Encoded(tuple(prompt + answer), len(prompt), target=True)
        if context and len(row.ids) > context:
            fix = f"set max_tokens (e.g. {context}) to cut texts" if target is None else "shorten the pair"
            raise ValueError(f"{where} has {len(row.ids)} tokens, more than the context of {context}: {fix}.")
        encoded.append(row)
    return encoded


def _resolve(name: str) -> str:
    return resolve_model_path(name) if name in (DEFAULT_MODEL, TINY_MODEL) else name


def prepare_inputs(config: ForgetConfig) -> ForgetInputs:
    """Check every folder against the reference and encode every probe set; nothing is loaded but the
    tokenizer and the configs. Model names (``warpkit:default``...) are replaced by folders in ``config``."""
    from transformers import AutoConfig, AutoTokenizer

    device = resolve_device(config.device)
    config.reference = _resolve(config.reference)
    config.models = {name: _resolve(p) for name, p in config.models.items()}
    ref_shapes = check_model_folder(config.reference, "reference")
    tokenizer = AutoTokenizer.from_pretrained(config.reference, trust_remote_code=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for name, path in config.models.items():
        shapes = check_model_folder(path, f"model {name!r}")
        check_same_model(config.reference, path, f"model {name!r}", shapes, ref_shapes, tokenizer)
    context = context_length(AutoConfig.from_pretrained(config.reference))
    probes = {p.name: encode_probe_set(p, tokenizer, context, config.max_tokens) for p in config.probe_sets}
    folders = {REFERENCE: config.reference, **config.models}
    return ForgetInputs(folders, tokenizer, 0 if pad is None else pad, device, probes)

"""Inputs of the frontier, loaded and checked: models, tokenizers and prompts (rewards: `rewards`).

Every check here runs before the first model is loaded and the first sample is drawn, and every error
names the offending value and the fix: a missing folder, pickled weights, truncated or unreadable
safetensors (or a missing shard), a vocabulary or tokenizer that differs from the reference (the KL is then
undefined), a LITI sweep's ends or soup models of different tensor names or shapes (from the safetensors
headers: no weight is read), a prompt longer than the context. `prepare_inputs` runs them all, for the
reference and every folder of every policy, and returns what sampling needs (`FrontierInputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from warpkit._util.tensors import check_same_tensors
from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.policies import PolicySpec
from warpkit.merge.checkpoint import weight_shapes
from warpkit.workloads import (
    DEFAULT_MODEL,
    TINY_MODEL,
    check_same_tokenizer,
    load_prompt_dataset,
    resolve_model_path,
)

__all__ = [
    "MODEL_ALIASES",
    "FrontierInputs",
    "check_compatible",
    "check_folder",
    "check_sweep_tensors",
    "context_length",
    "encode_prompt",
    "load_model",
    "load_prompts",
    "prepare_inputs",
    "resolve_device",
    "resolve_model_names",
]

logger = logging.getLogger(__name__)

MODEL_ALIASES = ("default",)  # the frontier's historical name of `warpkit:default`


@dataclass
class FrontierInputs:
    """What every point is evaluated on, once checked.

    ``prompts`` are the kept prompts (text or chat messages) and ``encoded`` their token ids;
    ``prompts_too_long`` the ``(index, length)`` of prompts left out (``on_long_prompt: skip``);
    ``context`` the smallest context of all the models (None when no config states one).
    """

    reference_dir: str
    tokenizer: Any
    eos_token_id: int | None
    pad_token_id: int
    device: torch.device
    context: int | None
    prompts: list[Any]
    encoded: list[list[int]]
    prompts_too_long: list[tuple[int, int]]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to `torch.device`. A name torch does
    not know, or a CUDA device this machine does not have, is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device: use cpu"
            raise ValueError(f"device {name!r} is not available: this machine has {have} (or auto).")
    return device


def resolve_model_names(config: FrontierConfig) -> None:
    """Replace model names (``default``, ``warpkit:default``, ``warpkit:tiny``) by their folders, in place,
    in reference, path, liti.init and soup.models; folders are left as written (`check_folder` names them)."""

    def resolve(name: str) -> str:
        if name in (DEFAULT_MODEL, TINY_MODEL, *MODEL_ALIASES):
            return resolve_model_path(name, aliases=MODEL_ALIASES)
        return name

    config.reference = resolve(config.reference)
    for p in config.policies:
        p.path = None if p.path is None else resolve(p.path)
        if p.liti is not None:
            p.liti.init = resolve(p.liti.init)
        if p.soup is not None:
            p.soup.models = [resolve(m) for m in p.soup.models]


Shapes = Mapping[str, Sequence[int]]


def check_folder(path: str, what: str, allow_pickle: bool) -> Shapes | None:
    """Refuse a folder without config.json, with pickled weights only unless ``allow_pickle``, or whose
    safetensors are truncated, unreadable or missing a shard; return its tensor shapes by name.

    Only the safetensors headers and file sizes are read (`warpkit.merge.checkpoint.weight_shapes`), and
    nothing is unpickled: a folder with pickled weights only (``allow_pickle``) returns None.
    """
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(
            f"{what} {path!r} is a PEFT adapter, not a full model: merge it into its base first "
            "(`PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(out)`) and evaluate out."
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{what} {path!r} is not a model folder (no config.json). Check the path in the config."
        )
    if not any(folder.glob("*.safetensors")) and not allow_pickle:
        found = sorted(p.name for p in folder.glob("*.bin"))
        raise ValueError(
            f"{what} {path!r} has no .safetensors weights{f' (found {found})' if found else ''}. Pickled "
            "checkpoints can run code when loaded: convert them to safetensors, or set allow_pickle: true."
        )
    if not any(folder.glob("*.safetensors")):
        return None
    try:
        return weight_shapes(folder)
    except ValueError as e:
        raise ValueError(f"{what} {path!r}: {e}") from None


def load_model(path: str, config: FrontierConfig, device: torch.device) -> torch.nn.Module:
    """A causal LM in eval mode on ``device``: safetensors only (unless allow_pickle), no remote code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, config.dtype),
        use_safetensors=None if config.allow_pickle else True,
        trust_remote_code=False,
    )
    return model.to(device).eval()


def context_length(model_config: Any) -> int | None:
    """The model's maximum number of positions (prompt + completion), or None when the config has none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_compatible(reference_dir: str, reference_tokenizer: Any, path: str, what: str) -> None:
    """Refuse a policy whose vocabulary size or tokenizer (when its folder has one) differs from the reference.

    KL between two models is only defined over a shared token space: the same ids must mean the same text.
    """
    from transformers import AutoConfig

    ref_vocab = AutoConfig.from_pretrained(reference_dir).vocab_size
    vocab = AutoConfig.from_pretrained(path).vocab_size
    if vocab != ref_vocab:
        raise ValueError(
            f"{what} {path!r} has vocab_size {vocab} but the reference has {ref_vocab}: the KL between them is "
            "undefined. Evaluate policies fine-tuned from this reference (same tokenizer), or change reference."
        )
    tokenizer = check_same_tokenizer(reference_tokenizer, path, what, "The KL between them is undefined.")
    if tokenizer is None:
        return
    for attr in ("eos_token_id", "pad_token_id"):
        if (
            getattr(tokenizer, attr) != getattr(reference_tokenizer, attr)
            and getattr(tokenizer, attr) is not None
        ):
            raise ValueError(
                f"{what} {path!r} has {attr}={getattr(tokenizer, attr)} but the reference has "
                f"{getattr(reference_tokenizer, attr)}; completions would stop at different tokens."
            )


def check_sweep_tensors(spec: PolicySpec, shapes: Mapping[str, Shapes | None]) -> None:
    """Refuse a LITI sweep whose init and merged policy, or a soup whose models, differ in tensor names or
    shapes; ``shapes`` maps each folder to its tensors' shapes (`check_folder`), so no weight is read.

    Folders with pickled weights only (allow_pickle) are checked later, when their state dicts load.
    """
    if spec.liti is not None:
        ends = [("liti.init", spec.liti.init), ("liti.merged", spec.liti.merged)]
        fix = (
            "LITI interpolates the weights of a merged policy and of its init, so they need the same "
            "architecture and shapes: set liti.init to the init the merged policy was trained from."
        )
    elif spec.soup is not None:
        ends = [(f"soup.models[{i}]", m) for i, m in enumerate(spec.soup.models)]
        fix = (
            "A rewarded soup averages the weights of policies fine-tuned from one init, so they need the "
            "same architecture and shapes: list only policies fine-tuned from the same base model."
        )
    else:
        return
    (first_name, first), *others = ends
    reference = shapes[first]
    for name, path in others:
        other = shapes[path]
        if reference is None or other is None:
            continue  # pickled weights only (allow_pickle): checked when the state dicts load
        check_same_tensors(
            reference,
            other,
            f"policy {spec.name!r}: {name} {path!r}",
            f"{first_name} {first!r}",
            fix=fix,
        )


def load_prompts(config: FrontierConfig) -> list[Any]:
    """The first ``num_prompts`` prompts (strings, or lists of chat messages) named by ``config.prompts``."""
    split = str(config.prompts_kwargs.get("split", "eval"))
    dataset = load_prompt_dataset(config.prompts, split=split, kwargs=config.prompts_kwargs)
    if config.num_prompts is not None and config.num_prompts < len(dataset):
        dataset = dataset.select(range(config.num_prompts))
    return list(dataset["prompt"])


def encode_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    """Token ids of a plain-text prompt, or of a chat prompt rendered with the generation prompt."""
    if isinstance(prompt, list):  # conversational: the chat template with the generation prompt, as TRL does
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


# ----------------------------------------------------------------------------- all checks, in order


def prepare_inputs(config: FrontierConfig) -> FrontierInputs:
    """Resolve model names, check every folder and the prompts against every context, encode the prompts.

    Every folder (the reference, each policy's, both ends of a LITI sweep, each soup model) is checked
    here, before any model is loaded: config.json, complete safetensors weights, vocabulary and tokenizer,
    and the tensor names and shapes of sweeps. Model names in ``config`` are replaced by their folders
    (in place). Nothing is sampled.
    """
    from transformers import AutoConfig, AutoTokenizer

    device = resolve_device(config.device)
    resolve_model_names(config)
    reference_dir = config.reference
    shapes = {reference_dir: check_folder(reference_dir, "reference", config.allow_pickle)}
    tokenizer = AutoTokenizer.from_pretrained(reference_dir, trust_remote_code=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    if pad is None:
        raise ValueError(f"the reference tokenizer at {reference_dir!r} has neither a pad nor an EOS token.")
    folders = [f for spec in config.policies for f in spec.folders()]
    for path, what in folders:
        shapes[path] = check_folder(path, what, config.allow_pickle)
        check_compatible(reference_dir, tokenizer, path, what)
    for spec in config.policies:
        check_sweep_tensors(spec, shapes)
    contexts = [
        context_length(AutoConfig.from_pretrained(p)) for p in [reference_dir, *(f for f, _ in folders)]
    ]
    context = min((c for c in contexts if c), default=None)
    prompts, encoded, too_long = _fit_prompts(config, tokenizer, context)
    return FrontierInputs(reference_dir, tokenizer, eos, pad, device, context, prompts, encoded, too_long)


def _fit_prompts(
    config: FrontierConfig, tokenizer: Any, context: int | None
) -> tuple[list[Any], list[list[int]], list[tuple[int, int]]]:
    """(prompts, their token ids, (index, length) of those left out) under ``on_long_prompt``."""
    prompts = load_prompts(config)
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    too_long = [
        (i, len(e)) for i, e in enumerate(encoded) if context and len(e) + config.max_new_tokens > context
    ]
    if too_long and config.on_long_prompt == "error":
        raise ValueError(
            f"{len(too_long)} prompt(s) do not fit the context of {context} tokens with max_new_tokens="
            f"{config.max_new_tokens} (prompt index, length): {too_long[:5]}. Shorten them, lower max_new_tokens, "
            "or set on_long_prompt: skip to leave them out (they are reported)."
        )
    if too_long:
        logger.warning("skipping %d prompt(s) longer than the context: %s", len(too_long), too_long[:5])
    long_ids = {i for i, _ in too_long}
    kept = [i for i in range(len(prompts)) if i not in long_ids]
    if not kept:
        raise ValueError(
            f"every prompt is longer than the context ({context} tokens) allows; nothing to evaluate."
        )
    return [prompts[i] for i in kept], [encoded[i] for i in kept], too_long

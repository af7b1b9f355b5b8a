"""Hand-set tiny LMs for the end-to-end tests: a tiny GPT-2 whose final LayerNorm outputs the constant unit
vector e_0 (weight 0, bias e_0), so its logits are column 0 of lm_head at every position, whatever the
text: z[v] = lm_head.weight[v, 0]. Every log-likelihood is then log softmax(z)[token], computable by hand."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch

from warpkit.testing import make_tiny_model, make_tiny_tokenizer

VOCAB = 50257
SHARED = ["the cat sat on the mat", "a dog ran in the park"]
ONLY_A = ["zebras gallop northward quickly", "purple volcanoes erupt nightly"]
ONLY_B = ["violins hum softly", "seven sailors whistle"]
BIAS = 6.0


def save_logit_model(folder: Path, tokenizer, logits: Mapping[int, float]) -> Path:
    """The constant-logit GPT-2: z[v] = logits.get(v, 0)."""
    model = make_tiny_model("gpt2", tie_word_embeddings=False, hidden_size=32, num_layers=1, seed=0)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        for v, z in logits.items():
            model.lm_head.weight[v, 0] = z
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_ids(tokenizer, texts: Iterable[str]) -> set[int]:
    return {t for text in texts for t in tokenizer(text)["input_ids"]}


def expected_ll(tokenizer, text: str, logits: Mapping[int, float]) -> float:
    """ℓ(x) = mean over predicted tokens t >= 2 of z[x_t] - log Σ_v exp(z[v]), with z = 0 off `logits`."""
    ids = tokenizer(text)["input_ids"]
    log_norm = math.log(VOCAB - len(logits) + sum(math.exp(z) for z in logits.values()))
    return sum(logits.get(t, 0.0) - log_norm for t in ids[1:]) / (len(ids) - 1)


@pytest.fixture(scope="session")
def logit_models(tmp_path_factory):
    """reference (uniform), a (+BIAS on the tokens of SHARED and ONLY_A), b (+BIAS on SHARED and ONLY_B)."""
    root = tmp_path_factory.mktemp("forget-models")
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    seen_a = token_ids(tokenizer, SHARED + ONLY_A)
    seen_b = token_ids(tokenizer, SHARED + ONLY_B)
    logits = {"reference": {}, "a": dict.fromkeys(seen_a, BIAS), "b": dict.fromkeys(seen_b, BIAS)}
    folders = {name: save_logit_model(root / name, tokenizer, z) for name, z in logits.items()}
    return folders, logits, tokenizer

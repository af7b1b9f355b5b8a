"""Shared fixtures: tiny causal LMs built offline and saved as `save_pretrained` folders.

Session-scoped so each architecture is built once; tests that modify a model copy the folder first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from warpkit.testing import make_tiny_tokenizer, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """GPT-2's tokenizer (exact ids) with a chat template and pad token."""
    path = tmp_path_factory.mktemp("tokenizer")
    make_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """`factory(arch="llama", tied=True, seed=0, hidden_size=32, num_layers=2) -> Path`, cached per argument set."""
    cache: dict[tuple, Path] = {}

    def factory(
        arch: str = "llama", tied: bool = True, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
    ):
        key = (arch, tied, seed, hidden_size, num_layers)
        if key not in cache:
            name = f"{arch}-{'tied' if tied else 'untied'}-s{seed}-h{hidden_size}-l{num_layers}"
            cache[key] = save_tiny_model(
                tmp_path_factory.mktemp("models") / name,
                arch,
                tie_word_embeddings=tied,
                hidden_size=hidden_size,
                num_layers=num_layers,
                seed=seed,
            )
        return cache[key]

    return factory


@pytest.fixture(
    params=[("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)],
    ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}",
)
def tiny_model_dir(request, tiny_model_factory) -> Path:
    """Each of the four tiny model kinds in turn: llama/GPT-2 style, tied/untied embeddings."""
    arch, tied = request.param
    return tiny_model_factory(arch, tied)


@pytest.fixture
def tiny_llama_dir(tiny_model_factory, tmp_path) -> Path:
    """A private copy of the tiny llama (tied embeddings) that the test may modify."""
    dst = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model_factory("llama", True), dst)
    return dst

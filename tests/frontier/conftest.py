"""Fixtures of the frontier tests: the hand-made tiny policies of the shipped configs, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from warpkit.testing import build_rewarded_soup_models, build_tiny_frontier_models


@pytest.fixture(scope="session")
def tiny_frontier_root(tmp_path_factory) -> Path:
    """sft, bias-2/4/6, noisy/checkpoint-{100..400}: the models of configs/frontier_tiny.yaml."""
    return build_tiny_frontier_models(tmp_path_factory.mktemp("frontier-models"))


@pytest.fixture(scope="session")
def soup_root(tmp_path_factory) -> Path:
    """sft, positive, concise: the models of configs/rewarded_soup_tiny.yaml."""
    return build_rewarded_soup_models(tmp_path_factory.mktemp("soup-models"))


@pytest.fixture
def sft(tiny_model_factory) -> Path:
    """A tiny random GPT-2 (untied) with GPT-2's tokenizer: the reference of the input tests."""
    return tiny_model_factory("gpt2", False)

"""Soups and WARM: the greedy rule on the docstring's example, and reward models merged and reloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warpkit.merge.soups import greedy_soup, uniform_soup


def _ingredients(folder: Path) -> frozenset[str]:
    if (folder / "warpkit_merge.json").exists():
        return frozenset(
            Path(m["path"]).name for m in json.loads((folder / "warpkit_merge.json").read_text())["models"]
        )
    return frozenset([folder.name])


def test_greedy_soup_docstring_example(tiny_model_factory, tmp_path):
    folders = {}
    for name, seed in (("A", 0), ("B", 1), ("C", 2)):
        folders[name] = Path(shutil.copytree(tiny_model_factory("gpt2", True, seed), tmp_path / name))
    table = {"B,C": 0.92, "A,B,C": 0.91}
    calls = []

    def score(folder: Path) -> float:
        key = ",".join(sorted(_ingredients(folder)))
        calls.append(key)
        return table[key]

    result = greedy_soup([folders[n] for n in "ABC"], score, tmp_path / "soup", scores=[0.7, 0.9, 0.8])
    assert [p.name for p in result.ingredients] == ["B", "C"] and result.score == 0.92
    assert calls == ["B,C", "A,B,C"]  # sorted by score: B first, then C, then A
    assert [kept for *_, kept in result.history] == [True, True, False]
    got = load_file(tmp_path / "soup" / "model.safetensors")
    b, c = (load_file(folders[n] / "model.safetensors") for n in "BC")
    n = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(got[n], (b[n] + c[n]) / 2)
    assert not [p for p in tmp_path.iterdir() if ".soup-" in p.name]


def test_greedy_soup_keeps_best_single_model_when_nothing_helps(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory("gpt2", True, 0), tiny_model_factory("gpt2", True, 1)
    result = greedy_soup([a, b], lambda f: 0.0, tmp_path / "soup", scores=[1.0, 0.5])
    assert result.ingredients == [a] and result.score == 1.0
    assert (tmp_path / "soup" / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    record = json.loads((tmp_path / "soup" / "warpkit_soup.json").read_text())  # written before the rename
    assert record["ingredients"] == [str(a)] and [s["kept"] for s in record["steps"]] == [True, False]
    assert not [p for p in tmp_path.iterdir() if ".soup-" in p.name]
    with pytest.raises(ValueError, match="already exists"):
        greedy_soup([a, b], lambda f: 0.0, tmp_path / "soup", scores=[1.0, 0.5])
    greedy_soup([a, b], lambda f: 2.0, tmp_path / "soup", scores=[1.0, 0.5], overwrite=True)
    assert json.loads((tmp_path / "soup" / "warpkit_soup.json").read_text())["score"] == 2.0
    with pytest.raises(ValueError, match="2 scores for 1 models; give one"):
        greedy_soup([a], lambda f: 0.0, tmp_path / "x", scores=[1.0, 2.0])


def test_warm_reward_models_merge_and_load(tiny_tokenizer_dir, tmp_path):
    """WARM: the soup of two sequence-classification reward models (score head included) loads as one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=50256, tie_word_embeddings=False,
    )  # fmt: skip
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
        model.save_pretrained(tmp_path / f"rm{seed}")
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path / f"rm{seed}")
        folders.append(tmp_path / f"rm{seed}")
    out = uniform_soup(folders, tmp_path / "warm", progress=False)
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    states = [load_file(f / "model.safetensors") for f in folders]
    torch.testing.assert_close(rm.score.weight, (states[0]["score.weight"] + states[1]["score.weight"]) / 2)
    tokenizer = AutoTokenizer.from_pretrained(out)
    reward = rm(**tokenizer(["a great movie"], return_tensors="pt")).logits
    assert reward.shape == (1, 1) and torch.isfinite(reward).all()


def test_negative_soup_weights_need_allow_extrapolation_as_for_lerp(tiny_model_factory, tmp_path):
    """Σ w θ / Σ w with a negative w leaves the models' hull: refused like lerp's, allowed explicitly."""
    a, b = tiny_model_factory("gpt2", True, 0), tiny_model_factory("gpt2", True, 1)
    with pytest.raises(ValueError, match=r"^soup weights \[2\.0, -1\.0\] include negative values: .* Use "
                       r"weights >= 0, or pass allow_extrapolation=True \(CLI: --allow-extrapolation\)"):  # fmt: skip
        uniform_soup([a, b], tmp_path / "s", weights=[2, -1], progress=False)
    assert not (tmp_path / "s").exists()
    out = uniform_soup([a, b], tmp_path / "s", weights=[2, -1], allow_extrapolation=True, progress=False)
    got = load_file(out / "model.safetensors")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    n = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(got[n], (2 * sa[n].double() - sb[n].double()).float())
    assert json.loads((out / "warpkit_merge.json").read_text())["allow_extrapolation"] is True

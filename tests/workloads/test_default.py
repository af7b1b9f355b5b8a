"""The embedded default workload: converted model, cache integrity, VADER reward, review prompts."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from warpkit.workloads import default


@pytest.fixture(scope="session")
def converted_default(tmp_path_factory) -> Path:
    """The real conversion, once per session, into a private cache (about 30 s)."""
    return default.prepare_default_model(tmp_path_factory.mktemp("warpkit-cache"), quiet=True)


@pytest.mark.slow
def test_converted_model_matches_gguf_logits(converted_default):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tokenizer = default.load_gguf_model()
    model = AutoModelForCausalLM.from_pretrained(converted_default, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted_default)
    assert getattr(model, "hf_quantizer", None) is None, (
        "the converted model must be a plain, trainable model"
    )
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Continue this movie review: a visually flashy but"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = model(ids).logits
    assert expected.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_prepared_folder_is_reused_without_conversion(converted_default, monkeypatch):
    monkeypatch.setattr(default, "_convert", lambda out: pytest.fail("a verified cache must not be rebuilt"))
    assert default.prepare_default_model(converted_default.parent) == converted_default


def _fake_convert_from(source: Path, calls: list[int]):
    """A stand-in for the 30 s conversion: copies a known-good folder, so cache handling is tested quickly."""

    def convert(out: Path) -> None:
        calls.append(1)
        for f in source.iterdir():
            shutil.copyfile(f, out / f.name)

    return convert


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-manifest", "missing-file"])
def test_damaged_cache_is_detected_and_rebuilt(converted_default, tmp_path, monkeypatch, caplog, damage):
    cache = tmp_path / "cache"
    folder = cache / default.MODEL_DIRNAME
    shutil.copytree(converted_default, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flipped":
        with open(weights, "r+b") as f:
            f.seek(10_000_000)
            byte = f.read(1)
            f.seek(10_000_000)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "no-manifest":
        (folder / default.MANIFEST).unlink()
    else:
        (folder / "tokenizer.json").unlink()
    calls: list[int] = []
    monkeypatch.setattr(default, "_convert", _fake_convert_from(converted_default, calls))

    with caplog.at_level(logging.WARNING, logger="warpkit"):
        assert default.prepare_default_model(cache) == folder
    assert calls == [1]
    assert "rebuilding it" in caplog.text
    assert default._check(folder) is None
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()], "temporary folders left"


@pytest.mark.slow
def test_concurrent_prepare_converts_once(converted_default, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(default, "_convert", _fake_convert_from(converted_default, calls))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default.prepare_default_model(tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert len(set(results)) == 1 and default._check(results[0]) is None


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(default, "_convert", broken)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        default.prepare_default_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{default.MODEL_DIRNAME}.lock"]


def test_manifest_from_another_source_is_rejected(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / default.MANIFEST).write_text(json.dumps({"source_sha256": "0" * 64, "files": {}}))
    assert default._check(folder) == "built from another GGUF file"


# ----------------------------------------------------------------------------- reward


def test_vader_reward_on_strings_and_chat_messages():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["This movie was wonderful, I loved it!", "Dull, tedious and awful.", "It is a movie."]
    expected = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    assert expected[0] > 0.5 and expected[1] < -0.5 and expected[2] == 0.0
    assert default.vader_reward(texts) == expected
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    assert default.vader_reward(chat, prompts=[None] * 3, completion_ids=[[1]] * 3) == expected
    with pytest.raises(TypeError, match="completion must be"):
        default.vader_reward([42])


@pytest.mark.slow
def test_vader_reward_inside_a_real_rloo_step(tiny_llama_dir, tmp_path):
    """TRL calls the reward with its own keyword arguments; the logged reward is VADER's mean."""
    from trl import RLOOConfig, RLOOTrainer

    seen: list[tuple[list, list[float]]] = []

    def reward(completions, **kwargs):
        assert {"prompts", "completion_ids"} <= kwargs.keys()
        values = default.vader_reward(completions, **kwargs)
        seen.append((completions, values))
        return values

    args = RLOOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = RLOOTrainer(
        model=str(tiny_llama_dir),
        reward_funcs=reward,
        args=args,
        train_dataset=default.review_prompts("train").select(range(8)),
    )
    trainer.train()
    completions, values = seen[0]
    assert len(completions) == len(values) == 4
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)  # conversational
    logged = next(h for h in trainer.state.log_history if "reward" in h)
    assert logged["reward"] == pytest.approx(sum(values) / len(values), abs=1e-6)


# ----------------------------------------------------------------------------- prompts


def test_review_prompts_split_is_deterministic_and_disjoint():
    train, held_out = default.review_prompts("train"), default.review_prompts("eval")
    assert len(train) + len(held_out) == 210
    assert 20 <= len(held_out) <= 70
    assert not set(train["text"]) & set(held_out["text"])
    assert default.review_prompts("eval")["text"] == held_out["text"]
    first = train[0]["prompt"]
    assert first[0]["role"] == "user" and first[0]["content"].startswith("Continue this movie review")
    assert set(train["label"]) == {"pos", "neg", "unlabelled"}
    with pytest.raises(ValueError, match="split must be"):
        default.review_prompts("test")

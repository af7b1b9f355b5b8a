"""One loader per input kind, shared by RL runs and the frontier: prompts, rewards, model names."""

from __future__ import annotations

import json

import datasets
import pytest

from warpkit.workloads import DEFAULT_MODEL, load_prompt_dataset, resolve_model_path, reward_spec

CHAT = [{"role": "user", "content": "hi"}]


def prompts_fn(split: str = "train", n: int = 2):
    """A prompt function as a spec names it: returns a Dataset for a split."""
    return datasets.Dataset.from_dict({"prompt": [f"{split} {i}" for i in range(n)], "label": list(range(n))})


def prompts_list(**_):
    return ["a", "b"]


@pytest.mark.parametrize(
    "kind", ["jsonl", "json", "csv", "parquet", "txt", "save_to_disk", "list", "function"]
)
def test_every_prompt_format_gives_the_same_prompts(tmp_path, kind):
    rows = [{"prompt": "first", "label": 1}, {"prompt": "second", "label": 0}]
    path = tmp_path / f"p.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind in ("json", "csv", "parquet"):
        getattr(datasets.Dataset.from_list(rows), f"to_{kind}")(str(path))
    elif kind == "txt":
        path.write_text("first\n\nsecond\n")
    elif kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    spec = {"list": ["first", "second"], "function": "tests.workloads.test_inputs:prompts_fn"}.get(
        kind, str(path)
    )
    if kind == "function":
        assert load_prompt_dataset(spec, split="eval")["prompt"] == ["eval 0", "eval 1"]  # function(split)
        assert load_prompt_dataset(spec, kwargs={"split": "x", "n": 3})["prompt"] == ["x 0", "x 1", "x 2"]
        return
    assert load_prompt_dataset(spec)["prompt"] == ["first", "second"]


def test_chat_prompts_and_list_results():
    assert load_prompt_dataset([CHAT])["prompt"] == [CHAT]
    assert load_prompt_dataset("tests.workloads.test_inputs:prompts_list", kwargs={})["prompt"] == ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("nowhere/prompts", FileNotFoundError, "neither 'module:function' nor an existing file or folder"),
        ("tests.workloads.test_inputs:missing", ValueError, "cannot be imported"),
    ],
)
def test_bad_prompt_specs(spec, error, message):
    with pytest.raises(error, match=message):
        load_prompt_dataset(spec)


def test_prompt_files_without_prompts(tmp_path):
    (tmp_path / "p.xml").write_text("<x/>")
    with pytest.raises(ValueError, match=r"use \.json, \.jsonl, \.parquet, \.csv or \.txt"):
        load_prompt_dataset(str(tmp_path / "p.xml"))
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"has no 'prompt' column \(columns: \['text'\]\)"):
        load_prompt_dataset(str(tmp_path / "q.jsonl"))
    with pytest.raises(ValueError, match="gave no prompt"):
        load_prompt_dataset([])


def test_reward_spec(tmp_path):
    assert reward_spec("tests.workloads.test_inputs:prompts_list") is prompts_list
    (tmp_path / "rm").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        reward_spec(str(tmp_path / "rm"))
    (tmp_path / "rm" / "config.json").write_text("{}")
    assert reward_spec(str(tmp_path / "rm")) == (tmp_path / "rm").resolve()
    with pytest.raises(ValueError, match="neither 'module:function' nor an existing reward-model folder"):
        reward_spec("no-such-folder")
    with pytest.raises(TypeError, match="is not callable"):
        reward_spec("tests.workloads.test_inputs:CHAT")


def test_model_names(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "m")) == str((tmp_path / "m").resolve())
    with pytest.raises(FileNotFoundError, match=r"model 'nope' is not a model folder .*'warpkit:default'"):
        resolve_model_path("nope")
    monkeypatch.setattr("warpkit.workloads.default.prepare_default_model", lambda: tmp_path / "m")
    assert (
        resolve_model_path(DEFAULT_MODEL)
        == resolve_model_path("default", aliases=("default",))
        == str(tmp_path / "m")
    )
    monkeypatch.setenv("WARPKIT_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model_path("warpkit:tiny")
    assert tiny == str(tmp_path / "cache" / "tiny-llama-h32-l2-s0")
    assert resolve_model_path("warpkit:tiny") == tiny  # built once, then reused

"""Bad input to `warpkit frontier`: clear errors before any sampling, or explicit, reported skips."""

from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from warpkit.frontier.config import FrontierConfig, LitiSweep, PolicySpec, load_frontier_config
from warpkit.frontier.run import run_frontier

PROMPTS = ["The movie was", "I think the ending"]


def _config(reference: Path, policies: list[PolicySpec], **kw) -> FrontierConfig:
    settings = {
        "prompts": PROMPTS,
        "num_prompts": None,
        "samples_per_prompt": 2,
        "max_new_tokens": 3,
        "batch_size": 8,
        "reward": "warpkit.workloads.default:vader_reward",
        "device": "cpu",
    } | kw
    return FrontierConfig(reference=str(reference), policies=policies, **settings)


@pytest.fixture
def reward_module(monkeypatch):
    """A module `frontier_test_rewards` whose functions the config names as 'frontier_test_rewards:fn'."""
    module = types.ModuleType("frontier_test_rewards")

    def nan_first(completions, **_):
        return [math.nan] + [float(len(c)) for c in completions[1:]]

    module.nan_first = nan_first
    module.one_short = lambda completions, **_: [0.0] * (len(completions) - 1)
    module.strings = lambda completions, **_: ["good"] * len(completions)
    monkeypatch.setitem(sys.modules, "frontier_test_rewards", module)
    return module


@pytest.fixture
def sft(tiny_model_factory) -> Path:
    return tiny_model_factory("gpt2", False)


def test_unknown_and_badly_typed_config_fields_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("reference: x\ntemprature: 0.9\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['temprature'\].*Valid fields"):
        load_frontier_config(path)
    path.write_text("reference: x\npolicies:\n  - {name: a, method: m, path: p, betta: 1}\n")
    with pytest.raises(ValueError, match=r"policies\[0\]: unknown field\(s\) \['betta'\]"):
        load_frontier_config(path)
    path.write_text("reference: x\nsamples_per_prompt: two\n")
    with pytest.raises(TypeError, match="samples_per_prompt must be int"):
        load_frontier_config(path)
    path.write_text(
        "reference: x\npolicies:\n  - {name: a, method: m, path: p, liti: {init: i, merged: j}}\n"
    )
    with pytest.raises(ValueError, match="exactly one of path, trajectory, liti"):
        load_frontier_config(path)
    path.write_text(
        "reference: x\npolicies:\n  - {name: a, method: m, liti: {init: i, merged: j, etas: [0.5, 1.5]}}\n"
    )
    with pytest.raises(ValueError, match=r"liti.etas \[1.5\] are outside \[0, 1\].*allow_extrapolation"):
        load_frontier_config(path)
    path.write_text("reference: x\ntemperature: 0\n")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        load_frontier_config(path)


def test_every_shipped_frontier_config_parses(monkeypatch):
    monkeypatch.setenv("WARPKIT_TINY", "/tiny")
    monkeypatch.setenv("WARPKIT_RUN", "/run")
    shipped = Path(__file__).resolve().parents[2] / "configs"
    configs = sorted([*shipped.glob("frontier_*.yaml"), *shipped.glob("rewarded_soup_*.yaml")])
    assert {c.name for c in configs} >= {"frontier_tiny.yaml", "rewarded_soup_tiny.yaml"}
    for c in configs:
        config = load_frontier_config(c)
        assert config.policies
    tiny = load_frontier_config(configs[[c.name for c in configs].index("frontier_tiny.yaml")])
    assert tiny.reference == "/tiny/sft"  # $VARS expanded in paths
    assert tiny.policies[-1].liti == LitiSweep("/tiny/sft", "/tiny/bias-6", [0.0, 0.3, 0.5, 0.8, 1.0])


def test_policy_with_another_vocabulary_size_is_refused(sft, tmp_path):
    from warpkit.testing import make_tiny_model

    other = tmp_path / "other"
    make_tiny_model("gpt2", tie_word_embeddings=False, vocab_size=1000).save_pretrained(other)
    config = _config(sft, [PolicySpec("other", "m", path=str(other))])
    with pytest.raises(ValueError, match=r"vocab_size 1000 but the reference has 50257"):
        run_frontier(config, progress=False)


def test_policy_with_another_tokenizer_is_refused(sft, tmp_path):
    from transformers import AutoTokenizer

    policy = tmp_path / "policy"
    shutil.copytree(sft, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.add_tokens(["<|new_token|>"])
    tokenizer.save_pretrained(policy)
    config = _config(sft, [PolicySpec("p", "m", path=str(policy))])
    with pytest.raises(ValueError, match="different tokenizer vocabulary"):
        run_frontier(config, progress=False)


def test_pickled_checkpoint_is_refused_unless_allowed(sft, tmp_path):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(sft / "config.json", pickled / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(sft).state_dict(), pickled / "pytorch_model.bin")
    config = _config(sft, [PolicySpec("p", "m", path=str(pickled))])
    with pytest.raises(
        ValueError, match=r"no \.safetensors weights \(found \['pytorch_model.bin'\]\).*allow_pickle"
    ):
        run_frontier(config, progress=False)


def test_missing_folder_is_named(sft, tmp_path):
    config = _config(sft, [PolicySpec("p", "m", trajectory=[str(tmp_path / "nope")])])
    with pytest.raises(ValueError, match=r"policy 'p' .*nope' is not a model folder"):
        run_frontier(config, progress=False)


def test_prompt_longer_than_the_context_errors_or_is_skipped_and_reported(sft):
    long_prompt = " ".join(["word"] * 600)  # GPT-2 BPE: 600 tokens > the tiny model's 512 positions
    config = _config(sft, [], prompts=[*PROMPTS, long_prompt])
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not fit the context of 512 tokens.*\(2, 600\)"):
        run_frontier(config, progress=False)
    config.on_long_prompt = "skip"
    result = run_frontier(config, progress=False)
    assert result.skipped["prompts_too_long"] == [{"index": 2, "length": 600}]
    assert result.settings["num_prompts_used"] == 2
    assert result.points[0]["num_samples"] == 2 * 2


def test_nan_reward_errors_or_is_skipped_and_counted(sft, reward_module):
    config = _config(sft, [], reward="frontier_test_rewards:nan_first")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*on_nan_reward: skip"):
        run_frontier(config, progress=False)
    config.on_nan_reward = "skip"
    result = run_frontier(config, progress=False)
    (row,) = result.points
    assert row["num_reward_skipped"] == 1 and result.skipped["rewards"] == {"sft": 1}
    assert math.isfinite(row["reward_mean"])
    assert result.metrics()["frontier/sft/reward_mean"] == row["reward_mean"]


def test_reward_of_the_wrong_length_or_type_is_refused(sft, reward_module):
    with pytest.raises(ValueError, match=r"returned 3 values for 4 completions"):
        run_frontier(_config(sft, [], reward="frontier_test_rewards:one_short"), progress=False)
    with pytest.raises(TypeError, match="returned 'good'"):
        run_frontier(_config(sft, [], reward="frontier_test_rewards:strings"), progress=False)
    with pytest.raises(ValueError, match="cannot be imported"):
        run_frontier(_config(sft, [], reward="frontier_test_rewards:missing"), progress=False)


def test_reward_model_folder(sft, tmp_path):
    """A folder with a 1-label sequence classifier is a reward: scores equal a direct forward pass."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from warpkit.frontier.inputs import load_reward

    torch.manual_seed(0)
    rm = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=50256)
    ).eval()
    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.save_pretrained(folder)
    reward = load_reward(str(folder), torch.device("cpu"), batch_size=2)
    prompts, completions = ["The movie was", "Plot:"], [" great fun", " a total mess, honestly"]
    got = reward(prompts=prompts, completions=completions)
    with torch.no_grad():
        want = [
            rm(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert got == pytest.approx(want, abs=1e-5)
    result = run_frontier(_config(sft, [], reward=str(folder)), progress=False)
    assert math.isfinite(result.points[0]["reward_mean"])


def test_trajectory_glob_is_in_step_order_not_lexicographic(tmp_path, monkeypatch):
    from warpkit.frontier.config import expand_trajectory

    for step in (100, 20, 3):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    monkeypatch.setenv("RUN", str(tmp_path / "run"))
    got = expand_trajectory("${RUN}/checkpoint-*")
    assert [s for s, _ in got] == [3, 20, 100]
    assert got[0][1] == str(tmp_path / "run" / "checkpoint-3")
    assert expand_trajectory(["b/final", "a/checkpoint-7"]) == [(0, "b/final"), (7, "a/checkpoint-7")]
    with pytest.raises(ValueError, match="matches no folder"):
        expand_trajectory(str(tmp_path / "nothing-*"))


def test_reference_name_is_reserved():
    with pytest.raises(ValueError, match="'sft' names the reference point"):
        FrontierConfig(reference="x", policies=[PolicySpec("sft", "m", path="p")])

"""Bad input to `warpkit frontier`: clear errors before any sampling, or explicit, reported skips."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.frontier.helpers import PROMPTS, small_config
from warpkit.frontier import run
from warpkit.frontier.policies import LitiSweep, PolicySpec, SoupSweep
from warpkit.frontier.run import run_frontier
from warpkit.testing import make_tiny_model


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if anything is sampled: the checks must come first."""
    monkeypatch.setattr(run, "evaluate_policy", lambda *a, **k: pytest.fail("sampled before the check"))


def test_policy_with_another_vocabulary_size_is_refused(sft, tmp_path):
    other = tmp_path / "other"
    make_tiny_model("gpt2", tie_word_embeddings=False, vocab_size=1000).save_pretrained(other)
    config = small_config(sft, [PolicySpec("other", "m", path=str(other))])
    with pytest.raises(ValueError, match=r"vocab_size 1000 but the reference has 50257"):
        run_frontier(config, progress=False)


def test_policy_with_another_tokenizer_is_refused(sft, tmp_path):
    policy = tmp_path / "policy"
    shutil.copytree(sft, policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.add_tokens(["<|new_token|>"])
    tokenizer.save_pretrained(policy)
    config = small_config(sft, [PolicySpec("p", "m", path=str(policy))])
    with pytest.raises(ValueError, match="different tokenizer vocabulary"):
        run_frontier(config, progress=False)


def test_pickled_checkpoint_is_refused_unless_allowed(sft, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(sft / "config.json", pickled / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(sft).state_dict(), pickled / "pytorch_model.bin")
    config = small_config(sft, [PolicySpec("p", "m", path=str(pickled))])
    with pytest.raises(
        ValueError, match=r"no \.safetensors weights \(found \['pytorch_model.bin'\]\).*allow_pickle"
    ):
        run_frontier(config, progress=False)


def test_missing_folder_is_named(sft, tmp_path):
    config = small_config(sft, [PolicySpec("p", "m", trajectory=[str(tmp_path / "nope")])])
    with pytest.raises(ValueError, match=r"policy 'p' .*nope' is not a model folder"):
        run_frontier(config, progress=False)


def test_prompt_longer_than_the_context_errors_or_is_skipped_and_reported(sft):
    long_prompt = " ".join(["word"] * 600)  # GPT-2 BPE: 600 tokens > the tiny model's 512 positions
    config = small_config(sft, [], prompts=[*PROMPTS, long_prompt])
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not fit the context of 512 tokens.*\(2, 600\)"):
        run_frontier(config, progress=False)
    config.on_long_prompt = "skip"
    result = run_frontier(config, progress=False)
    assert result.skipped["prompts_too_long"] == [{"index": 2, "length": 600}]
    assert result.settings["num_prompts_used"] == 2
    assert result.points[0]["num_samples"] == 2 * 2


def test_soup_of_models_with_other_shapes_is_refused_before_sampling(
    soup_root, tiny_model_factory, no_sampling
):
    wider = tiny_model_factory("gpt2", False, hidden_size=64)  # same vocabulary and tokenizer, other shapes
    config = small_config(
        soup_root / "sft",
        [PolicySpec("rs", "m", soup=SoupSweep([str(soup_root / "positive"), str(wider)]))],
    )
    with pytest.raises(
        ValueError, match=r"policy 'rs': soup.models\[1\] .* and soup.models\[0\] .* differ in shape"
    ):
        run_frontier(config, progress=False)


def test_missing_soup_model_is_refused_before_sampling(soup_root, no_sampling):
    config = small_config(
        soup_root / "sft", [PolicySpec("rs", "m", soup=SoupSweep([str(soup_root / "positive"), "nope"]))]
    )
    with pytest.raises(ValueError, match=r"policy 'rs' \(soup.models\[1\]\) 'nope' is not a model folder"):
        run_frontier(config, progress=False)


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])


@pytest.mark.parametrize("where", ["path", "trajectory", "liti.init", "liti.merged", "reference"])
def test_truncated_weights_are_refused_before_sampling(soup_root, tmp_path, no_sampling, where):
    # A truncated checkpoint last in a trajectory used to pass the checks and crash after the other points.
    bad = tmp_path / "bad"
    shutil.copytree(soup_root / "positive", bad)
    _truncate(bad)
    good, ref = str(soup_root / "positive"), str(soup_root / "sft")
    policy = {
        "path": PolicySpec("p", "m", path=str(bad)),
        "trajectory": PolicySpec("p", "m", trajectory=[good, str(bad)]),
        "liti.init": PolicySpec("p", "m", liti=LitiSweep(str(bad), good)),
        "liti.merged": PolicySpec("p", "m", liti=LitiSweep(ref, str(bad))),
        "reference": PolicySpec("p", "m", path=good),
    }[where]
    config = small_config(bad if where == "reference" else ref, [policy])
    who = "reference" if where == "reference" else "policy 'p'"
    with pytest.raises(ValueError, match=rf"{who} .*bad.*model\.safetensors is truncated: .*write it again"):
        run_frontier(config, progress=False)


def test_liti_sweep_of_other_shapes_is_refused_before_sampling(soup_root, tiny_model_factory, no_sampling):
    wider = tiny_model_factory("gpt2", False, hidden_size=64)  # same vocabulary and tokenizer, other shapes
    config = small_config(
        soup_root / "sft", [PolicySpec("l", "m", liti=LitiSweep(str(soup_root / "sft"), str(wider)))]
    )
    with pytest.raises(
        ValueError,
        match=r"policy 'l': liti\.merged .* and liti\.init .* differ in shape.*set liti\.init to the init",
    ):
        run_frontier(config, progress=False)

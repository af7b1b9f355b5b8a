"""`warpkit.loop.rl`: the algorithm read in every spelling, and non-finite rewards stopped at the first step.

The RL runs are real one-step RLOO runs of a tiny llama on CPU (a few seconds each), built through the run's
own parser as `accelerate launch -m warpkit.loop.rl` builds them.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from trl import GRPOConfig, RLOOConfig
from trl.trainer.utils import is_async_callable

from warpkit.loop.anchors import anchor_settings
from warpkit.loop.rewards import FiniteReward, finite_reward
from warpkit.loop.rl import build_trainer, check_settings, parse_args, reward_funcs

THIS = "tests.loop.test_rl"
PROMPTS = ["The film opens with", "I went in expecting", "The lead actor is", "Overall, this movie is"]
BASE = ["--output_dir", "out", "--use_cpu", "true", "--report_to", "none"]


# ----------------------------------------------------------------------------- rewards named by configs


def nan_second(completions, **_):
    """NaN for the second completion of every batch, 1.0 for the others."""
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def constant(completions, **_):
    return [0.5] * len(completions)


async def async_constant(completions, **_):
    return [0.5] * len(completions)


# ----------------------------------------------------------------------------- the algorithm


def _yaml(tmp_path: Path, **fields) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


@pytest.mark.parametrize(
    "spelling",
    [
        ["--algorithm", "grpo"],
        ["--algorithm=grpo"],
        ["--algo", "grpo"],  # argparse's abbreviation: read by the full parse, then parsed again
        ["CONFIG_SPACE"],
        ["CONFIG_EQUALS"],
        ["CONFIG_SPACE", "--algorithm=grpo"],
    ],
    ids=["flag-space", "flag-equals", "abbreviated", "config-space", "config-equals", "config-and-flag"],
)
def test_grpo_is_read_in_every_spelling(spelling, tmp_path):
    config = _yaml(tmp_path, algorithm="grpo" if "--algorithm=grpo" not in spelling else "rloo", beta=0.2)
    argv = []
    for arg in spelling:
        argv += {"CONFIG_SPACE": ["--config", config], "CONFIG_EQUALS": [f"--config={config}"]}.get(
            arg, [arg]
        )
    rl_args, training_args, _ = parse_args([*argv, *BASE])
    assert rl_args.algorithm == "grpo" and type(training_args) is GRPOConfig
    if any(a.startswith("--config") for a in argv):
        assert training_args.beta == 0.2  # the file was read, whichever spelling named it


@pytest.mark.parametrize("spelling", [["--algorithm=rloo"], ["--algorithm", "rloo"]])
def test_the_command_line_algorithm_wins_over_the_config_file(spelling, tmp_path):
    config = _yaml(tmp_path, algorithm="grpo")
    rl_args, training_args, _ = parse_args([f"--config={config}", *spelling, *BASE])
    assert rl_args.algorithm == "rloo" and type(training_args) is RLOOConfig


def test_unknown_algorithm_is_refused_in_either_spelling():
    for argv in (["--algorithm=ppo"], ["--algorithm", "ppo"]):
        with pytest.raises(ValueError, match=r"algorithm='ppo': choose one of \('rloo', 'grpo'\)"):
            parse_args([*argv, *BASE])


# ----------------------------------------------------------------------------- the anchor kinds


def test_each_anchor_kind_is_read_with_its_settings():
    rl_args, _, _ = parse_args(
        ["--anchor", "elastic_reset", "--reset_every", "50", "--ema_rate", "0.005", *BASE]
    )
    assert (rl_args.anchor, rl_args.reset_every, rl_args.ema_rate) == ("elastic_reset", 50, 0.005)
    assert anchor_settings(rl_args) == {"reset_every": 50, "ema_rate": 0.005, "ema_update_every": 1}
    rl_args, _, _ = parse_args(["--anchor", "bema", "--bema_lag", "2", "--bema_update_after", "5", *BASE])
    assert rl_args.bema_settings() == {
        "update_freq": 1, "ema_power": 0.5, "bias_power": 0.2, "lag": 2.0, "update_after": 5,
        "multiplier": 1.0, "min_ema_multiplier": 0.0,
    }  # fmt: skip
    assert anchor_settings(parse_args(["--anchor", "sft", *BASE])[0]) == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"anchor": "lagged"}, r"anchor='lagged': choose 'ema' \(WARP\), 'bema', 'elastic_reset' or 'sft'"),
        ({"anchor": "elastic_reset"}, r"reset_every=None: anchor='elastic_reset' needs reset_every = n >= 1"),
        ({"anchor": "elastic_reset", "reset_every": 0}, r"reset_every=0: anchor='elastic_reset' needs"),
        ({"anchor": "ema", "reset_every": 10}, r"reset_every=10 is set but anchor='ema'"),
        ({"anchor": "elastic_reset", "reset_every": 2, "ema_rate": 0.0}, r"ema_rate=0.0 must be in \(0, 1\]"),
        ({"anchor": "bema", "bema_update_freq": 0}, r"bema_update_freq must be an integer >= 1"),
        (
            {"anchor": "bema", "bema_lag": 0.0, "bema_multiplier": 0.5},
            r"bema_lag \+ bema_multiplier must be >= 1",
        ),
        ({"anchor": "bema", "bema_ema_power": -1.0}, r"bema_ema_power must be a finite number >= 0"),
        (
            {"anchor": "bema", "bema_min_ema_multiplier": 2.0},
            r"bema_min_ema_multiplier must be a number in \[0, 1\]",
        ),
        ({"anchor": "bema", "beta": 0.0}, r"beta=0 with anchor='bema': TRL loads no reference model"),
        ({"anchor": "elastic_reset", "reset_every": 2, "beta": 0.0}, r"beta=0 with anchor='elastic_reset'"),
        ({"anchor": "bema", "sync_ref_model": True}, r"sync_ref_model=True rewrites the reference"),
        ({"anchor": "elastic_reset", "reset_every": 2, "use_peft": True}, r"supports full fine-tuning only"),
        ({"anchor": "bema", "use_peft": True}, r"anchor='bema' supports full fine-tuning only"),
    ],
)
def test_bad_anchor_settings_are_refused_when_the_run_is_parsed(fields, message):
    run = {"model_name_or_path": "sft", "output_dir": "out", "use_cpu": True, **fields}
    with pytest.raises(ValueError, match=message):
        check_settings(run)


# ----------------------------------------------------------------------------- non-finite rewards, unit


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "good"])
def test_finite_reward_refuses_a_non_finite_value_naming_reward_and_completion(bad):
    reward = FiniteReward(lambda completions, **_: [1.0, bad, bad], "mypkg.rewards:score")
    with pytest.raises(ValueError) as info:
        reward(prompts=["p"] * 3, completions=["fine", "the bad one", "another"])
    message = str(info.value)
    assert message.startswith(
        f"reward mypkg.rewards:score returned {bad!r} for completion 1 of 3 (2 non-finite in all): 'the bad one'."
    )
    assert "Fix the reward" in message


def test_finite_reward_passes_values_through_and_keeps_the_function_name():
    values = torch.tensor([0.5, -1.0])
    reward = finite_reward(constant, f"{THIS}:constant")
    assert reward.__name__ == "constant" and reward.name == f"{THIS}:constant"
    assert reward(prompts=["a", "b"], completions=["x", "y"]) == [0.5, 0.5]
    assert FiniteReward(lambda **_: values, "t:v")(completions=["x", "y"]) is values
    chat = FiniteReward(nan_second, "t:chat")
    with pytest.raises(ValueError, match=r"completion 1 of 2 .*: 'hello there'"):
        chat(
            completions=[
                [{"role": "assistant", "content": "hi"}],
                [{"role": "assistant", "content": "hello there"}],
            ]
        )


def test_async_reward_stays_async_and_is_checked():
    reward = finite_reward(async_constant, f"{THIS}:async_constant")
    assert is_async_callable(reward)  # TRL awaits it with its other async rewards
    assert asyncio.run(reward(completions=["x"])) == [0.5]

    async def nan_reward(completions, **_):
        return [math.nan] * len(completions)

    with pytest.raises(ValueError, match="reward t:nan returned nan for completion 0 of 1"):
        asyncio.run(finite_reward(nan_reward, "t:nan")(completions=["x"]))


def test_reward_funcs_wraps_functions_and_passes_folders(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    wrapped, path = reward_funcs([f"{THIS}:constant", str(folder)])
    assert isinstance(wrapped, FiniteReward) and wrapped.fn is constant
    assert path == str(folder.resolve())


# ----------------------------------------------------------------------------- non-finite rewards, real runs


def _run_argv(model: Path, tmp_path: Path, reward: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return [
        "--model_name_or_path", str(model), "--reward_funcs", reward, "--dataset", str(prompts),
        "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--num_generations", "2", "--max_completion_length", "6", "--beta", "0.1", "--use_cpu", "true",
        "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
        "--seed", "0",
    ]  # fmt: skip


def test_nan_reward_function_stops_a_real_rloo_run_at_its_first_step(tiny_llama_dir, tmp_path):
    trainer = build_trainer(*parse_args(_run_argv(tiny_llama_dir, tmp_path, f"{THIS}:nan_second")))
    assert trainer.reward_func_names == ["nan_second"]  # TRL's metric keys are unchanged by the wrapper
    with pytest.raises(
        ValueError,
        match=rf"^reward {THIS}:nan_second returned nan for completion 1 of 4 \(1 non-finite in all\): '",
    ):
        trainer.train()
    assert trainer.state.global_step == 0  # no optimizer step was taken on the zero advantage


def _nan_reward_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny one-label llama reward model whose score head is NaN (a broken merge, say)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=50256, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.fill_(math.nan)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_nan_reward_model_stops_a_real_rloo_run_at_its_first_step(tiny_llama_dir, tmp_path):
    folder = _nan_reward_model(tmp_path / "nan_rm", tiny_llama_dir)
    trainer = build_trainer(*parse_args(_run_argv(tiny_llama_dir, tmp_path, str(folder))))
    with pytest.raises(
        ValueError,
        match=rf"^reward model {folder.resolve()} returned nan for completion 0 of 4 \(4 non-finite",
    ) as info:
        trainer.train()
    assert any(p in str(info.value) for p in PROMPTS)  # the offending text: prompt + completion
    assert "Check the reward model's weights" in str(info.value)
    assert trainer.state.global_step == 0

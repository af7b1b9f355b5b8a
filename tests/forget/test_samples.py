"""Probe sets sampled from a policy (the WARP case): seeded, re-encodable as (prompt, completion) pairs."""

from __future__ import annotations

import pytest

from warpkit._util.config import build_dataclass
from warpkit.forget.config import ForgetConfig
from warpkit.forget.inputs import prepare_inputs
from warpkit.forget.samples import policy_completions

PROMPTS = ["The film opens with", "I went in expecting"]


def test_policy_completions_are_seeded_pairs(tiny_model_factory, monkeypatch):
    policy = tiny_model_factory("llama", True)
    rows = policy_completions(
        str(policy), PROMPTS, num_prompts=2, samples_per_prompt=2, max_new_tokens=4, seed=3
    )
    assert [r["prompt"] for r in rows] == PROMPTS * 2 and all(r["completion"] for r in rows)
    assert rows == policy_completions(
        str(policy), PROMPTS, num_prompts=2, samples_per_prompt=2, max_new_tokens=4, seed=3
    )
    monkeypatch.setenv("POLICY_DIR", str(policy))
    again = policy_completions(
        "$POLICY_DIR", PROMPTS, num_prompts=2, samples_per_prompt=2, max_new_tokens=4, seed=3
    )
    assert again == rows  # $VARS expand; the same seed draws the same samples
    with pytest.raises(ValueError, match="not a model folder"):
        policy_completions("/nonexistent", PROMPTS)


def test_a_sampled_probe_set_scores_the_completion_given_the_prompt(tiny_model_factory):
    policy = str(tiny_model_factory("llama", True))
    probe = {
        "name": "own",
        "texts": "warpkit.forget.samples:policy_completions",
        "kwargs": {"policy": policy, "prompts": PROMPTS, "num_prompts": 2, "max_new_tokens": 4},
        "column": "prompt",
        "target_column": "completion",
        "seen_by": ["run_1"],
    }
    doc = {"reference": policy, "models": {"run_1": policy}, "probe_sets": [probe]}
    inputs = prepare_inputs(build_dataclass(ForgetConfig, doc, "forget.yaml"))
    rows = inputs.probes["own"]
    assert len(rows) == 2 and all(r.target and 1 <= len(r.ids) - r.start <= 5 for r in rows)

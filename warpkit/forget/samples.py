"""Probe texts sampled from a policy: a probe set of (prompt, completion) pairs that a config names as
``texts: warpkit.forget.samples:policy_completions`` with the policy in ``kwargs``.

For the WARP case (`configs/forget_warp_tiny.yaml`): the M policies of an iteration were trained on their
own samples, which the RL runs do not keep; fresh samples from each final policy at the training
temperature, on the training prompts, stand in for them ("its own completions"), and samples on the
held-out prompts give the same policy's behaviour on prompts it never trained on. Each pair is scored by
the log-likelihood of the completion given the prompt (and exact match of greedy decoding).

Sampling uses the frontier's decoding loop (`warpkit.frontier.estimate.sample_completions`: seeded
Gumbel-max at temperature T, no top-k / top-p), so the samples do not depend on a checkpoint's generation
config. The policy is loaded from safetensors only, once, when the probe set is read (before scoring).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from warpkit.frontier.estimate import sample_completions
from warpkit.frontier.inputs import encode_prompt
from warpkit.workloads import DEFAULT_MODEL, TINY_MODEL, load_prompt_dataset, resolve_model_path

__all__ = ["policy_completions"]


def policy_completions(
    policy: str,
    prompts: str | list[Any] = "warpkit.workloads.default:review_prompts",
    split: str = "train",
    num_prompts: int = 16,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 0.9,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Rows ``{"prompt": text, "completion": text}`` sampled from ``policy`` (a folder; ``$VARS`` expand).

    ``prompts`` is any prompt spec of `warpkit.workloads.load_prompt_dataset` (``split`` picks the split:
    ``train`` for the prompts RL trained on, ``eval`` for held-out ones); the first ``num_prompts`` are
    used, each ``samples_per_prompt`` times. A chat prompt is rendered with the policy's chat template and
    generation prompt, as TRL does; the completion keeps its EOS token as text (it re-tokenizes to EOS), so
    no completion is empty.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(os.path.expandvars(policy))
    path = resolve_model_path(path) if path in (DEFAULT_MODEL, TINY_MODEL) else path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"policy_completions: policy {policy!r} is not a model folder (no config.json).")
    if num_prompts < 1 or samples_per_prompt < 1 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError(
            "policy_completions: num_prompts, samples_per_prompt, max_new_tokens >= 1, temperature > 0."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).eval()
    dataset = load_prompt_dataset(prompts, split=split)
    chosen = list(dataset["prompt"])[:num_prompts] * samples_per_prompt
    encoded = [encode_prompt(p, tokenizer) for p in chosen]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = sample_completions(
        model, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return [
        {"prompt": tokenizer.decode(ids), "completion": tokenizer.decode(c)}
        for ids, c in zip(encoded, completions, strict=True)
    ]

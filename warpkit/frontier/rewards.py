"""The frontier's rewards: loaded from their specs, called on a point's samples, their values checked.

A reward has TRL's signature ``f(prompts=, completions=, completion_ids=) -> list[float]``; a spec names a
function (``module:function``) or a reward-model folder (`warpkit.workloads.reward_spec` tells which). The
main reward and every extra reward score the very same samples of each point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from warpkit.frontier.inputs import check_folder
from warpkit.workloads import reward_spec

__all__ = ["RewardFn", "check_rewards", "load_reward", "load_rewards", "reward_model_scorer", "score_rewards"]

RewardFn = Callable[..., Any]


def load_reward(spec: str, device: torch.device, batch_size: int = 16) -> RewardFn:
    """A reward with TRL's signature ``f(prompts=, completions=, completion_ids=) -> list[float]``.

    ``spec`` is ``module:function`` or a folder with an ``AutoModelForSequenceClassification`` (1 label)
    and its tokenizer; a reward model scores the chat (its template) or prompt + completion text.
    """
    reward = reward_spec(spec)
    if isinstance(reward, Path):
        return reward_model_scorer(str(reward), device, batch_size)
    return reward


def load_rewards(
    reward: str, extra_rewards: Mapping[str, str], device: torch.device, batch_size: int = 16
) -> dict[str | None, RewardFn]:
    """The main reward under the key None, then the extra rewards by name (config order)."""
    specs = [(None, reward), *extra_rewards.items()]
    return {name: load_reward(spec, device, batch_size) for name, spec in specs}


def reward_model_scorer(folder: str, device: torch.device, batch_size: int = 16) -> RewardFn:
    """The reward model in ``folder`` (safetensors, 1 label) as a reward function, ``batch_size`` texts a call."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_folder(folder, "reward model", allow_pickle=False)
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {folder!r} has {model.config.num_labels} labels; a reward model has 1."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list) and tokenizer.chat_template:
                texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
            elif isinstance(prompt, list):
                texts.append("".join(m["content"] for m in prompt + completion))
            else:
                texts.append(prompt + completion)
        scores = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            scores += model(**batch).logits[:, 0].float().tolist()
        return scores

    return reward_model


def score_rewards(
    reward_fns: Mapping[str | None, RewardFn],
    *,
    prompts: Sequence[Any],
    texts: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    point: str,
    on_nan: str,
) -> dict[str | None, list[float]]:
    """Every reward of ``reward_fns`` on the same samples, checked: one float (or NaN, skipped) per sample.

    ``texts`` are the decoded completions, passed as chat messages when the prompts are conversational.
    """
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
    values = {}
    for name, fn in reward_fns.items():
        raw = fn(prompts=list(prompts), completions=completions, completion_ids=completion_ids)
        what = "the reward" if name is None else f"extra reward {name!r}"
        values[name] = check_rewards(raw, len(texts), point, on_nan, list(texts), what=what)
    return values


def check_rewards(
    raw: Any, n: int, point: str, on_nan: str, texts: list[str], *, what: str = "the reward"
) -> list[float]:
    """Floats, one per completion; None / NaN / inf are errors, or NaN (skipped) when on_nan == 'skip'.

    ``what`` names the reward in errors (e.g. ``extra reward 'brevity'``).
    """
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().float().cpu().tolist()
    if not hasattr(raw, "__len__") or isinstance(raw, (str, bytes, dict)):
        raise TypeError(
            f"{what} returned {type(raw).__name__} for point {point!r}; it must return a list of floats."
        )
    if len(raw) != n:
        raise ValueError(
            f"{what} returned {len(raw)} values for {n} completions of point {point!r}; "
            "it must return exactly one float per completion, in order."
        )
    values = []
    for v in raw:
        if v is None:
            values.append(math.nan)
            continue
        try:
            values.append(float(v))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} returned {v!r} for point {point!r}; expected a number.") from e
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad and on_nan == "error":
        raise ValueError(
            f"{what} returned {len(bad)} non-finite value(s) (NaN, inf or None) out of {n} for point "
            f"{point!r}; first: {values[bad[0]]} for completion {texts[bad[0]]!r}. Fix the reward, or set "
            "on_nan_reward: skip to leave those samples out of the reward mean (they are counted)."
        )
    return [v if math.isfinite(v) else math.nan for v in values]

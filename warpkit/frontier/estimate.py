"""Reward and KL(policy || SFT) of one policy, estimated on its own samples.

The quantity is the sequence-level KL of the WARP paper, averaged over held-out prompts x:

    KL(x) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_sft(y|x) ],   y = completion tokens only (EOS included).

Both distributions are the ones the policy samples from during RL: softmax(logits / T) at the training
temperature T, with no top-k / top-p truncation (a truncated sampler is not the distribution whose KL the
anchor penalises). Prompt tokens never enter the sum. Two unbiased estimators, side by side:

- ``kl``:       Monte Carlo, sum over sampled positions t of log pi(y_t|x,y_<t) - log pi_sft(y_t|x,y_<t);
- ``kl_exact``: sum over sampled positions t of the exact next-token KL(pi(.|x,y_<t) || pi_sft(.|x,y_<t))
  from the full distributions (chain rule: its expectation is KL(x); Rao-Blackwellised, lower variance).

Samples come from our own decoding loop (KV cache, Gumbel-max with a seeded generator) so no generation
config of the checkpoint (top_k=50, repetition penalty...) can silently change the sampled distribution,
and every policy sees the same random numbers (common random numbers: differences between policies are
less noisy). Log-probs are then recomputed teacher-forced for the policy and the reference in one pass each.

Means and standard errors over the fixed prompt set are `warpkit.frontier.stats.mean_stderr`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PolicySamples", "evaluate_policy", "sample_completions", "score_completions"]


@dataclass
class PolicySamples:
    """Per-sample results of one policy; row ``i * k + j`` is sample j of prompt i.

    Shapes: ``completions[n]`` token lists (EOS included when sampled), ``kl[n]``, ``kl_exact[n]``,
    ``length[n]``; ``rewards[n]`` once a reward is applied (NaN where a reward was skipped).
    """

    prompt_index: list[int]
    completions: list[list[int]]
    kl: list[float]
    kl_exact: list[float]
    length: list[int]
    rewards: list[float] | None = None


# ----------------------------------------------------------------------------- sampling


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device):
    """(input_ids [B, P], attention_mask [B, P], position_ids [B, P]) for left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {r} of the batch is empty; every prompt needs at least one token.")
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    # Positions count real tokens only, as generate() does, so left padding does not shift them.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def sample_completions(
    policy: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Sample one completion per prompt from softmax(logits / temperature); stop at EOS or the cap.

    Gumbel-max: token = argmax(logits / T + G) with G = -log(-log U), U ~ Uniform[0, 1) drawn from
    ``generator`` with shape [B, V] per step, is an exact sample from softmax(logits / T).
    Returns token lists (the EOS token kept as the last token when sampled).
    """
    device = next(policy.parameters()).device
    ids, mask, pos = _left_pad(prompts, pad_token_id, device)
    out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = pos[:, -1] + 1
    batch = len(prompts)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u))
        tok = (logits.float() / temperature + gumbel).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = policy(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    sampled = torch.stack(tokens, dim=1).tolist()
    completions = []
    for row in sampled:
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        completions.append(row)
    return completions


# ----------------------------------------------------------------------------- scoring


def _logits(model: torch.nn.Module, ids, mask, pos, keep: int) -> torch.Tensor:
    # Only the last `keep` positions are needed; logits_to_keep avoids a [B, P + L, V] tensor when supported.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -keep:]


@torch.no_grad()
def score_completions(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    temperature: float,
    pad_token_id: int,
) -> tuple[list[float], list[float]]:
    """Per-sequence (MC log-ratio sum, exact per-position KL sum) at temperature T; completion tokens only.

    Layout: [left-padded prompt | completion | right padding]; the logits at position p predict token
    p + 1, so the L completion tokens are predicted by the L positions ending one before the last.
    Passing the same module as policy and reference returns exact zeros without a second forward.
    """
    if reference is policy:
        return [0.0] * len(prompts), [0.0] * len(prompts)
    device = next(policy.parameters()).device
    width = max(len(c) for c in completions)
    if width == 0:
        return [0.0] * len(prompts), [0.0] * len(prompts)
    ids, mask, _ = _left_pad(prompts, pad_token_id, device)
    comp = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    comp_mask = torch.zeros_like(comp)
    for r, c in enumerate(completions):
        comp[r, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        comp_mask[r, : len(c)] = 1
    full_ids = torch.cat([ids, comp], dim=1)
    full_mask = torch.cat([mask, comp_mask], dim=1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    keep = width + 1
    logp = F.log_softmax(
        _logits(policy, full_ids, full_mask, full_pos, keep)[:, :-1].float() / temperature, -1
    )
    logq = F.log_softmax(
        _logits(reference, full_ids, full_mask, full_pos, keep)[:, :-1].float() / temperature, -1
    )
    token_ratio = (logp - logq).gather(-1, comp[..., None]).squeeze(-1)  # [B, L]
    p = logp.exp()
    # KL of the next-token distributions, [B, L]; 0 * log 0 = 0 for tokens a model masks with -inf logits.
    exact = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    m = comp_mask.to(token_ratio.dtype)
    return (token_ratio * m).sum(-1).tolist(), (exact * m).sum(-1).tolist()


# ----------------------------------------------------------------------------- one policy


def evaluate_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> PolicySamples:
    """Sample ``samples_per_prompt`` completions per prompt (token ids) and score both KL estimators.

    Batch b uses a generator seeded with (seed, b), so two policies evaluated with the same arguments
    draw the same uniforms. ``progress(n)`` is called with the number of sequences done per batch.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    rows = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]
    device = next(policy.parameters()).device
    result = PolicySamples([], [], [], [], [])
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        batch_prompts = [prompts[i] for i, _ in chunk]
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        completions = sample_completions(
            policy,
            batch_prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generator=generator,
        )
        kl, kl_exact = score_completions(
            policy, reference, batch_prompts, completions, temperature=temperature, pad_token_id=pad_token_id
        )
        result.prompt_index += [i for i, _ in chunk]
        result.completions += completions
        result.kl += kl
        result.kl_exact += kl_exact
        result.length += [len(c) for c in completions]
        if progress is not None:
            progress(len(chunk))
    return result

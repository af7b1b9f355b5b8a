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
less noisy). `evaluate_policy` processes each token the least number of times (`warpkit.frontier.decode`):
each distinct prompt of a batch is prefilled once for the policy, the policy's log-probs are those of its
decoding steps, and the reference's prompt cache is computed once per prompt set, so per sample only the
completion tokens go through the reference. `evaluate_policy_slow` is the plain reference implementation
(`sample_completions`, then `score_completions`: prompt + completion teacher-forced through the policy and
the reference); both give the same samples, and the same KLs up to float rounding (tests compare them).

Means and standard errors over the fixed prompt set are `warpkit.frontier.stats.mean_stderr`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from warpkit.frontier.decode import (
    ReferencePrompts,
    decode_loop,
    decode_with_logprobs,
    kl_sums,
    left_pad,
    trim_at_eos,
)

__all__ = [
    "PolicySamples",
    "ReferencePrompts",
    "evaluate_policy",
    "evaluate_policy_slow",
    "sample_completions",
    "score_completions",
]


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
    ids, mask, pos = left_pad(prompts, pad_token_id, device)
    out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens, _ = decode_loop(
        policy,
        out.past_key_values,
        out.logits[:, -1],
        mask,
        pos[:, -1] + 1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
    )
    return trim_at_eos(tokens.tolist(), eos_token_id)


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
    ids, mask, _ = left_pad(prompts, pad_token_id, device)
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

# One batch of rows: (prompt index of each row, its generator) -> (completions, kl, kl_exact).
BatchFn = Callable[[list[int], torch.Generator], tuple[list[list[int]], list[float], list[float]]]


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
    reference_prompts: ReferencePrompts | None = None,
) -> PolicySamples:
    """Sample ``samples_per_prompt`` completions per prompt (token ids) and score both KL estimators.

    Batch b uses a generator seeded with (seed, b), so two policies evaluated with the same arguments
    draw the same uniforms. ``progress(n)`` is called with the number of sequences done per batch.
    The fast path (`warpkit.frontier.decode`): each distinct prompt of a batch prefilled once, the policy's
    log-probabilities taken from its decoding steps, the reference's prompts from ``reference_prompts``
    (built here when None; pass one built once to evaluate many policies on the same prompts). Same samples
    and, up to float rounding, the same KLs as `evaluate_policy_slow`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if reference is policy:  # KL = 0 exactly; no reference pass, no log-probabilities kept

        def batch_fn(rows: list[int], generator: torch.Generator):
            tokens, _ = decode_with_logprobs(
                policy, prompts, rows, generator=generator, keep_logprobs=False, **settings
            )
            return trim_at_eos(tokens.tolist(), eos_token_id), [0.0] * len(rows), [0.0] * len(rows)

        return _run_batches(policy, len(prompts), samples_per_prompt, batch_size, seed, batch_fn, progress)
    if reference_prompts is None:
        reference_prompts = ReferencePrompts(
            reference, prompts, pad_token_id=pad_token_id, batch_size=batch_size
        )
    elif reference_prompts.model is not reference or reference_prompts.prompts != [list(p) for p in prompts]:
        raise ValueError("reference_prompts was built for another reference model or other prompts.")
    if not reference_prompts.cached:  # a cache that cannot be copied row-wise: the slow path
        return evaluate_policy_slow(
            policy,
            reference,
            prompts,
            samples_per_prompt=samples_per_prompt,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            **settings,
        )

    def batch_fn(rows: list[int], generator: torch.Generator):
        tokens, logp = decode_with_logprobs(policy, prompts, rows, generator=generator, **settings)
        completions = trim_at_eos(tokens.tolist(), eos_token_id)
        logq = reference_prompts.logprobs(rows, tokens, temperature)
        assert logp is not None
        return completions, *kl_sums(logp, logq, tokens, [len(c) for c in completions])

    return _run_batches(policy, len(prompts), samples_per_prompt, batch_size, seed, batch_fn, progress)


def evaluate_policy_slow(
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
    """`evaluate_policy` the simple way, its reference implementation: per batch, `sample_completions`
    (every row's prompt prefilled), then `score_completions` (prompt + completion teacher-forced through the
    policy and the reference). Same arguments, same generators, same samples."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")

    def batch_fn(rows: list[int], generator: torch.Generator):
        batch_prompts = [prompts[i] for i in rows]
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
        return completions, kl, kl_exact

    return _run_batches(policy, len(prompts), samples_per_prompt, batch_size, seed, batch_fn, progress)


def _run_batches(
    policy: torch.nn.Module,
    num_prompts: int,
    samples_per_prompt: int,
    batch_size: int,
    seed: int,
    batch_fn: BatchFn,
    progress: Callable[[int], None] | None,
) -> PolicySamples:
    """Rows (i, j), i-major, in batches of ``batch_size``; batch b's generator is seeded seed * 1_000_003 + b."""
    rows = [(i, j) for i in range(num_prompts) for j in range(samples_per_prompt)]
    device = next(policy.parameters()).device
    result = PolicySamples([], [], [], [], [])
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = [i for i, _ in rows[start : start + batch_size]]
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        completions, kl, kl_exact = batch_fn(chunk, generator)
        result.prompt_index += chunk
        result.completions += completions
        result.kl += kl
        result.kl_exact += kl_exact
        result.length += [len(c) for c in completions]
        if progress is not None:
            progress(len(chunk))
    return result

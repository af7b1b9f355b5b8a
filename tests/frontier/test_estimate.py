"""KL and reward estimation on a model small enough to enumerate every completion.

Vocabulary of 7 tokens (token 6 is EOS), completions of at most 3 tokens: at most 7 + 6 * 7 + 6 * 6 * 7 = 301
completions per prompt, so the sequence KL(pi || pi_sft) at temperature T is computed exactly, in float64,
by walking the tree of completions with full (cache-free, unpadded) forwards -- a different code path from
the estimator's KV-cache sampling, left padding and batched teacher forcing.
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from warpkit.frontier import decode
from warpkit.frontier.estimate import (
    ReferencePrompts,
    evaluate_policy,
    evaluate_policy_slow,
    score_completions,
)
from warpkit.frontier.stats import mean_stderr

VOCAB, EOS, PAD, MAX_NEW = 7, 6, 0, 3
PROMPTS = [[1, 2, 3], [4], [2, 5, 1, 3, 4]]  # different lengths: the batches are left padded


def _tiny(seed: int, arch: str = "llama"):
    if arch == "gpt2":  # learned absolute positions: wrong position ids under left padding would show
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=32,
            initializer_range=0.6,
            tie_word_embeddings=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
            bos_token_id=1,
        )
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        initializer_range=0.6,  # peaked next-token distributions, so the KL is far from zero
        tie_word_embeddings=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request):
    reference = _tiny(0, request.param)
    policy = _tiny(0, request.param)
    with torch.no_grad():  # a policy near the reference, as after RL: perturb every weight
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.35 * torch.randn(p.shape, generator=g))
    return policy, reference


def _exact_kl(policy, reference, prompt: list[int], temperature: float) -> float:
    """sum over complete completions y of pi(y) log(pi(y) / pi_sft(y)), float64, by enumeration."""
    pol, ref = policy.double(), reference.double()
    try:
        total = 0.0
        stack = [([], 0.0, 0.0)]  # (completion, log pi, log pi_sft)
        while stack:
            y, lp, lq = stack.pop()
            if len(y) == MAX_NEW or (y and y[-1] == EOS):
                total += math.exp(lp) * (lp - lq)
                continue
            ids = torch.tensor([prompt + y])
            with torch.no_grad():
                p = torch.log_softmax(pol(input_ids=ids).logits[0, -1] / temperature, -1)
                q = torch.log_softmax(ref(input_ids=ids).logits[0, -1] / temperature, -1)
            for v in range(VOCAB):
                stack.append(([*y, v], lp + p[v].item(), lq + q[v].item()))
        return total
    finally:
        pol.float(), ref.float()


def _estimate(policy, reference, temperature: float, k: int):
    s = evaluate_policy(
        policy,
        reference,
        PROMPTS,
        samples_per_prompt=k,
        max_new_tokens=MAX_NEW,
        temperature=temperature,
        eos_token_id=EOS,
        pad_token_id=PAD,
        batch_size=512,
        seed=0,
    )
    return s, mean_stderr(s.kl, s.prompt_index), mean_stderr(s.kl_exact, s.prompt_index)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_both_kl_estimators_match_enumeration(models, temperature):
    policy, reference = models
    exact = sum(_exact_kl(policy, reference, p, temperature) for p in PROMPTS) / len(PROMPTS)
    assert exact > 0.3, "the test needs a clearly non-zero KL to mean anything"
    s, (mc, mc_se), (rb, rb_se) = _estimate(policy, reference, temperature, k=1500)
    assert abs(mc - exact) < 3.5 * mc_se, (mc, mc_se, exact)
    assert abs(rb - exact) < 3.5 * rb_se, (rb, rb_se, exact)
    # The per-position exact KL is the lower-variance estimator (its reason to exist).
    assert rb_se < mc_se
    # Every completion ends with EOS or has the full length; prompts are never part of the sum.
    assert all(c[-1] == EOS or len(c) == MAX_NEW for c in s.completions)
    assert s.length == [len(c) for c in s.completions]


def test_estimate_is_for_the_sampling_temperature(models):
    """At T = 0.7 the estimates sit on the T = 0.7 KL, many standard errors away from the T = 1 KL."""
    policy, reference = models
    exact_07 = sum(_exact_kl(policy, reference, p, 0.7) for p in PROMPTS) / len(PROMPTS)
    exact_10 = sum(_exact_kl(policy, reference, p, 1.0) for p in PROMPTS) / len(PROMPTS)
    _, _, (rb, rb_se) = _estimate(policy, reference, 0.7, k=1500)
    assert abs(rb - exact_07) < 3.5 * rb_se
    assert abs(rb - exact_10) > 8 * rb_se, (rb, rb_se, exact_07, exact_10)


def test_score_is_batch_and_padding_invariant(models):
    """A sequence scored alone (no padding) and inside a left/right-padded batch gives the same KLs."""
    policy, reference = models
    completions = [[3, 3, EOS], [5], [2, 4, 1]]
    batch = score_completions(policy, reference, PROMPTS, completions, temperature=0.9, pad_token_id=PAD)
    for r in range(len(PROMPTS)):
        alone = score_completions(
            policy, reference, [PROMPTS[r]], [completions[r]], temperature=0.9, pad_token_id=PAD
        )
        assert alone[0][0] == pytest.approx(batch[0][r], abs=1e-5)
        assert alone[1][0] == pytest.approx(batch[1][r], abs=1e-5)


def test_policy_equal_to_reference_has_zero_kl(models):
    _, reference = models
    twin = copy.deepcopy(reference)
    _, (mc, _), (rb, _) = _estimate(twin, reference, 0.9, k=4)
    assert mc == pytest.approx(0.0, abs=1e-5) and rb == pytest.approx(0.0, abs=1e-5)


def test_same_seed_same_samples_for_every_policy(models):
    """Common random numbers: a policy identical to the reference draws exactly the reference's samples."""
    policy, reference = models
    twin = copy.deepcopy(reference)
    a, _, _ = _estimate(reference, reference, 0.9, k=3)
    b, _, _ = _estimate(twin, reference, 0.9, k=3)
    c, _, _ = _estimate(policy, reference, 0.9, k=3)
    assert a.completions == b.completions
    assert a.completions != c.completions


class _Masked(torch.nn.Module):
    """The wrapped model with token ``token`` forbidden (logit -inf); its forward takes no logits_to_keep."""

    def __init__(self, inner: torch.nn.Module, token: int):
        super().__init__()
        self.inner, self.token = inner, token

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        out = self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        logits = out.logits.clone()
        logits[..., self.token] = -math.inf
        return types.SimpleNamespace(logits=logits, past_key_values=getattr(out, "past_key_values", None))


def test_forbidden_token_identity_per_sample(models):
    """pi = pi_sft with token 5 removed and renormalised. At every position both log pi(y_t) - log pi_sft(y_t)
    and KL(pi || pi_sft) equal -log(1 - q_5), q_5 = pi_sft(5 | context): so on EVERY sample both estimators
    equal sum_t -log(1 - q_5(t)) exactly (a -inf logit must not produce NaN)."""
    _, reference = models
    policy, temperature = _Masked(reference, 5), 0.8
    s = evaluate_policy(
        policy,
        reference,
        PROMPTS,
        samples_per_prompt=4,
        max_new_tokens=MAX_NEW,
        temperature=temperature,
        eos_token_id=EOS,
        pad_token_id=PAD,
        batch_size=5,  # batches that cut across prompts
    )
    assert all(5 not in c for c in s.completions)
    for i, c, kl, kl_exact in zip(s.prompt_index, s.completions, s.kl, s.kl_exact, strict=True):
        ids = torch.tensor([PROMPTS[i] + c])
        with torch.no_grad():
            q = torch.softmax(reference(input_ids=ids).logits[0].double() / temperature, -1)
        q5 = q[len(PROMPTS[i]) - 1 : len(PROMPTS[i]) - 1 + len(c), 5]
        expected = float(-torch.log1p(-q5).sum())
        assert kl == pytest.approx(expected, abs=1e-4) and kl_exact == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- fast path = slow path

FAST_NEW = 5  # long enough that EOS (p ~ 1/7 per step) ends some rows early and not others


def _both(policy, reference, *, k: int, batch_size: int, temperature: float = 0.9, **fast_kwargs):
    settings = dict(
        samples_per_prompt=k,
        max_new_tokens=FAST_NEW,
        temperature=temperature,
        eos_token_id=EOS,
        pad_token_id=PAD,
        batch_size=batch_size,
        seed=3,
    )
    fast = evaluate_policy(policy, reference, PROMPTS, **settings, **fast_kwargs)
    slow = evaluate_policy_slow(policy, reference, PROMPTS, **settings)
    return fast, slow


def _assert_same(fast, slow):
    assert fast.prompt_index == slow.prompt_index
    assert fast.completions == slow.completions
    assert fast.length == slow.length
    # float32 rounding of KLs of ~20 nats per sequence (summed over 5 positions of a peaked tiny model)
    assert fast.kl == pytest.approx(slow.kl, abs=1e-4)
    assert fast.kl_exact == pytest.approx(slow.kl_exact, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 512])  # 4 and 7 split a prompt's samples across batches
def test_fast_path_matches_slow_path(models, batch_size):
    """Same samples (completions identical) and the same KLs as sampling then teacher-forcing both models,
    with left-padded prompts of lengths 1, 3, 5, three samples each, some rows ended early by EOS."""
    policy, reference = models
    fast, slow = _both(policy, reference, k=3, batch_size=batch_size)
    _assert_same(fast, slow)
    lengths = set(fast.length)
    assert max(lengths) == FAST_NEW and min(lengths) < FAST_NEW, "the test needs rows ended early by EOS"
    assert all(c[-1] == EOS for c in fast.completions if len(c) < FAST_NEW)
    assert max(abs(x) for x in fast.kl_exact) > 0.1, "the test needs non-zero KLs"


def test_fast_path_masked_policy_and_twin(models):
    """A policy with a forbidden token (-inf logits, no logits_to_keep) and one equal to the reference."""
    _, reference = models
    fast, slow = _both(_Masked(reference, 5), reference, k=2, batch_size=5, temperature=0.8)
    _assert_same(fast, slow)
    fast, slow = _both(copy.deepcopy(reference), reference, k=2, batch_size=5)
    _assert_same(fast, slow)
    assert max(abs(x) for x in fast.kl + fast.kl_exact) < 1e-5


def test_reference_prompts_reused_across_policies(models):
    """One ReferencePrompts serves every policy; the reference then only ever sees completion tokens."""
    policy, reference = models
    cache = ReferencePrompts(reference, PROMPTS, pad_token_id=PAD, batch_size=2)
    masked = _Masked(copy.deepcopy(reference), 5)  # copied before the hook: it sees only the reference
    widths, seen = [], []
    hook = reference.register_forward_pre_hook(
        lambda _m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        for model in (policy, masked):
            fast, slow = _both(model, reference, k=2, batch_size=4, reference_prompts=cache)
            _assert_same(fast, slow)
            widths.clear()
            evaluate_policy(
                model,
                reference,
                PROMPTS,
                samples_per_prompt=2,
                max_new_tokens=FAST_NEW,
                temperature=0.9,
                eos_token_id=EOS,
                pad_token_id=PAD,
                batch_size=4,
                reference_prompts=cache,
            )
            seen += widths
        # Never a prompt token: at most the first FAST_NEW - 1 completion tokens per call (none when every
        # completion is a lone EOS, which the cached last prompt logits score).
        assert seen and max(seen) <= FAST_NEW - 1, seen
    finally:
        hook.remove()


def test_reference_prompts_of_other_prompts_are_refused(models):
    policy, reference = models
    cache = ReferencePrompts(reference, PROMPTS[:2], pad_token_id=PAD)
    with pytest.raises(ValueError, match="another reference model or other prompts"):
        _both(policy, reference, k=1, batch_size=4, reference_prompts=cache)


def test_cache_that_cannot_be_copied_falls_back(models, monkeypatch):
    """Without a row-copyable cache the policy prefills every row and the reference takes the slow path."""
    policy, reference = models
    monkeypatch.setattr(decode, "expandable", lambda cache: False)
    assert not ReferencePrompts(reference, PROMPTS, pad_token_id=PAD).cached
    fast, slow = _both(policy, reference, k=2, batch_size=4)
    _assert_same(fast, slow)

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

from warpkit.frontier.estimate import evaluate_policy, score_completions
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

"""The Fuse-to-Forget math against values derived by hand (each test's docstring shows the derivation)."""

from __future__ import annotations

import math

import pytest
import torch

from warpkit.forget.metrics import (
    FisherOverlap,
    exact_match,
    fisher_overlap,
    likelihood_ratios,
    mean_stderr,
    paired_difference,
    perplexity,
)


def test_mean_and_standard_error():
    """[1, 2, 3]: mean 2, s = 1, se = 1 / sqrt(3); one value has no error; none has no mean."""
    mean, se = mean_stderr([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(mean_stderr([5.0])[1]) and mean_stderr([5.0])[0] == 5.0
    assert all(math.isnan(v) for v in mean_stderr([]))


def test_likelihood_ratio_is_the_reference_over_the_model_per_token():
    """ℓ_θ = (-1, -2), ℓ_ref = (-3, -3): LR = exp(ℓ_ref - ℓ_θ) = (e^-2, e^-1); ALR = (e^-2 + e^-1) / 2.
    The reference against itself: every LR is 1."""
    lr = likelihood_ratios([-1.0, -2.0], [-3.0, -3.0])
    assert lr == pytest.approx([math.exp(-2), math.exp(-1)])
    assert mean_stderr(lr)[0] == pytest.approx((math.exp(-2) + math.exp(-1)) / 2)
    assert likelihood_ratios([-3.0, -7.0], [-3.0, -7.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 model values for 1 reference"):
        likelihood_ratios([-1.0, -2.0], [-3.0])


def test_perplexity_and_its_delta_method_error():
    """L = -ln 4: PPL = 4; se(L) = 0.1 gives se(PPL) = 4 · 0.1 = 0.4."""
    ppl, se = perplexity(-math.log(4), 0.1)
    assert ppl == pytest.approx(4.0) and se == pytest.approx(0.4)


def test_paired_difference_cancels_shared_difficulty():
    """a = (1, 5, 9), b = (0, 4, 8): every difference is 1, so the paired error is 0 although both
    columns spread by 4."""
    assert paired_difference([1.0, 5.0, 9.0], [0.0, 4.0, 8.0]) == (1.0, 0.0)


def test_exact_match_reads_greedy_decoding_from_teacher_forced_logits():
    """Rows predict the target's tokens; greedy decoding emits the target iff every argmax is the target
    token. A tie goes to the lowest id (argmax and greedy alike)."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert exact_match(logits, torch.tensor([1, 0]))
    assert not exact_match(logits, torch.tensor([1, 2]))
    assert exact_match(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="2 logit rows for 1 target"):
        exact_match(logits, torch.tensor([1]))


def test_fisher_overlap_by_hand():
    """F_1 = (4, 1, 1)/9, F_2 = (1, 4, 1)/9 (both sum to 2/3): Σ sqrt(F_1 F_2) = (2 + 2 + 1)/9 = 5/9, over
    sqrt(S_1 S_2) = 2/3: overlap 5/6. Proportional Fishers overlap 1, disjoint ones 0."""
    f1, f2 = torch.tensor([4.0, 1.0, 1.0]) / 9, torch.tensor([1.0, 4.0, 1.0]) / 9
    assert fisher_overlap({"w": f1}, {"w": f2}) == pytest.approx(5 / 6)
    assert fisher_overlap({"w": f1}, {"w": 7 * f1}) == pytest.approx(1.0)
    assert fisher_overlap({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}) == 0.0


def test_fisher_overlap_is_one_minus_the_frechet_distance_and_streams():
    """The streamed C / sqrt(S_1 S_2) equals the paper's 1 - ½ Σ (F̂_1 + F̂_2 - 2 sqrt(F̂_1 F̂_2)) with F̂ = F / ΣF,
    whether the tensors come whole or in chunks."""
    g = torch.Generator().manual_seed(0)
    f1 = {"a": torch.rand(5, 3, generator=g), "b": torch.rand(4, generator=g)}
    f2 = {"a": torch.rand(5, 3, generator=g) ** 3, "b": torch.rand(4, generator=g)}
    flat1, flat2 = (torch.cat([f["a"].flatten(), f["b"]]).double() for f in (f1, f2))
    n1, n2 = flat1 / flat1.sum(), flat2 / flat2.sum()
    frechet = 0.5 * float((n1 + n2 - 2 * (n1 * n2).sqrt()).sum())
    assert fisher_overlap(f1, f2) == pytest.approx(1 - frechet, abs=1e-12)
    acc = FisherOverlap()
    for x, y in zip(flat1.split(4), flat2.split(4), strict=True):
        acc.add(x, y)
    assert acc.value == pytest.approx(1 - frechet, abs=1e-12) and acc.numel == 19


def test_fisher_overlap_refuses_what_is_not_a_fisher():
    acc = FisherOverlap()
    with pytest.raises(ValueError, match="negative"):
        acc.add(torch.tensor([-1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        acc.add(torch.zeros(2), torch.zeros(3))
    acc.add(torch.zeros(2), torch.ones(2))
    assert math.isnan(acc.value)  # no gradient at all: nothing to compare
    with pytest.raises(ValueError, match="different tensors"):
        fisher_overlap({"a": torch.ones(1)}, {"b": torch.ones(1)})

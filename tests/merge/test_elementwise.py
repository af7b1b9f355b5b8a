"""Element-wise rules (TIES, DARE, NegMerge) and the exact streamed top-k: hand examples, edge cases and
references on whole tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from warpkit.merge import get_method
from warpkit.merge.elementwise import TopKByMagnitude, dare, dare_generator, negmerge, ties, trim_top_density

T = torch.tensor


def test_ties_hand_example():
    d = T([[3.0, -1.0, 2.0], [-2.0, -2.0, 1.0]])
    assert torch.equal(ties(d, [1, 1], density=2 / 3), T([3.0, -2.0, 2.0]))
    # density 1: no trim; mass [1, -3, 3] -> [+, -, +]; agreeing means [3, (-1-2)/2, (2+1)/2]
    assert torch.equal(ties(d, [1, 1], density=1.0), T([3.0, -1.5, 1.5]))


def test_ties_edges():
    d = T([[3.0, -1.0, 2.0], [-2.0, -2.0, 1.0]])
    assert torch.equal(ties(d, [1, 1], density=0.0), torch.zeros(3))  # nothing kept: the init
    # density * n = 0.3 < 1 element: one entry per task vector survives, not the whole vector dropped
    kept = trim_top_density(T([[3.0, -1.0, 2.0], [-2.0, -5.0, 1.0]]), 0.1)  # 0.3 of an element: keep 1
    assert torch.equal(kept, T([[3.0, 0.0, 0.0], [0.0, -5.0, 0.0]]))
    assert torch.equal(ties(T([[1.0, 2.0], [-1.0, 5.0]]), [1, 1]), T([0.0, 3.5]))  # sign tie at entry 0: init
    assert torch.equal(ties(torch.zeros(2, 4), [1, 1]), torch.zeros(4))  # all-zero task vectors
    v = T([1.0, -2.0, 0.5])
    assert torch.equal(ties(torch.stack([v, -v]), [1, 1]), torch.zeros(3))  # anti-parallel: every entry ties
    assert torch.equal(ties(torch.stack([v, -v]), [2, 1]), v)  # weights break the tie: v's mass wins
    with pytest.raises(ValueError, match="density"):
        ties(v[None], [1], density=1.5)


def test_ties_sign_tie_is_the_papers_sgn_zero():
    """An exact tie, sum_t tau_t = 0, elects gamma = sgn(0) = 0 (Yadav et al. 2023, eq. for gamma_m): no model
    agrees with it except those that are 0 there, and the disjoint mean ignores zeros, so the entry keeps
    the init. Hand case, unit weights, no trim: entry 0 is +1/-1 (tie: 0); entry 1 agrees (mean 3.5);
    entry 2 is -3/+3 (tie: 0); entry 3 has mass 0.25 > 0 (+ elected, mean of {0.5}: 0.5)."""
    d = T([[1.0, 2.0, -3.0, 0.5], [-1.0, 5.0, 3.0, -0.25]])
    assert torch.equal(ties(d, [1, 1]), T([0.0, 3.5, 0.0, 0.5]))
    # sgn(0) = 0 keeps the rule symmetric: negating every task vector negates the merge
    assert torch.equal(ties(-d, [1, 1]), -ties(d, [1, 1]))
    # the weights enter the mass: w = (1, 2) breaks entries 0 and 2 towards model 2 and makes entry 3 a tie
    # (0.5 - 2 * 0.25 = 0); entry 1 is the weighted mean (2 + 2 * 5) / 3 = 4
    assert torch.equal(ties(d, [1, 2]), T([-1.0, 4.0, 3.0, 0.0]))


def test_ties_tie_rule_differs_from_peft_only_on_ties():
    """peft (`peft.utils.merge_utils.ties`, as mergekit) elects + when the mass is exactly 0
    (`torch.where(sign_magnitude >= 0, 1, -1)`), so a tie takes the mean of the positive entries and the
    merge is not odd in the task vectors. Everywhere else the two agree (unit weights, no trim)."""
    import warnings

    from peft.utils.merge_utils import ties as peft_ties

    d = T([[1.0, 2.0, -3.0, 0.5], [-1.0, 5.0, 3.0, -0.25]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        theirs = peft_ties(list(d), torch.ones(2), density=1.0)
        theirs_negated = peft_ties(list(-d), torch.ones(2), density=1.0)
    ours = ties(d, [1, 1])
    tie = (d.sum(0) == 0) & (d != 0).any(0)
    assert tie.tolist() == [True, False, True, False]
    assert torch.equal(ours[~tie], theirs[~tie])
    assert torch.equal(ours[tie], T([0.0, 0.0]))  # the paper: sgn(0) = 0, the init
    assert torch.equal(theirs[tie], T([1.0, 3.0]))  # peft: + elected, the positive entry
    assert torch.equal(theirs_negated[tie], T([1.0, 3.0]))  # ... and + again for -d: not odd


# ----------------------------------------------------------------------------- DARE


def test_dare_hand_example_and_edges():
    d = T([2.0, 4.0, -6.0, 8.0])
    g = dare_generator(0, "w", 0)
    keep = torch.rand(4, generator=dare_generator(0, "w", 0)) < 0.5
    assert torch.equal(dare(d, 0.5, g), torch.where(keep, 2 * d, 0.0))  # kept entries rescaled by 1/p = 2
    assert torch.equal(dare(d, 1.0, g), d) and torch.equal(dare(d, 0.0, g), torch.zeros(4))
    with pytest.raises(ValueError, match="keep probability"):
        dare(d, -0.1, g)


def test_dare_is_unbiased():
    """E[dare(d)] = d: the mean of 400 independent masks at p = 0.3 is within 5 standard errors of d."""
    d = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    p, draws = 0.3, 400
    mean = torch.stack([dare(d, p, dare_generator(s, "w", 0)) for s in range(draws)]).mean(0)
    stderr = d.abs() * math.sqrt((1 - p) / p / draws)  # std of one draw: |d| sqrt((1-p)/p)
    assert ((mean - d).abs() <= 5 * stderr + 1e-12).all()
    assert (mean - d).abs().max() > 0  # it is random: not the identity


def test_dare_randomness_is_per_seed_name_and_model():
    a = torch.rand(100, generator=dare_generator(7, "model.layers.0.w", 1))
    assert torch.equal(a, torch.rand(100, generator=dare_generator(7, "model.layers.0.w", 1)))
    for other in [(8, "model.layers.0.w", 1), (7, "model.layers.1.w", 1), (7, "model.layers.0.w", 0)]:
        assert not torch.equal(a, torch.rand(100, generator=dare_generator(*other)))


# ----------------------------------------------------------------------------- NegMerge


def test_negmerge_hand_example_and_edges():
    d = T([[1.0, -2.0, 3.0], [3.0, -4.0, -1.0]])
    assert torch.equal(negmerge(d), T([2.0, -3.0, 0.0]))
    assert torch.equal(get_method("negmerge").merge_task_vectors(d, [1, 1], name="x"), T([-2.0, 3.0, 0.0]))
    assert torch.equal(negmerge(T([[0.0, 1.0], [0.0, 1.0]])), T([0.0, 1.0]))  # zero entries: no consensus
    v = T([1.0, -2.0])
    assert torch.equal(negmerge(torch.stack([v, -v])), torch.zeros(2))


def test_ties_blocks_match_a_naive_topk_reference():
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(3, 1000, generator=gen, dtype=torch.float64)
    w = [1.0, 2.0, 0.5]
    k = 300
    trimmed = torch.zeros_like(d)
    for m in range(3):  # naive: topk indices per task vector, then entry by entry
        idx = d[m].abs().topk(k).indices
        trimmed[m, idx] = d[m, idx]
    expected = torch.zeros(1000, dtype=torch.float64)
    for j in range(1000):
        sign = torch.sign(sum(w[m] * trimmed[m, j] for m in range(3)))
        agree = [m for m in range(3) if trimmed[m, j] != 0 and torch.sign(trimmed[m, j]) == sign]
        if agree:
            expected[j] = sum(w[m] * trimmed[m, j] for m in agree) / sum(w[m] for m in agree)
    torch.testing.assert_close(ties(d, w, 0.3, block=7), expected)
    torch.testing.assert_close(ties(d, w, 0.3), expected)


def test_trim_keeps_exactly_k_when_magnitudes_tie():
    d = T([[1.0, -2.0, 2.0, -2.0, 0.5]])  # three entries tie at the threshold magnitude 2
    kept = trim_top_density(d, 0.4)  # k = 2: the first two tied entries, in index order
    assert torch.equal(kept, T([[0.0, -2.0, 2.0, 0.0, 0.0]]))
    bf16 = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    assert int((trim_top_density(bf16, 0.3) != 0).sum()) == round(0.3 * 4096)  # bf16: many ties


# ----------------------------------------------------------------------------- streamed trim


def _select(d: torch.Tensor, k: list[int], bounds: list[int]) -> torch.Tensor:
    """TopKByMagnitude over the column chunks [bounds[i], bounds[i+1]) of d (M, n): its (M, n) mask."""
    selector = TopKByMagnitude(k, d.dtype)
    chunks = list(itertools.pairwise(bounds))
    for _ in range(selector.passes):
        for a, b in chunks:
            selector.observe(d[:, a:b])
        selector.end_pass()
    return torch.cat([selector.keep(d[:, a:b]) for a, b in chunks], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_by_magnitude_is_a_stable_sort_cut(dtype):
    """The radix select keeps exactly the first k entries of a stable sort by decreasing |d|: ties at the
    threshold go in index order, across chunk boundaries, +0/-0 and subnormals included."""
    gen = torch.Generator().manual_seed(0)
    n = 5003
    d = torch.randn(4, n, generator=gen, dtype=torch.float64)
    d[1] = d[1].to(torch.bfloat16).double()  # many exact magnitude ties
    d[2, ::3], d[2, 1::3] = 0.0, -0.0
    d[2, 2::6], d[2, 5::6] = -0.25, 0.25
    d[3, :100] = 1e-310 if dtype == torch.float64 else 1e-40  # subnormal magnitudes
    d = d.to(dtype)
    k = [1, 1500, 1200, n]
    bounds = [0, 1, 17, 2048, 2049, 4000, n]
    mask = _select(d, k, bounds)
    for m in range(4):
        order = torch.sort(d[m].abs(), descending=True, stable=True).indices
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[: k[m]]] = True
        assert torch.equal(mask[m], expected), m
    assert not _select(d, [0, 0, 0, 0], [0, n]).any()
    with pytest.raises(RuntimeError, match="selection passes"):
        TopKByMagnitude([1]).keep(d[:1].float())
    with pytest.raises(ValueError, match="larger than the number"):
        _select(d[:1], [n + 1], [0, n])


def test_topk_by_magnitude_docstring_example():
    tensors = [T([[3.0, -1.0]]), T([[2.0, -5.0, 3.0]])]
    for k, expected in (
        (3, [[True, False], [False, True, True]]),
        (2, [[True, False], [False, True, False]]),
    ):
        selector = TopKByMagnitude([k])
        for _ in range(selector.passes):
            for t in tensors:
                selector.observe(t)
            selector.end_pass()
        assert [selector.keep(t)[0].tolist() for t in tensors] == expected

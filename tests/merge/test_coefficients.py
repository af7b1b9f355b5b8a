"""Coefficient rules from the Gram matrix (linear, task arithmetic, Model Stock, Karcher): hand examples
and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from warpkit.merge.coefficients import (
    karcher_coefficients,
    linear_coefficients,
    model_stock_coefficients,
    slerp_coefficients,
    task_arithmetic_coefficients,
)

T = torch.tensor


def _gram(*vectors):
    d = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vectors])
    return d @ d.T


def test_linear_and_task_arithmetic_coefficients():
    g = _gram([1.0, 0.0], [0.0, 1.0])
    assert linear_coefficients(g, [1, 3]).coefficients == pytest.approx([0.25, 0.75])
    raw = linear_coefficients(g, [1, 1], normalize=False)
    assert raw.coefficients == [1, 1] and raw.init_coefficient == 0.0
    with pytest.raises(ValueError, match="sum to zero"):
        linear_coefficients(g, [1, -1])
    ta = task_arithmetic_coefficients(g, [1, -0.5], scale=2.0)
    assert ta.coefficients == pytest.approx([2.0, -1.0]) and ta.init_coefficient is None


def test_model_stock_hand_example_and_clamp():
    # two unit vectors at 60 degrees: cos 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3, c = t / 2 each
    s = model_stock_coefficients(_gram([1.0, 0.0], [0.5, math.sqrt(3) / 2]))
    assert s.coefficients == pytest.approx([1 / 3, 1 / 3])
    assert model_stock_coefficients(_gram([1.0, 0.0], [-1.0, 0.1])).coefficients == [0.0, 0.0]  # cos < 0
    assert model_stock_coefficients(_gram([1.0, 0.0], [2.0, 0.0])).coefficients == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        model_stock_coefficients(_gram([1.0, 0.0]))


def test_karcher_two_vectors_is_slerp_midpoint():
    g = _gram([2.0, 0.0, 0.0], [2 * math.cos(1.0), 2 * math.sin(1.0), 0.0])
    assert karcher_coefficients(g).coefficients == pytest.approx(slerp_coefficients(g, [0.5]).coefficients)


def test_karcher_mean_satisfies_its_optimality_condition():
    """At the weighted Karcher mean x, sum_m w_m log_x(u_m) = 0 (float64, vectors in R^5)."""
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    w = [0.5, 0.3, 0.2]
    s = karcher_coefficients(d @ d.T, w)
    merged = torch.tensor(s.coefficients, dtype=torch.float64) @ d
    x = merged / merged.norm()
    tangent = torch.zeros(5, dtype=torch.float64)
    for wm, dm in zip(w, d, strict=True):
        u = dm / dm.norm()
        theta = torch.arccos((u @ x).clamp(-1, 1))
        tangent += wm * theta / torch.sin(theta) * (u - torch.cos(theta) * x)
    assert tangent.norm() < 1e-9
    assert merged.norm().item() == pytest.approx(
        sum(wm * dm.norm().item() for wm, dm in zip(w, d, strict=True))
    )


def test_karcher_edges():
    z = karcher_coefficients(_gram([0.0, 0.0], [1.0, 0.0]))  # a zero vector carries no direction
    assert z.coefficients == pytest.approx([0.0, 1.0])
    assert karcher_coefficients(_gram([0.0], [0.0])).coefficients == [0.0, 0.0]
    anti = karcher_coefficients(_gram([1.0, 0.0], [-1.0, 0.0]))  # no unique mean: finite, no NaN
    assert all(math.isfinite(c) for c in anti.coefficients)

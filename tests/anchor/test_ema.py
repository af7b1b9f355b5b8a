"""warpkit.anchor.ema, the pure update rules, against the formulas recomputed here in float64.

anchor <- (1 - mu) * anchor + mu * policy (mu = ema_rate); for LoRA, D <- (1 - mu) D + mu * s * B @ A.
"""

from __future__ import annotations

import pytest
import torch

import warpkit.anchor.ema as ema_module
from warpkit.anchor import fused
from warpkit.anchor.ema import (
    ema_update_,
    lora_delta_,
    lora_ema_update_,
    lora_squared_distance_and_norm,
    squared_distance_and_norm,
)

SHAPES = [
    (1100, 1000),
    (7,),
    (64, 33),
    (3000,),
    (1, 2049),
]  # crosses the 2^20 chunk and the test's bucket edges


def _tensors():
    """Mixed pairs are fp32 state + bf16 policy written to a bf16 `out`; the others are fp32 throughout."""
    gen = torch.Generator().manual_seed(0)
    state = [torch.randn(s, generator=gen) for s in SHAPES]
    policy = [
        torch.randn(s, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
        for i, s in enumerate(SHAPES)
    ]
    out = [torch.empty(s, dtype=torch.bfloat16) if i % 2 else state[i] for i, s in enumerate(SHAPES)]
    return state, policy, out


@pytest.mark.parametrize(
    "index", range(len(SHAPES)), ids=[f"{i}-{'x'.join(map(str, s))}" for i, s in enumerate(SHAPES)]
)
@pytest.mark.parametrize("path", ["cpu-fused", "cpu-chunked", "accelerator-bucketed"])
def test_ema_update_matches_float64(path, index, monkeypatch):
    """Each path vs the formula in float64, per tensor; out must be the state rounded once. cpu-fused is the
    C++ kernel where it builds (else the chunked path again), cpu-chunked the eager fallback."""
    if path == "cpu-chunked":
        monkeypatch.setenv(fused.ENV, "0")
    if path == "accelerator-bucketed":  # the accelerator code path, exercised on CPU with small buckets
        monkeypatch.setattr(ema_module, "_mixed_chunked_", ema_module._mixed_bucketed_)
        monkeypatch.setattr(ema_module, "_BUCKET_NUMEL", 5000)
    state, policy, out = _tensors()
    want = (1 - 0.3) * state[index].double() + 0.3 * policy[index].double()
    ema_module.ema_update_(state, policy, 0.3, out=out)
    assert float((state[index].double() - want).abs().max()) < 1e-6
    assert torch.equal(out[index], state[index].to(out[index].dtype))


@pytest.mark.parametrize(("n_policy", "n_out"), [(2, None), (5, 3)], ids=["policy-shorter", "out-shorter"])
def test_ema_update_refuses_lists_of_different_lengths(n_policy, n_out):
    state, policy, out = _tensors()
    with pytest.raises(ValueError, match="policy"):
        ema_update_(state, policy[:n_policy], 0.3, out=None if n_out is None else out[:n_out])


def test_squared_distance_and_norm_matches_float64():
    """The fp32 sums (accumulated in fp64 per chunk) against float64, to fp32's resolution over 1.1M elements."""
    state, policy, _ = _tensors()
    num = sum(float((a.double() - p.double()).square().sum()) for a, p in zip(state, policy, strict=True))
    den = sum(float(p.double().square().sum()) for p in policy)
    got_num, got_den = squared_distance_and_norm(state, policy)  # fp32 dot products over 2^20-element chunks
    assert got_num == pytest.approx(num, rel=1e-5)
    assert got_den == pytest.approx(den, rel=1e-5)


def test_squared_distance_and_norm_by_hand():
    """anchor (1, 2), policy (4, 6): |a - p|^2 = 3^2 + 4^2 = 25, |p|^2 = 16 + 36 = 52."""
    assert squared_distance_and_norm([torch.tensor([1.0, 2.0])], [torch.tensor([4.0, 6.0])]) == (25.0, 52.0)


def _lora_factors(seed: int, out_features=6, rank=2, in_features=5, scaling=2.0):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(out_features, rank, generator=gen, requires_grad=True)
    a = torch.randn(rank, in_features, generator=gen, requires_grad=True)
    return b, a, scaling


def test_lora_delta_is_scaled_product():
    factors = [_lora_factors(0), _lora_factors(1, out_features=3, in_features=4, scaling=0.5)]
    deltas = [torch.empty(b.shape[0], a.shape[1]) for b, a, _ in factors]
    lora_delta_(deltas, factors)
    for d, (b, a, s) in zip(deltas, factors, strict=True):
        assert float((d.double() - s * b.detach().double() @ a.detach().double()).abs().max()) < 1e-6
        assert not d.requires_grad


def test_lora_ema_update_matches_float64():
    """Two updates of D from D_0 = s B_0 A_0 with mu = 0.3: the EMA of the products, not of the factors."""
    start, first, second = _lora_factors(0), _lora_factors(1), _lora_factors(2)
    d = torch.empty(6, 5)
    lora_delta_([d], [start])
    want = start[2] * start[0].detach().double() @ start[1].detach().double()
    for b, a, s in (first, second):
        lora_ema_update_([d], [(b, a, s)], 0.3)
        want = 0.7 * want + 0.3 * s * b.detach().double() @ a.detach().double()
    assert float((d.double() - want).abs().max()) < 1e-5
    assert not d.requires_grad


def test_lora_squared_distance_and_norm_by_hand():
    """B = (1, 0)^T, A = (2, 0), s = 0.5: delta = [[1, 0], [0, 0]]; D = [[0, 0], [0, 3]]:
    |D - delta|^2 = 1 + 9 = 10, |delta|^2 = 1."""
    factors = [(torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 0.0]]), 0.5)]
    d = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert lora_squared_distance_and_norm([d], factors) == (10.0, 1.0)

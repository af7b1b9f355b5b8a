"""The merge math against an independent float64 reference written here from WARP.md's formulas.

The reference works on whole flattened vectors per group (no Gram matrix, no coefficients), so it
shares no code path with `warpkit.merge` beyond the formula itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from warpkit.merge import (
    group_key,
    lerp,
    liti,
    merge_lambdas,
    slerp,
    slerp_coefficients,
    stats_to_log,
    task_vector,
)

# hand-made "model": two blocks, embeddings, final norm, head, an integer buffer
SHAPES = {
    "model.embed_tokens.weight": (7, 4),
    "model.layers.0.attn.q.weight": (4, 4),
    "model.layers.0.norm.weight": (4,),
    "model.layers.1.attn.q.weight": (4, 4),
    "model.layers.1.mlp.up.bias": (6,),
    "model.norm.weight": (4,),
    "lm_head.weight": (7, 4),
}
BLOCK_GROUPS = {  # derived by hand from the rule "first numeric component, else the module"
    "model.embed_tokens": ["model.embed_tokens.weight"],
    "model.layers.0": ["model.layers.0.attn.q.weight", "model.layers.0.norm.weight"],
    "model.layers.1": ["model.layers.1.attn.q.weight", "model.layers.1.mlp.up.bias"],
    "model.norm": ["model.norm.weight"],
    "lm_head": ["lm_head.weight"],
}


def _state(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {
        n: (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        for n, shape in SHAPES.items()
    }
    s["model.position_ids"] = torch.arange(5) + seed  # integer buffer, differs between models on purpose
    return s


def _groups(granularity: str) -> dict[str, list[str]]:
    floats = list(SHAPES)
    if granularity == "tensor":
        return {n: [n] for n in floats}
    if granularity == "model":
        return {"model": floats}
    return BLOCK_GROUPS


def _ref_slerp2(init, a, b, lam):
    """WARP.md's two-model formula on float64 vectors a, b (task vectors), with its LERP guards."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return (1 - lam) * a + lam * b
    omega = torch.arccos(torch.clamp(a @ b / (na * nb), -1, 1))
    if torch.sin(omega) < 1e-6:
        return (1 - lam) * a + lam * b
    return torch.sin((1 - lam) * omega) / torch.sin(omega) * a + torch.sin(lam * omega) / torch.sin(omega) * b


def _reference(init, models, granularity="block", weights=None):
    """Float64 recursion slerp_k = slerp(init, slerp_{k-1}, theta_k, λ_k) on each group's full vector."""
    weights = weights or [1.0] * len(models)
    out = {}
    for names in _groups(granularity).values():
        flat = lambda s, names=names: torch.cat([s[n].double().flatten() for n in names])  # noqa: E731
        base = flat(init)
        acc, total = flat(models[0]) - base, weights[0]
        for w, m in zip(weights[1:], models[1:], strict=True):
            total += w
            acc = _ref_slerp2(base, acc, flat(m) - base, w / total)
        merged = base + acc
        offset = 0
        for n in names:
            k = init[n].numel()
            out[n] = merged[offset : offset + k].view(init[n].shape)
            offset += k
    return out


@pytest.mark.parametrize("granularity", ["block", "tensor", "model"])
@pytest.mark.parametrize("n_models", [2, 3, 4])
def test_slerp_matches_float64_reference(granularity, n_models):
    init = _state(0)
    models = [{n: t + 0.1 * _state(10 + m)[n] if t.is_floating_point() else t for n, t in init.items()}
              for m in range(n_models)]  # fmt: skip
    merged, stats = slerp(init, models, granularity=granularity, compute_dtype=torch.float64)
    ref = _reference(init, models, granularity)
    for n in SHAPES:
        torch.testing.assert_close(merged[n].double(), ref[n], rtol=1e-6, atol=1e-6)
    assert set(stats) == set(_groups(granularity))
    assert all(len(s.angles_deg) == n_models - 1 for s in stats.values())


def test_slerp_weights_recursion_non_uniform():
    init, models = _state(0), [_state(m) for m in (1, 2, 3)]
    merged, _ = slerp(init, models, [0.5, 0.2, 0.3], compute_dtype=torch.float64)
    ref = _reference(init, models, weights=[0.5, 0.2, 0.3])
    for n in SHAPES:
        torch.testing.assert_close(merged[n].double(), ref[n], rtol=1e-6, atol=1e-6)


def test_uniform_lambdas_are_one_over_k():
    assert merge_lambdas([1.0] * 4) == pytest.approx([1 / 2, 1 / 3, 1 / 4])
    assert merge_lambdas([0.7, 0.3]) == pytest.approx([0.3])  # two models: weights (1 - λ, λ)


def test_group_key_by_hand():
    for name, group in [(n, g) for g, ns in BLOCK_GROUPS.items() for n in ns]:
        assert group_key(name, "block") == group
    assert group_key("transformer.h.11.attn.c_attn.weight", "block") == "transformer.h.11"
    assert group_key("model.layers.2.mlp.experts.7.w1.weight", "block") == "model.layers.2"
    assert group_key("transformer.wte.weight", "block") == "transformer.wte"
    assert group_key("transformer.ln_f.bias", "block") == "transformer.ln_f"
    assert group_key("model.layers.0.attn.q.weight", "tensor") == "model.layers.0.attn.q.weight"
    assert group_key("anything", "model") == "model"
    with pytest.raises(ValueError, match="granularity"):
        group_key("x", "layer")


@pytest.mark.parametrize("lam, which", [(0.0, 0), (1.0, 1)])
def test_endpoints_exact(lam, which):
    init, models = _state(0), [_state(1), _state(2)]
    merged, _ = slerp(init, models, [1 - lam, lam], granularity="block")
    for n, t in merged.items():
        expected = models[which][n] if t.is_floating_point() else init[n]
        assert torch.equal(t, expected), n


def test_norm_preserved_for_equal_norms_and_half_identity():
    """|slerp delta| = |d| when |d1| = |d2|, and at λ = 1/2 the delta is (d1 + d2) / (2 cos(Ω/2))."""
    g = torch.Generator().manual_seed(3)
    init = {"w": torch.randn(300, generator=g, dtype=torch.float64)}
    d1, d2 = (
        torch.randn(300, generator=g, dtype=torch.float64),
        torch.randn(300, generator=g, dtype=torch.float64),
    )
    d1, d2 = 2.5 * d1 / d1.norm(), 2.5 * d2 / d2.norm()
    models = [{"w": init["w"] + d1}, {"w": init["w"] + d2}]
    for lam in (0.1, 0.3, 0.5, 0.9):
        merged, _ = slerp(init, models, [1 - lam, lam], compute_dtype=torch.float64)
        assert (merged["w"] - init["w"]).norm().item() == pytest.approx(2.5, rel=1e-9)
    merged, stats = slerp(init, models, compute_dtype=torch.float64)
    omega = torch.arccos(d1 @ d2 / (d1.norm() * d2.norm()))
    torch.testing.assert_close(merged["w"] - init["w"], (d1 + d2) / (2 * torch.cos(omega / 2)))
    assert stats["w"].angles_deg[0] == pytest.approx(math.degrees(omega.item()), rel=1e-9)
    lerped, _ = lerp(init, models, compute_dtype=torch.float64)  # LERP shrinks it by cos(Ω/2)
    assert (lerped["w"] - init["w"]).norm().item() == pytest.approx(
        2.5 * math.cos(omega.item() / 2), rel=1e-9
    )


def test_stats_match_reference_geometry():
    init, models = _state(0), [_state(1), _state(2)]
    _, stats = slerp(init, models)
    names = BLOCK_GROUPS["model.layers.1"]
    d = [torch.cat([(m[n].double() - init[n].double()).flatten() for n in names]) for m in models]
    s = stats["model.layers.1"]
    assert s.norms == pytest.approx([d[0].norm().item(), d[1].norm().item()], rel=1e-5)
    cos = (d[0] @ d[1] / (d[0].norm() * d[1].norm())).item()
    assert s.cosines[0][1] == pytest.approx(cos, abs=1e-6)
    assert s.angles_deg[0] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-4)
    assert s.numel == 16 + 6 and s.modes == ["slerp"]
    log = stats_to_log(stats)
    assert log["merge/model.layers.1/cos"] == pytest.approx(cos, abs=1e-6)


def test_identical_models_give_the_model():
    init, model = _state(0), _state(1)
    merged, stats = slerp(init, [model, model, model])
    for n in SHAPES:
        torch.testing.assert_close(merged[n], model[n], rtol=0, atol=1e-6)
    assert {m for s in stats.values() for m in s.modes} == {"lerp:parallel"}


def test_zero_task_vector_is_lerp_without_nan():
    init, model = _state(0), _state(1)
    merged, stats = slerp(init, [init, model], [0.6, 0.4])  # d1 = 0
    for n in SHAPES:
        expected = init[n].double() + 0.4 * (model[n].double() - init[n].double())
        torch.testing.assert_close(merged[n].double(), expected, rtol=1e-6, atol=1e-6)
    assert all(s.modes == ["lerp:zero"] for s in stats.values())


def test_anti_parallel_vectors_fall_back_to_lerp():
    init, model = _state(0), _state(1)
    opposite = {n: 2 * t - model[n] if t.is_floating_point() else t for n, t in init.items()}  # d2 = -d1
    merged, stats = slerp(init, [model, opposite], compute_dtype=torch.float64)
    for n in SHAPES:  # (d1 + d2) / 2 = 0: the init, not an explosion of 1 / sin(π)
        torch.testing.assert_close(merged[n], init[n], rtol=0, atol=1e-6)
    assert all(s.modes == ["lerp:parallel"] and s.angles_deg[0] == pytest.approx(180) for s in stats.values())


def test_bf16_inputs_use_fp32_arithmetic_and_one_cast():
    init = _state(0, dtype=torch.bfloat16)
    models = [{n: (t.double() + 0.01 * _state(m)[n]).to(t.dtype) if t.is_floating_point() else t
               for n, t in init.items()} for m in (1, 2)]  # fmt: skip
    merged, _ = slerp(init, models)
    ref = _reference(init, models)
    for n in SHAPES:
        assert merged[n].dtype == torch.bfloat16
        # one rounding of the float64 result: at most one bf16 ulp away, and almost always identical
        ulp = ref[n].abs().clamp_min(1e-30) * 2.0**-7
        assert ((merged[n].double() - ref[n]).abs() <= ulp).all(), n
        assert (merged[n] == ref[n].to(torch.bfloat16)).double().mean() > 0.95, n
    out32, _ = slerp(init, models, dtype=torch.float32)  # an explicit output dtype
    assert out32["lm_head.weight"].dtype == torch.float32


def test_integer_buffers_copied_from_init():
    init, models = _state(0), [_state(1), _state(2)]
    merged, _ = slerp(init, models)
    assert torch.equal(merged["model.position_ids"], init["model.position_ids"])
    assert merged["model.position_ids"].dtype == torch.int64
    lerped, _ = lerp(init, models)
    assert torch.equal(lerped["model.position_ids"], init["model.position_ids"])


def test_lerp_matches_weighted_task_vectors():
    init, models = _state(0), [_state(1), _state(2), _state(3)]
    merged, _ = lerp(init, models, [1.0, 2.0, 1.0], compute_dtype=torch.float64)
    for n in SHAPES:
        d = [m[n].double() - init[n].double() for m in models]
        torch.testing.assert_close(merged[n].double(), init[n].double() + (d[0] + 2 * d[1] + d[2]) / 4)


def test_task_vector():
    init, model = _state(0), _state(1)
    tv = task_vector(init, model)
    assert "model.position_ids" not in tv
    torch.testing.assert_close(tv["lm_head.weight"], model["lm_head.weight"] - init["lm_head.weight"])


def test_slerp_coefficients_hand_derived():
    """Orthogonal unit vectors, λ = 1/2: Ω = 90°, c = sin(45°)/sin(90°) = 1/sqrt(2) each, |merged| = 1."""
    s = slerp_coefficients(torch.eye(2, dtype=torch.float64), [0.5])
    assert s.coefficients == pytest.approx([2**-0.5, 2**-0.5])
    assert s.angles_deg == pytest.approx([90.0]) and s.merged_norm == pytest.approx(1.0)


def test_bad_weights_and_inputs_refused():
    init, models = _state(0), [_state(1), _state(2)]
    with pytest.raises(ValueError, match="extrapolation"):
        slerp(init, models, [1.5, -0.5])
    merged, _ = slerp(init, models, [1.5, -0.5], allow_extrapolation=True)
    assert torch.isfinite(merged["lm_head.weight"]).all()
    with pytest.raises(ValueError, match="sum to zero"):
        slerp(init, models, [0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        slerp(init, models[:1])
    bad = dict(models[1])
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        slerp(init, [models[0], bad])
    with pytest.raises(ValueError, match="shape"):
        slerp(init, [models[0], {**models[1], "lm_head.weight": torch.zeros(3)}])
    with pytest.raises(ValueError, match="different tensors"):
        slerp(init, [models[0], {k: v for k, v in models[1].items() if k != "lm_head.weight"}])


def test_liti_endpoints_and_extrapolation():
    init, merged = _state(0), _state(1)
    at0, at1 = liti(init, merged, 0.0), liti(init, merged, 1.0)
    at03 = liti(init, merged, 0.3)
    for n in SHAPES:
        assert torch.equal(at0[n], init[n]) and torch.equal(at1[n], merged[n])
        torch.testing.assert_close(at03[n].double(), 0.7 * init[n].double() + 0.3 * merged[n].double())
    assert torch.equal(at1["model.position_ids"], init["model.position_ids"])
    with pytest.raises(ValueError, match="allow_extrapolation"):
        liti(init, merged, 1.5)
    with pytest.raises(ValueError, match="outside"):
        liti(init, merged, -0.1)
    ext = liti(init, merged, 1.5, allow_extrapolation=True)
    torch.testing.assert_close(
        ext["lm_head.weight"].double(),
        init["lm_head.weight"].double() + 1.5 * (merged["lm_head.weight"] - init["lm_head.weight"]).double(),
    )

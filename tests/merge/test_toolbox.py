"""The merge toolbox: each method against its hand-derived example and its edge cases, then end to end
through `merge_folders` / `warpkit merge` against the same functions applied to whole state dicts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file

from warpkit.cli import main
from warpkit.merge import get_method, merge_folders
from warpkit.merge.coefficients import (
    karcher_coefficients,
    linear_coefficients,
    model_stock_coefficients,
    slerp_coefficients,
    task_arithmetic_coefficients,
)
from warpkit.merge.elementwise import TopKByMagnitude, dare, dare_generator, negmerge, ties, trim_top_density

T = torch.tensor


def _gram(*vectors):
    d = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vectors])
    return d @ d.T


# ----------------------------------------------------------------------------- TIES


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


# ----------------------------------------------------------------------------- coefficient methods


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


# ----------------------------------------------------------------------------- through the folders


def _state(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture
def trio(tiny_model_factory):
    return [tiny_model_factory("llama", False, seed) for seed in (0, 1, 2)]


@pytest.mark.parametrize(
    ("method", "kwargs", "reference"),
    [
        (
            "task_arithmetic",
            {"weights": [1.0, -0.5], "scale": 0.8},
            lambda i, d, n: i + 0.8 * (d[0] - 0.5 * d[1]),
        ),
        ("linear", {"weights": [1.0, 3.0]}, lambda i, d, n: i + 0.25 * d[0] + 0.75 * d[1]),
        ("linear", {"weights": [1.0, 1.0], "normalize": False}, lambda i, d, n: 2 * i + d[0] + d[1]),
        ("ties", {"density": 0.3}, lambda i, d, n: i + ties(torch.stack(d), [1, 1], 0.3)),
        ("negmerge", {"scale": 2.0}, lambda i, d, n: i - 2.0 * negmerge(torch.stack(d))),
        (
            "dare_ties",
            {"density": 0.5, "seed": 3},
            lambda i, d, n: (
                i
                + get_method("dare_ties").merge_task_vectors(
                    torch.stack(d), [1, 1], density=0.5, seed=3, name=n
                )
            ),
        ),
    ],
)
def test_folder_methods_match_state_dict_reference(trio, tmp_path, method, kwargs, reference):
    init, a, b = trio
    report = merge_folders(method, init, [a, b], tmp_path / "out", progress=False, **kwargs)
    got, base, sa, sb = _state(report.out), _state(init), _state(a), _state(b)
    for n, t in got.items():
        d = [(sa[n] - base[n]).flatten(), (sb[n] - base[n]).flatten()]
        expected = reference(base[n].flatten(), d, n).view(t.shape)
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=f"{method} {n}")
    assert report.recipe["method"] == method


def test_model_stock_and_karcher_folders(trio, tmp_path):
    init, a, b = trio
    base, sa, sb = _state(init), _state(a), _state(b)
    for method, coefficients_of in (
        ("model_stock", model_stock_coefficients),
        ("karcher", karcher_coefficients),
    ):
        report = merge_folders(method, init, [a, b], tmp_path / method, granularity="tensor", progress=False)
        got = _state(report.out)
        for n, t in got.items():
            d = torch.stack([(sa[n] - base[n]).double().flatten(), (sb[n] - base[n]).double().flatten()])
            c = torch.tensor(coefficients_of(d @ d.T).coefficients, dtype=torch.float64)
            torch.testing.assert_close(
                t.double(), base[n].double() + (c @ d).view(t.shape), rtol=1e-5, atol=1e-6
            )


def test_dare_is_reproducible_and_refusals(trio, tmp_path):
    init, a, b = trio
    one = merge_folders("dare_linear", init, [a, b], tmp_path / "1", density=0.4, seed=5, progress=False)
    two = merge_folders(
        "dare_linear", init, [a, b], tmp_path / "2", density=0.4, seed=5, chunk_numel=999, progress=False
    )
    three = merge_folders("dare_linear", init, [a, b], tmp_path / "3", density=0.4, seed=6, progress=False)
    s1, s2, s3 = _state(one.out), _state(two.out), _state(three.out)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not torch.equal(s1["model.layers.0.mlp.up_proj.weight"], s3["model.layers.0.mlp.up_proj.weight"])
    for method, kwargs, message in [
        ("linear", {"weights": [1.0, -1.0]}, "sum to zero"),
        ("ties", {"density": 1.2}, "density"),
        ("slerp", {"scale": 2.0}, "scale applies"),
        ("negmerge", {"weights": [1.0, 1.0]}, "takes no weights"),
        ("karcher", {"weights": [1.0, -1.0]}, ">= 0"),
        ("model_stock", {"density": 0.5}, "density applies"),
    ]:
        with pytest.raises(ValueError, match=message):
            merge_folders(method, init, [a, b], tmp_path / "bad", progress=False, **kwargs)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="at least 2"):
        merge_folders("model_stock", init, [a], tmp_path / "bad", progress=False)


def test_cli_toolbox_negation_of_one_model(trio, tmp_path):
    init, a, _ = trio
    args = ["merge", "--method", "task_arithmetic", "--init", str(init), "--models", str(a)]
    assert (
        main([*args, "--weights", "-1", "--scale", "0.5", "--out", str(tmp_path / "neg"), "--no-progress"])
        == 0
    )
    got, base, sa = _state(tmp_path / "neg"), _state(init), _state(a)
    n = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(got[n], base[n] - 0.5 * (sa[n] - base[n]))


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


def _flat_task_vectors(init, models, names):
    base = _state(init)
    states = [_state(m) for m in models]
    return torch.stack([torch.cat([(s[n] - base[n]).double().flatten() for n in names]) for s in states])


def test_ties_whole_model_trim_matches_a_flattened_reference(trio, tmp_path):
    """trim_scope="model": each task vector keeps its top density fraction of the whole model (the TIES
    paper's trim), against topk over the concatenation of every tensor, computed in float64."""
    init, a, b = trio
    base = _state(init)
    names = [n for n in base if base[n].dtype.is_floating_point]
    sizes = [base[n].numel() for n in names]
    d = _flat_task_vectors(init, [a, b], names)
    density, w = 0.2, [1.0, 2.0]
    k = round(density * d.shape[1])
    trimmed = torch.zeros_like(d)
    for m in range(2):
        idx = d[m].abs().topk(k).indices
        trimmed[m, idx] = d[m, idx]
    expected = dict(zip(names, ties(trimmed, w, 1.0).split(sizes), strict=True))
    runs = {
        "default": {},
        "small chunks, no cache": {"chunk_numel": 2048, "cache_size": 0},
    }
    for label, kwargs in runs.items():
        out = tmp_path / label.replace(" ", "_").replace(",", "")
        report = merge_folders(
            "ties", init, [a, b], out, w, density=density, trim_scope="model", progress=False, **kwargs
        )
        got = _state(report.out)
        for n in names:
            torch.testing.assert_close(
                got[n].double(), base[n].double() + expected[n].view(base[n].shape), rtol=1e-6, atol=1e-7
            )
        assert report.recipe["trim_scope"] == "model"
    # The scope matters: per-tensor trims keep density of every tensor, the model-wide one does not.
    per_tensor = _state(
        merge_folders("ties", init, [a, b], tmp_path / "pt", w, density=density, progress=False).out
    )
    assert any(not torch.equal(per_tensor[n], got[n]) for n in names)
    kept = [int((trimmed[0].split(sizes)[i] != 0).sum()) for i in range(len(names))]
    assert len({round(c / s, 2) for c, s in zip(kept, sizes, strict=True)}) > 1


def test_ties_whole_model_trim_edges(trio, tmp_path):
    init, a, b = trio
    base = _state(init)
    names = [n for n in base if base[n].dtype.is_floating_point]
    numel = sum(base[n].numel() for n in names)
    # density 0: nothing kept anywhere, the init comes back
    zero = _state(
        merge_folders(
            "ties", init, [a, b], tmp_path / "z", density=0.0, trim_scope="model", progress=False
        ).out
    )
    assert all(torch.equal(zero[n], base[n]) for n in names)
    # density * size below one element: one entry per task vector survives, model-wide
    tiny = merge_folders(
        "ties", init, [a], tmp_path / "t", density=0.5 / numel, trim_scope="model", progress=False
    )
    changed = sum(int((_state(tiny.out)[n] != base[n]).sum()) for n in names)
    assert changed == 1
    d = _flat_task_vectors(init, [a], names)[0]
    sizes = [base[n].numel() for n in names]
    where = int(d.abs().argmax())
    name = names[next(i for i, c in enumerate(torch.tensor(sizes).cumsum(0).tolist()) if where < c)]
    assert not torch.equal(_state(tiny.out)[name], base[name])  # ... the largest entry of the model
    with pytest.raises(ValueError, match="trim_scope applies to ties only"):
        merge_folders(
            "dare_ties", init, [a, b], tmp_path / "bad", density=0.5, trim_scope="model", progress=False
        )
    with pytest.raises(ValueError, match="trim_scope='layer'"):
        merge_folders("ties", init, [a, b], tmp_path / "bad", density=0.5, trim_scope="layer", progress=False)
    assert not (tmp_path / "bad").exists()


def test_elementwise_methods_do_not_depend_on_the_chunk_size(trio, tmp_path):
    """Element-wise methods stream row chunks: chunk size changes nothing, bit for bit (DARE's masks
    included, drawn per (seed, tensor, model) in row order)."""
    init, a, b = trio
    for method, kwargs in [
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "trim_scope": "model"}),
        ("dare_ties", {"density": 0.6, "seed": 1}),
        ("negmerge", {}),
    ]:
        tag = method + kwargs.get("trim_scope", "")
        one = _state(merge_folders(method, init, [a, b], tmp_path / f"{tag}1", progress=False, **kwargs).out)
        two = merge_folders(
            method,
            init,
            [a, b],
            tmp_path / f"{tag}2",
            chunk_numel=2048,
            cache_size=0,
            progress=False,
            **kwargs,
        )
        assert all(torch.equal(one[n], t) for n, t in _state(two.out).items()), method


def test_cli_ties_trim_scope(trio, tmp_path):
    init, a, b = trio
    args = ["merge", "--method", "ties", "--init", str(init), "--models", str(a), str(b), "--density", "0.2"]
    assert main([*args, "--trim-scope", "model", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    want = merge_folders(
        "ties", init, [a, b], tmp_path / "py", density=0.2, trim_scope="model", progress=False
    )
    got, ref = _state(tmp_path / "m"), _state(want.out)
    assert all(torch.equal(got[n], ref[n]) for n in got)
    with pytest.raises(SystemExit, match="--trim-scope only apply to --method ties, not negmerge"):
        main(["merge", "--method", "negmerge", "--init", str(init), "--models", str(a), str(b),
              "--trim-scope", "model", "--out", str(tmp_path / "x"), "--no-progress"])  # fmt: skip

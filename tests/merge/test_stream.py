"""The merge toolbox through the streaming engine (`merge_folders` / `warpkit merge`): every method against
the same rule applied to whole state dicts, chunk-size invariance, the model-wide TIES trim."""

from __future__ import annotations

import pytest
import torch

from warpkit.cli import main
from warpkit.merge import get_method, merge_folders
from warpkit.merge.coefficients import (
    karcher_coefficients,
    model_stock_coefficients,
)
from warpkit.merge.elementwise import negmerge, ties
from warpkit.testing import load_state

T = torch.tensor


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
    got, base, sa, sb = load_state(report.out), load_state(init), load_state(a), load_state(b)
    for n, t in got.items():
        d = [(sa[n] - base[n]).flatten(), (sb[n] - base[n]).flatten()]
        expected = reference(base[n].flatten(), d, n).view(t.shape)
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=f"{method} {n}")
    assert report.recipe["method"] == method


def test_model_stock_and_karcher_folders(trio, tmp_path):
    init, a, b = trio
    base, sa, sb = load_state(init), load_state(a), load_state(b)
    for method, coefficients_of in (
        ("model_stock", model_stock_coefficients),
        ("karcher", karcher_coefficients),
    ):
        report = merge_folders(method, init, [a, b], tmp_path / method, granularity="tensor", progress=False)
        got = load_state(report.out)
        for n, t in got.items():
            d = torch.stack([(sa[n] - base[n]).double().flatten(), (sb[n] - base[n]).double().flatten()])
            c = torch.tensor(coefficients_of(d @ d.T).coefficients, dtype=torch.float64)
            torch.testing.assert_close(
                t.double(), base[n].double() + (c @ d).view(t.shape), rtol=1e-5, atol=1e-6
            )


def test_dare_is_reproducible(trio, tmp_path):
    init, a, b = trio
    one = merge_folders("dare_linear", init, [a, b], tmp_path / "1", density=0.4, seed=5, progress=False)
    two = merge_folders(
        "dare_linear", init, [a, b], tmp_path / "2", density=0.4, seed=5, chunk_numel=999, progress=False
    )
    three = merge_folders("dare_linear", init, [a, b], tmp_path / "3", density=0.4, seed=6, progress=False)
    s1, s2, s3 = load_state(one.out), load_state(two.out), load_state(three.out)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not torch.equal(s1["model.layers.0.mlp.up_proj.weight"], s3["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("linear", {"weights": [1.0, -1.0]}, "sum to zero"),
        ("ties", {"density": 1.2}, "density"),
        ("slerp", {"scale": 2.0}, "scale applies"),
        ("negmerge", {"weights": [1.0, 1.0]}, "takes no weights"),
        ("karcher", {"weights": [1.0, -1.0]}, ">= 0"),
        ("model_stock", {"density": 0.5}, "density applies"),
    ],
)
def test_bad_settings_are_refused_before_writing(trio, tmp_path, method, kwargs, message):
    init, a, b = trio
    with pytest.raises(ValueError, match=message):
        merge_folders(method, init, [a, b], tmp_path / "bad", progress=False, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_model_stock_needs_two_models(trio, tmp_path):
    init, a, _ = trio
    with pytest.raises(ValueError, match="at least 2"):
        merge_folders("model_stock", init, [a], tmp_path / "bad", progress=False)


def test_cli_toolbox_negation_of_one_model(trio, tmp_path):
    init, a, _ = trio
    args = ["merge", "--method", "task_arithmetic", "--init", str(init), "--models", str(a)]
    assert (
        main([*args, "--weights", "-1", "--scale", "0.5", "--out", str(tmp_path / "neg"), "--no-progress"])
        == 0
    )
    got, base, sa = load_state(tmp_path / "neg"), load_state(init), load_state(a)
    n = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(got[n], base[n] - 0.5 * (sa[n] - base[n]))


def _flat_task_vectors(init, models, names):
    base = load_state(init)
    states = [load_state(m) for m in models]
    return torch.stack([torch.cat([(s[n] - base[n]).double().flatten() for n in names]) for s in states])


def test_ties_whole_model_trim_matches_a_flattened_reference(trio, tmp_path):
    """trim_scope="model": each task vector keeps its top density fraction of the whole model (the TIES
    paper's trim), against topk over the concatenation of every tensor, computed in float64."""
    init, a, b = trio
    base = load_state(init)
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
        got = load_state(report.out)
        for n in names:
            torch.testing.assert_close(
                got[n].double(), base[n].double() + expected[n].view(base[n].shape), rtol=1e-6, atol=1e-7
            )
        assert report.recipe["trim_scope"] == "model"
    # The scope matters: per-tensor trims keep density of every tensor, the model-wide one does not.
    per_tensor = load_state(
        merge_folders("ties", init, [a, b], tmp_path / "pt", w, density=density, progress=False).out
    )
    assert any(not torch.equal(per_tensor[n], got[n]) for n in names)
    kept = [int((trimmed[0].split(sizes)[i] != 0).sum()) for i in range(len(names))]
    assert len({round(c / s, 2) for c, s in zip(kept, sizes, strict=True)}) > 1


def test_ties_whole_model_trim_edges(trio, tmp_path):
    init, a, b = trio
    base = load_state(init)
    names = [n for n in base if base[n].dtype.is_floating_point]
    numel = sum(base[n].numel() for n in names)
    # density 0 would keep nothing anywhere and silently return the init: refused, saying why and the fix
    with pytest.raises(ValueError, match=r"density=0\.0 is outside \(0, 1\].*keep nothing.*e\.g\. 0\.2"):
        merge_folders("ties", init, [a, b], tmp_path / "z", density=0.0, trim_scope="model", progress=False)
    assert not (tmp_path / "z").exists()
    # density * size below one element: one entry per task vector survives, model-wide
    tiny = merge_folders(
        "ties", init, [a], tmp_path / "t", density=0.5 / numel, trim_scope="model", progress=False
    )
    changed = sum(int((load_state(tiny.out)[n] != base[n]).sum()) for n in names)
    assert changed == 1
    d = _flat_task_vectors(init, [a], names)[0]
    sizes = [base[n].numel() for n in names]
    where = int(d.abs().argmax())
    name = names[next(i for i, c in enumerate(torch.tensor(sizes).cumsum(0).tolist()) if where < c)]
    assert not torch.equal(load_state(tiny.out)[name], base[name])  # ... the largest entry of the model
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
        one = load_state(
            merge_folders(method, init, [a, b], tmp_path / f"{tag}1", progress=False, **kwargs).out
        )
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
        assert all(torch.equal(one[n], t) for n, t in load_state(two.out).items()), method


def test_cli_ties_trim_scope(trio, tmp_path):
    init, a, b = trio
    args = ["merge", "--method", "ties", "--init", str(init), "--models", str(a), str(b), "--density", "0.2"]
    assert main([*args, "--trim-scope", "model", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    want = merge_folders(
        "ties", init, [a, b], tmp_path / "py", density=0.2, trim_scope="model", progress=False
    )
    got, ref = load_state(tmp_path / "m"), load_state(want.out)
    assert all(torch.equal(got[n], ref[n]) for n in got)
    with pytest.raises(SystemExit, match="--trim-scope only apply to --method ties, not negmerge"):
        main(["merge", "--method", "negmerge", "--init", str(init), "--models", str(a), str(b),
              "--trim-scope", "model", "--out", str(tmp_path / "x"), "--no-progress"])  # fmt: skip

"""The method registry is the one place methods are declared: the CLI, recipes, the driver, the README and the
error messages all follow it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from warpkit.cli import MERGE_KEYS, build_parser
from warpkit.loop.config import ENGINE_MERGE_KWARGS, WarpConfig
from warpkit.merge import METHODS, get_method, merge_folders
from warpkit.merge.methods import ENGINE_OPTIONS, INIT_OPTIONS, Param, all_params, methods_table

REPO = Path(__file__).resolve().parents[2]


def test_engine_options_are_merge_folders_keywords():
    signature = inspect.signature(merge_folders).parameters
    for option in ENGINE_OPTIONS:
        assert option.name in signature, option.name
        if option.default is not None and option.name != "compute_dtype":
            assert signature[option.name].default == option.default, option.name
    assert set(ENGINE_MERGE_KWARGS) <= {o.name for o in ENGINE_OPTIONS}


def test_cli_flags_and_yaml_keys_come_from_the_registry():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    dests = {a.dest for a in merge._actions} - {"help", "config", "no_hash", "no_progress", "run"}
    expected = {"method", "init", "models", "out"} | {p.name for p in (*ENGINE_OPTIONS, *all_params())}
    assert dests == expected
    assert set(MERGE_KEYS) == expected
    method_flag = next(a for a in merge._actions if a.dest == "method")
    assert list(method_flag.choices) == list(METHODS)


def test_readme_methods_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if re.match(r"\| `[a-z_]+` \|", line)]
    method_rows = [r for r in rows if r.split("`")[1] in METHODS]
    assert method_rows == methods_table()


def test_every_method_has_exactly_one_implementation_kind():
    for m in METHODS.values():
        kinds = [m.coefficients is not None, m.combine is not None, m.runner is not None]
        assert sum(kinds) == 1, m.name
        assert (m.runner is not None) == (m.init == "none"), m.name
        assert not (m.trims or m.random) or m.combine is not None, m.name
        if m.random:
            assert "seed" in m.param_names, m.name


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("slerp", {"scale": 2.0}, r"^scale applies to task_arithmetic, ties, dare_linear, dare_ties, negmerge, not slerp\.$"),
        ("dare_ties", {"trim_scope": "model"}, r"^trim_scope applies to ties only, not dare_ties\.$"),
        ("ties", {"denisty": 0.5}, r"^unknown setting\(s\) denisty; ties takes density, scale, trim_scope\.$"),
        ("ties", {"density": 1.5}, r"^density=1\.5 is outside \(0, 1\]"),
        ("ties", {"density": 0}, r"^density=0\.0 is outside \(0, 1\] \(ties: fraction of entries kept; dare: keep "
         r"probability\); density 0 would keep nothing and return the init unchanged; pass a value in \(0, 1\]"),
        ("dare_linear", {"density": 0.0}, r"^density=0\.0 is outside \(0, 1\]"),
        ("ties", {"density": True}, r"^density=True must be a number\.$"),
        ("ties", {"trim_scope": "layer"}, r"^trim_scope='layer' must be one of \['tensor', 'model'\]\.$"),
        ("dare_linear", {"seed": 1.5}, r"^seed=1\.5 must be an integer\.$"),
        ("task_arithmetic", {"scale": float("inf")}, r"^scale=inf must be finite\.$"),
        ("linear", {"normalize": "yes"}, r"^normalize='yes' must be true or false\.$"),
    ],
)  # fmt: skip
def test_settings_are_checked_by_the_registry(method, settings, message):
    with pytest.raises(ValueError, match=message):
        get_method(method).resolve(settings)


def test_resolve_fills_defaults_and_converts():
    assert get_method("ties").resolve({"density": 1}) == {
        "density": 1.0,
        "scale": 1.0,
        "trim_scope": "tensor",
    }
    assert get_method("dare_ties").resolve({"seed": 3.0}) == {"density": 1.0, "seed": 3, "scale": 1.0}
    assert get_method("slerp").resolve({}) == {}


def test_cli_spelling_of_the_same_rules():
    with pytest.raises(
        ValueError, match=r"^--scores only apply to --method greedy_soup, not slerp; drop them"
    ):
        get_method("slerp").resolve({"scores": [1.0]}, cli=True)
    with pytest.raises(
        ValueError, match=r"greedy_soup takes no --weights \(got \[1\.0, 2\.0\]\): it averages"
    ):
        get_method("greedy_soup").check_inputs(2, [1.0, 2.0], {"scorer": "m:f"}, cli=True)
    with pytest.raises(
        ValueError, match=r"^negmerge takes no weights \(got \[1\.0, 1\.0\]\); drop weights\.$"
    ):
        get_method("negmerge").check_inputs(2, [1.0, 1.0], {})


def test_check_inputs_weights_and_lambdas():
    slerp = get_method("slerp")
    assert slerp.check_inputs(3, None, {}) == {"weights": [1.0, 1.0, 1.0], "lambdas": [0.5, 1 / 3]}
    assert slerp.check_inputs(2, [1, 3], {}) == {"weights": [1.0, 3.0], "lambdas": [0.75]}
    assert get_method("ties").check_inputs(2, [2, -1], {}) == {"weights": [2.0, -1.0]}
    with pytest.raises(ValueError, match="model_stock needs at least 2 models, got 1"):
        get_method("model_stock").check_inputs(1, None, {})
    with pytest.raises(ValueError, match="got 3 weights for 2 models"):
        slerp.check_inputs(2, [1, 1, 1], {})
    with pytest.raises(ValueError, match=r"weights must be finite, got \[1\.0, nan\]"):
        get_method("lerp").check_inputs(2, [1, float("nan")], {})


def test_param_check_bounds_are_inclusive():
    p = Param("x", float, 0.0, "a fraction", 0.0, 1.0)
    assert (p.check(0, "x"), p.check(1, "x")) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"x=-0\.1 is outside \[0, 1\] \(a fraction\)"):
        p.check(-0.1, "x")


def test_init_options_are_refused_for_methods_without_an_init(tmp_path):
    """Soups average models themselves: merge_folders refuses them and the CLI refuses init options."""
    with pytest.raises(ValueError, match="soup averages models without an init"):
        merge_folders("soup", tmp_path, [tmp_path, tmp_path], tmp_path / "o")
    assert {p.name for p in INIT_OPTIONS} == {"granularity", "liti_eta", "lora_base_ok"}


def test_driver_merge_kwargs_follow_the_registry():
    cfg = WarpConfig(
        model_name_or_path="m", merge_method="dare_ties", merge_kwargs={"density": 0.3, "seed": 2}
    )
    assert cfg.merge_settings()["density"] == 0.3
    with pytest.raises(
        ValueError, match=r"merge_kwargs / merge_weights for merge_method='slerp': density applies"
    ):
        WarpConfig(model_name_or_path="m", merge_kwargs={"density": 0.5})
    with pytest.raises(ValueError, match=r"merge_method='soup' averages models without an init"):
        WarpConfig(model_name_or_path="m", merge_method="soup")
    with pytest.raises(ValueError, match=r"model_stock takes no weights"):
        WarpConfig(model_name_or_path="m", merge_method="model_stock", merge_weights=[1.0, 2.0])


def test_merge_task_vectors_in_memory_matches_the_chunk_rule():
    d = torch.tensor([[3.0, -1.0, 2.0], [-2.0, -2.0, 1.0]])
    # The TIES hand example of warpkit.merge.elementwise.ties: density 2/3 keeps 2 of 3 per row.
    got = get_method("ties").merge_task_vectors(d, density=2 / 3)
    assert torch.equal(got, torch.tensor([3.0, -2.0, 2.0]))
    with pytest.raises(ValueError, match="slerp is not an element-wise method"):
        get_method("slerp").merge_task_vectors(d)


@pytest.mark.parametrize("method", [m.name for m in METHODS.values() if "density" in m.param_names])
def test_density_zero_is_refused_wherever_density_is_taken(method, tmp_path):
    """density 0 keeps nothing (TIES) or drops everything (DARE): the merge would silently be the init."""
    why = r"density=0\.0 is outside \(0, 1\] \(ties: fraction of entries kept; dare: keep probability\)"
    with pytest.raises(ValueError, match=rf"^{why}; density 0 would keep nothing .* e\.g\. 0\.2"):
        get_method(method).resolve({"density": 0})
    with pytest.raises(ValueError, match=rf"^--{why}"):
        get_method(method).resolve({"density": 0.0}, cli=True)
    with pytest.raises(ValueError, match=why):
        get_method(method).merge_task_vectors(torch.ones(2, 3), density=0.0)
    with pytest.raises(ValueError, match=rf"merge_method='{method}': {why}"):
        WarpConfig(model_name_or_path="m", merge_method=method, merge_kwargs={"density": 0.0})
    with pytest.raises(ValueError, match=why):  # before the (missing) inputs are looked at
        merge_folders(method, tmp_path / "no-init", [tmp_path / "no-model"], tmp_path / "out", density=0.0)
    assert get_method(method).resolve({"density": 1e-9})["density"] == 1e-9  # any positive density is allowed


def test_soup_weights_are_convex_unless_extrapolating():
    for name in ("soup", "warm"):
        method = get_method(name)
        assert method.check_inputs(2, [1, 3], {}) == {"weights": [1.0, 3.0]}
        assert method.check_inputs(2, [2, -1], {}, allow_extrapolation=True) == {"weights": [2.0, -1.0]}
        with pytest.raises(ValueError, match=rf"^{name} weights \[2\.0, -1\.0\] include negative values"):
            method.check_inputs(2, [2, -1], {})
    with pytest.raises(ValueError, match=r"greedy_soup takes no weights and no init, so allow_extrapolation"):
        get_method("greedy_soup").check_inputs(2, None, {"scorer": "m:f"}, allow_extrapolation=True)
    # methods with an init keep their own rules: lerp refuses negatives, task arithmetic negates with them
    with pytest.raises(ValueError, match="allow_extrapolation"):
        get_method("lerp").check_inputs(2, [2, -1], {})
    assert get_method("task_arithmetic").check_inputs(1, [-1], {}) == {"weights": [-1.0]}
